"""Device and pinned memory of the ``cuda`` backend: reused per size, counted, never leaked.

Why a pool. A training step makes the same arrays, of the same sizes, every step;
``cudaMalloc``/``cudaFree`` per array cost host time, and Numba's deferred frees
(flushed when *its* queue fills) make device memory climb in between. So every
array the backend makes comes from :class:`DevicePool`: a block of exactly that
size that nothing refers to any more is handed out again, so after the first step
a step allocates nothing.

Why reuse is safe. Every kernel and copy of the backend runs in order on one
compute stream, and a block counts as free only once no host object refers to its
memory (Numba's own reference count on the allocation covers views and slices; the
simulator's arrays are NumPy views of one root). Every kernel that used the block
was queued before that, so a kernel queued after it runs after them.

Uploads run on a second stream, so they overlap compute. A block for uploads (the
:class:`DevicePool` made with ``ordered=True``) may still be read by queued kernels
when it turns free, so the first upload that sees it free records an event on the
compute stream, and the upload into it waits for that event; the oldest such block
is used first, so the wait is usually over already.

The bookkeeping (:meth:`DevicePool.stats`) is what the leak test reads: the number
of device allocations made, the bytes held and in use.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import config, cuda

from cnn.errors import CnnError

MiB = 2 ** 20
ALIGN = 256  # bytes: sizes are rounded up to this, so near-equal sizes share blocks


class OutOfDeviceMemory(CnnError, MemoryError):
    """The GPU has no room for an array the step needs."""


def new_event():
    """A CUDA event without timing (cheaper to record and wait on)."""
    return cuda.event() if config.ENABLE_CUDASIM else cuda.event(timing=False)


def _mib(nbytes: float) -> str:
    return f"{nbytes / MiB:,.1f} MiB"


@dataclass
class _Block:
    nbytes: int
    root: Any  # the pool's own handle on the allocation
    refs: Callable[[], int]  # references to the allocation right now
    base: int  # ... when nothing handed out refers to it
    free_event: Any = None  # ordered pools: compute-stream event after its last user
    free_seq: int = 0  # when free_event was recorded (older first)
    used: bool = False  # handed out at least once

    def in_use(self) -> bool:
        return self.refs() > self.base


@dataclass
class PoolStats:
    """Counters of one pool since it was made (or :meth:`DevicePool.reset_peak`)."""

    allocations: int = 0  # device allocations made (cudaMalloc calls)
    reuses: int = 0  # arrays served from a free block
    peak_held: int = 0  # bytes held at most (in use or cached)
    trims: int = 0


class DevicePool:
    """Device arrays served from blocks kept per size (see the module doc)."""

    def __init__(self, name: str = "arrays", ordered: bool = False, depth: int = 2):
        self.name = name
        self.ordered = ordered
        self.depth = depth if ordered else 1  # blocks made per new size
        self.simulator = bool(config.ENABLE_CUDASIM)
        self.blocks: dict[int, list[_Block]] = {}
        self.stats_ = PoolStats()
        self.limit: int | None = None  # bytes this pool may hold (None: the GPU's)
        self._seq = 0

    # --- bookkeeping ----------------------------------------------------------------

    def held_bytes(self) -> int:
        return sum(b.nbytes for blocks in self.blocks.values() for b in blocks)

    def in_use_bytes(self) -> int:
        return sum(b.nbytes for blocks in self.blocks.values() for b in blocks if b.in_use())

    def stats(self) -> dict[str, int]:
        blocks = [b for bs in self.blocks.values() for b in bs]
        return {"allocations": self.stats_.allocations, "reuses": self.stats_.reuses,
                "blocks": len(blocks), "held_bytes": self.held_bytes(),
                "in_use_bytes": sum(b.nbytes for b in blocks if b.in_use()),
                "peak_held_bytes": self.stats_.peak_held}

    def reset_peak(self) -> None:
        self.stats_.peak_held = self.held_bytes()

    def trim(self) -> int:
        """Give every free block back to the GPU; returns the bytes given back."""
        freed = 0
        for size in list(self.blocks):
            keep = [b for b in self.blocks[size] if b.in_use()]
            freed += sum(b.nbytes for b in self.blocks[size] if not b.in_use())
            if keep:
                self.blocks[size] = keep
            else:
                del self.blocks[size]
        if freed:
            self.stats_.trims += 1
        return freed

    # --- serving --------------------------------------------------------------------

    def empty(self, shape: tuple[int, ...], dtype: Any, compute_stream: Any = 0,
              batch_size: int | None = None) -> tuple[Any, _Block]:
        """A device array of ``shape``/``dtype`` (contents undefined) and its block."""
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        block = self._free_block(size, compute_stream)
        if block is None:
            first = size not in self.blocks
            block = self._new_block(size, shape, dtype, batch_size)
            for _ in range(self.depth - 1 if first else 0):  # spares to alternate with
                self._new_block(size, shape, dtype, batch_size)
        else:
            self.stats_.reuses += 1
        block.used = True
        return self._hand_out(block, nbytes, shape, dtype), block

    def _free_block(self, size: int, compute_stream: Any) -> _Block | None:
        candidates = [b for b in self.blocks.get(size, ()) if not b.in_use()]
        if not self.ordered:
            return candidates[0] if candidates else None
        # ordered: a never-used block first, then one whose event is from an earlier call
        # (the kernels before it have most likely run), the oldest first
        self._seq += 1
        fresh = [b for b in candidates if not b.used]
        if fresh:
            return fresh[0]
        aged = [b for b in candidates if b.free_event is not None]
        for b in candidates:  # first seen free now: mark the compute stream here
            if b.free_event is None:
                b.free_event = new_event()
                b.free_event.record(compute_stream)
                b.free_seq = self._seq
        if aged:
            return min(aged, key=lambda b: b.free_seq)
        return min(candidates, key=lambda b: b.free_seq) if candidates else None

    def _hand_out(self, block: _Block, nbytes: int, shape, dtype) -> Any:
        if self.simulator:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

            return FakeCUDAArray(block.root[:nbytes].view(dtype).reshape(shape))
        return block.root[:nbytes].view(dtype).reshape(shape)

    def _allocate(self, size: int) -> tuple[Any, Callable[[], int]]:
        if self.simulator:
            root = np.empty(size, np.uint8)
            # the pool's list, this frame's ``root`` and getrefcount's argument: the base
            return root, lambda: sys.getrefcount(root)
        root = cuda.device_array(size, np.uint8)
        mem = root.gpu_data.owner  # Numba counts the views of the allocation on it
        if not isinstance(getattr(mem, "refct", None), int):
            raise RuntimeError(f"the cuda backend's memory pool needs numba-cuda's view count "
                               f"on allocations (MemoryPointer.refct); {type(mem).__name__} "
                               "has none: use numba-cuda >= 0.20 (pip install -e '.[cuda]')")
        return root, lambda: mem.refct

    def _new_block(self, size: int, shape, dtype, batch_size: int | None) -> _Block:
        if self.limit is not None and self.held_bytes() + size > self.limit:
            self.trim()
            if self.held_bytes() + size > self.limit:
                raise self._oom(shape, dtype, size, batch_size,
                                f"the backend's memory limit is {_mib(self.limit)}")
        try:
            root, refs = self._allocate(size)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
            if not _is_oom(exc):
                raise
            self.trim()
            flush_pending_frees()
            try:
                root, refs = self._allocate(size)
            except Exception as exc2:  # noqa: BLE001
                if not _is_oom(exc2):
                    raise
                raise self._oom(shape, dtype, size, batch_size, _gpu_free()) from None
        block = _Block(size, root, refs, 0)
        del root  # the base count is taken with only the pool holding the allocation
        self.blocks.setdefault(size, []).append(block)
        block.base = refs()
        self.stats_.allocations += 1
        self.stats_.peak_held = max(self.stats_.peak_held, self.held_bytes())
        return block

    def _oom(self, shape, dtype, size: int, batch_size: int | None,
             why: str) -> OutOfDeviceMemory:
        live = self.in_use_bytes()
        at = f" at batch size {batch_size}" if batch_size else ""
        return OutOfDeviceMemory(
            f"out of GPU memory{at}: a {shape} {np.dtype(dtype).name} array needs "
            f"{_mib(size)} more while the step's arrays already hold {_mib(live)}, so the "
            f"step needs at least {_mib(live + size)} on the device ({why}). Use a smaller "
            f"--batch-size (memory grows about linearly with it) or free the GPU.")


def _is_oom(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    return "OUT_OF_MEMORY" in str(code) or "OUT_OF_MEMORY" in str(exc) or code == 2


def _gpu_free() -> str:
    try:
        free, total = cuda.current_context().get_memory_info()
    except Exception:  # noqa: BLE001 - a description only
        return "the GPU reports no free memory"
    return f"the GPU has {_mib(free)} free of {_mib(total)}"


def flush_pending_frees() -> None:
    """Free what Numba has queued for freeing (it also does this itself on out-of-memory)."""
    if config.ENABLE_CUDASIM:
        return
    manager = getattr(cuda.current_context(), "memory_manager", None)
    pending = getattr(manager, "deallocations", None)
    if pending is not None:
        pending.clear()


# --- pinned host memory ---------------------------------------------------------------------

class _Slot:
    """One page-locked host buffer and the event of the last copy out of it."""

    def __init__(self, nbytes: int):
        self.buf = cuda.pinned_array(max(nbytes, 1), dtype=np.uint8)
        self.event = None
        self.ptr = self.buf.ctypes.data

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def view(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self.buf[:n].view(dtype).reshape(shape)


class PinnedStaging:
    """Page-locked host buffers, ``depth`` per size, used in turn (the host fills one
    while the copy out of the other is in flight). A caller can load a batch straight
    into one (:meth:`buffer`); :meth:`slot_of` recognises it, so no copy is made."""

    def __init__(self, depth: int = 3, max_sizes: int = 16):
        self.depth, self.max_sizes = depth, max_sizes
        self.rings: dict[int, list[_Slot]] = {}
        self.turn: dict[int, int] = {}
        self.by_ptr: dict[int, _Slot] = {}

    def next_slot(self, nbytes: int) -> _Slot:
        """The next buffer of this size, once the copy out of it has finished."""
        ring = self.rings.get(nbytes)
        if ring is None:
            if len(self.rings) >= self.max_sizes:  # drop the oldest size
                old = next(iter(self.rings))
                for slot in self.rings.pop(old):
                    slot.wait()
                    self.by_ptr.pop(slot.ptr, None)
            ring = self.rings[nbytes] = [_Slot(nbytes) for _ in range(self.depth)]
            self.by_ptr.update({s.ptr: s for s in ring})
            self.turn[nbytes] = 0
        slot = ring[self.turn[nbytes] % self.depth]
        self.turn[nbytes] += 1
        slot.wait()
        return slot

    def buffer(self, shape, dtype) -> np.ndarray:
        """A pinned array to fill in place (then give it to ``from_host``)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self.next_slot(nbytes).view(shape, dtype)

    def slot_of(self, a: np.ndarray) -> _Slot | None:
        """The slot ``a`` fills from its start, when ``a`` is one of ours."""
        slot = self.by_ptr.get(a.ctypes.data) if a.flags.c_contiguous else None
        return slot if slot is not None and a.nbytes <= slot.buf.nbytes else None


