"""C++ backend: thin wrapper around the pybind11 kernel in csrc/ (CPU, OpenMP, SIMD).

W' is a Kronecker sum sum_i L_i (x) R_i with (L, R) = (A, OV) in token layout and (OV, A) in
feature layout; the kernel reads L (h, P, S) and R (h, Q, T) in place through their strides (each
thread packs the coefficients and the slab R[:, q, :] of the rows it writes) and writes any tile of W'.

Large outputs made here (W' without out=) come from an output cache: a freed block is kept, up to
a limit (an eighth of physical memory by default, DUAT_OUTPUT_CACHE_BYTES, `set_output_cache_limit`),
for the next output of the same size, which then skips the page zeroing of fresh memory;
`empty_output_cache()` gives the memory back.

The extension carries one copy of the kernels per instruction set (baseline, avx2, avx512,
avx512_bf16 on x86-64) and uses the best one the CPU supports;
DUAT_CPU_CAPABILITY=baseline|avx2|avx512|avx512_bf16 (read at
import) or `set_cpu_capability` selects a lower one, `cpu_capability()` reports the one in use.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager

import torch

from duat_kernels.reference import compute_dtype

try:
    from duat_kernels import _C
except ImportError as exc:  # a source tree without a build, or a failed build
    _C = None
    IMPORT_ERROR = (f"the C++ extension duat_kernels._C could not be imported ({exc}); build it with "
                    "`pip install .` (or `pip install -e .` in a source checkout)")
else:
    IMPORT_ERROR = ""

CAPABILITY_ENV = "DUAT_CPU_CAPABILITY"

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64",
                torch.float16: "float16", torch.bfloat16: "bfloat16"}


# Whether the OpenMP thread pool of this process is usable. GNU OpenMP's pool does not survive
# fork(): a forked child that enters a parallel region of more than one thread waits forever for
# the parent's threads, in our kernel and in torch's own parallel ops alike (they share libgomp).
_FORKED_AFTER_KERNEL = False
_KERNEL_RAN = False


def _after_fork_in_child() -> None:
    """In a fork()ed child of a process that ran the kernel: one thread, in our kernel and in torch."""
    global _FORKED_AFTER_KERNEL
    if _KERNEL_RAN:
        _FORKED_AFTER_KERNEL = True
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_after_fork_in_child)


def is_available() -> bool:
    return _C is not None


def cpu_capability() -> str:
    """The ISA variant of the C++ kernels in use: "baseline", "avx2", "avx512", "avx512_bf16" (or "native" in a
    DUAT_NATIVE=1 build); "unavailable" when the extension is not built."""
    return _C.cpu_capability() if _C is not None else "unavailable"


def supported_capabilities() -> list[str]:
    """The ISA variants compiled into the extension that this CPU can run, lowest first."""
    return list(_C.supported_capabilities()) if _C is not None else []


def set_cpu_capability(name: str) -> None:
    """Use the named ISA variant (one of supported_capabilities()) for every later kernel call."""
    if _C is None:
        raise RuntimeError(IMPORT_ERROR)
    if not isinstance(name, str) or name not in _C.compiled_capabilities():
        raise ValueError(f"CPU capability must be one of {', '.join(_C.compiled_capabilities())}, got {name!r}")
    if name not in _C.supported_capabilities():
        raise ValueError(f"this CPU cannot run the {name!r} kernels; it supports {', '.join(supported_capabilities())}")
    _C.set_cpu_capability(name)


@contextmanager
def using_capability(name: str):
    """Run the enclosed kernel calls with the named ISA variant, then restore the previous one."""
    before = cpu_capability()
    set_cpu_capability(name)
    try:
        yield name
    finally:
        _C.set_cpu_capability(before)


def _apply_capability_env() -> None:
    """DUAT_CPU_CAPABILITY forces a variant; an unusable value warns and keeps the best one."""
    forced = os.environ.get(CAPABILITY_ENV, "").strip()
    if forced and _C is not None:
        try:
            set_cpu_capability(forced)
        except ValueError as exc:
            warnings.warn(f"{CAPABILITY_ENV}={forced!r} ignored: {exc}; using {cpu_capability()!r}", RuntimeWarning,
                          stacklevel=2)


# The most threads per CPU that a --threads option takes: more only contend for the CPUs, and tens of
# thousands make OpenMP fail to start them: torch.set_num_threads(100000) leaves a process in which
# the next parallel region (torch's or the kernel's) aborts in libgomp or segfaults.
MAX_THREADS_PER_CPU = 4


def max_threads() -> int:
    """The most threads a thread count option takes (_validation.check_threads): 4 per CPU."""
    return MAX_THREADS_PER_CPU * (os.cpu_count() or 1)


def num_threads() -> int:
    """Threads the kernel runs on: torch's setting, or 1 in a forked child (see _after_fork_in_child)."""
    return 1 if _FORKED_AFTER_KERNEL else torch.get_num_threads()


