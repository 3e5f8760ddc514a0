"""Statistics of the entries of W' that need no dense matrix: exact Frobenius norm and trace, and
estimates from uniformly sampled entries with confidence intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from duat_kernels import reference
from duat_kernels._memory import check_fits
from duat_kernels._validation import check_has_data, check_index, check_tensor, integer
from duat_kernels.operator_args import sampling_arguments
from duat_kernels.linalg.norms import grid_norms64
from duat_kernels.attention_source import as_source


# Sampled OV entries formed per step from the head factors: (h, step, d) products.
SAMPLES_PER_STEP = 8192
# fraction_above forms the whole OV up to this size, else only the sampled entries.
WHOLE_OV_BYTES = 64 << 20


def frobenius_norm(attn, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """||W'||_F for attn (B, h, N, N_k) or an AttentionSource -> (B,): the root of the summed squared
    block norms (exact), reduced to one super-block as they are formed; the float64 root of the float64 sum (finite
    where the norm of float32 factors exceeds float32's range)."""
    return grid_norms64(attn, w_v, w_o, num_kv_heads, (1, 1))[:, 0, 0]


def trace(attn, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """tr W' = Σ_n Σ_c Σ_i A_i[n, n] OV_i[c, c] for square W' (M_in = M_out) -> (B,); the same in both
    layouts. attn (B, h, N, N) or an AttentionSource; only the diagonal of A is read (and widened). The
    N·M diagonal entries are formed (O(N·M·h), no OV needed: OV_i[c, c] = Σ_d Wo_i[c, d] Wv_i[d, c])
    and summed, so NaN and Inf come out as in the dense W' (Inf - Inf between entries)."""
    source = as_source(attn, num_kv_heads, w_v, w_o)
    num_kv_heads = source.kv_heads
    if source.keys != source.tokens:
        raise ValueError(f"trace needs a square W', but A is {source.tokens} x {source.keys} (cross-attention: N "
                         f"queries over N_k keys of another sequence, W' maps the encoder's states to the decoder's; "
                         f"it has no diagonal of a token to itself)")
    if w_v.shape[1] != w_o.shape[0]:
        raise ValueError(f"trace needs a square W' (M_in = M_out), got M_in={w_v.shape[1]}, M_out={w_o.shape[0]}")
    if w_v.shape[1] == 0:  # an empty W' has trace 0, whatever A holds
        return torch.zeros(source.batch, dtype=torch.float64, device=source.device)
    wo, wv = reference.head_factors(w_v.double(), w_o.double(), source.heads, num_kv_heads)  # (h, M, d), (h, d, M)
    diag_ov = torch.einsum("icd,idc->ic", wo, wv).to(source.device)  # OV_i[c, c]
    diagonal = torch.einsum("bin,ic->bnc", source.diagonal().double(), diag_ov)  # W'[(n, c), (n, c)]
    return diagonal.sum((1, 2))


@dataclass
class EntryEstimate:
    """A fraction of the entries of W' estimated from a uniform sample, with a Wilson interval."""

    fraction: float
    low: float
    high: float
    samples: int
    threshold: float
    confidence: float

    def __str__(self) -> str:
        return (f"{self.fraction:.4f} of entries have |w| > {self.threshold:.3g} "
                f"({self.confidence:.0%} CI [{self.low:.4f}, {self.high:.4f}], {self.samples} samples)")


def sample_entries(attn, ov: torch.Tensor | tuple[torch.Tensor, torch.Tensor], samples: int,
                   generator: torch.Generator | None = None, batch: int = 0) -> torch.Tensor:
    """Values of `samples` uniformly drawn entries of W' (token layout; layouts permute the same
    entries): W'[(n, c), (m, a)] = Σ_i A_i[n, m] OV_i[c, a], each computed as a length-h dot product.
    ov: the OV circuits (h, M_out, M_in), or their head factors (Wo_i (h, M_out, d), Wv_{i//g} (h, d, M_in))
    (reference.head_factors), from which only the sampled entries of OV are formed."""
    _check_ov(ov)
    if integer(samples, tensors=False) is None or samples < 0:
        raise ValueError(f"samples must be an int >= 0, got {samples!r}")
    wo = ov[0] if isinstance(ov, tuple) else ov
    h, m_out, m_in = wo.shape[0], wo.shape[1], ov[1].shape[2] if isinstance(ov, tuple) else ov.shape[2]
    source = as_source(attn, h)  # attn (B, h, N, N_k) or an AttentionSource
    # four int64 indices, then α, the gathered OV entries and their product (h, samples) each
    check_fits(f"{samples:,} sampled entries of W'", samples * (4 * 8 + 3 * h * wo.dtype.itemsize),
               source.device, "Draw fewer samples (the interval shrinks as 1/sqrt(samples)).")
    sizes = (source.tokens, m_out, source.keys, m_in)
    idx = [torch.randint(0, size, (samples,), generator=generator) for size in sizes]
    rows, c, cols, a = (i.to(source.device) for i in idx)
    alpha = source.entries(batch, rows, cols).to(wo.dtype)  # (h, samples)
    return (alpha * _ov_entries(ov, c, a)).sum(0)


def _check_ov(ov) -> None:
    """ov (h, M_out, M_in), or the head factors (h, M_out, d) and (h, d, M_in): a 2-D weight for it failed with
    IndexError 'tuple index out of range'."""
    if isinstance(ov, tuple):
        if len(ov) != 2:
            raise ValueError(f"ov must be OV (h, M_out, M_in) or the pair (Wo_i (h, M_out, d), Wv_i (h, d, M_in)), "
                             f"got a tuple of {len(ov)}")
        check_tensor("ov[0]", ov[0], (3,))
        check_tensor("ov[1]", ov[1], (3,))
        if ov[0].shape[0] != ov[1].shape[0] or ov[0].shape[2] != ov[1].shape[1]:
            raise ValueError(f"ov must be the pair (Wo_i (h, M_out, d), Wv_i (h, d, M_in)), got shapes "
                             f"{tuple(ov[0].shape)} and {tuple(ov[1].shape)}")
    else:
        check_tensor("ov", ov, (3,))


def _ov_entries(ov: torch.Tensor | tuple[torch.Tensor, torch.Tensor], c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """OV_i[c_s, a_s] (h, S): gathered from OV, or formed from the head factors as d-term dot products, a few
    thousand samples at a time (O(h·S·d), never the (h, M_out, M_in) OV)."""
    if not isinstance(ov, tuple):
        return ov[:, c, a]
    wo, wv = ov
    out = torch.empty(wo.shape[0], c.shape[0], dtype=wo.dtype, device=wo.device)
    for s0 in range(0, c.shape[0], SAMPLES_PER_STEP):
        cs, as_ = c[s0:s0 + SAMPLES_PER_STEP], a[s0:s0 + SAMPLES_PER_STEP]
        out[:, s0:s0 + SAMPLES_PER_STEP] = (wo[:, cs] * wv[:, :, as_].transpose(1, 2)).sum(-1)
    return out


def fraction_above(attn, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int, threshold: float,
                   samples: int = 100_000, confidence: float = 0.95, seed: int = 0, batch: int = 0) -> EntryEstimate:
    """Estimated fraction of entries with |w| > threshold (the paper's "almost fully dense", made
    quantitative), from a uniform sample with a Wilson score interval; NaN (fraction and interval)
    when a sampled entry is NaN."""
    threshold, samples, confidence, seed = sampling_arguments(threshold, samples, confidence, seed)
    source = as_source(attn, num_kv_heads, w_v, w_o)
    num_kv_heads = source.kv_heads
    if w_v.shape[1] == 0 or w_o.shape[0] == 0:
        raise ValueError(f"W' of shape ({source.tokens * w_o.shape[0]}, {source.keys * w_v.shape[1]}) has no entries "
                         f"to sample (M_in={w_v.shape[1]}, M_out={w_o.shape[0]})")
    batch = check_index("batch", batch, source.batch, f"B={source.batch} batch elements")
    check_has_data("fraction_above", source.device)
    dtype = torch.promote_types(torch.promote_types(w_v.dtype, w_o.dtype), torch.float32)  # float64 stays float64
    # OV when it is small (gathering from it is ~10x faster than d-term products per sample), else the head
    # factors: an (h, M_out, M_in) OV of wide layers failed to allocate (h = 2, M = 100000: 80 GB)
    if source.heads * w_o.shape[0] * w_v.shape[1] * dtype.itemsize <= WHOLE_OV_BYTES:
        ov = reference.ov_circuits(w_v.to(dtype), w_o.to(dtype), source.heads, num_kv_heads).to(source.device)
    else:
        ov = tuple(t.to(source.device) for t in reference.head_factors(w_v.to(dtype), w_o.to(dtype), source.heads,
                                                                      num_kv_heads))
    g = torch.Generator().manual_seed(seed)
    values = sample_entries(source, ov, samples, g, batch)
    if bool(values.isnan().any()):  # |NaN| > t is false: counting it as "not above" would hide it
        return EntryEstimate(math.nan, math.nan, math.nan, samples, threshold, confidence)
    hits = int((values.abs() > threshold).sum())
    p = hits / samples
    z = _normal_quantile(0.5 + confidence / 2)
    denom = 1 + z * z / samples
    centre = (p + z * z / (2 * samples)) / denom
    half = z * math.sqrt(p * (1 - p) / samples + z * z / (4 * samples * samples)) / denom
    return EntryEstimate(p, max(0.0, centre - half), min(1.0, centre + half), samples, threshold, confidence)


def _normal_quantile(q: float) -> float:
    from statistics import NormalDist
    return NormalDist().inv_cdf(q)
