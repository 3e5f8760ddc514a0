"""The C++ kernels behind QKAttention on the CPU (float32): A V and Aᵀ U from q and k without storing A.

`mix_transposed` is what HVOOperator.rmatvec needs: per head, A_iᵀ U_i with A recomputed per row block
(logits micro-kernel, softmax numerators, then Pᵀ (U / Σ) accumulated into the key rows); one pass over
the logits, the cost of about one attention forward. `mix` is A V for sources that torch's sdpa cannot
compute (soft-capped logits). Block norms use the same pass through duat_kernels.linalg.gram_norms.
"""

from __future__ import annotations

import torch

from duat_kernels import backends, cpp
from duat_kernels._validation import all_finite


def handles(source) -> bool:
    """Whether the C++ pass computes this source's products: float32 q/k on the CPU, finite, logits that
    cannot overflow float32 (QKAttention.wide_logits), extension built; plain eager tensors (not FakeTensorMode's,
    torch.func's or traced ones: the kernels read NumPy views)."""
    return (cpp.is_available() and hasattr(cpp._C, "qk_mix") and source.device.type == "cpu"
            and backends.direct_kernel_call(source.q, source.k)
            and source.dtype == torch.float32 and source.q.shape[-1] > 0 and all_finite(source.q, source.k)
            and not source.wide_logits())


def kernel_options(source) -> dict:
    """The keyword arguments of the q/k kernels for this source (scale, soft-cap, masks, threads)."""
    return dict(scale=float(source.scale), softcap=float(source.softcap or 0.0), causal=source.causal,
                window=int(source.window or 0), num_threads=cpp.kernel_threads())


def query_keys(source):
    """q and k of the source as contiguous NumPy views for the kernels."""
    return cpp._numpy_view(source.q.contiguous()), cpp._numpy_view(source.k.contiguous())


def key_mask(source):
    """The key mask (B, N_k) as a NumPy bool view for the kernels, or None."""
    return None if source.key_mask is None else source.key_mask[:, 0, 0].contiguous().numpy()


def mix(source, values: torch.Tensor) -> torch.Tensor:
    """A_i V_{i // g} (B, h, N, e) for values (B, h_kv, N_k, e) and a source that `handles` accepts; computed
    in float32, returned in values' dtype."""
    vals = values.to(torch.float32).contiguous()
    out = torch.empty(source.batch, source.heads, source.tokens, vals.shape[-1], dtype=torch.float32)
    cpp._C.qk_mix(*query_keys(source), key_mask(source), vals.numpy(), out.numpy(), **kernel_options(source))
    return out.to(values.dtype)


def mix_transposed(source, u: torch.Tensor) -> torch.Tensor:
    """A_iᵀ U_i (B, h, N_k, e) for u (B, h, N, e) and a QKAttention source that `handles` accepts; computed
    in float32, returned in u's dtype."""
    uc = u.to(torch.float32).contiguous()
    out = torch.empty(source.batch, source.heads, source.keys, uc.shape[-1], dtype=torch.float32)
    cpp._C.qk_mix_transposed(*query_keys(source), key_mask(source), uc.numpy(), out.numpy(), **kernel_options(source))
    return out.to(u.dtype)
