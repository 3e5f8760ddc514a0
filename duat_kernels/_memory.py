"""The memory budget: how many bytes can still be allocated, and the refusal of a dense result that would
not fit, made before anything is allocated."""

from __future__ import annotations

import os

import torch

from duat_kernels import cpp


class DenseTooLargeError(MemoryError, ValueError):
    """A dense result that would not fit in memory (or on disk), refused before anything is allocated."""


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on the device (MemAvailable on the CPU, plus the C++
    backend's cached output blocks, which a new allocation of another size releases)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return _meminfo_available() + _cached_output_bytes()


def _cached_output_bytes() -> int:
    return cpp.output_cache_info().get("cached_bytes", 0)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def format_bytes(n: float) -> str:
    """n bytes in B, KiB, ... PiB; past 10^4 PiB in powers of ten (a size of 10^26 tokens read
    '284217094304040072421727437120360939520.0 PiB')."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.1f} {unit}" if n < 1e4 else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


DENSE_HINT = ("Use the matrix-free duat_kernels.HVOOperator instead (matvec/rmatvec/matmat for products, "
              "block() and tile() for parts of W').")


def check_fits(what: str, needed: int, device: torch.device, hint: str = DENSE_HINT) -> None:
    """Refuse, before allocating, an allocation that cannot fit in memory; `hint` says what to do instead. While
    torch.compile traces, nothing is checked: a traced graph cannot read /proc, and sizes are checked eagerly."""
    if needed <= 0 or torch.compiler.is_compiling():  # nothing to allocate (out= given), or a trace
        return
    free = available_memory(device)
    if needed > free:
        raise DenseTooLargeError(
            f"{what} needs {format_bytes(needed)} but only {format_bytes(free)} is available on {device}. {hint}")

