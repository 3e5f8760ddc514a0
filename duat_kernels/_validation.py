"""Input checks of the public API, done once, before any allocation or kernel call.

Every error names the argument and what was expected. Kernels trust what passes these checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from duat_kernels import cpp

OUTPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LAYOUTS = ("token", "feature")


class IndexOutOfRangeError(IndexError, ValueError):
    """An index (block, batch element) outside its axis: an IndexError, and a ValueError like every
    other bad argument of the public API."""


@dataclass(frozen=True)
class HeadDims:
    """Sizes of one attention layer: B batch, h query heads, h_kv kv heads, N tokens (queries: rows of A), d head
    size, and N_k keys (columns of A): N_k = N for self-attention, the encoder's length for cross-attention."""

    batch: int
    heads: int
    kv_heads: int
    tokens: int
    head_dim: int
    m_in: int
    m_out: int
    batched: bool  # whether attn came with a batch axis
    keys: int

    @property
    def square(self) -> bool:
        """Whether A is N x N (self-attention), so that W' maps the layer's own tokens to themselves."""
        return self.keys == self.tokens


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_tensor(name: str, t, ndims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {_shape(t)}")
    check_real_dtype(name, t)


def check_real_dtype(name: str, t: torch.Tensor) -> None:
    """t must be a dense (strided) float32/float64/float16/bfloat16 tensor; float8 is refused because
    its values mean nothing without the scales that quantised them."""
    check_strided(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype (float32, float64, float16 or bfloat16), "
                        f"got {t.dtype}")
    if t.dtype not in OUTPUT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float64, float16 or bfloat16. Dequantise "
                        f"float8 weights first (multiply by their scales, e.g. w.float() * scale)")


def check_strided(name: str, t: torch.Tensor) -> None:
    """Sparse (COO, CSR, ...) and MKL-DNN tensors failed deep inside torch (reshape, strides, storage)."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with "
                        f"{name}.to_dense()")


def as_dtype(dtype) -> torch.dtype | None:
    """A torch.dtype from a dtype or its name ("float32", "torch.bfloat16", "half"); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(resolved, torch.dtype):
            return resolved
    raise TypeError(f"dtype must be a torch.dtype or one of 'float32', 'float64', 'float16', 'bfloat16', "
                    f"got {dtype!r}")


NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def storage_dtype(dtype, default: torch.dtype, where: str) -> torch.dtype:
    """The dtype W' is stored in where NumPy holds it (a .npy file, Dask, Zarr): dtype (or its name), else
    `default` (the operator's dtype), bfloat16 widened to float32 (exact): NumPy has no bfloat16, and an
    operator of bfloat16 tensors refused its own default."""
    dtype = as_dtype(dtype)
    if dtype is None:
        dtype = torch.float32 if default == torch.bfloat16 else default
    if dtype not in NUMPY_DTYPES:
        raise TypeError(f"dtype must be float32, float64 or float16 {where}, got {dtype}")
    return dtype


def integer(value, tensors: bool = True) -> int | None:
    """value as an int if it is an integer: anything with __index__ (int, NumPy integer, and with
    tensors=True a one-element integer tensor) but a bool; else None. A symbolic size (torch.SymInt,
    a dimension that torch.compile traces as dynamic) is an integer too, kept symbolic: TorchDynamo
    cannot trace hasattr on it."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return value if type(value) in (int, torch.SymInt) else int(value)  # an int subclass (IntEnum) as int
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and (not tensors or value.dtype == torch.bool)) \
            or not hasattr(value, "__index__"):
        return None  # a bool tensor's __index__ gives 0 or 1: block(torch.tensor(True), 0) was block 1
    try:
        return value.__index__()
    except TypeError:  # an array of several entries or of floats has __index__, and refuses it
        return None


def check_flag(name: str, value) -> bool:
    """A True/False argument (NumPy bools and 0/1 too) as a bool; a string such as "no", which would be
    truthy, or a tensor is a TypeError."""
    if isinstance(value, (str, bytes, torch.Tensor, np.ndarray)) or value not in (True, False):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def numeric_array(name: str, value, complex_ok: bool = False) -> np.ndarray:
    """value as a NumPy array of numbers (bool, int, float; complex when complex_ok): strings and objects
    failed deep inside NumPy, and complex values were cast to real with only a warning."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged nested sequences
        raise TypeError(f"{name} must be an array of numbers, got {type(value).__name__} ({exc})") from None
    if array.dtype.kind not in ("biufc" if complex_ok else "biuf"):
        kinds = "real or complex numbers" if complex_ok else "real numbers"
        raise TypeError(f"{name} must hold {kinds}, got an array of dtype {array.dtype}")
    return array


