"""Every scale preset of the study, in one visible table.

``quick`` is a smoke run (minutes, every code path, no numbers worth reading; written to
``build/quick``); ``standard`` is the committed study on a 2-core machine; ``full`` is
for a bigger host or a cluster. An experiment reads its sizes with ``preset(family,
scale)`` and nothing else decides them.
"""

from __future__ import annotations

from typing import Any

from study.schema import SCALES

DEFAULT_SCALE = "standard"
#: The strategies of the stragglers family (study.experiments.stragglers.STRATEGIES keys);
#: the last one, the lr / (1 + s) variant, runs where a preset says.
STRAGGLER_STRATEGIES: tuple[str, ...] = (
    "allreduce", "param-server", "param-server-backup", "async-param-server",
    "async-param-server-stale", "model-average", "hogwild (local)", "hogwild (shared)",
    "hogwild (scaled)", "async-param-server-stale1")

#: family -> scale -> settings. Trials are interleaved repeats (study/measure.py).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # notebook 01: the sequential NumPy reference, trained to convergence
    "baseline": {
        "quick": dict(dataset="digits", subset=None, epochs=3, batch_size=64, lr=0.05),
        "standard": dict(dataset="fashion-mnist", subset=None, epochs=15, batch_size=64,
                         lr=0.05),
        "full": dict(dataset="fashion-mnist", subset=None, epochs=15, batch_size=64, lr=0.05),
    },
    # notebook 02: one training step of each backend, side by side in one process; the
    # seed (3x32x32, b128) and MPI (1x28x28, b64) configurations are the headlines'
    "kernels": {
        "quick": dict(shapes=("1x12x12",), batches=(8,), threads=(1, 2), steps=3, trials=2,
                      kernel_config=("1x12x12", 8), grid_shape="1x12x12",
                      grid_filters=((8, 16),), grid_batches=(8,), grid_steps=3, gemm_size=256,
                      copy_mb=16, roof_repeats=3, compile_batch=8, compile_trials=1),
        "standard": dict(shapes=("3x32x32", "1x28x28"), batches=(64, 128), threads=(1, 2),
                         steps=12, trials=5, kernel_config=("3x32x32", 128),
                         grid_shape="1x28x28", grid_filters=((16, 32), (32, 64), (64, 128)),
                         grid_batches=(32, 128, 512), grid_steps=6, gemm_size=2048,
                         copy_mb=256, roof_repeats=5, compile_batch=128, compile_trials=5),
        "full": dict(shapes=("3x32x32", "1x28x28"), batches=(32, 64, 128, 256),
                     threads=(1, 2, 4, 8, 16), steps=30, trials=7,
                     kernel_config=("3x32x32", 128), grid_shape="1x28x28",
                     grid_filters=((16, 32), (32, 64), (64, 128), (128, 256)),
                     grid_batches=(32, 128, 512, 1024), grid_steps=12, gemm_size=4096,
                     copy_mb=1024, roof_repeats=5, compile_batch=128, compile_trials=5),
    },
    # notebook 04: MPI strategies as real mpiexec jobs (start-up measured apart). Timing:
    # weak scaling at `batch_per_rank`, strong at `global_batch`, `steps` steps per run,
    # P = `ranks` (None: 1..physical cores, + one oversubscribed P with `oversubscribe`).
    # Accuracy: `acc_workers` training ranks x `acc_batch_per_rank`, one seed per trial.
    "mpi": {
        "quick": dict(dataset="digits", subset=None, test_subset=128, backend="numpy",
                      steps=6, trials=1, ranks=(1, 2), oversubscribe=False,
                      batch_per_rank=64, global_batch=128, acc_workers=2,
                      acc_batch_per_rank=32, acc_epochs=1, acc_subset=None, acc_seeds=1,
                      acc_lr=0.05, comm_ranks=(2,),
                      comm_sizes=(4, 256, 16384, 262144, 1048576, 4194304),
                      comm_repeats=10, compute_batches=(4, 16, 64), compute_repeats=3,
                      amortise_steps=(1, 10, 100, 1000, 10000)),
        "standard": dict(dataset="fashion-mnist", subset=16384, test_subset=2000,
                         backend="numba", steps=60, trials=5, ranks=None, oversubscribe=False,
                         batch_per_rank=64, global_batch=128, acc_workers=2,
                         acc_batch_per_rank=32, acc_epochs=3, acc_subset=12000, acc_seeds=5,
                         acc_lr=0.05, comm_ranks=None, comm_sizes=None, comm_repeats=50,
                         compute_batches=(4, 8, 16, 32, 64, 128), compute_repeats=7,
                         amortise_steps=(1, 10, 30, 100, 300, 1000, 10000)),
        "full": dict(dataset="fashion-mnist", subset=None, test_subset=None, backend="numba",
                     steps=200, trials=7, ranks=None, oversubscribe=True, batch_per_rank=64,
                     global_batch=128, acc_workers=2, acc_batch_per_rank=32, acc_epochs=10,
                     acc_subset=None, acc_seeds=5, acc_lr=0.05, comm_ranks=None,
                     comm_sizes=None, comm_repeats=100,
                     compute_batches=(4, 8, 16, 32, 64, 128), compute_repeats=11,
                     amortise_steps=(1, 10, 30, 100, 300, 1000, 10000)),
    },
    # notebook 05: HOGWILD workers on one shared buffer, against sequential `cnn.train`;
    # seed_batch is the seed configuration's batch (headlines, the pinning variant)
    "hogwild": {
        "quick": dict(dataset="digits", subset=None, test_subset=None, epochs=2,
                      workers=(1, 2), trials=1, batches=(32,), seed_batch=32,
                      backend="numba", timeout_s=600),
        "standard": dict(dataset="fashion-mnist", subset=12000, test_subset=None, epochs=3,
                         workers=(1, 2), trials=5, batches=(32, 64), seed_batch=64,
                         backend="numba", timeout_s=1800),
        "full": dict(dataset="fashion-mnist", subset=None, test_subset=None, epochs=5,
                     workers=(1, 2, 4, 8), trials=7, batches=(32, 64), seed_batch=64,
                     backend="numba", timeout_s=3600),
    },
    # notebook 05: k-fold cross-validation on ipyparallel engines; (subset, epochs) is the
    # seed point, `work` the (subset, epochs) points of the work-per-engine sweep
    "kfold": {
        "quick": dict(dataset="digits", subset=None, epochs=1, folds=2, engines=(1, 2),
                      trials=1, work=((600, 1), (None, 1)), batch_size=64, backend="numba",
                      cpu_interval=0.25, timeout_s=600),
        "standard": dict(dataset="fashion-mnist", subset=12000, epochs=2, folds=4,
                         engines=(1, 2), trials=5, work=((3000, 1), (6000, 1), (12000, 2)),
                         batch_size=64, backend="numba", cpu_interval=0.5, timeout_s=1800),
        "full": dict(dataset="fashion-mnist", subset=None, epochs=3, folds=8,
                     engines=(1, 2, 4, 8), trials=5, work=((6000, 1), (20000, 1), (None, 3)),
                     batch_size=64, backend="numba", cpu_interval=0.5, timeout_s=3600),
    },
    # notebook 07: the project's strategies against what users would pick instead (torch
    # DDP, torch's mnist_hogwild scheme, joblib over folds); `epochs`/`subset` for the ddp
    # and hogwild parts, `kfold_*` for the folds (the kfold family's seed point)
    "peers": {
        "quick": dict(dataset="digits", subset=None, test_subset=None, epochs=1, batch_size=64,
                      workers=(1, 2), trials=1, folds=2, kfold_subset=None, kfold_epochs=1,
                      backend="numba", cpu_interval=0.25, timeout_s=600),
        "standard": dict(dataset="fashion-mnist", subset=12000, test_subset=None, epochs=3,
                         batch_size=64, workers=(1, 2), trials=5, folds=4, kfold_subset=12000,
                         kfold_epochs=2, backend="numba", cpu_interval=0.5, timeout_s=1800),
        "full": dict(dataset="fashion-mnist", subset=None, test_subset=None, epochs=5,
                     batch_size=64, workers=(1, 2, 4, 8), trials=7, folds=8, kfold_subset=None,
                     kfold_epochs=3, backend="numba", cpu_interval=0.5, timeout_s=3600),
    },
    # notebook 05, section 5: stragglers, the remedies, time to accuracy. Two workers
    # everywhere; `strategies` run with no straggler, `straggler_strategies` in the other
    # scenarios; one worker (deterministic accuracy) `seq_trials` times; `momentum_batches`:
    # HOGWILD's momentum options at batches other than the scenarios' one. Standard: about
    # 24 minutes on the 2-core VM (study.experiments.stragglers.estimate).
    "stragglers": {
        "quick": dict(dataset="digits", subset=480, test_subset=200, epochs=2, batch_size=16,
                      target_acc=0.6, eval_samples=160, delay_ms=2.0, sync_every=4,
                      scenarios=("none", "slow4x"), strategies=STRAGGLER_STRATEGIES,
                      straggler_strategies=STRAGGLER_STRATEGIES[:-1], momentum_batches=(32,),
                      trials=1, seq_trials=1, backend="numba", timeout_s=600),
        "standard": dict(dataset="fashion-mnist", subset=6000, test_subset=2000, epochs=2,
                         batch_size=32, target_acc=0.80, eval_samples=3000, delay_ms=4.0,
                         sync_every=4, scenarios=("none", "slow2x", "slow4x", "random"),
                         strategies=STRAGGLER_STRATEGIES,
                         # the synchronous server waits for the slowest worker as allreduce
                         # does: with stragglers only allreduce runs (about 3 minutes less)
                         straggler_strategies=tuple(s for s in STRAGGLER_STRATEGIES[:-1]
                                                    if s != "param-server"),
                         momentum_batches=(64,), trials=5, seq_trials=1, backend="numba",
                         timeout_s=1200),
        "full": dict(dataset="fashion-mnist", subset=None, test_subset=None, epochs=3,
                     batch_size=32, target_acc=0.88, eval_samples=12000, delay_ms=4.0,
                     sync_every=4, scenarios=("none", "slow2x", "slow4x", "random"),
                     strategies=STRAGGLER_STRATEGIES, straggler_strategies=STRAGGLER_STRATEGIES,
                     momentum_batches=(64,), trials=7, seq_trials=1, backend="numba",
                     timeout_s=7200),
    },
}


def preset(family: str, scale: str) -> dict[str, Any]:
    """A copy of the settings of ``family`` at ``scale`` (clear error for unknown names)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if family not in PRESETS:
        raise ValueError(f"no presets for {family!r}; families: {', '.join(PRESETS)}")
    return dict(PRESETS[family][scale])
