"""Power-of-two scaling of the squares that the norm analyses form in float32.

A squared norm ||v||² overflows float32 once ||v|| > 2^64 (~1.8e19), loses precision below 2^-63 and vanishes
below 2^-75, far inside the range of the norm itself (2^-126 to 3.4e38). The factors whose squares are taken
(the Gram factor C of block_norms, the weights of its torch path, the projected values u of contributions) are
multiplied by 2^-e, 2^e the power of two just above their largest entry, and the roots by 2^e afterwards.
Multiplying by a power of two is exact (outside the subnormal range), so the norms are those of the unscaled
factors, rounded alike.

Factors whose largest entry lies in [2^-limit, 2^limit] are taken as they are (e = 0): the norms of ordinary
inputs are bitwise what they were. Each caller's limit keeps its squares inside float32 for such factors. A
factor with NaN or Inf is never rescaled (e = 0), so non-finite inputs propagate as before. Entries of A far
from 1 (a stored A that is not probabilities) are not scaled: a float32 result that is not finite from finite
factors is computed again in float64.

The same holds in float64 at its own range: squares overflow once ||v|| > 2^512 and vanish below 2^-537, so
factors computed in float64 (float64 inputs) are scaled with exponents up to ±MAX_EXPONENT_FLOAT64 (max_exponent),
and the weights of the float64 Gram matrix of block_norms likewise (norms.scaled_gram_factor).
"""

from __future__ import annotations

import math

import torch

from duat_kernels._validation import has_values

# |e| <= MAX_EXPONENT: 2^±e is a normal float32, and a float32 factor (max 2^128) comes to at most 4.
MAX_EXPONENT = 126
# The same for factors scaled in float64 (max 2^1024): scaled, their largest entry lies in [2^-52, 4] (subnormals
# included), so no square overflows or vanishes. Capped at ±126, float64 factors of 1e200 still overflowed.
MAX_EXPONENT_FLOAT64 = 1022


def max_exponent(dtype: torch.dtype) -> int:
    """The largest |e| for factors scaled in `dtype`: MAX_EXPONENT_FLOAT64 for float64, else MAX_EXPONENT."""
    return MAX_EXPONENT_FLOAT64 if dtype == torch.float64 else MAX_EXPONENT


def exponent(magnitude: float, limit: int, most: int = MAX_EXPONENT) -> int:
    """e with 2^(e-1) <= magnitude < 2^e for a finite magnitude > 0 outside [2^-limit, 2^limit], else 0
    (clamped to ±most: ±MAX_EXPONENT for factors scaled in float32)."""
    if not 0 < magnitude < math.inf or 2.0 ** -limit <= magnitude <= 2.0 ** limit:
        return 0
    return max(-most, min(most, math.frexp(magnitude)[1]))


def finite_max(t: torch.Tensor) -> float:
    """max |t| over the finite entries of t (0 for none)."""
    return float(torch.where(t.isfinite(), t.detach().abs(), 0).amax()) if t.numel() else 0.0


def scaled_down(t: torch.Tensor, limit: int, most: int = MAX_EXPONENT,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
    """(t · 2^-e in `dtype` (t's if None), e) with e the `exponent` of t's largest finite entry: t's values as they
    are for e = 0. Reads the values (eager only; exponent_of and scaled are the traceable forms)."""
    e = exponent(finite_max(t), limit, most)
    t = t if dtype is None else t.to(dtype)
    return (t * 2.0 ** -e if e else t), e


def exponent_of(t: torch.Tensor, limit: int, dims: tuple[int, ...] | None = None,
                most: int = MAX_EXPONENT) -> torch.Tensor:
    """`exponent` of max|t| as a float64 tensor () from torch operations (a Python branch on the values only where they
    can be read), so it runs under autograd, torch.func and torch.compile; not differentiated (the scale is a constant). With dims,
    one exponent per slice: max|t| over dims, kept as dimensions of size 1. Clamped to ±most (max_exponent of
    the dtype t is scaled in). Where no slice is scaled and the values can be read, a single 0 of that many
    dimensions (broadcasts as the exponents would)."""
    if t.numel() == 0:
        shape = () if dims is None else [1 if i in dims or i - t.dim() in dims else n for i, n in enumerate(t.shape)]
        return torch.zeros(shape, dtype=torch.float64, device=t.device)
    t = t.detach()
    # max|t| per slice from max and -min: two reductions, no |t| written
    mag = t.abs().amax() if dims is None else torch.maximum(t.amax(dim=dims, keepdim=True),
                                                             t.amin(dim=dims, keepdim=True).neg_())
    if has_values(mag):  # every slice as it is (all zero or inside the limits): one 0, no pass over the slices
        lowest, highest = (float(m) for m in torch.aminmax(mag.masked_fill(mag == 0, 1)))  # NaN: neither holds
        if 2.0 ** -limit <= lowest and highest <= 2.0 ** limit:
            return torch.zeros([1] * mag.dim(), dtype=torch.float64, device=t.device)
    outside = ((mag > 2.0 ** limit) & (mag < math.inf)) | ((mag > 0) & (mag < 2.0 ** -limit))  # NaN: neither
    mag = mag.double()
    e = (mag.log2().floor() + 1).clamp(-most, most)
    return torch.where(outside, e, torch.zeros_like(e))


def scaled_up(t: torch.Tensor, limit: int, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(t · 2^-e, e) with e <= 0 per slice over dims (exponent_of, kept as dimensions of size 1): each slice whose
    largest entry is below 2^-limit' brought to [1/2, 1), the others as they are (huge ones are the callers' float64
    recompute). limit is float32's; limit' = limit + (max_exponent(t.dtype) - MAX_EXPONENT) // 2 widens it by half of
    float64's extra range, which its squares keep (float64 slices of 1e-13 are not scaled). Traceable and
    differentiable, as scaled is."""
    most = max_exponent(t.dtype)
    e = exponent_of(t, limit + (most - MAX_EXPONENT) // 2, dims, most).clamp_max(0)
    return scaled(t, e), e


def scaled(t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """t · 2^-e (|e| <= max_exponent(t.dtype)) in t's dtype (t itself for e = 0 where e can be read)."""
    if known_zero(e):
        return t
    return t * torch.exp2(-e).to(t.dtype)


def unscaled(t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """t · 2^e in t's dtype for |e| <= 2·max_exponent(t.dtype), as two same-signed power-of-two factors that the
    dtype holds (an intermediate overflows only where the result does); t itself for e = 0 where e can be read."""
    if known_zero(e):
        return t
    half = torch.trunc(e / 2)
    return t * torch.exp2(half).to(t.dtype) * torch.exp2(e - half).to(t.dtype)


def known_zero(e: torch.Tensor) -> bool:
    """Whether e is known to be 0 everywhere (its value read: not under torch.compile or vmap), so that the common case
    costs no pass over the tensor scaled."""
    return has_values(e) and not bool(e.any())
