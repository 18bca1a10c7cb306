"""The sequential NumPy reference (notebook 01): is it right, and what does it reach?

    python -m study.experiments.baseline --scale standard     # ~10 min on 2 cores
    python -m study.experiments.baseline --scale quick --parts twin

Parts:

- ``twin``: the NumPy network against its PyTorch twin (loaded through ``state_dict``)
  on logits, loss and every gradient, float32 and float64, for three models
  (``results/twin_check.pkl``).
- ``train``: the seed CNN trained by ``python -m cnn.train`` in a fresh process
  (start-up apart), SGD-momentum + cosine, one row per epoch
  (``results/baseline_<dataset>.pkl`` and the weights beside it). Training is
  deterministic, so one run is the measurement of accuracy; its throughput is
  reported as the median over epochs with a CI over epochs (labelled so).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from study import analysis, paths, schema
from study.checks import compare
from study.config import DEFAULT_SCALE, preset
from study.experiments import cli, load_saved
from study.measure import new_session, pinned_env, python_module, run_cli

PARTS = ("twin", "train")
TWIN = "twin_check"
TWIN_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "seed_cnn": ((1, 28, 28), 10), "lenet5": ((1, 28, 28), 10), "mlp": ((4,), 3)}


def train_name(dataset: str) -> str:
    return f"baseline_{dataset.replace('-', '_')}"


RESULTS = (TWIN, train_name("fashion-mnist"), train_name("digits"))


def twin_rows(models: Sequence[str] = tuple(TWIN_SHAPES), batch: int = 4, seed: int = 0
              ) -> list[dict[str, Any]]:
    """One row per (model, dtype, quantity): the NumPy network against torch, live."""
    import torch

    from cnn.metrics import make_row
    from cnn.models import build
    from cnn.twin import torch_loss_and_grads, torch_twin

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        for name in models:
            shape, k = TWIN_SHAPES[name]
            for dtype in (np.float32, np.float64):
                net = build(name, shape, k, dtype=dtype, seed=seed)
                rng = np.random.default_rng(seed)
                x = rng.standard_normal((batch, *shape)).astype(dtype)
                y = rng.integers(0, k, batch)
                logits = net.forward(x)
                loss = net.loss_and_grad(x, y)
                grads = {s.name: net.grads[s.offset:s.offset + s.size].reshape(s.shape).copy()
                         for s in net.slots}
                tloss, tlogits, tgrads = torch_loss_and_grads(torch_twin(net), x, y)
                pairs = [("logits", logits, tlogits), ("loss", loss, tloss)]
                pairs += [(g, grads[g], tgrads[g]) for g in grads]
                for quantity, got, want in pairs:
                    c = compare(got, want, f"{name} {quantity}")
                    out.append(make_row(
                        experiment=TWIN, strategy="numpy-vs-torch", backend="numpy",
                        processes=1, threads=1, workers=1, device="cpu", model=name,
                        dataset="synthetic", batch_size=batch, quantity=quantity,
                        dtype=np.dtype(dtype).name, rel_err=c.rel_err, tolerance=c.tol,
                        check_ok=c.ok, torch_version=torch.__version__))
    finally:
        torch.set_num_threads(saved)
    return out


def run_twin(scale: str, session: str) -> pd.DataFrame:
    df = schema.rows(twin_rows(), scale=scale, session=session)
    schema.save(df, TWIN)
    return df


def train_argv(scale: str, weights: str) -> list[str]:
    p = preset("baseline", scale)
    argv = ["--backend", "numpy", "--dataset", p["dataset"], "--model", "seed_cnn",
            "--epochs", str(p["epochs"]), "--batch-size", str(p["batch_size"]),
            "--lr", str(p["lr"]), "--momentum", "0.9", "--weight-decay", "5e-4",
            "--schedule", "cosine", "--seed", "0", "--experiment", train_name(p["dataset"]),
            "--save-weights", weights]
    if p.get("subset"):
        argv += ["--subset", str(p["subset"])]
    return argv


def run_train(scale: str, session: str, log: Callable[[str], None] | None = print
              ) -> pd.DataFrame:
    """Train the seed CNN in a fresh process; rows per epoch, weights beside them."""
    p = preset("baseline", scale)
    name = train_name(p["dataset"])
    folder = paths.results_dir(scale)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.npz"
    if log:
        log(f"training the seed CNN on {p['dataset']} for {p['epochs']} epoch(s) "
            f"(python -m cnn.train, 1 thread)")
    raw = run_cli(python_module("cnn.train", *train_argv(scale, str(weights))),
                  env=pinned_env(1), what="python -m cnn.train (baseline)")
    raw["strategy"] = "sequential"
    raw["config"] = f"seed_cnn {p['dataset']} b{p['batch_size']}"
    df = schema.rows(raw, scale=scale, session=session, workers=1)
    schema.save(df, name)
    return df


def run(scale: str = DEFAULT_SCALE, *, parts: Sequence[str] | None = None,
        log: Callable[[str], None] | None = print) -> dict[str, pd.DataFrame]:
    session = new_session()
    out: dict[str, pd.DataFrame] = {}
    if parts is None or "twin" in parts:
        out[TWIN] = run_twin(scale, session)
    if parts is None or "train" in parts:
        df = run_train(scale, session, log)
        out[str(df["experiment"].iloc[0])] = df
    return out


def load(scale: str = DEFAULT_SCALE) -> dict[str, pd.DataFrame]:
    return load_saved(RESULTS, scale)


def weights_path(dataset: str, scale: str = DEFAULT_SCALE):
    """The trained baseline's weights (``results/baseline_<dataset>.npz``), or None."""
    p = paths.results_dir(scale) / f"{train_name(dataset)}.npz"
    return p if p.is_file() else None


