"""The Numba CUDA backend (notebook 03): right in the simulator here, fast on a real GPU.

    python -m study.experiments.gpu --scale standard          # simulator check (+ GPU bench)
    python -m study.experiments.gpu --parts simulator

Parts:

- ``simulator``: the CUDA backend against the NumPy reference in Numba's CUDA simulator
  (a fresh process with ``NUMBA_ENABLE_CUDASIM=1``): logits, loss, every gradient, one
  SGD step and the fused conv+ReLU kernel, at odd sizes that fill no block, float32 and
  float64 (``results/gpu_simulator_check.pkl``). It checks correctness, not speed.
- ``bench``: where a CUDA GPU is present, ``benchmarks/bench_gpu.py`` (CUDA vs NumPy vs
  torch+cuDNN, TF32 off for the headline) writes ``results/bench_gpu.pkl``. Without a GPU
  the part says so and the headlines say "not measured" with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from study import analysis, paths, schema
from study.checks import compare
from study.config import DEFAULT_SCALE
from study.experiments import cli, load_saved
from study.measure import RunFailed, new_session, tail

PARTS = ("simulator", "bench")
SIMULATOR = "gpu_simulator_check"
BENCH = "bench_gpu"
RESULTS = (SIMULATOR, BENCH)


def backend_check(backend: str = "cuda", batch: int = 3, input_shape: Sequence[int] = (3, 5, 7),
                  filters: Sequence[int] = (4, 5), hidden: int = 6, num_classes: int = 3,
                  dtypes: Sequence[str] = ("float32", "float64"), seed: int = 0
                  ) -> list[dict[str, Any]]:
    """``backend`` against the NumPy reference: one row per (dtype, quantity).

    A small seed CNN whose sizes fill no block (so every bounds check runs) is built on
    both backends with the same weights; logits, loss, every gradient, one SGD-momentum
    step, the fused conv+ReLU kernel where the backend has it, and whether a second
    ``loss_and_grad`` is bitwise identical (fixed-order reductions).
    """
    from cnn import models
    from cnn.backends import contract
    from cnn.optim import SGD

    kw = dict(input_shape=tuple(input_shape), num_classes=num_classes, padding=1,
              filters=tuple(filters), hidden=hidden, seed=seed)
    rows = []
    for dtype in dtypes:
        ref = models.seed_cnn(backend="numpy", dtype=dtype, **kw)
        net = models.seed_cnn(backend=backend, dtype=dtype, **kw)
        rng = np.random.default_rng(seed + 7)
        x = rng.standard_normal((batch, *input_shape)).astype(dtype)
        y = rng.integers(0, num_classes, size=batch)

        device = net.backend.device_name()

        def add(quantity: str, got: Any, want: Any, dtype: str = dtype,
                device: str = device) -> None:
            c = compare(got, want, quantity)
            rows.append(dict(dtype=dtype, quantity=quantity, rel_err=c.rel_err,
                             tolerance=c.tol, check_ok=c.ok, device=device))

        add("logits", net.forward(x), ref.forward(x))
        loss_ref, loss = ref.loss_and_grad(x, y), net.loss_and_grad(x, y)
        add("loss", loss, loss_ref)
        g = net.backend.to_host(net.grads)
        for s in ref.slots:
            add(f"grad {s.name}", g[s.offset:s.offset + s.size],
                ref.grads[s.offset:s.offset + s.size])
        again = net.loss_and_grad(x, y)
        same = bool(again == loss and np.array_equal(net.backend.to_host(net.grads), g))
        rows.append(dict(dtype=dtype, quantity="second loss_and_grad bitwise identical",
                         rel_err=0.0 if same else float("inf"), tolerance=0.0, check_ok=same,
                         device=device))
        for o in (SGD(ref, lr=0.05, momentum=0.9), SGD(net, lr=0.05, momentum=0.9)):
            o.step()
        add("params after 1 SGD step", net.backend.to_host(net.params), ref.params)
        R, C = ref.backend, net.backend
        if contract.supports(C, "conv2d_relu_forward"):
            w = rng.standard_normal((filters[0], input_shape[0], 3, 3)).astype(dtype)
            b = rng.standard_normal(filters[0]).astype(dtype)
            want, _ = R.relu_forward(R.conv2d_forward(x, w, b, 1, 1)[0])
            got, _ = C.conv2d_relu_forward(C.from_host(x), C.from_host(w), C.from_host(b), 1, 1)
            add("fused conv+bias+ReLU kernel", C.to_host(got), want)
    return rows


def simulator_rows(timeout: float = 900) -> list[dict[str, Any]]:
    """`backend_check` of the CUDA backend in a fresh process under the CUDA simulator."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    cmd = [sys.executable, "-m", "study.experiments.gpu", "--simulator-json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=paths.project_root())
    line = next((s for s in proc.stdout.splitlines() if s.startswith("JSON")), None)
    if proc.returncode != 0 or line is None:
        raise RunFailed(f"the CUDA simulator check failed (exit {proc.returncode}):\n"
                        f"{tail(proc.stdout + proc.stderr)}")
    return json.loads(line[4:])


def run_simulator(scale: str, session: str) -> pd.DataFrame:
    from cnn.metrics import make_row

    raw = [make_row(experiment=SIMULATOR, strategy="cuda-vs-numpy", backend="cuda",
                    processes=1, threads=1, workers=1, model="seed_cnn", dataset="synthetic",
                    batch_size=3, **r) for r in simulator_rows()]
    df = schema.rows(raw, scale=scale, session=session)
    schema.save(df, SIMULATOR)
    return df


