"""Pin the worker processes a library CLI spawns, one core each (HOGWILD's pinning variant).

Issue 11: a 2-worker HOGWILD step was faster than a 1-worker step. One explanation is the
scheduler migrating a lone worker between cores; pinning tells. ``taskset -c`` on the
CLI's command pins the whole process tree to one set of cores (children inherit the
mask), not each worker to its own core, and the HOGWILD CLI has no pinning option. So
`pin_children` watches this process's descendants from a background thread and moves
each new worker (matched on its command line: multiprocessing's ``spawn_main``) to the
next core with ``os.sched_setaffinity``. Workers import, load and warm up for seconds
before the timed region starts; the watcher polls every 20 ms, so training runs pinned.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence

#: What a worker started by multiprocessing's ``spawn`` has on its command line.
SPAWNED = "spawn_main"


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity mask), in order."""
    if not hasattr(os, "sched_getaffinity"):
        return list(range(os.cpu_count() or 1))
    return sorted(os.sched_getaffinity(0))


def can_pin() -> bool:
    """Whether this platform can pin processes (Linux: ``os.sched_setaffinity``)."""
    return hasattr(os, "sched_setaffinity")


@contextlib.contextmanager
def pin_children(cores: Sequence[int], match: str = SPAWNED,
                 interval: float = 0.02) -> Iterator[dict[int, int]]:
    """Inside the block, pin every new descendant whose command line contains ``match`` to
    its own core (``cores`` in turn). Yields ``{pid: core}``, filled as workers appear."""
    import psutil

    if not can_pin():
        raise RuntimeError("pinning needs os.sched_setaffinity (Linux); run the unpinned "
                           "variant only on this platform")
    cores = [int(c) for c in cores]
    if not cores:
        raise ValueError("pin_children needs at least one core")
    assigned: dict[int, int] = {}
    stop = threading.Event()
    me = psutil.Process()

    def watch() -> None:
        while not stop.is_set():
            for child in me.children(recursive=True):
                if child.pid in assigned:
                    continue
                with contextlib.suppress(psutil.Error, OSError):
                    if match in " ".join(child.cmdline()):
                        core = cores[len(assigned) % len(cores)]
                        os.sched_setaffinity(child.pid, {core})
                        assigned[child.pid] = core
            stop.wait(interval)

    thread = threading.Thread(target=watch, name="pin-children", daemon=True)
    thread.start()
    try:
        yield assigned
    finally:
        stop.set()
        thread.join(timeout=5)