def check_threads(name: str, value) -> int:
    """A thread count: an int in [1, cpp.max_threads()] (4 per CPU; 100000 crashed the process in OpenMP)."""
    threads = positive_int(value)
    if threads is None:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if threads > cpp.max_threads():
        raise ValueError(f"{name} must be at most {cpp.max_threads()} ({cpp.MAX_THREADS_PER_CPU} per CPU, "
                         f"{os.cpu_count()} CPUs here), got {value!r}")
    return threads


def check_index(name: str, index, size: int, axis: str) -> int:
    """A Python-style index into an axis of `size` (negative counts from the end) -> [0, size)."""
    if integer(index) is None:
        raise TypeError(f"{name} must be an int, got {type(index).__name__} {index!r}")
    index = integer(index)
    if not -size <= index < size:
        raise IndexOutOfRangeError(f"{name}={index} is out of range for {axis} "
                                   f"(expected {-size} <= {name} < {size})")
    return index % size


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'token' or 'feature', got {layout!r}")


def check_has_data(what: str, device: torch.device) -> None:
    """Refuse meta tensors where numbers must come out (a file, a NumPy array, a sample, a spectrum)."""
    if device.type == "meta":
        raise ValueError(f"{what} needs an HVOOperator on tensors with data (cpu or cuda), got meta tensors "
                         "(they have shapes only)")


def check_operator(what: str, op, data: bool = True) -> None:
    """op must be an HVOOperator, on tensors with data for data=True (check_has_data): save_dense('op', path) failed
    with "'str' object has no attribute 'dims'", to_dask(attn) with "'Tensor' object has no attribute 'device'"."""
    from duat_kernels.hvo_operator import HVOOperator  # it imports this module

    if not isinstance(op, HVOOperator):
        raise TypeError(f"{what} needs an HVOOperator (duat_kernels.HVOOperator(attn, w_v, w_o)), got "
                        f"{type(op).__name__}")
    if data:
        check_has_data(what, op.device)


def check_not_given(what: str, kwargs: dict, **fixed) -> None:
    """Refuse keyword arguments that `what` fixes itself (their fixed values given as `fixed`), which Python refused
    as "hvo_matrix() got multiple values for keyword argument 'layout'"."""
    given = [name for name in fixed if name in kwargs]
    if given:
        own = ", ".join(f"{name}={fixed[name]!r}" for name in given)
        raise TypeError(f"{what} takes its own {', '.join(given)} ({own}); build another one for other values")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}; put all inputs on one device")
    return first


def positive_int(value) -> int | None:
    """value as an int if it is a positive integer (an int or a NumPy integer, not a tensor), else None."""
    value = integer(value, tensors=False)
    return value if value is not None and value >= 1 else None


def check_heads(num_heads: int, num_kv_heads: int | None, w_v: torch.Tensor | None,
                w_o: torch.Tensor) -> tuple[int, int]:
    """Validate h, h_kv against w_o (M_out, h*d) and w_v (h_kv*d, M_in); return (h_kv, d)."""
    h = positive_int(num_heads)
    if h is None:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    num_heads = h
    h_kv = positive_int(num_heads if num_kv_heads is None else num_kv_heads)
    if h_kv is None:
        raise ValueError(f"num_kv_heads must be a positive int or None, got {num_kv_heads!r}")
    if num_heads % h_kv:
        raise ValueError(f"num_kv_heads={h_kv} must divide the number of query heads h={num_heads} (GQA groups)")
    if w_o.shape[1] % num_heads:
        raise ValueError(f"w_o must have shape (M_out, h*d) with h={num_heads} heads, got {_shape(w_o)}: "
                         f"{w_o.shape[1]} is not a multiple of {num_heads}")
    d = w_o.shape[1] // num_heads
    if w_v is not None and w_v.shape[0] != h_kv * d:
        raise ValueError(f"w_v must have shape (h_kv*d, M_in) = ({h_kv}*{d}, M_in) = ({h_kv * d}, M_in) for "
                         f"num_kv_heads={h_kv} and head size d={d} (from w_o), got {_shape(w_v)}")
    return h_kv, d