def kernel_threads() -> int:
    """num_threads() for a kernel about to run, recording that a parallel one ran (for fork safety)."""
    global _KERNEL_RAN
    threads = num_threads()
    _KERNEL_RAN = _KERNEL_RAN or threads > 1
    return threads


_apply_capability_env()


def _numpy_view(t: torch.Tensor):
    """A NumPy view sharing t's memory; bfloat16 (unknown to NumPy) travels as int16 bits. A tensor whose
    negative bit is set (a lazy negation: x.conj().imag of a complex x, torch._neg_view) has no such
    view: its negated copy is passed (outputs never have the bit: _validation.check_out refuses it)."""
    t = t.detach().resolve_neg()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def _tile_ranges(row0: int, col0: int, shape: tuple[int, int], inner_rows: int, inner_cols: int):
    """_factor_range of a (rows, cols) tile at (row0, col0) along both axes."""
    return _factor_range(row0, shape[0], inner_rows), _factor_range(col0, shape[1], inner_cols)


def _check_tile(name: str, out, row0, col0, total: tuple[int, int] | None) -> None:
    """out a 2-D tensor of a kernel output dtype whose tile at (row0, col0) lies inside W (total rows, cols).
    A negative row0 was read as a Python slice from the end: kron_sum_tile_(row0=-4) of a 4-row W wrote
    W[0:2] silently, and a tile past the end was refused with the rows and shape of a sliced problem."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"{name}: out must be a 2-D (rows, cols) tensor, got {getattr(out, 'shape', type(out).__name__)}")
    if out.dtype not in _DTYPE_NAMES:
        raise TypeError(f"{name}: out must be {', '.join(_DTYPE_NAMES.values())}, got {out.dtype}")
    if total is None:  # out alone: checked before the factors, whose shapes give W's
        return
    from duat_kernels._validation import integer  # _validation imports this module

    for arg, start, size, limit in (("row0", row0, out.shape[0], total[0]), ("col0", col0, out.shape[1], total[1])):
        if integer(start) is None:  # a bool tensor was taken as 0 or 1
            raise TypeError(f"{name}: {arg} must be an int, got {start!r}")
        start = integer(start)
        if start < 0 or start + size > limit:
            raise ValueError(f"{name}: the tile [{start}, {start + size}) along {arg} lies outside W's {limit} "
                             f"{'rows' if arg == 'row0' else 'columns'} (W of shape {tuple(total)}, out {tuple(out.shape)})")


def _check_factors(name: str, out: torch.Tensor, **factors: tuple[torch.Tensor, int, str]) -> None:
    """Each factor (tensor, dims, shape in words) a tensor of that many dims in out's compute dtype on the CPU,
    whose memory out does not share: the kernel reads the factors while it writes out (an overlap gave a wrong
    W' without a word)."""
    from duat_kernels._validation import overlaps  # _validation imports this module

    for arg, (t, dims, shape) in factors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {arg} must be a {dims}-D {shape} tensor, got {got}")
        if t.device.type != "cpu":
            raise ValueError(f"{name}: {arg} must be on the CPU, got {t.device}")
        if t.dtype != compute_dtype(out.dtype):
            raise TypeError(f"{name}: {arg} must be {compute_dtype(out.dtype)} (the compute dtype of a {out.dtype} "
                            f"out), got {t.dtype}")
    if out.device.type != "cpu":
        raise ValueError(f"{name}: out must be on the CPU, got {out.device}")
    for arg, (t, _, _) in factors.items():
        if overlaps(out, t):
            raise ValueError(f"{name}: out overlaps the memory of {arg}, which the kernel reads while it writes out; "
                             "pass a separate buffer")


def _check_heads_of(name: str, num_heads, num_kv_heads, w_v: torch.Tensor, w_o: torch.Tensor) -> int:
    """_validation.check_heads for a kernel wrapper: ov_circuits(w_v, w_o, True, True) was one head of d = h·d
    (shape (1, M_out, M_in), silently), a float head count torch.empty's "failed to unpack the object", and a
    kv head count that does not divide the kernel's "heads (2) must be a positive multiple of kv_heads (3)".
    Returns h_kv (num_kv_heads=None: h, as everywhere)."""
    from duat_kernels._validation import check_heads  # _validation imports this module

    try:
        return check_heads(num_heads, num_kv_heads, w_v, w_o)[0]
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def kron_sum_tile_(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor, row0: int = 0,
                   col0: int = 0) -> torch.Tensor:
    """Write W[row0:row0+rows, col0:col0+cols] of W = sum_i left_i (x) right_i into out (rows, cols).

    left (h, P, S), right (h, Q, T) in the compute dtype of out, on the CPU; out contiguous.
    """
    _check_tile("kron_sum_tile_", out, row0, col0, None)
    _check_factors("kron_sum_tile_", out, left=(left, 3, "(h, P, S)"), right=(right, 3, "(h, Q, T)"))
    if left.shape[0] != right.shape[0]:  # was the kernel's "lt has 2 heads but rt has 3"
        raise ValueError(f"kron_sum_tile_: left {tuple(left.shape)} and right {tuple(right.shape)} must have the same "
                         "number of heads h (axis 0)")
    _check_tile("kron_sum_tile_", out, row0, col0, (left.shape[1] * right.shape[1], left.shape[2] * right.shape[2]))
    if out.numel() == 0:
        return out
    # Only the factor entries the tile touches are passed (views, no copies), so a small tile of a
    # long-sequence W' costs O(tile), not O(h N²).
    (p0, p1, q0, q1, row0), (s0, s1, t0, t1, col0) = _tile_ranges(row0, col0, out.shape, right.shape[1], right.shape[2])
    lt = left[:, p0:p1, s0:s1]  # (h, P', S'), read in place through its strides
    rt = right[:, q0:q1, t0:t1]  # (h, Q', T')
    if rt.shape[-1] > 1 and rt.stride(-1) != 1:
        rt = rt.contiguous()
    _C.kron_sum(_numpy_view(lt), _numpy_view(rt), _numpy_view(out), _DTYPE_NAMES[out.dtype], row0, col0,
                kernel_threads())
    return out


def kron_sum_factored_(attn: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int,
                       out: torch.Tensor, row0: int = 0, col0: int = 0) -> torch.Tensor:
    """Write W'[row0:row0+rows, col0:col0+cols] of the token-layout W' = Σ_i A_i ⊗ OV_i into out
    (rows, cols) for attn (h, N, N_k), w_v (h_kv·d, M_in) and w_o (M_out, h·d), all in out's compute
    dtype on the CPU. Only the parts of A and the weights the tile touches are passed, and OV is
    computed by the kernel a few rows q at a time, in cache, never written: the same bits as
    kron_sum_tile_ with ov_circuits, in O(tile + threads·h·M_in) memory."""
    _check_tile("kron_sum_factored_", out, row0, col0, None)
    _check_factors("kron_sum_factored_", out, attn=(attn, 3, "(h, N, N_k)"), w_v=(w_v, 2, "(h_kv·d, M_in)"),
                   w_o=(w_o, 2, "(M_out, h·d)"))
    num_kv_heads = _check_heads_of("kron_sum_factored_", attn.shape[0], num_kv_heads, w_v, w_o)
    _check_tile("kron_sum_factored_", out, row0, col0, (attn.shape[1] * w_o.shape[0], attn.shape[2] * w_v.shape[1]))
    if out.numel() == 0:
        return out
    if w_o.shape[1] == 0:  # head size d = 0: every OV_i is an empty sum, zero (the kernel's OV needs d >= 1)
        zero_ov = out.new_zeros((), dtype=attn.dtype).expand(attn.shape[0], w_o.shape[0], w_v.shape[1])
        return kron_sum_tile_(attn, zero_ov, out, row0, col0)
    (p0, p1, q0, q1, row0), (s0, s1, t0, t1, col0) = _tile_ranges(row0, col0, out.shape, w_o.shape[0], w_v.shape[1])
    wo, wv = w_o.detach()[q0:q1].contiguous(), w_v.detach()[:, t0:t1].contiguous()
    _C.kron_sum_factored(_numpy_view(attn[:, p0:p1, s0:s1]), _numpy_view(wo), _numpy_view(wv), _numpy_view(out),
                         _DTYPE_NAMES[out.dtype], num_kv_heads, row0, col0, kernel_threads())
    return out


def ov_circuits(w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """OV_i = Wo_i @ Wv_{i // g} (h, M_out, M_in), a view of an (M_out, h, M_in) buffer: the slab layout
    the kernel reads a token-layout row from. w_v (h_kv·d, M_in), w_o (M_out, h·d), float32 or float64
    on the CPU, without autograd. Computed by the kernel's micro-kernel (about 2.4x torch.bmm at
    d = 64, benchmarks/bench_ov_circuits.py); every entry is one chain of d multiply-adds, so the result does not depend on threads."""
    for name, w in (("w_v", w_v), ("w_o", w_o)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.device.type != "cpu" or \
                w.dtype not in (torch.float32, torch.float64):
            got = f"{w.dim()}-D {w.dtype} on {w.device}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"ov_circuits: {name} must be a 2-D float32 or float64 CPU tensor, got {got}")
    num_kv_heads = _check_heads_of("ov_circuits", num_heads, num_kv_heads, w_v, w_o)
    num_heads = int(num_heads)
    dtype = torch.promote_types(w_v.dtype, w_o.dtype)
    wo, wv = w_o.detach().to(dtype).contiguous(), w_v.detach().to(dtype).contiguous()
    slabs = torch.empty(wo.shape[0], num_heads, wv.shape[1], dtype=dtype)
    _C.ov_slabs(_numpy_view(wo), _numpy_view(wv), _numpy_view(slabs), num_heads, num_kv_heads, kernel_threads())
    return slabs.permute(1, 0, 2)


# Outputs from this size up come from the output cache (smaller ones are cheap to fault in).
OUTPUT_CACHE_MIN_BYTES = 8 << 20


def empty_output(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor for a kernel output: from the output cache when it is
    large (its storage cannot be resized), else torch.empty."""
    from duat_kernels._validation import integer  # _validation imports this module

    if not all(integer(n, tensors=False) is not None and n >= 0 for n in shape):
        raise ValueError(f"empty_output: shape must be ints >= 0, got {tuple(shape)!r}")
    if dtype not in _DTYPE_NAMES:  # a dtype's name failed with "'str' object has no attribute 'itemsize'"
        raise TypeError(f"empty_output: dtype must be one of {', '.join(map(str, _DTYPE_NAMES))}, got {dtype!r}")
    shape = tuple(integer(n, tensors=False) for n in shape)  # NumPy integers as ints
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= 1 << 63:
        raise ValueError(f"empty_output: shape {tuple(shape)} of {dtype} needs {nbytes} bytes, more than any "
                         "address space holds")
    if _C is None or nbytes < OUTPUT_CACHE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(_C.alloc_output(nbytes)).view(dtype).view(shape)


def stream_fill_(out: torch.Tensor, byte: int = 0x3F) -> torch.Tensor:
    """Set every byte of a contiguous CPU tensor to `byte` with the kernel's non-temporal stores (the
    store path of a W' above 16 MiB written into out=): the memory-write floor of that path, next to
    fill_'s. The default 0x3F gives 0.75 in float32 and bfloat16: data, not zeros, which some
    machines write twice as fast (a VM measured here). For benchmarks."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"stream_fill_: out must be a torch.Tensor, got {type(out).__name__}")
    if out.is_neg() or out.is_conj():  # a lazy view: the bytes would go into the resolved copy, not into out
        raise ValueError("stream_fill_ needs a tensor without the negative or conjugate bit; pass "
                         "out.resolve_neg().resolve_conj() (a copy) or the tensor it views")
    if out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"stream_fill_ needs a contiguous CPU tensor, got {out.device} tensor of strides {out.stride()}")
    from duat_kernels._validation import integer  # _validation imports this module

    if integer(byte, tensors=False) is None or not 0 <= byte <= 255:  # a NumPy integer was refused
        raise ValueError(f"byte must be an int in [0, 255], got {byte!r}")
    _C.stream_fill(_numpy_view(out), integer(byte), kernel_threads())
    return out


def output_cache_info() -> dict[str, int]:
    """{cached_bytes, cached_blocks, limit_bytes, hits, misses} of the output cache."""
    return dict(_C.output_cache_info()) if _C is not None else {}


def empty_output_cache() -> None:
    """Give every cached output block back to the operating system."""
    if _C is not None:
        _C.release_output_cache()


def set_output_cache_limit(nbytes: int) -> None:
    """Keep at most nbytes of freed outputs for reuse (0 turns the cache off)."""
    if isinstance(nbytes, bool) or not hasattr(nbytes, "__index__") or nbytes < 0:  # 1.5 was taken as 1
        raise ValueError(f"nbytes must be an int >= 0 (0 turns the cache off), got {nbytes!r}")
    if _C is not None:
        _C.set_output_cache_limit(min(int(nbytes), (1 << 63) - 1))


OUTPUT_CACHE_ENV = "DUAT_OUTPUT_CACHE_BYTES"


def _apply_output_cache_env() -> None:
    """DUAT_OUTPUT_CACHE_BYTES sets the cache limit (bytes, "2e9" too); an unusable value warns and keeps the
    default, an eighth of physical memory. The C++ side reads it with strtoull, which took "-5" as 2**64 - 5
    (no limit), "1e9" as 1 byte and "garbage" as 0, silently."""
    text = os.environ.get(OUTPUT_CACHE_ENV, "").strip()
    if not text or _C is None:
        return
    try:
        value = float(text)
        nbytes = int(text) if text.lstrip("+").isdigit() else int(value) if value.is_integer() else -1
    except (ValueError, OverflowError):  # not a number, or inf
        nbytes = -1
    if nbytes < 0:
        default = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8
        warnings.warn(f"{OUTPUT_CACHE_ENV}={text!r} ignored: expected a number of bytes >= 0 (0 turns the cache "
                      f"off); using the default, an eighth of physical memory ({default} bytes)", RuntimeWarning,
                      stacklevel=2)
        nbytes = default
    set_output_cache_limit(nbytes)


_apply_output_cache_env()


def _factor_range(start: int, length: int, inner: int) -> tuple[int, int, int, int, int]:
    """Index ranges of the outer (p or s) and inner (q or t) factor axes that W[start:start+length]
    touches along one axis (index = outer * inner + in), and the start within the sliced problem."""
    o0, o1 = start // inner, (start + length - 1) // inner + 1
    if o1 - o0 == 1:  # inside one outer index: only part of the inner axis is needed
        i0, i1 = start % inner, (start + length - 1) % inner + 1
        return o0, o1, i0, i1, 0
    return o0, o1, 0, inner, start - o0 * inner
