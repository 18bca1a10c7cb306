import nbformat as nbf
nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
md("""# 01 · The sequential baseline

The NumPy backend is the reference every other backend and strategy is checked against, and the
one-worker baseline that parallel speedups start from. This notebook shows that it computes the
same numbers as PyTorch, then trains the seed CNN on Fashion-MNIST.

`scale = "quick"` is a smoke run on `digits` (written under `build/quick`); `measure = False`
redraws from the saved results without training."""),
code('scale = "standard"\nmeasure = True', metadata={"tags": ["parameters"]}),
code("""from IPython.display import Markdown, display

from study.experiments import baseline as B
from study.figures import baseline as F
from study.figures import style

style.apply_style()"""),
md("## The data\n\nFashion-MNIST from Debian's `dataset-fashion-mnist` (checked against pinned SHA-256), and scikit-learn's `digits`, the embedded default."),
code("""table, shown = B.data_overview(scale)
for name, (x, y, classes) in shown.items():
    style.save_figure(F.sample_grid(x, y, classes, title=f"{name}: first training images per class"),
                      f"baseline_samples_{name.replace('-', '_')}", scale)
table"""),
md("## Is the reference right? The PyTorch twin\n\nThe same weights loaded into `torch.nn.Sequential` through `state_dict`: logits, loss and every gradient compared with `study.checks.compare` (max |ours − torch| / max |torch|)."),
code("""frames = B.run(scale, parts=["twin"]) if measure else B.load(scale)
twin = frames["twin_check"]
fig = F.twin_errors(twin)
style.save_figure(fig, "baseline_twin", scale)
B.twin_table(twin).style.format("{:.1e}")"""),
md("## Training the seed CNN\n\n`python -m cnn.train` in a fresh process (start-up measured apart), SGD with momentum 0.9, weight decay 5e-4, cosine schedule, batch 64."),
code("""frames = B.run(scale, parts=["train"]) if measure else B.load(scale)
curves = next(df for name, df in frames.items() if name.startswith("baseline_"))
fig = F.training_curves(curves, title=f"seed CNN on {curves['dataset'].iloc[0]}, sequential NumPy")
style.save_figure(fig, "baseline_curves", scale)
curves[["epoch", "train_loss", "test_loss", "test_acc", "samples_per_s", "wall_s", "startup_s"]].round(4)"""),
md("## Where it errs"),
code("""dataset = curves["dataset"].iloc[0]
cm, classes, acc = B.evaluate_saved(dataset, scale)
fig = F.confusion_matrix(cm, classes, title=f"{dataset} test split, saved baseline weights")
style.save_figure(fig, "baseline_confusion", scale)
display(Markdown(f"Test accuracy of the saved weights: **{acc:.2%}** on {int(cm.sum())} images."))"""),
md("## Reading\n\nThe headline numbers, with their provenance, as the README and the report print them:"),
code("""for h in B.headlines(B.load(scale)):
    print(f"- {h.label}: {h.text()}" + (f"  [flagged: {h.anomaly}]" if h.anomaly else ""))"""),
]
nb.cells = cells
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "/work/main/notebooks/01_sequential_baseline.ipynb")