# What a 3-D attn means, for every error about heads.
ATTN_AXES_HINT = (
    "attn is read as (h, N, N) per-head probabilities of one sequence, or (B, h, N, N) for a batch. A head-averaged "
    "(B, N, N) map (nn.MultiheadAttention's default) is not W' of the layer: call the module with need_weights=True, "
    "average_attn_weights=False for (B, h, N, N); pass a batch of single-head maps as attn.unsqueeze(1) with "
    "num_heads=1 only if w_v and w_o are one head's weights")


def check_attention(attn: torch.Tensor, w_v: torch.Tensor | None, w_o: torch.Tensor,
                    num_kv_heads: int | None, num_heads: int | None = None, *, needs_w_v: bool = True) -> HeadDims:
    """The sizes of attn (h, N, N) / (B, h, N, N) with w_v (h_kv·d, M_in) and w_o (M_out, h·d). w_v=None only with
    needs_w_v=False (hvo_bias, which has no w_v): hvo_matrix(attn, None, w_o) failed with "'NoneType' object has
    no attribute 'dtype'", and HVOOperator(attn, None, w_o) made an operator of shape (N·M_out, 0)."""
    check_tensor("attn", attn, (3, 4))
    check_tensor("w_o", w_o, (2,))
    if w_v is not None or needs_w_v:
        check_tensor("w_v", w_v, (2,))
    n, n_k = attn.shape[-2], attn.shape[-1]
    if n == 0 or n_k == 0 or attn.shape[-3] == 0:
        raise ValueError(f"attn must have shape (h, N, N_k) or (B, h, N, N_k) (N_k = N for self-attention, the "
                         f"encoder's length for cross-attention) with h, N, N_k >= 1, got {_shape(attn)}")
    h = attn.shape[-3]
    if num_heads is not None:
        if positive_int(num_heads) is None:
            raise ValueError(f"num_heads must be a positive int or None, got {num_heads!r}")
        if num_heads != h:
            raise ValueError(f"num_heads={num_heads} but attn of shape {_shape(attn)} has {h} heads on axis -3. "
                             + ATTN_AXES_HINT)
    try:
        h_kv, d = check_heads(h, num_kv_heads, w_v, w_o)
    except ValueError as exc:
        if num_heads is None and attn.dim() == 3:  # perhaps a head-averaged (B, N, N) map
            raise ValueError(f"{exc}. {ATTN_AXES_HINT}") from None
        raise
    batched = attn.dim() == 4
    return HeadDims(batch=attn.shape[0] if batched else 1, heads=h, kv_heads=h_kv, tokens=n, head_dim=d,
                    m_in=w_v.shape[1] if w_v is not None else 0, m_out=w_o.shape[0], batched=batched, keys=n_k)


def check_bias(name: str, b: torch.Tensor | None, size: int) -> None:
    if b is None:
        return
    check_tensor(name, b, (1,))
    if b.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},), got {_shape(b)}")


def resolve_dtype(dtype: torch.dtype | str | None, out: torch.Tensor | None, *inputs: torch.Tensor) -> torch.dtype:
    dtype = as_dtype(dtype)
    if dtype is None and out is not None:
        dtype = out.dtype
    elif dtype is None:
        dtype = inputs[0].dtype
        for t in inputs[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float64, float16, bfloat16, got {dtype}")
    if out is not None and out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype} but dtype={dtype} was requested")
    return dtype


def check_out(out: torch.Tensor, shape: tuple[int, ...], device: torch.device, *inputs: torch.Tensor) -> None:
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {_shape(out)}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but the inputs are on {device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (it is written in place, row-major); "
                         "pass a fresh torch.empty buffer or out=None")
    if out.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("out requires grad; hvo_matrix writes it in place, so pass a buffer without grad")
    if torch.compiler.is_compiling() or functorch_wrapped(out, *inputs) or any(
            t is not None and type(t) not in (torch.Tensor, torch.nn.Parameter) for t in (out, *inputs)):
        # fake tensors (compile, export, FakeTensorMode) and torch.func's wrappers (vmap, grad) have no
        # addresses ("Cannot access data pointer of Tensor that doesn't have storage"); the eager call checks overlap
        return
    if out.is_inference() and not torch.is_inference_mode_enabled():  # as torch's own out= ops refuse it
        raise ValueError("out is an inference tensor (made under torch.inference_mode) and cannot be written "
                         "outside it; call hvo_matrix under torch.inference_mode too, or pass a buffer made outside")
    if out.device.type == "meta":
        return  # meta tensors have no memory (every address is 0): nothing to overlap
    if out.is_neg():  # a lazy negation (torch._neg_view): what is written would be read back negated
        raise ValueError("out has its negative bit set (a lazily negated view); pass a plain buffer (torch.empty)")
    if any(overlaps(out, t) for t in inputs):
        raise ValueError("out overlaps the memory of an input tensor; pass a separate buffer")


