"""Backend dispatch: the one place that chooses and calls a kernel.

"reference" is plain PyTorch (any device, differentiable), "cpp" the C++ kernel (CPU tensors),
"auto" the fastest one available for the tensors' device.
"""

from __future__ import annotations

import torch

from duat_kernels import cpp, reference

BACKENDS = ("auto", "reference", "cpp")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on tensors of the given device, fastest last."""
    names = ["reference"]
    if torch.device(device).type == "cpu" and cpp.is_available():
        names.append("cpp")
    return names


def resolve(backend: str, device: torch.device, needs_grad: bool) -> str:
    """The concrete backend for `backend` (which may be "auto"), or a clear error why it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "auto":
        return "reference" if needs_grad else available_backends(device)[-1]
    if backend == "cpp":
        if not cpp.is_available():
            raise RuntimeError(f"backend='cpp' is unavailable: {cpp.IMPORT_ERROR}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, but the inputs are on {device}; "
                             "use backend='auto' or move the inputs to the CPU")
        if needs_grad:
            raise RuntimeError("backend='cpp' does not propagate gradients; call it under torch.no_grad() "
                               "or use backend='reference' (or 'auto') for a differentiable W'")
    return backend


def materialise(backend: str, attn: torch.Tensor, ov: torch.Tensor, layout: str,
                out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """W' for attn (B, h, N, N), ov (h, M_out, M_in) into out (B, N*M_out, N*M_in), or a new tensor."""
    if backend == "reference":
        ct = reference.compute_dtype(dtype)
        w = reference.hvo_matrix(attn.to(ct), ov.to(ct), layout)
        return w.to(dtype) if out is None else out.copy_(w)
    if out is None:
        b, h, n, _ = attn.shape
        out = torch.empty(b, n * ov.shape[1], n * ov.shape[2], dtype=dtype, device=attn.device)
    return cpp.hvo_matrix_(attn, ov, layout, out)
