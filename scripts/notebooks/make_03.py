import nbformat as nbf
nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# 03 · The Numba CUDA backend

Weights, gradients and optimiser state stay on the device; convolution is an implicit GEMM in
shared memory, dense layers a tiled GEMM, and weight-gradient partials are reduced in a fixed
order (no atomics), so a step is deterministic. Here it is checked against the NumPy reference
in Numba's CUDA simulator; its speed needs a real GPU (`scripts/gpu_check.sh`, README "GPU")."""),
code('scale = "standard"\nmeasure = True', metadata={"tags": ["parameters"]}),
code("""from IPython.display import Markdown, display

from study.experiments import gpu as G
from study.figures import gpu as F
from study.figures import style

style.apply_style()
print("CUDA here:", G.gpu_status())"""),
md("## Correct: the CUDA backend against NumPy, in the simulator\n\nA small seed CNN with sizes that fill no block, so every bounds check runs; float32 and float64."),
code("""frames = G.run(scale, parts=["simulator"]) if measure else G.load(scale)
check = frames["gpu_simulator_check"]
style.save_figure(F.simulator_check(check), "gpu_simulator_check", scale)
assert check["check_ok"].all(), check[~check["check_ok"]]
G.check_table(check).style.format("{:.1e}")"""),
md("## Fast: CUDA against NumPy and torch+cuDNN on a GPU"),
code("""frames = G.run(scale, parts=["bench"]) if measure else G.load(scale)
frames = {**G.load(scale), **frames}
for h in G.headlines(frames):
    display(Markdown(f"- **{h.label}**: {h.text()}" + (f" — {h.note}" if h.note else "")))
if "bench_gpu" in frames:
    style.save_figure(F.throughput(frames["bench_gpu"]), "gpu_throughput", scale)"""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "/work/main/notebooks/03_numba_cuda.ipynb")