def overlaps(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether the byte ranges a and b span on one device intersect (b None or either empty: False)."""
    if b is None or b.device != a.device or not a.numel() or not b.numel():
        return False
    lo, hi = _byte_range(a)
    b_lo, b_hi = _byte_range(b)
    return lo < b_hi and b_lo < hi


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return 0, 0
    start = t.data_ptr()
    span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    neg = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st < 0)
    return start + neg * t.element_size(), start + (span + 1) * t.element_size()


def value_bytes(t: torch.Tensor) -> bytes:
    """The bytes of t's values, row-major, for hashing: a lazily negated view (negative bit set) gives its
    values' bytes, as its plain copy does (torch's view to uint8 refuses such a tensor)."""
    return t.detach().resolve_neg().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def has_values(*tensors: torch.Tensor) -> bool:
    """Whether the tensors hold values that Python may read: not meta tensors, nor FakeTensorMode's or another
    subclass, nor batched by torch.func.vmap (which cannot branch on them), nor traced by torch.compile (a branch
    on them breaks the graph)."""
    return not torch.compiler.is_compiling() and all(
        t.device.type != "meta" and type(t) in (torch.Tensor, torch.nn.Parameter)
        and not functorch_level_is(torch._C._functorch.is_batchedtensor, t) for t in tensors)


def functorch_wrapped(*tensors: torch.Tensor | None) -> bool:
    """Whether a tensor is a torch.func transform's wrapper (vmap's batched tensor, grad's), which has no
    storage: no data pointer for a C++ kernel ("Cannot access data pointer of Tensor that doesn't have storage")
    or an overlap check. False in a torch.compile trace, which cannot ask and sees through the wrappers."""
    return not torch.compiler.is_compiling() and any(
        t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def functorch_level_is(kind, *tensors: torch.Tensor) -> bool:
    """Whether some level of some tensor's torch.func wrappers satisfies kind (a torch._C._functorch test such
    as is_batchedtensor or is_gradtrackingtensor)."""
    f = torch._C._functorch
    for t in tensors:
        while f.is_functorch_wrapped_tensor(t):
            if kind(t):
                return True
            t = f.get_unwrapped(t)
    return False


def all_finite(*tensors: torch.Tensor | None) -> bool:
    """Whether every entry of the given tensors is known to be finite. NaN and Inf survive any sum, so a finite
    sum proves the entries finite (no bool tensor: ~25x faster than isfinite().all() on the CPU); only
    a sum that is not finite (a non-finite entry, or finite entries that overflow) is checked entry by entry.
    Tensors whose values cannot be read (has_values: meta, FakeTensorMode's, vmap's, a torch.compile trace) are
    not known finite: False, so that callers take the path that is exact for NaN and Inf as well."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        if not has_values(t):
            return False
        t = distinct_part(t)
        total = t.sum(dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None)
        if not bool(torch.isfinite(total)) and not bool(torch.isfinite(t).all()):
            return False
    return True


def distinct_part(t: torch.Tensor) -> torch.Tensor:
    """t narrowed to its first index along every dimension of stride 0 (an expand()ed one): the same values, each
    read once (all_finite of attn expanded to 10^9 batch elements summed all 10^9 copies)."""
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if stride == 0 and size > 1:
            t = t.narrow(dim, 0, 1)
    return t


def nan_max(values, default: float | None = None) -> float:
    """The largest of some numbers (errors, norms), NaN if any is NaN: Python's max skips a NaN that comes
    after a number (NaN > x is false), so one NaN layer would pass a tolerance check. default: for no values."""
    values = [float(v) for v in values]
    if not values and default is not None:
        return float(default)
    return float("nan") if any(v != v for v in values) else max(values)
