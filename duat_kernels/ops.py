"""torch.library registration of the materialisation, so that it composes with torch.compile and
autograd: duat::hvo_matrix (returns W') and duat::hvo_matrix_out (writes W' into out).

Both take attn (B, h, N, N), ov (h, M_out, M_in) (the OV circuits, computed with ordinary torch
ops so that gradients reach w_v and w_o through them), the layout and a concrete backend.
"""

from __future__ import annotations

import torch

from duat_kernels import backends, reference


@torch.library.custom_op("duat::hvo_matrix", mutates_args=())
def hvo_matrix(attn: torch.Tensor, ov: torch.Tensor, layout: str, backend: str, dtype: torch.dtype) -> torch.Tensor:
    batch, _, n, _ = attn.shape
    out = backends.empty_output(backend, (batch, n * ov.shape[1], n * ov.shape[2]), dtype, attn.device)
    return backends.materialise(backend, attn, ov, layout, out)


@hvo_matrix.register_fake
def _(attn, ov, layout, backend, dtype):
    batch, _, n, _ = attn.shape
    return attn.new_empty(batch, n * ov.shape[1], n * ov.shape[2], dtype=dtype)


@torch.library.custom_op("duat::hvo_matrix_out", mutates_args=("out",))
def hvo_matrix_out(attn: torch.Tensor, ov: torch.Tensor, layout: str, backend: str, out: torch.Tensor) -> None:
    backends.materialise(backend, attn, ov, layout, out)


@hvo_matrix_out.register_fake
def _(attn, ov, layout, backend, out):
    return None


def hvo_matrix_vjp(grad: torch.Tensor, attn: torch.Tensor, ov: torch.Tensor, layout: str):
    """Gradients of <grad, W'> with respect to attn and ov. W' is linear in each:

        d attn[b, i, n, m] = Σ_{c,a} G[b, (n, c), (m, a)] OV_i[c, a]
        d ov[i, c, a]      = Σ_{b,n,m} G[b, (n, c), (m, a)] A_i[b, n, m]

    computed per output token n as small batched products over c, so that nothing larger than
    (M_out, h, N) is formed besides the incoming gradient itself.
    """
    batch, h, n, _ = attn.shape
    m_out, m_in = ov.shape[1:]
    ct = reference.compute_dtype(grad.dtype)
    if layout == "token":
        g5 = grad.reshape(batch, n, m_out, n, m_in)  # (b, n, c, m, a)
    else:
        g5 = grad.reshape(batch, m_out, n, m_in, n).permute(0, 2, 1, 4, 3)  # (b, c, n, a, m) -> (b, n, c, m, a)
    ov_c = ov.to(ct).transpose(0, 1)  # (c, h, a)
    a_ct = attn.to(ct)
    grad_attn = torch.empty(batch, h, n, n, dtype=ct, device=attn.device)
    grad_ov = torch.zeros(m_out, h, m_in, dtype=ct, device=attn.device)
    for b in range(batch):
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
