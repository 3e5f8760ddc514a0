"""Public API: W'_HVO, its bias b' and the OV circuits (DESIGN.md §1-2).

Validation and allocation happen here, once; `backends.materialise` picks the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from duat_kernels import _validation as v
from duat_kernels import backends, ops, reference
from duat_kernels._memory import check_fits
from duat_kernels.heads import select_heads
from duat_kernels.repeated_batch import repeated, repeats_one_element

__all__ = ["hvo_matrix", "hvo_bias", "ov_circuits"]


def ov_circuits(w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int, num_kv_heads: int | None = None) -> torch.Tensor:
    """Per-head OV circuits OV_i = Wo_i · Wv_{i // g}, column-vector convention.

    Args:
        w_v: (h_kv·d, M_in) value projection weight (nn.Linear convention).
        w_o: (M_out, h·d) output projection weight.
        num_heads: h, the number of query heads.
        num_kv_heads: h_kv (GQA); defaults to h. Query head i reads kv head i // (h / h_kv).

    Returns:
        (h, M_out, M_in) tensor in the promoted dtype of w_v and w_o.
    """
    v.check_tensor("w_v", w_v, (2,))
    v.check_tensor("w_o", w_o, (2,))
    v.check_same_device(w_v=w_v, w_o=w_o)
    h_kv, _ = v.check_heads(num_heads, num_kv_heads, w_v, w_o)
    dtype = torch.promote_types(w_v.dtype, w_o.dtype)
    h = v.positive_int(num_heads)
    if w_v.device.type != "meta":
        check_fits(f"OV circuits of shape ({h}, {w_o.shape[0]}, {w_v.shape[1]})",
                   h * w_o.shape[0] * w_v.shape[1] * dtype.itemsize, w_v.device,
                   "Use the matrix-free duat_kernels.HVOOperator (block(n, m) forms one Σ_i A_i[n, m] OV_i).")
    return reference.ov_circuits(w_v.to(dtype), w_o.to(dtype), h, h_kv)


def hvo_matrix(attn: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, *, num_kv_heads: int | None = None,
               layout: str = "token", backend: str = "auto", out: torch.Tensor | None = None,
               dtype: torch.dtype | str | None = None, num_heads: int | None = None,
               heads: int | Sequence[int] | None = None) -> torch.Tensor:
    """Materialise W'_HVO, the matrix with h' = W' x' (+ b') for one attention layer.

    Token layout: W'[(n, c), (m, a)] = Σ_i A_i[n, m] · OV_i[c, a], i.e. W' = Σ_i A_i ⊗ OV_i;
    feature layout: W' = Σ_i OV_i ⊗ A_i (the same entries, permuted). See DESIGN.md §1.

    Args:
        attn: (h, N, N_k) or (B, h, N, N_k) per-head attention probabilities (after softmax, masks, dropout):
            N_k = N for self-attention; for cross-attention N queries (decoder) attend N_k keys (encoder) and
            x' is the encoder states that the value projection reads. A 3-D attn is one sequence's h heads, never
            a batch of head-averaged (B, N, N) maps
            (nn.MultiheadAttention's default output): ask the module for average_attn_weights=False.
        w_v: (h_kv·d, M_in) value projection weight. w_o: (M_out, h·d) output projection weight.
        num_kv_heads: h_kv for grouped-query attention; defaults to h.
        num_heads: h; when given, attn must have h heads on axis -3 (catches head-averaged maps).
        layout: "token" (x'[n·M_in + a] = X[n, a]) or "feature" (x'[a·N + n] = X[n, a]).
        backend: "auto", "reference", "cpp" or "triton" (see `available_backends`). Every backend is
            differentiable in attn, w_v and w_o (the torch.library op duat::hvo_matrix has a backward).
        out: optional contiguous buffer of the output shape and dtype, written in place and returned.
        dtype: output dtype (float32, float64, float16, bfloat16, or its name as a string); defaults to
            out.dtype or the promoted input dtype. Accumulation is in float32 (float64 for float64 output).
        heads: a head index or a sequence of them: W' of those heads only, Σ_{i in heads} A_i ⊗ OV_i
            (one head's own contribution with heads=i); default all heads.

    Returns:
        (N·M_out, N_k·M_in), or (B, N·M_out, N_k·M_in) for batched attn (B, M_in and M_out may be 0).
        Non-finite inputs propagate as IEEE arithmetic says (0 · NaN = NaN) with every backend.
    """
    dims = v.check_attention(attn, w_v, w_o, num_kv_heads, num_heads)
    if heads is not None:
        attn, w_v, w_o, _, num_kv_heads = select_heads(attn, w_v, w_o, None, heads, dims.kv_heads)
        dims = v.check_attention(attn, w_v, w_o, num_kv_heads)
    v.check_layout(layout)
    device = v.check_same_device(attn=attn, w_v=w_v, w_o=w_o)
    if out is not None:
        v.check_tensor("out", out, (3,) if dims.batched else (2,))
    dtype = v.resolve_dtype(dtype, out, attn, w_v, w_o)
    rows, cols = dims.tokens * dims.m_out, dims.keys * dims.m_in
    shape = (dims.batch, rows, cols) if dims.batched else (rows, cols)
    backend = backends.resolve(backend, device)
    if dtype not in backends.output_dtypes(backend):
        raise TypeError(f"backend={backend!r} writes {', '.join(map(str, backends.output_dtypes(backend)))}, "
                        f"not {dtype}; use backend='reference' or 'cpp' for it")
    if out is not None:
        v.check_out(out, shape, device, attn, w_v, w_o)
        if backends.tracks_grad(attn, w_v, w_o):
            raise RuntimeError("out= writes W' in place and records no gradient; pass out=None for a differentiable "
                               "W' (or call under torch.no_grad())")
    attn4 = attn if dims.batched else attn.unsqueeze(0)
    # every batch element the same (attn expanded along the batch): W' of element 0, copied over the batch
    repeats = repeats_one_element(attn4) and not v.functorch_wrapped(w_v, w_o, out)
    if not torch.compiler.is_compiling() and device.type != "meta":  # meta tensors and compiled graphs allocate nothing
        entries = dims.batch * rows * cols
        needed = 0 if out is not None else entries * dtype.itemsize
        if backend == "reference":  # the Kronecker products and their running sum, in the compute dtype
            needed += ((1 if repeats else dims.batch) + 2) * rows * cols * reference.compute_dtype(dtype).itemsize
        check_fits(f"W' of shape {shape} ({entries:,} entries of {dtype}) with backend={backend!r}", needed, device)
    if repeats:
        one = hvo_matrix(attn4[:1], w_v, w_o, num_kv_heads=dims.kv_heads, layout=layout, backend=backend, dtype=dtype)
        return repeated(one, dims.batch, "W'", out)

    ct = reference.compute_dtype(dtype)
    if backends.fuses_ov(backend, layout, attn4.shape[0], attn4, w_v, w_o):
        result = out if out is not None else backends.empty_output(backend, shape, dtype, device)
        backends.materialise_fused(attn4, w_v, w_o, dims.kv_heads, result if dims.batched else result.unsqueeze(0))
        return result
    ov = backends.ov_circuits(backend, w_v.to(ct), w_o.to(ct), dims.heads, dims.kv_heads)
    if out is not None and not torch.compiler.is_compiling() and backends.functorch_batched(attn4, w_v, w_o, out):
        # torch.func.vmap has no batching rule for the op that writes into out (mutating ops get no fallback):
        # W' is formed out of place and copied, which vmap batches (out batched like the inputs)
        result = ops.materialise(attn4, ov, layout, backend, dtype)
        return out.copy_(result if dims.batched else result[0])
    if out is not None:
        ops.materialise_into(attn4, ov, layout, backend, out if dims.batched else out.unsqueeze(0))
        return out
    if not torch.compiler.is_compiling() and (backends.functorch_grad(attn4, w_v, w_o)  # torch.func.grad, jacrev, jvp
                                              or backends.has_tangent(attn4, w_v, w_o)):  # forward-mode AD
        result = reference.hvo_matrix(attn4.to(ct), ov, layout).to(dtype)
    else:
        result = ops.materialise(attn4, ov, layout, backend, dtype)
    return result if dims.batched else result[0]


def hvo_bias(attn: torch.Tensor, w_o: torch.Tensor, b_v: torch.Tensor | None = None, b_o: torch.Tensor | None = None,
             *, num_kv_heads: int | None = None, layout: str = "token", num_heads: int | None = None,
             heads: int | Sequence[int] | None = None) -> torch.Tensor:
    """The bias b' of h' = W' x' + b'.

    b'[(n, c)] = Σ_i (Σ_m A_i[n, m]) · (Wo_i b_v[kv head of i])[c] + b_o[c]; rows of A are not
    assumed to sum to one (padding, attention sinks, dropout).

    Args:
        attn: (h, N, N_k) or (B, h, N, N_k) (cross-attention: N_k != N). w_o: (M_out, h·d).
            b_v: (h_kv·d,) or None. b_o: (M_out,) or None.
        num_kv_heads: h_kv for grouped-query attention; defaults to h.
        layout: "token" (index n·M_out + c) or "feature" (index c·N + n).
        num_heads: h; when given, attn must have h heads on axis -3 (see hvo_matrix).
        heads: as in hvo_matrix: only these heads' value-bias terms (b_o, which belongs to no head,
            is added as given: pass b_o=None for the heads' own contribution).

    Returns:
        (N·M_out,), or (B, N·M_out) for batched attn, in the promoted dtype of the inputs.
    """
    dims = v.check_attention(attn, None, w_o, num_kv_heads, num_heads, needs_w_v=False)
    if heads is not None:
        v.check_bias("b_v", b_v, dims.kv_heads * dims.head_dim)
        w_v = torch.empty(dims.kv_heads * dims.head_dim, 0, dtype=w_o.dtype, device=w_o.device)
        attn, _, w_o, b_v, num_kv_heads = select_heads(attn, w_v, w_o, b_v, heads, dims.kv_heads)
        dims = v.check_attention(attn, None, w_o, num_kv_heads, needs_w_v=False)
    v.check_layout(layout)
    v.check_bias("b_v", b_v, dims.kv_heads * dims.head_dim)
    v.check_bias("b_o", b_o, dims.m_out)
    v.check_same_device(attn=attn, w_o=w_o, b_v=b_v, b_o=b_o)
    dtype = v.resolve_dtype(None, None, *(t for t in (attn, w_o, b_v, b_o) if t is not None))
    ct = reference.compute_dtype(dtype)
    attn4 = attn if dims.batched else attn.unsqueeze(0)
    if repeats_one_element(attn4) and not v.functorch_wrapped(w_o, b_v, b_o):  # every batch element the same
        return repeated(hvo_bias(attn4[:1], w_o, b_v, b_o, num_kv_heads=dims.kv_heads, layout=layout), dims.batch, "b'")
    bias = reference.hvo_bias(attn4.to(ct), w_o.to(ct), None if b_v is None else b_v.to(ct),
                              None if b_o is None else b_o.to(ct), dims.kv_heads, layout).to(dtype)
    return bias if dims.batched else bias[0]
