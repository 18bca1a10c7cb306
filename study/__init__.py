"""The study: runs the experiments on the `cnn` library, keeps their rows, analyses them,
draws the figures and builds the report (docs/DESIGN.md).

    python -m study --help

`cnn` never imports this package; this package imports `cnn`. Modules: `paths` (where
things live), `schema` (the results schema, validated on save and load), `config`
(every scale preset), `measure` (timers, interleaved trials, the quiet-host guard,
roofs), `cluster` (MPI ranks as ipyparallel engines), `checks` (one compare), one module
per experiment family under `experiments/`, `analysis` (speedup, CIs, anomalies,
headlines), `figures/`, `report` (summary.json, README table, Typst) and `notebooks`.
"""
