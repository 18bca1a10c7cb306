"""Compile every kernel of the ``cuda`` backend for a real GPU and report its resources.

    python -m cnn.backends.cuda_compile              # sm_90 (H100/H200), float32 + float64
    python -m cnn.backends.cuda_compile --cc 8.0 --json out.json

No GPU is needed: each kernel of ``cuda_kernels.specs`` is compiled to PTX by NVVM
(numba-cuda) for the target, with exactly the argument types the backend launches
it with, and assembled by nvJitLink (``cuda.bindings``), whose ``-verbose`` log gives
registers, shared memory, stack frame and spill bytes. On a machine with a GPU the
numbers come from the kernels as loaded on the device instead (the same compiler,
what actually runs).

A kernel that does not compile is an error, never a skip. The exit status is 1
when any kernel fails to compile, spills registers, uses local memory, or (float32
kernels) does float64 arithmetic, except where the kernel means to: the loss kernel
sums the batch's log-likelihoods in float64, like the NumPy reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

#: float32 kernels that use float64 on purpose.
F64_BY_DESIGN = frozenset({"softmax_xent"})
COLUMNS = ("kernel", "dtype", "registers", "shared_bytes", "stack_bytes", "spill_stores",
           "spill_loads", "f64_ops", "local_ops", "launch_bounds", "source")


@contextlib.contextmanager
def _target(cc: tuple[int, int], real_gpu: bool) -> Iterator[None]:
    """Device functions compile for the *current* device; without one, pretend one of
    compute capability ``cc`` exists while compiling."""
    if real_gpu:
        yield
        return
    import numba.cuda.dispatcher as dispatcher

    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = saved


def nvjitlink_resources(ptx: str, cc: tuple[int, int]) -> dict[str, int]:
    """Registers, shared memory, stack and spills of the one kernel in ``ptx``, as
    nvJitLink (ptxas) reports them for ``sm_<cc>``."""
    from cuda.bindings import nvjitlink

    opts = [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"]
    handle = nvjitlink.create(len(opts), opts)
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        try:
            nvjitlink.complete(handle)
        except Exception as exc:
            log = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, log)
            raise RuntimeError(f"nvJitLink: {log.decode(errors='replace').strip()}") from exc
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    text = log.decode(errors="replace")

    def grab(pattern: str) -> int:
        m = re.search(pattern, text)
        if m is None:
            raise RuntimeError(f"nvJitLink's log has no {pattern!r}:\n{text}")
        return int(m.group(1))

    return {"registers": grab(r"[Uu]sed (\d+) registers"),
            "shared_bytes": grab(r"(\d+) bytes smem"),
            "stack_bytes": grab(r"(\d+) bytes stack frame"),
            "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads")}


def _device_compile(spec: Any, cc: tuple[int, int]) -> tuple[str, dict[str, int]]:
    """PTX and resources of the kernel as loaded on this machine's GPU (what runs)."""
    from numba import cuda

    from cnn.backends import cuda_kernels as K

    kernel = cuda.jit([spec.signature], **K.jit_options(spec.launch_bounds))(spec.pyfunc)
    (compiled,) = kernel.overloads.values()  # the one signature
    local = int(compiled.local_mem_per_thread)
    return compiled.inspect_asm(cc), {
        "registers": int(compiled.regs_per_thread),
        "shared_bytes": int(compiled.shared_mem_per_block),
        "stack_bytes": local, "spill_stores": local, "spill_loads": local}


def compile_report(cc: tuple[int, int] = (9, 0),
                   dtypes: Sequence[str] = ("float32", "float64")) -> list[dict[str, Any]]:
    """One row per kernel and dtype (see :data:`COLUMNS`); raises on a compile error."""
    from numba import cuda

    from cnn.backends import cuda_kernels as K

    real_gpu = cuda.is_available() and cuda.get_current_device().compute_capability == cc
    rows = []
    with _target(cc, real_gpu):
        specs = [s for dt in dtypes for s in K.specs(dt)]
        specs.append(K.KernelSpec("probe", K.probe, K.PROBE_SIGNATURE))
        for spec in specs:
            try:
                if real_gpu:
                    ptx, res = _device_compile(spec, cc)
                else:
                    ptx, _ = cuda.compile_ptx(spec.pyfunc, spec.signature, cc=cc,
                                              launch_bounds=spec.launch_bounds)
                    res = nvjitlink_resources(ptx, cc)
            except Exception as exc:
                raise RuntimeError(f"kernel {spec.name} ({spec.dtype}) does not compile for "
                                   f"sm_{cc[0]}{cc[1]}: {exc}") from exc
            f32 = spec.dtype == "float32"
            rows.append({
                "kernel": spec.name, "dtype": spec.dtype, **res,
                "f64_ops": len(re.findall(r"\.f64\b", ptx)) if f32 else 0,
                "local_ops": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
                "launch_bounds": spec.launch_bounds,
                "source": "device" if real_gpu else f"nvjitlink sm_{cc[0]}{cc[1]}"})
    return rows


