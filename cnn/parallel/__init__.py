"""Parallel training strategies: MPI, HOGWILD and asynchronous k-fold."""
