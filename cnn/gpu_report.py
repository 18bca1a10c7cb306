"""Notebook 03's helpers: the cuda backend checked in Numba's CUDA simulator, the GPU
benchmark grid, and the GPU-vs-CPU tables and figures.

    from cnn import gpu_report as G
    check = G.simulator_check()            # a subprocess with NUMBA_ENABLE_CUDASIM=1
    G.check_table(check)                   # max relative error per tensor vs NumPy
    gpu = G.load_step_rows("results/bench_gpu.pkl")
    fig = G.throughput_figure(rows)        # samples/s vs batch size, one panel per shape

The simulator must be switched on before ``numba.cuda`` is first imported, and a
notebook kernel (or a pytest process) may already have imported it: so the check
runs in a fresh Python with the variable set, and sends its numbers back as JSON.
Nothing here invents a number: where a results file or a device is missing the
functions say so and return empty frames.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.results import numeric_column as _num
from cnn.results import text_column as _str

#: The two input shapes of issue 4 (CIFAR-like and MNIST-like), as results label them.
SHAPES = ("3x32x32", "1x28x28")

#: The benchmark grid per notebook scale (run only where a CUDA GPU is present).
#: ``numpy_repeats`` is small: the sequential step at batch 4096 takes seconds.
GPU_SCALES: dict[str, dict[str, Any]] = {
    "quick": dict(batch_sizes=(32, 256), repeats=10, warmup=2, numpy_repeats=1,
                  kernel_batch=256, numba=False, gemm_size=2048),
    "standard": dict(batch_sizes=(32, 128, 512, 2048, 4096), repeats=30, warmup=5,
                     numpy_repeats=2, kernel_batch=512, numba=True, gemm_size=4096),
    "full": dict(batch_sizes=(32, 64, 128, 256, 512, 1024, 2048, 4096), repeats=50, warmup=5,
                 numpy_repeats=3, kernel_batch=512, numba=True, gemm_size=8192),
}

#: Issue 4's targets (the same numbers as benchmarks/bench_gpu.py).
TARGET_VS_TORCH = 0.5
TARGET_VS_NUMPY = 50.0

REL_TOL = 1e-4  # float32, scale-relative, as tests/test_numba_cuda.py
REL_TOL64 = 1e-10
SIMULATOR_DEVICE = "cuda-simulator"


def kernel_config_table() -> pd.DataFrame:
    """The GEMM tiles of ``cnn.backends._cuda_kernels``, read from its constants: block
    shape, per-thread micro-tile, shared memory per block and when each is used."""
    from cnn.backends import _cuda_kernels as K

    rows = []
    for bm, bn in K.TILES:
        threads = (bm // K.RM) * (bn // K.RN)
        smem = K.TK * ((bm + K.PAD) + (bn + K.PAD))
        rows.append({"output tile BM x BN": f"{bm} x {bn}", "K slice (TK)": K.TK,
                     "threads / block": threads,
                     "outputs / thread (registers)": f"{K.RM} x {K.RN}",
                     "shared memory / block (float32)": f"{smem * 4:,} B",
                     "used when": (f"M <= {K.TILES[1][0]} rows (e.g. 32 output channels, "
                                   "gradients into <= 32 input channels, dense layers at "
                                   "batch <= 32)"
                                   if (bm, bn) == K.TILES[1] else
                                   f"M > {K.TILES[1][0]} rows")})
    return pd.DataFrame(rows).set_index("output tile BM x BN")


# --------------------------------------------------------------------------- simulator check

_SIM_SCRIPT = r"""
import json, sys, time
import numpy as np
from numba import config
assert config.ENABLE_CUDASIM, "NUMBA_ENABLE_CUDASIM is not set"
from cnn import models
from cnn.optim import SGD

cfg = json.loads(sys.argv[1])
out = {"rows": []}
t0 = time.perf_counter()
kw = dict(input_shape=tuple(cfg["input_shape"]), num_classes=cfg["num_classes"], padding=1,
          filters=tuple(cfg["filters"]), hidden=cfg["hidden"], seed=cfg["seed"])


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.max(np.abs(want))), 1e-30) if want.size else 1.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    return err, scale