def problems(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What is wrong with the compiled kernels, one line each."""
    out = []
    for r in rows:
        what = f"{r['kernel']} ({r['dtype']})"
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"{what} spills registers ({r['spill_stores']} B stored, "
                       f"{r['spill_loads']} B loaded)")
        if r["local_ops"]:
            out.append(f"{what} uses local memory ({r['local_ops']} ld/st.local in its PTX)")
        base = r["kernel"].split("/")[0]
        if r["f64_ops"] and base not in F64_BY_DESIGN:
            out.append(f"{what} does {r['f64_ops']} float64 operations")
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (f"{'kernel':<18} {'dtype':<8} {'regs':>4} {'smem B':>7} {'stack':>5} "
            f"{'spill st/ld':>11} {'f64':>4} {'bounds':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        bounds = "x".join(map(str, r["launch_bounds"])) if r["launch_bounds"] else "-"
        lines.append(f"{r['kernel']:<18} {r['dtype']:<8} {r['registers']:>4} "
                     f"{r['shared_bytes']:>7} {r['stack_bytes']:>5} "
                     f"{r['spill_stores']:>5}/{r['spill_loads']:<5} {r['f64_ops']:>4} "
                     f"{bounds:>8}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What the cuda backend runs on here: versions, toolchain, device, and whether the
    backend's probe kernel compiles and runs (``available``: "ok" or the reason)."""
    import platform
    from importlib import metadata

    import numba
    from numba import config, cuda

    def attempt(fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a report: say what failed, go on
            return f"unknown ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"

    def dist(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {"python": platform.python_version(), "numba": numba.__version__,
                            "numba-cuda": dist("numba-cuda"), "numpy": dist("numpy"),
                            "torch": dist("torch"), "simulator": bool(config.ENABLE_CUDASIM)}
    if not config.ENABLE_CUDASIM:
        from numba.cuda.cudadrv import nvvm

        info["nvvm"] = attempt(lambda: ".".join(map(str, nvvm.NVVM().get_version())))
        info["cuda_available"] = attempt(cuda.is_available)
        if info["cuda_available"] is True:
            dev = cuda.get_current_device()
            info["device"] = attempt(lambda: dev.name.decode() if isinstance(dev.name, bytes)
                                     else str(dev.name))
            info["compute_capability"] = attempt(lambda: ".".join(map(str,
                                                                      dev.compute_capability)))
            info["multiprocessors"] = attempt(lambda: int(dev.MULTIPROCESSOR_COUNT))
            info["driver"] = attempt(lambda: ".".join(map(str, cuda.cudadrv.driver.driver
                                                          .get_version())))
            info["runtime"] = attempt(lambda: ".".join(map(str, cuda.runtime.get_version())))
            free_total = attempt(cuda.current_context().get_memory_info)
            if isinstance(free_total, tuple):
                info["memory_free_gib"] = round(free_total[0] / 2 ** 30, 1)
                info["memory_total_gib"] = round(free_total[1] / 2 ** 30, 1)
    from cnn.backends import available_backends

    info["available"] = available_backends()["cuda"]
    if info["torch"]:
        def torch_cuda():
            import torch

            if not torch.cuda.is_available():
                return "no CUDA in this torch"
            return (f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                    f"{torch.cuda.get_device_name()}")
        info["torch_cuda"] = attempt(torch_cuda)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn.backends.cuda_compile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 (H100/H200)")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--env", action="store_true",
                   help="only describe the environment (exit 1 when the backend cannot run)")
    args = p.parse_args(argv)
    if args.env:
        info = environment()
        info["available"] = info.pop("available")  # the verdict last
        for key, value in info.items():
            print(f"{key:>18}: {value}")
        return 0 if info["available"] == "ok" else 1
    try:
        cc = tuple(int(v) for v in args.cc.split("."))
        if len(cc) != 2:
            raise ValueError
    except ValueError:
        p.error(f"--cc must look like 9.0, got {args.cc!r}")
    rows = compile_report(cc, [d for d in args.dtypes.split(",") if d])
    print(format_table(rows))
    if args.json:
        from cnn.io import atomic_write

        with atomic_write(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    found = problems(rows)
    print(f"compiled {len(rows)} kernels for sm_{cc[0]}{cc[1]} ({rows[0]['source']}); "
          f"{len(found)} problems" + "".join(f"\n  {f}" for f in found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
