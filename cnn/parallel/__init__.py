"""Parallel training strategies: MPI, HOGWILD and asynchronous k-fold.

- :mod:`cnn.parallel.mpi`: MPI data parallelism (allreduce, parameter server sync/async,
  model averaging, hybrid ranks x threads), run as ``mpiexec -n P python -m cnn.parallel.mpi``.
- :mod:`cnn.parallel.costmodel`: latency/bandwidth measurements and a ring-allreduce cost model.
- :mod:`cnn.parallel.hogwild`, :mod:`cnn.parallel.kfold`: shared-memory HOGWILD and k-fold.

Nothing here imports ``mpi4py`` at package import time: ``from mpi4py import MPI``
initialises MPI, which only the modules that need it do, when they need it.
"""
