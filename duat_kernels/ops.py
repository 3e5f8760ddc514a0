"""torch.library registration of the materialisation, so that it composes with torch.compile and
autograd: duat::hvo_matrix (returns W') and duat::hvo_matrix_out (writes W' into out).

Both take attn (B, h, N, N_k) (N_k = N but for cross-attention),
ov (h, M_out, M_in) (the OV circuits, computed with ordinary torch
ops so that gradients reach w_v and w_o through them), the layout and a concrete backend.
"""

from __future__ import annotations

import torch

from duat_kernels import _validation as v
from duat_kernels import backends, reference
from duat_kernels._progress import batch_elements

KERNEL_BACKENDS = ("reference", "cpp", "triton")


def output_shape(attn: torch.Tensor, ov: torch.Tensor) -> tuple[int, int, int]:
    """(B, N·M_out, N_k·M_in): the shape of W' for attn (B, h, N, N_k) and ov (h, M_out, M_in)."""
    return attn.shape[0], attn.shape[-2] * ov.shape[1], attn.shape[-1] * ov.shape[2]


def check_op_arguments(attn: torch.Tensor, ov: torch.Tensor, layout: str, backend: str, dtype: torch.dtype,
                       out: torch.Tensor | None = None) -> tuple[int, int, int]:
    """The arguments of the ops when called directly (torch.ops.duat.*; duat_kernels.hvo_matrix checked them
    already): a misspelt layout was read as "feature", an out= of a narrower shape got a tile of W', both
    silently. Returns the output shape (B, N·M_out, N_k·M_in)."""
    if attn.dim() != 4 or ov.dim() != 3 or ov.shape[0] != attn.shape[1]:
        raise ValueError(f"duat::hvo_matrix needs attn (B, h, N, N_k) and ov (h, M_out, M_in) with the same h, got "
                         f"{tuple(attn.shape)} and {tuple(ov.shape)}")
    v.check_layout(layout)
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, KERNEL_BACKENDS))} (a resolved backend), "
                         f"got {backend!r}")
    if dtype not in v.OUTPUT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float64, float16, bfloat16, got {dtype}")
    shape = output_shape(attn, ov)
    if out is not None:
        v.check_out(out, shape, attn.device, attn, ov)
    return shape


@torch.library.custom_op("duat::hvo_matrix", mutates_args=())
def hvo_matrix(attn: torch.Tensor, ov: torch.Tensor, layout: str, backend: str, dtype: torch.dtype) -> torch.Tensor:
    check_op_arguments(attn, ov, layout, backend, dtype)
    return _materialise_new(attn, ov, layout, backend, dtype)


def _materialise_new(attn: torch.Tensor, ov: torch.Tensor, layout: str, backend: str, dtype: torch.dtype) -> torch.Tensor:
    out = backends.empty_output(backend, output_shape(attn, ov), dtype, attn.device)
    return backends.materialise(backend, attn, ov, layout, out)


@hvo_matrix.register_fake
def _(attn, ov, layout, backend, dtype):
    return attn.new_empty(output_shape(attn, ov), dtype=dtype)


@torch.library.custom_op("duat::hvo_matrix_out", mutates_args=("out",))
def hvo_matrix_out(attn: torch.Tensor, ov: torch.Tensor, layout: str, backend: str, out: torch.Tensor) -> None:
    check_op_arguments(attn, ov, layout, backend, out.dtype, out)
    backends.materialise(backend, attn, ov, layout, out)


@hvo_matrix_out.register_fake
def _(attn, ov, layout, backend, out):
    return None


def materialise(attn: torch.Tensor, ov: torch.Tensor, layout: str, backend: str, dtype: torch.dtype) -> torch.Tensor:
    """W' (B, N·M_out, N_k·M_in) for checked attn (B, h, N, N_k) and ov (h, M_out, M_in): duat::hvo_matrix, or
    its kernel directly where backends.direct_call allows (the op's dispatch costs 20-40 µs a call, a
    third of a small Triton call)."""
    if backends.direct_call(attn, ov):
        return _materialise_new(attn, ov, layout, backend, dtype)
    return hvo_matrix(attn, ov, layout, backend, dtype)


def materialise_into(attn: torch.Tensor, ov: torch.Tensor, layout: str, backend: str, out: torch.Tensor) -> None:
    """Write W' into a checked out (B, N·M_out, N_k·M_in): duat::hvo_matrix_out, or its kernel directly where
    backends.direct_call allows."""
    if backends.direct_call(attn, ov, out):
        backends.materialise(backend, attn, ov, layout, out)
    else:
        hvo_matrix_out(attn, ov, layout, backend, out)


def hvo_matrix_vjp(grad: torch.Tensor, attn: torch.Tensor, ov: torch.Tensor, layout: str):
    """Gradients of <grad, W'> with respect to attn and ov. W' is linear in each:

        d attn[b, i, n, m] = Σ_{c,a} G[b, (n, c), (m, a)] OV_i[c, a]
        d ov[i, c, a]      = Σ_{b,n,m} G[b, (n, c), (m, a)] A_i[b, n, m]

    computed per output token n as small batched products over c, so that nothing larger than
    (M_out, h, N) is formed besides the incoming gradient itself.
    """
    batch, h, n, n_k = attn.shape
    m_out, m_in = ov.shape[1:]
    ct = reference.compute_dtype(grad.dtype)
    if layout == "token":
        g5 = grad.reshape(batch, n, m_out, n_k, m_in)  # (b, n, c, m, a)
    else:
        g5 = grad.reshape(batch, m_out, n, m_in, n_k).permute(0, 2, 1, 4, 3)  # (b, c, n, a, m) -> (b, n, c, m, a)
    ov_c = ov.to(ct).transpose(0, 1)  # (c, h, a)
    a_ct = attn.to(ct)
    grad_attn = torch.empty(batch, h, n, n_k, dtype=ct, device=attn.device)
    grad_ov = torch.zeros(m_out, h, m_in, dtype=ct, device=attn.device)
    for b in batch_elements(batch, "gradient of W'"):
        for row in range(n):
            g = g5[b, row].to(ct)  # (c, m, a): the blocks of output token `row`
            grad_attn[b, :, row, :] = torch.matmul(ov_c, g.transpose(-1, -2)).sum(0)  # Σ_c OV[:, c, :] Gᵀ
            grad_ov += torch.matmul(a_ct[b, :, row, :], g)  # (c, h, a): A[:, row, :] G
    return grad_attn.to(attn.dtype), grad_ov.transpose(0, 1).to(ov.dtype)


def _setup_context(ctx, inputs, output):
    attn, ov, layout, _backend, _dtype = inputs
    ctx.save_for_backward(attn, ov)
    ctx.layout = layout


def _backward(ctx, grad):
    attn, ov = ctx.saved_tensors
    grad_attn, grad_ov = hvo_matrix_vjp(grad, attn, ov, ctx.layout)
    return grad_attn, grad_ov, None, None, None


hvo_matrix.register_autograd(_backward, setup_context=_setup_context)