class LossSlots:
    """Pinned float64 scalars the losses are copied into, one per live loss value."""

    def __init__(self, chunk: int = 64):
        self.chunk = chunk
        self.free: list[np.ndarray] = []
        self._chunks: list[np.ndarray] = []

    def take(self, owner: object) -> np.ndarray:
        """A pinned ``float64[1]``, returned to the pool when ``owner`` is collected."""
        if not self.free:
            block = cuda.pinned_array(self.chunk, dtype=np.float64)
            self._chunks.append(block)
            self.free += [block[i:i + 1] for i in range(self.chunk)]
        slot = self.free.pop()
        weakref.finalize(owner, self.free.append, slot)
        return slot


class DeviceLoss:
    """A loss on its way back from the GPU: ``float()`` waits for its own copy only
    (an event after the loss kernel), never for the rest of the queued step."""

    __slots__ = ("_host", "_event", "_value", "__weakref__")

    def __init__(self, slots: LossSlots):
        self._host = slots.take(self)
        self._event = None
        self._value: float | None = None

    def start(self, device_scalar: Any, stream: Any) -> DeviceLoss:
        device_scalar.copy_to_host(self._host, stream=stream)
        self._event = new_event()
        self._event.record(stream)
        return self

    def __float__(self) -> float:
        if self._value is None:
            if self._event is not None:
                self._event.synchronize()
            self._value = float(self._host[0])
        return self._value

    def ready(self) -> bool:
        """Whether ``float()`` would return at once."""
        if self._value is not None or self._event is None:
            return True
        query = getattr(self._event, "query", None)  # the simulator's events have none
        return True if query is None else bool(query())

    def __repr__(self) -> str:
        return f"DeviceLoss({float(self):.6g})"