def gpu_status() -> str:
    """``"ok"`` where the CUDA backend can run on a real GPU, else why not (one line)."""
    from cnn.backends import available_backends

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1): not a GPU"
    return available_backends().get("cuda", "unknown")


def run(scale: str = DEFAULT_SCALE, *, parts: Sequence[str] | None = None,
        log: Callable[[str], None] | None = print) -> dict[str, pd.DataFrame]:
    session = new_session()
    out: dict[str, pd.DataFrame] = {}
    if parts is None or "simulator" in parts:
        out[SIMULATOR] = run_simulator(scale, session)
    if parts is None or "bench" in parts:
        status = gpu_status()
        if status != "ok":
            if log:
                log(f"GPU benchmark not run: {status}")
        else:
            out.update(run_bench(scale, session, log))
    return out


def run_bench(scale: str, session: str, log: Callable[[str], None] | None = print
              ) -> dict[str, pd.DataFrame]:
    """``benchmarks/bench_gpu.py`` on this machine's GPU; its rows made study rows."""
    grid = "gpu-quick" if scale != "full" else "standard"
    dest = paths.results_dir(scale)
    raw_path = dest / "bench_gpu.raw.pkl"
    cmd = [sys.executable, str(paths.project_root() / "benchmarks" / "bench_gpu.py"),
           "--grid", grid, "--out", str(raw_path)]
    if log:
        log("running " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RunFailed(f"bench_gpu.py failed (exit {proc.returncode}):\n"
                        f"{tail(proc.stdout + proc.stderr)}")
    raw = pd.read_pickle(raw_path)
    raw_path.unlink()
    df = schema.rows(raw, scale=scale, session=session)
    schema.save(df, BENCH)
    return {BENCH: df}


def load(scale: str = DEFAULT_SCALE) -> dict[str, pd.DataFrame]:
    return load_saved(RESULTS, scale)


def check_table(df: pd.DataFrame) -> pd.DataFrame:
    """Relative error per quantity (rows) and dtype (columns)."""
    t = df.pivot_table(index="quantity", columns="dtype", values="rel_err", aggfunc="max")
    t = t.reindex(list(dict.fromkeys(df["quantity"])))
    t.columns.name = None
    return t


def headlines(frames: dict[str, pd.DataFrame]) -> list[analysis.Headline]:
    out = []
    sim = frames.get(SIMULATOR)
    if sim is not None and len(sim):
        ok = bool(sim["check_ok"].all())
        out.append(analysis.Headline(
            "cuda_simulator", "Numba CUDA backend vs NumPy in the CUDA simulator, worst "
            "relative error (float32)", float(sim.loc[sim["dtype"] == "float32",
                                                     "rel_err"].max()),
            source=f"results/{SIMULATOR}.pkl", scale=str(sim["scale"].iloc[0]),
            note=("every check passed" if ok else "A CHECK FAILED") + "; correctness only, "
                 "the simulator says nothing about speed"))
    bench = frames.get(BENCH)
    why = ("no CUDA GPU was available to the sessions that built this study; run "
           "scripts/gpu_check.sh on a GPU machine (README, 'GPU')")
    if bench is None or not len(bench) or not (bench["backend"] == "cuda").any():
        out.append(analysis.not_measured("cuda_vs_torch", "Numba CUDA step vs torch+cuDNN "
                                         "(TF32 off), seed CNN 3x32x32 batch 256", why))
        out.append(analysis.not_measured("cuda_vs_numpy", "Numba CUDA step vs NumPy 1 thread, "
                                         "seed CNN 3x32x32 batch 256", why))
        return out
    return out + bench_headlines(bench)


def bench_headlines(bench: pd.DataFrame) -> list[analysis.Headline]:
    """CUDA against torch+cuDNN and NumPy at the seed configuration, from bench_gpu rows."""
    out = []
    seed = bench[(bench["input_shape"].astype(str) == "3x32x32")]
    for key, other, label in (("cuda_vs_torch", "torch", "torch+cuDNN (TF32 off)"),
                              ("cuda_vs_numpy", "numpy", "NumPy 1 thread")):
        cu = seed[(seed["backend"] == "cuda")]
        ot = seed[(seed["backend"] == other)]
        if other == "torch" and "tf32" in seed:
            ot = ot[ot["tf32"].map(lambda v: v is False or v == 0)]
        batch = 256 if (cu["batch_size"] == 256).any() else (
            int(cu["batch_size"].max()) if len(cu) else 0)
        a = cu[cu["batch_size"] == batch]["samples_per_s"]
        b = ot[ot["batch_size"] == (batch if other == "torch" else 128)]["samples_per_s"]
        r = analysis.ratio_ci(a, b)
        out.append(analysis.Headline(
            key, f"Numba CUDA step vs {label}, seed CNN 3x32x32 batch {batch}", r[0], r[1],
            r[2], unit="x", source=f"results/{BENCH}.pkl",
            scale=",".join(sorted(set(bench["scale"].astype(str)))), trials=int(len(a)),
            host=str(bench["host"].iloc[0]), cpu=str(bench["gpu"].iloc[0])))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--simulator-json"]:  # the child process of simulator_rows
        print("JSON" + json.dumps(backend_check("cuda")))
        return 0
    return cli("gpu", __doc__ or "", run, PARTS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