for dtype in cfg["dtypes"]:
    ref = models.seed_cnn(backend="numpy", dtype=dtype, **kw)
    net = models.seed_cnn(backend="cuda", dtype=dtype, **kw)
    out["device"] = net.backend.device_name()
    rng = np.random.default_rng(cfg["seed"] + 7)
    n = cfg["batch"]
    x = rng.standard_normal((n, *kw["input_shape"])).astype(dtype)
    y = rng.integers(0, kw["num_classes"], size=n)

    def add(quantity, shape, got, want):
        err, scale = rel(got, want)
        out["rows"].append(dict(dtype=dtype, quantity=quantity, shape=str(tuple(shape)),
                                max_abs_err=err, ref_scale=scale, max_rel_err=err / scale))

    add("logits", (n, kw["num_classes"]), net.forward(x), ref.forward(x))
    loss_ref, loss = ref.loss_and_grad(x, y), net.loss_and_grad(x, y)
    add("loss", (), loss, loss_ref)
    g = net.backend.to_host(net.grads)
    for s in ref.slots:
        add(f"grad {s.name}", s.shape, g[s.offset:s.offset + s.size],
            ref.grads[s.offset:s.offset + s.size])
    first = g.copy()
    again = net.loss_and_grad(x, y)
    out.setdefault("deterministic", {})[dtype] = bool(
        again == loss and np.array_equal(net.backend.to_host(net.grads), first))
    opt_ref, opt = SGD(ref, lr=0.05, momentum=0.9), SGD(net, lr=0.05, momentum=0.9)
    for o in (opt_ref, opt):
        o.step()
    add("params after 1 SGD step", (ref.num_params,), net.backend.to_host(net.params),
        ref.params)
    # the fused conv + bias + ReLU kernel (the Network calls conv and ReLU separately)
    R, C = ref.backend, net.backend
    w = rng.standard_normal((kw["filters"][0], kw["input_shape"][0], 3, 3)).astype(dtype)
    b = rng.standard_normal(kw["filters"][0]).astype(dtype)
    want, _ = R.relu_forward(R.conv2d_forward(x, w, b, 1, 1)[0])
    got, _ = C.conv2d_forward(C.from_host(x), C.from_host(w), C.from_host(b), 1, 1, relu=True)
    add("fused conv+bias+ReLU (kernel)", want.shape, C.to_host(got), want)
out["seconds"] = time.perf_counter() - t0
out["num_params"] = int(ref.num_params)
print("JSON" + json.dumps(out))
"""


def _root() -> Path:
    from cnn.summary import project_root

    return project_root()


def results_path(name: str) -> Path:
    """``<results dir>/<name>`` (``$CNN_RESULTS_DIR``, else ``<root>/results``)."""
    from cnn.summary import results_dir

    return results_dir() / name


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the project root when it lies inside it, else as given."""
    path = Path(path)
    try:
        return path.resolve().relative_to(_root()).as_posix()
    except ValueError:
        return str(path)


