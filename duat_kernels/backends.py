"""Backend dispatch: the one place that chooses and calls a kernel.

"reference" is plain PyTorch (any device), "cpp" the C++ kernel (CPU tensors), "triton" the
Triton kernel (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1), "auto" the fastest one
available for the tensors' device. Every kernel writes one tile of W = Σ_i L_i ⊗ R_i.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch.autograd import forward_ad

from duat_kernels import cpp, reference
from duat_kernels._progress import batch_elements
from duat_kernels._validation import OUTPUT_DTYPES, functorch_level_is, functorch_wrapped

BACKENDS = ("auto", "reference", "cpp", "triton")


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, at import: find_spec stats the import path (~40 µs, half a small call's time).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _triton_importable() -> bool:
    return _TRITON_FOUND


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on tensors of the given device, fastest last."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device or a device name such as 'cpu' or 'cuda', got "
                        f"{type(device).__name__} {device!r}")
    try:
        kind = torch.device(device).type
    except RuntimeError:  # torch's "Expected one of cpu, cuda, ipu, ... device type at start of device string"
        raise ValueError(f"device must be a torch.device or a device name such as 'cpu' or 'cuda', got {device!r}"
                         ) from None
    names = ["reference"]
    if kind == "cpu" and triton_interpreter() and _triton_importable():
        names.append("triton")  # correct but slow: for tests, never picked by "auto" on the CPU
    if kind == "cpu" and cpp.is_available():
        names.append("cpp")
    if kind == "cuda" and torch.cuda.is_available() and _triton_importable():  # no GPU: nothing runs on "cuda"
        names.append("triton")
    return names


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` (which may be "auto"), or a clear error why it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "auto":
        return available_backends(device)[-1]
    if backend == "cpp":
        if not cpp.is_available():
            raise RuntimeError(f"backend='cpp' is unavailable: {cpp.IMPORT_ERROR}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, but the inputs are on {device}; "
                             "use backend='auto' or move the inputs to the CPU")
    if backend == "triton":
        if not _triton_importable():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if device.type == "cpu" and not triton_interpreter():
            raise ValueError("backend='triton' runs on CUDA tensors; on CPU tensors it runs only in Triton's "
                             "interpreter (set TRITON_INTERPRET=1 before triton is imported). Use backend='cpp' "
                             "or 'auto' on the CPU")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA tensors, but the inputs are on {device}")
    return backend


def output_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    if backend == "triton":
        from duat_kernels import triton as triton_backend
        return triton_backend.OUTPUT_DTYPES
    return OUTPUT_DTYPES


def tile_kernel(backend: str):
    """The function (left, right, out, row0, col0) -> out of a kernel backend."""
    if backend == "cpp":
        return cpp.kron_sum_tile_
    if backend == "triton":
        from duat_kernels import triton as triton_backend
        return triton_backend.kron_sum_tile_
    raise ValueError(f"backend {backend!r} has no tile kernel")


def direct_kernel_call(*tensors: torch.Tensor) -> bool:
    """Whether a C++ or Triton kernel may run on these tensors outside the registered op: eager (not
    traced by torch.compile or torch.export), plain tensors with storage (no torch.func wrapper,
    FakeTensor or other subclass) and no dispatch mode active (FakeTensorMode, FlopCounterMode, a
    profiler's mode and the like see the op or the reference's torch ops instead)."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors) and not functorch_wrapped(*tensors))


def direct_call(*tensors: torch.Tensor) -> bool:
    """direct_kernel_call, and autograd records nothing through the tensors: a kernel may then replace the
    registered op (whose backward the kernel has not)."""
    return direct_kernel_call(*tensors) and not tracks_grad(*tensors)


