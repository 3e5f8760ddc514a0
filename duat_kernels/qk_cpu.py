"""The C++ kernels behind QKAttention on the CPU (float32): Aᵀ U from q and k without storing A.

`mix_transposed` is what HVOOperator.rmatvec needs: per head, A_iᵀ U_i with A recomputed per row block
(logits micro-kernel, softmax numerators, then Pᵀ (U / Σ) accumulated into the key rows); one pass over
the logits, the cost of about one attention forward. Block norms use the same pass through
duat_kernels.analysis.gram_norms.
"""

from __future__ import annotations

import torch

from duat_kernels import cpp
from duat_kernels._validation import all_finite


def handles(source) -> bool:
    """Whether the C++ pass computes this source's products: float32 q/k on the CPU, finite, extension built."""
    return (cpp.is_available() and hasattr(cpp._C, "qk_mix_transposed") and source.device.type == "cpu"
            and source.dtype == torch.float32 and source.q.shape[-1] > 0 and all_finite(source.q, source.k))


def mix_transposed(source, u: torch.Tensor) -> torch.Tensor:
    """A_iᵀ U_i (B, h, N, e) for u (B, h, N, e) and a QKAttention source that `handles` accepts; computed
    in float32, returned in u's dtype."""
    uc = u.to(torch.float32).contiguous()
    out = torch.empty_like(uc)
    mask = None if source.key_mask is None else source.key_mask[:, 0, 0].contiguous().numpy()
    threads = cpp.num_threads()
    cpp._KERNEL_RAN = cpp._KERNEL_RAN or threads > 1
    cpp._C.qk_mix_transposed(source.q.contiguous().numpy(), source.k.contiguous().numpy(), mask, uc.numpy(),
                             out.numpy(), scale=float(source.scale), softcap=float(source.softcap or 0.0),
                             causal=source.causal, window=int(source.window or 0), num_threads=threads)
    return out.to(u.dtype)