def simulator_check(batch: int = 3, input_shape: Sequence[int] = (3, 5, 7),
                    filters: Sequence[int] = (4, 5), hidden: int = 6, num_classes: int = 3,
                    dtypes: Sequence[str] = ("float32", "float64"), seed: int = 0,
                    timeout: float = 600) -> pd.DataFrame:
    """The cuda backend against the NumPy reference, in Numba's CUDA simulator.

    A tiny seed CNN (``input_shape``, ``filters``, ``hidden``; sizes that fill no
    block, so every bounds check runs) is built on both backends with the same
    weights; one batch gives the logits, the loss and every gradient, then one
    SGD-momentum step and the fused conv+bias+ReLU kernel on its own. Runs in a
    subprocess with ``NUMBA_ENABLE_CUDASIM=1``.

    Returns one row per (dtype, quantity): ``max_abs_err``, ``ref_scale``
    (max |reference|), ``max_rel_err`` (their ratio), ``tolerance`` and ``ok``.
    ``df.attrs`` holds ``device`` (``"cuda-simulator"``), ``seconds``,
    ``deterministic`` (a second ``loss_and_grad`` bitwise equal, per dtype) and
    the configuration.
    """
    cfg = dict(batch=int(batch), input_shape=list(input_shape), filters=list(filters),
               hidden=int(hidden), num_classes=int(num_classes), dtypes=list(dtypes),
               seed=int(seed))
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _SIM_SCRIPT, json.dumps(cfg)], cwd=_root(),
                          env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    line = next((s for s in proc.stdout.splitlines() if s.startswith("JSON")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"the simulator check failed (exit {proc.returncode}):\n{tail}")
    got = json.loads(line[4:])
    df = pd.DataFrame(got["rows"])
    df["tolerance"] = np.where(df["dtype"] == "float64", REL_TOL64, REL_TOL)
    df["ok"] = df["max_rel_err"] <= df["tolerance"]
    df.attrs.update(device=got.get("device"), seconds=got.get("seconds"), wall_s=wall,
                    deterministic=got.get("deterministic", {}),
                    num_params=got.get("num_params"), config=cfg)
    return df


def check_table(df: pd.DataFrame) -> pd.DataFrame:
    """Max relative error per quantity (rows) and dtype (columns)."""
    order = list(dict.fromkeys(df["quantity"]))
    table = df.pivot_table(index="quantity", columns="dtype", values="max_rel_err",
                           aggfunc="max").reindex(order)
    shapes = df.drop_duplicates("quantity").set_index("quantity")["shape"]
    table.insert(0, "shape", shapes.reindex(order))
    table.columns.name = "max rel. error"
    return table


def check_figure(df: pd.DataFrame, title: str | None = None) -> Any:
    """Horizontal bars of the simulator check's relative errors per quantity and dtype
    (log scale), with each dtype's tolerance as a dotted line."""
    from cnn import plots, runinfo

    n = 0 if df is None else df["quantity"].nunique()
    fig, (ax,) = plots._new_figure(1, (7.6, 0.32 * n + 1.9))
    if df is None or not len(df):
        plots._empty(ax, "no simulator check")
        return fig
    dtypes = list(dict.fromkeys(df["dtype"]))
    order = list(dict.fromkeys(df["quantity"]))
    height = 0.8 / len(dtypes)
    base = np.arange(len(order))
    zeros = []
    for i, d in enumerate(dtypes):
        vals = (df[df["dtype"] == d].set_index("quantity")["max_rel_err"].reindex(order)
                .to_numpy(dtype=float))
        ys = base + i * height
        pos = vals > 0
        color = plots.PALETTE[i % len(plots.PALETTE)]
        ax.barh(ys[pos], vals[pos], height, color=color, label=d)
        zeros += list(ys[vals == 0])
        tol = float(df.loc[df["dtype"] == d, "tolerance"].iloc[0])
        ax.axvline(tol, color=color, linestyle=":", linewidth=1.2,
                   label=f"{d} tolerance {tol:g}")
    ax.set_xscale("log")
    left = ax.get_xlim()[0]
    for y in zeros:
        ax.text(left, y, " 0 (exact)", ha="left", va="center", fontsize=6)
    ax.set_yticks(base + height * (len(dtypes) - 1) / 2, order, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("max |cuda - numpy| / max |numpy|")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    cfg = df.attrs.get("config", {})
    ax.set_title(title or "cuda backend vs NumPy reference, in Numba's CUDA simulator")
    counts = runinfo.cpu_count()
    shape = "x".join(str(v) for v in cfg.get("input_shape", []))
    fig.text(0.0, -0.01, f"computed on {runinfo.host()}: {runinfo.cpu_model()} "
             f"({counts.get('physical')} cores); device {df.attrs.get('device')}: the CUDA "
             f"kernels interpreted on the CPU (a correctness check, not a timing)\n"
             f"tiny seed CNN: batch {cfg.get('batch')} of {shape}, filters "
             f"{tuple(cfg.get('filters', []))}, {cfg.get('hidden')} hidden units, "
             f"{cfg.get('num_classes')} classes",
             ha="left", va="top", fontsize=7, color="#444444", transform=fig.transFigure)
    return fig


# --------------------------------------------------------------------------- running the grid

def gpu_status() -> str:
    """``"ok"`` when the cuda backend can run here on a real GPU, else the reason."""
    from cnn.backends import available_backends

    status = available_backends().get("cuda", "backend 'cuda' is not registered")
    if status == "ok":
        from cnn.backends import get_backend

        if getattr(get_backend("cuda"), "SIMULATOR", False):
            return "this process runs Numba's CUDA simulator, not a GPU: no timings"
    return status


def _bench_gpu_module() -> Any:
    """``benchmarks/bench_gpu.py`` (a script, not part of the package), imported by path."""
    import importlib.util

    path = _root() / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_gemm_row(n: int = 4096, repeats: int = 10, experiment: str = "bench_gpu",
                 log: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """The GPU's practical float32 GEMM ceiling, a ``strategy="gemm-ceiling"`` row.

    cuBLAS SGEMM through a CUDA build of torch (TF32 off: true float32) when there is
    one; otherwise the cuda backend's own tiled GEMM kernel (``kernel`` says which, so
    a percentage of it is read as "of our own best GEMM", not of the hardware's).
    """
    from cnn import bench
    from cnn.backends import get_backend

    B = get_backend("cuda")
    device = B.device_name()
    kernel = None
    try:
        import torch

        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            a, b = (torch.randn(n, n, device="cuda") for _ in range(2))
            c = torch.empty(n, n, device="cuda")
            t = bench.time_calls(lambda: torch.matmul(a, b, out=c), repeats, 2,
                                 torch.cuda.synchronize)
            kernel, backend = f"cuBLAS sgemm {n}x{n}x{n} (torch, TF32 off)", "torch"
    except ImportError:
        pass
    if kernel is None:
        rng = np.random.default_rng(0)
        a = B.from_host(rng.standard_normal((n, n), dtype=np.float32))
        b = B.from_host(rng.standard_normal((n, n), dtype=np.float32))
        c = B._empty((1, n, n), np.float32)
        t = bench.time_calls(lambda: B._gemm(a, False, b, True, c), repeats, 2, B.synchronize)
        kernel, backend = f"cuda backend tiled GEMM {n}x{n}x{n} (no cuBLAS here)", "cuda"
    gflops = 2.0 * n**3 / (t["step_ms_median"] / 1e3) / 1e9
    if log:
        log(f"GPU GEMM ceiling on {device}: {gflops:,.0f} GFLOP/s ({kernel})")
    common = bench._common(backend, 1, device, None, float("nan"), None, None, experiment,
                           strategy="gemm-ceiling")
    return bench._row(**{**common, "dataset": None}, samples=float("nan"),
                      wall_s=t["wall_s"], compile_s=t["compile_s"],
                      step_ms_median=t["step_ms_median"], step_ms_iqr=t["step_ms_iqr"],
                      gflops=gflops, pct_of_peak=100.0, kernel=kernel,
                      kernel_flops=2.0 * n**3, repeats=repeats, warmup=2, gemm_gflops=gflops)


def run_gpu_bench(scale: str = "standard", shapes: Sequence[str] = SHAPES,
                  out: str | os.PathLike | None = None,
                  log: Callable[[str], Any] | None = print) -> pd.DataFrame:
    """Issue 4's grid on this machine's GPU, merged into ``results/bench_gpu.pkl``.

    For each input shape ``benchmarks/bench_gpu.py`` times numpy (sequential), cuda,
    the batch's host-to-device copy and torch+cuDNN (when torch has CUDA) at
    ``GPU_SCALES[scale]["batch_sizes"]``; then here: numba (CPU, every core) at the same
    batches when the scale says so, the cuda backend's per-kernel times at
    ``kernel_batch`` and the GPU's GEMM ceiling (:func:`gpu_gemm_row`).

    Every row is saved in one :func:`cnn.results.save_results` call at the end:
    that function replaces *all* earlier rows of this (host, device), so saving shape by
    shape would keep only the last shape. Rows from other machines are kept. Raises
    :class:`cnn.errors.BackendUnavailable` without a GPU.
    """
    import tempfile

    from cnn import bench
    from cnn.errors import BackendUnavailable
    from cnn.results import load_results, save_results, to_frame

    status = gpu_status()
    if status != "ok":
        raise BackendUnavailable(status)
    cfg = GPU_SCALES[scale]
    out = Path(out) if out else results_path("bench_gpu.pkl")
    say = log or (lambda _m: None)
    bench_gpu = _bench_gpu_module()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            say(f"--- {shape}: numpy, cuda, transfer, torch-cudnn at batches "
                f"{cfg['batch_sizes']}")
            rows += bench_gpu.main([
                "--batch-sizes", ",".join(map(str, cfg["batch_sizes"])),
                "--input-shape", shape, "--repeats", str(cfg["repeats"]),
                "--warmup", str(cfg["warmup"]), "--numpy-repeats", str(cfg["numpy_repeats"]),
                "--out", str(Path(tmp) / f"{shape}.pkl")])
    threads = bench.max_threads() or 1
    for shape in shapes:
        if cfg["numba"]:
            for batch in cfg["batch_sizes"]:
                rows.append(bench.bench_step("numba", threads, batch, shape, (32, 64),
                                             max(3, cfg["numpy_repeats"]), 1, memory=False,
                                             experiment="bench_gpu"))
                say(bench._describe(rows[-1]))
        say(f"--- {shape}: cuda kernels at batch {cfg['kernel_batch']}")
        rows += bench.bench_kernels("cuda", 1, cfg["kernel_batch"], shape, (32, 64),
                                    cfg["repeats"], cfg["warmup"], experiment="bench_gpu")
    rows.append(gpu_gemm_row(cfg["gemm_size"], log=log))
    save_results(to_frame(rows), out, merge_on=bench.MERGE_ON)
    say(f"wrote {len(rows)} rows to {out}")
    return load_results(out)


# --------------------------------------------------------------------------- reading results


def load_results_file(path: str | os.PathLike) -> pd.DataFrame | None:
    """The frame in ``path``, or None when the file does not exist."""
    from cnn.results import load_results

    path = Path(path)
    return load_results(path) if path.is_file() else None


def timed_rows(df: pd.DataFrame | None) -> pd.DataFrame:
    """``df`` without rows run in Numba's CUDA simulator (a wiring check, not a timing)."""
    if df is None or not len(df):
        return pd.DataFrame()
    return df[_str(df, "device") != SIMULATOR_DEVICE]


def _minute(stamp: str) -> str:
    return stamp.replace("T", " ")[:16]


def provenance(df: pd.DataFrame | None) -> pd.DataFrame:
    """Where a results frame was measured: rows per (host, device) with the host's CPU and
    GPU, the commit(s) and the time span."""
    if df is None or not len(df):
        return pd.DataFrame()
    keys = ["host", "device"]
    out = []
    for (host, device), grp in df.groupby([_str(df, k) for k in keys], sort=False):
        stamps = _str(grp, "timestamp").replace("", np.nan).dropna().sort_values()
        out.append({"host": host, "device": device,
                    "cpu": next(iter(_str(grp, "cpu").replace("", np.nan).dropna()), None),
                    "gpu": next(iter(_str(grp, "gpu").replace("", np.nan).dropna()), None),
                    "rows": len(grp),
                    "strategies": ", ".join(dict.fromkeys(_str(grp, "strategy"))),
                    "commit": ", ".join(dict.fromkeys(c for c in _str(grp, "commit") if c))
                    or None,
                    "measured (UTC)": (f"{_minute(stamps.iloc[0])} .. {_minute(stamps.iloc[-1])}"
                                       if len(stamps) else None)})
    return pd.DataFrame(out)


def step_rows(df: pd.DataFrame | None) -> pd.DataFrame:
    """Whole-training-step rows (no kernel, GEMM-ceiling or transfer rows) with a
    ``series`` label: strategy, thread count for CPU backends."""
    df = timed_rows(df)
    if not len(df):
        return pd.DataFrame()
    steps = df[~_str(df, "strategy").isin(["kernel", "gemm-ceiling", "transfer"])].copy()
    steps = steps[_num(steps, "samples_per_s").notna() & _num(steps, "batch_size").notna()]
    if not len(steps):
        return steps
    dev = _str(steps, "device")
    strategy = _str(steps, "strategy")
    threads = _num(steps, "threads").fillna(1).astype(int).astype(str)
    on_gpu = (dev != "cpu") & (dev != "")
    steps["series"] = np.where(on_gpu, strategy, strategy + " " + threads + "t")
    steps["batch_size"] = _num(steps, "batch_size").astype(int)
    return steps


def gpu_ceiling(df: pd.DataFrame | None) -> tuple[float, str | None, str | None]:
    """(GFLOP/s, kernel, device) of the GPU GEMM-ceiling row (NaN, None, None without one)."""
    df = timed_rows(df)
    if not len(df):
        return float("nan"), None, None
    rows = df[(_str(df, "strategy") == "gemm-ceiling") & (_str(df, "device") != "cpu")]
    if not len(rows):
        return float("nan"), None, None
    r = rows.loc[_num(rows, "gflops").idxmax()]
    return float(r["gflops"]), r.get("kernel"), r.get("device")


def with_gpu_peak(df: pd.DataFrame, ceiling: float) -> pd.DataFrame:
    """``pct_of_gpu_gemm`` = gflops / the GPU's GEMM ceiling x 100 for rows on the GPU."""
    out = df.copy()
    on_gpu = (_str(out, "device") != "cpu") & (_str(out, "device") != "")
    out["pct_of_gpu_gemm"] = np.where(on_gpu & np.isfinite(ceiling),
                                      100.0 * _num(out, "gflops") / ceiling, np.nan)
    return out


def comparison_table(steps: pd.DataFrame) -> pd.DataFrame:
    """samples/s per (input shape, batch) and series, with ``host`` in the column name when
    the rows come from more than one host; plus the issue's ratios where both sides exist on
    the same host (cuda / sequential, cuda / torch-cudnn)."""
    if steps is None or not len(steps):
        return pd.DataFrame()
    hosts = _str(steps, "host")
    many = hosts.nunique() > 1
    col = steps["series"] + ((" @ " + hosts) if many else "")
    table = steps.assign(column=col).pivot_table(
        index=["input_shape", "batch_size"], columns="column", values="samples_per_s",
        aggfunc="median", sort=False).sort_index()
    for host in hosts.unique():
        suffix = f" @ {host}" if many else ""
        cuda, seq, torch = (f"cuda{suffix}", f"sequential 1t{suffix}", f"torch-cudnn{suffix}")
        if cuda in table and seq in table:
            table[f"cuda / sequential{suffix}"] = table[cuda] / table[seq]
        if cuda in table and torch in table:
            table[f"cuda / torch-cudnn{suffix}"] = table[cuda] / table[torch]
    table.columns.name = "samples/s"
    return table


def kernel_rows(df: pd.DataFrame | None, ceiling: float = float("nan")) -> pd.DataFrame:
    """Per-kernel rows of the cuda backend: ms, GFLOP/s, % of the GPU GEMM ceiling, GB/s."""
    df = timed_rows(df)
    if not len(df):
        return pd.DataFrame()
    k = df[(_str(df, "strategy") == "kernel") & (_str(df, "backend") == "cuda")]
    if not len(k):
        return pd.DataFrame()
    k = with_gpu_peak(k, ceiling)
    cols = ["input_shape", "batch_size", "kernel", "direction", "step_ms_median", "step_ms_iqr",
            "gflops", "pct_of_gpu_gemm", "gbytes_per_s", "host", "device"]
    out = k[[c for c in cols if c in k.columns]].copy()
    out["batch_size"] = _num(out, "batch_size").astype(int)
    return out.set_index(["input_shape", "batch_size", "kernel", "direction"])


# --------------------------------------------------------------------------- figures

def _series_style(steps: pd.DataFrame) -> dict[str, tuple[str, str]]:
    from cnn import plots

    hosts = list(dict.fromkeys(_str(steps, "host")))
    return {h: (plots.HOST_MARKERS[i % len(plots.HOST_MARKERS)],
                plots.HOST_LINESTYLES[i % len(plots.HOST_LINESTYLES)])
            for i, h in enumerate(hosts)}


def _shade(color: str, i: int, n: int) -> tuple[float, float, float]:
    """``color`` lightened for the ``i``-th of ``n`` thread counts (the most threads: full)."""
    from matplotlib.colors import to_rgb

    mix = 1.0 if n <= 1 else 0.45 + 0.55 * i / (n - 1)
    return tuple(mix * c + (1 - mix) for c in to_rgb(color))


def throughput_figure(steps: pd.DataFrame, shapes: Iterable[str] = SHAPES,
                      title: str | None = None, note: str | None = None) -> Any:
    """Training samples/s against batch size, one panel per input shape, one series per
    (strategy, threads, host, device), log-log. CPU and GPU rows side by side."""
    from cnn import plots

    shapes = list(shapes)
    fig, axes = plots._new_figure(len(shapes), (4.6 * len(shapes), 4.0))
    if steps is None or not len(steps):
        for ax in axes:
            plots._empty(ax, "no step rows")
        return fig
    styles = _series_style(steps)
    threads = {st: sorted(set(_num(g, "threads").fillna(1).astype(int)))
               for st, g in steps.groupby(_str(steps, "strategy"))}
    for ax, shape in zip(axes, shapes, strict=True):
        sub = steps[_str(steps, "input_shape") == shape]
        if not len(sub):
            plots._empty(ax, f"no rows for {shape}")
            ax.set_title(shape)
            continue
        keys = ["series", "strategy", "host", "device"]
        for (series, strategy, host, device), grp in sub.groupby(
                [_str(sub, k) for k in keys], sort=False):
            agg = grp.groupby("batch_size")["samples_per_s"].median().sort_index()
            marker, ls = styles.get(host, ("o", "-"))
            t = int(_num(grp, "threads").fillna(1).iloc[0])
            color = _shade(plots.strategy_color(strategy.replace("torch-cudnn", "torch")),
                           threads[strategy].index(t), len(threads[strategy]))
            ax.plot(agg.index, agg.values, marker=marker, linestyle=ls, color=color,
                    label=plots.series_label(series, host, device),
                    markerfacecolor="none" if strategy == "torch-cudnn" else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("training samples / s")
        ax.set_title(f"input {shape}")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.set_size_inches(4.6 * len(shapes), 4.0 + 0.17 * math.ceil(len(labels) / 2))
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=7)
    if title:
        fig.suptitle(title)
    plots._footer(fig, steps, note=note, top=True)
    return fig


def ratio_figure(steps: pd.DataFrame, shapes: Iterable[str] = SHAPES) -> Any:
    """cuda throughput over the same host's sequential NumPy and torch+cuDNN, per batch
    size and shape, with issue 4's targets (50x and 0.5x) as dotted lines."""
    from cnn import plots

    fig, (ax_np, ax_t) = plots._new_figure(2, (8.4, 3.8))
    pairs = ((ax_np, "sequential 1t", TARGET_VS_NUMPY, "cuda / sequential NumPy"),
             (ax_t, "torch-cudnn", TARGET_VS_TORCH, "cuda / torch+cuDNN"))
    if steps is None or not len(steps):
        for ax, *_ in pairs:
            plots._empty(ax, "no step rows")
        return fig
    for ax, ref, target, name in pairs:
        drawn = False
        for i, shape in enumerate(shapes):
            for host, sub in steps[_str(steps, "input_shape") == shape].groupby(
                    _str(steps, "host")[_str(steps, "input_shape") == shape], sort=False):
                a = sub[sub["series"] == "cuda"].groupby("batch_size")["samples_per_s"].median()
                b = sub[sub["series"] == ref].groupby("batch_size")["samples_per_s"].median()
                r = (a / b).dropna()
                if not len(r):
                    continue
                device = _str(sub[sub["series"] == "cuda"], "device").iloc[0]
                ax.plot(r.index, r.values, marker=plots.HOST_MARKERS[i],
                        color=plots.PALETTE[i], label=plots.series_label(shape, host, device))
                drawn = True
        if not drawn:
            plots._empty(ax, f"no same-host cuda and {ref} rows")
            ax.set_title(name)
            continue
        ax.axhline(target, color="#888888", linestyle=":", linewidth=1,
                   label=f"target {target:g}x")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{name} (samples/s ratio)")
        ax.set_title(name)
        ax.legend(loc="best")
    plots._footer(fig, steps)
    return fig


def kernel_figure(kernels: pd.DataFrame, source: pd.DataFrame | None = None) -> Any:
    """Horizontal bars: ms per cuda kernel at the kernel batch, one panel per shape, each
    bar annotated with its % of the GPU GEMM ceiling (where it does FLOPs). ``source``
    (the results frame) names the machines in the footer."""
    from cnn import plots

    if kernels is None or not len(kernels):
        fig, (ax,) = plots._new_figure(1)
        plots._empty(ax, "no kernel rows")
        return fig
    k = kernels.reset_index()
    shapes = list(dict.fromkeys(k["input_shape"]))
    n = max(k.groupby("input_shape").size())
    fig, axes = plots._new_figure(len(shapes), (4.6 * len(shapes), 0.28 * n + 1.6))
    for ax, shape in zip(axes, shapes, strict=True):
        sub = k[k["input_shape"] == shape]
        labels = [f"{r.kernel} {r.direction}" for r in sub.itertuples()]
        y = np.arange(len(sub))
        ax.barh(y, sub["step_ms_median"], color=plots.strategy_color("cuda"))
        for yi, r in zip(y, sub.itertuples(), strict=True):
            pct = getattr(r, "pct_of_gpu_gemm", float("nan"))
            if np.isfinite(pct):
                ax.text(r.step_ms_median, yi, f" {pct:.0f}%", va="center", fontsize=7)
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("median ms")
        ax.set_title(f"{shape}, batch {int(sub['batch_size'].iloc[0])}")
        ax.grid(axis="y", visible=False)
    fig.suptitle("cuda backend, median ms per kernel (label: % of the GPU GEMM ceiling)",
                 fontsize=10)
    plots._footer(fig, source if source is not None else k)
    return fig


def peak_table(steps: pd.DataFrame, ceiling: float) -> pd.DataFrame:
    """GFLOP/s of the GPU step rows (cuda, torch-cudnn) and their % of the GPU GEMM ceiling,
    per input shape and batch size."""
    if steps is None or not len(steps):
        return pd.DataFrame()
    gpu = with_gpu_peak(steps, ceiling)
    gpu = gpu[(_str(gpu, "device") != "cpu") & (_str(gpu, "device") != "")]
    if not len(gpu):
        return pd.DataFrame()
    table = gpu.pivot_table(index=["input_shape", "batch_size"], columns="series",
                            values=["gflops", "pct_of_gpu_gemm"], aggfunc="median",
                            sort=False).sort_index()
    table.columns = [f"{s} {'GFLOP/s' if v == 'gflops' else '% of GEMM'}"
                     for v, s in table.columns]
    return table