def ov_circuits(backend: str, w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """OV (h, M_out, M_in) for materialising W' (or a tile of it) with a backend.

    The C++ backend computes it with its own kernel, as a view of an (M_out, h, M_in) buffer: a
    token-layout row of W' then reads its slab OV[:, q, :] in place. Every other case (and any OV
    a gradient has to flow through) is reference.ov_circuits. hvo_matrix and the tiles of
    HVOOperator both take OV from here, so a tile equals the same slice of W' bit for bit."""
    if (backend != "cpp" or not direct_call(w_v, w_o) or w_v.device.type != "cpu"
            or w_v.dtype not in (torch.float32, torch.float64)):
        return reference.ov_circuits(w_v, w_o, num_heads, num_kv_heads)
    return cpp.ov_circuits(w_v, w_o, num_heads, num_kv_heads)


def ov_part(backend: str, w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int, num_kv_heads: int, rows: slice,
            cols: slice) -> torch.Tensor:
    """OV[:, rows, cols] as ov_circuits gives it: the C++ backend forms only that part, from w_o[rows]
    and w_v[:, cols] (each entry is the same chain of d multiply-adds as in the whole OV, so the
    same bits); other backends slice the whole OV."""
    if backend == "cpp":
        return ov_circuits(backend, w_v[:, cols], w_o[rows], num_heads, num_kv_heads)
    return ov_circuits(backend, w_v, w_o, num_heads, num_kv_heads)[:, rows, cols]


def tracks_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an operation on these tensors: grad mode on and one of them requires grad,
    or one of them carries a forward-mode tangent (has_tangent)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors) or has_tangent(*tensors)


def has_tangent(*tensors: torch.Tensor | None) -> bool:
    """Whether a tensor is a dual tensor of forward-mode AD (torch.autograd.forward_ad.make_dual): the C++ and
    Triton kernels drop its tangent (W' came back without one), and the registered op has no forward formula."""
    if getattr(forward_ad, "_current_level", 0) < 0 or torch.compiler.is_compiling():  # no dual_level entered
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def functorch_grad(*tensors: torch.Tensor) -> bool:
    """Whether a tensor is tracked by a torch.func gradient transform (grad, vjp, jacrev, jvp), at any level
    of its wrappers: the registered op's autograd formula cannot run there (torch.library generates an
    autograd.Function without setup_context, which those transforms require; pytorch issues 168393,
    179652), so such calls take the reference ops, which compose with every transform."""
    return functorch_level_is(torch._C._functorch.is_gradtrackingtensor, *tensors)


def functorch_batched(*tensors: torch.Tensor) -> bool:
    """Whether a tensor is batched by torch.func.vmap, at any level of its wrappers."""
    return functorch_level_is(torch._C._functorch.is_batchedtensor, *tensors)


def fuses_ov(backend: str, layout: str, batch: int, *tensors: torch.Tensor) -> bool:
    """Whether W' (or a tile of it) for a batch of attention maps is written by the C++ kernel straight
    from the weights, OV computed in cache (materialise_fused): token layout, one batch element (a
    batch shares one OV), eager and without autograd through any of the tensors (the registered op,
    which takes OV, serves the other cases)."""
    return (backend == "cpp" and layout == "token" and batch == 1 and all(t.device.type == "cpu" for t in tensors)
            and direct_call(*tensors))


def materialise_fused(attn: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int,
                      out: torch.Tensor, row0: int = 0, col0: int = 0) -> torch.Tensor:
    """Write W'[row0:, col0:] (out's shape) for attn (1, h, N, N_k) into out (1, rows, cols) (see fuses_ov)."""
    ct = reference.compute_dtype(out.dtype)
    cpp.kron_sum_factored_(attn[0].to(ct), w_v.to(ct), w_o.to(ct), num_kv_heads, out[0], row0, col0)
    return out


def empty_output(backend: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output of a backend: the C++ backend's large outputs come from its output cache."""
    if backend == "cpp":
        return cpp.empty_output(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def kron_factors(attn: torch.Tensor, ov: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) of W = Σ_i L_i ⊗ R_i for attn (h, N, N_k) and ov (h, M_out, M_in)."""
    return (attn, ov) if layout == "token" else (ov, attn)


def materialise(backend: str, attn: torch.Tensor, ov: torch.Tensor, layout: str, out: torch.Tensor) -> torch.Tensor:
    """Write W' for attn (B, h, N, N_k), ov (h, M_out, M_in) into out (B, N·M_out, N_k·M_in)."""
    ct = reference.compute_dtype(out.dtype)
    ov = ov.to(ct)
    if backend == "reference":
        return out.copy_(reference.hvo_matrix(attn.to(ct), ov, layout))
    if out.numel() == 0:  # empty batch, M_in = 0 or M_out = 0: nothing to write
        return out
    kernel = tile_kernel(backend)
    for b in batch_elements(attn.shape[0], "W' per batch element"):
        kernel(*kron_factors(attn[b].to(ct), ov, layout), out[b])
    return out