def twin_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows (model, quantity) in check order, columns float32/float64: worst rel. error."""
    t = df.pivot_table(index=["model", "quantity"], columns="dtype", values="rel_err",
                       aggfunc="max")
    order = list(dict.fromkeys(zip(df["model"], df["quantity"], strict=True)))
    t = t.reindex(pd.MultiIndex.from_tuples(order, names=["model", "quantity"]))
    t.columns.name = None
    return t


def confusion(y_true: Any, y_pred: Any, k: int) -> np.ndarray:
    """``k x k`` counts: rows the true class, columns the predicted one."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def evaluate_saved(dataset: str, scale: str = DEFAULT_SCALE
                   ) -> tuple[np.ndarray, list[str], float] | None:
    """(confusion matrix, class names, accuracy) of the saved baseline weights on the test
    split; None when no weights were saved at this scale."""
    from cnn import data as cdata
    from cnn.models import seed_cnn

    w = weights_path(dataset, scale)
    if w is None:
        return None
    x, y = cdata.load(dataset, "test")
    classes = list(cdata.dataset_info(dataset)["classes"])
    net = seed_cnn(x.shape[1:], len(classes), padding=int(min(x.shape[2:]) < 16))
    net.load(w)
    cm = confusion(y, net.predict(x), len(classes))
    return cm, classes, float(np.trace(cm) / cm.sum())


def data_overview(scale: str = DEFAULT_SCALE) -> tuple[pd.DataFrame, dict[str, tuple]]:
    """A table of the datasets the study uses, and ``{name: (x, y, classes)}`` to show."""
    from cnn import data as cdata

    names = list(dict.fromkeys([preset("baseline", scale)["dataset"], "digits"]))
    table, shown = [], {}
    for name in names:
        x, y = cdata.load(name, "train")
        info = cdata.dataset_info(name)
        table.append({"dataset": name, "train images": len(y),
                      "test images": len(cdata.load(name, "test")[1]),
                      "shape": "x".join(map(str, x.shape[1:])),
                      "classes": info["num_classes"]})
        shown[name] = (x, y, [str(c) for c in info["classes"]])
    return pd.DataFrame(table), shown


def headlines(frames: dict[str, pd.DataFrame]) -> list[analysis.Headline]:
    out = []
    name = next((n for n in (train_name("fashion-mnist"), train_name("digits"))
                 if n in frames and len(frames[n])), train_name("fashion-mnist"))
    df = frames.get(name)
    if df is None or not len(df):
        return [analysis.not_measured("baseline_accuracy", "Sequential baseline test accuracy",
                                      f"results/{name}.pkl has not been made yet "
                                      "(python -m study.experiments.baseline)")]
    last = df.sort_values("epoch").iloc[-1]
    h = analysis.Headline(
        "baseline_accuracy", f"Sequential NumPy baseline, test accuracy ({last['dataset']})",
        float(last["test_acc"]),
        unit="acc", config=str(last.get("config", "")), source=f"results/{name}.pkl",
        scale=str(last["scale"]), session=str(last["session"]), trials=1,
        host=str(last["host"]), cpu=str(last["cpu"]),
        note=f"{int(last['epoch'])} epochs; deterministic (the same curve bit for bit on "
             "a re-run), so one run")
    rate = analysis.median_ci(df["samples_per_s"])
    t = analysis.Headline(
        "baseline_throughput", "Sequential NumPy baseline, training samples/s", rate[0], rate[1],
        rate[2], unit="samples/s", config=h.config, source=h.source, scale=h.scale,
        session=h.session, trials=len(df), host=h.host, cpu=h.cpu,
        note="median over the epochs of one run, CI over epochs")
    for x in (h, t):
        if x.scale not in paths.COMMITTED_SCALES:
            x.anomaly = f"{x.scale}-scale rows in a standard headline"
    twin = frames.get(TWIN)
    if twin is not None and len(twin):
        for dtype in ("float32", "float64"):
            worst = float(twin.loc[twin["dtype"] == dtype, "rel_err"].max())
            out.append(analysis.Headline(
                f"twin_{dtype}", f"NumPy vs PyTorch twin, worst relative error ({dtype})",
                worst, unit="", source=f"results/{TWIN}.pkl",
                scale=str(twin["scale"].iloc[0]), note="logits, loss and every gradient of "
                "seed_cnn, lenet5 and mlp"))
    return [h, t, *out]


def main(argv: Sequence[str] | None = None) -> int:
    return cli("baseline", __doc__ or "", run, PARTS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
