"""Per-head views: W' of a subset of the heads, Σ_{i in heads} A_i ⊗ OV_i (DESIGN.md §1)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from duat_kernels._validation import integer
from duat_kernels.repeated_batch import per_element


def _integer_dtype(a: torch.Tensor | np.ndarray) -> bool:
    if isinstance(a, torch.Tensor):
        return not (a.dtype.is_floating_point or a.dtype.is_complex or a.dtype == torch.bool)
    return a.dtype.kind in "iu"


def head_indices(heads: int | Sequence[int] | np.ndarray | torch.Tensor, num_heads: int) -> list[int]:
    """heads (an int, a sequence of ints, or a 1-D integer array or tensor) as a list of distinct
    indices in [0, h) (negative indices count from the end)."""
    def is_int(i) -> bool:  # an int or a NumPy integer, not a tensor
        return integer(i, tensors=False) is not None

    if isinstance(heads, (torch.Tensor, np.ndarray)) and heads.ndim <= 1 and _integer_dtype(heads):
        heads = heads.tolist()  # a 1-D index array (np.arange, torch.tensor([...])) or a 0-d one
    items = [heads] if is_int(heads) else heads
    if not isinstance(items, Sequence) or isinstance(items, str) or not items or not all(is_int(i) for i in items):
        raise TypeError(f"heads must be an int or a non-empty sequence of ints, got {heads!r}")
    items = [integer(i) for i in items]
    bad = [i for i in items if not -num_heads <= i < num_heads]
    if bad:
        raise ValueError(f"heads must be in [-{num_heads}, {num_heads}) for h={num_heads} heads, got {bad}")
    chosen = [i % num_heads for i in items]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"heads must be distinct, got {list(items)}")
    return chosen


def select_heads(attn: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, b_v: torch.Tensor | None,
                 heads: int | Sequence[int], num_kv_heads: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """The attention layer restricted to `heads`, as an ordinary layer of k = len(heads) heads.

    Args (shapes already validated): attn (..., h, N, N); w_v (h_kv·d, M_in); w_o (M_out, h·d);
        b_v (h_kv·d,) or None; num_kv_heads h_kv (None: h).

    Returns:
        (attn (..., k, N, N), w_v (k·d, M_in), w_o (M_out, k·d), b_v (k·d,) or None, k): each chosen
        query head i gets its own copy of kv head i // g, so OV_i is unchanged and h_kv becomes k.
    """
    h = attn.shape[-3]
    d = w_o.shape[1] // h
    group = h // (num_kv_heads or h)
    chosen = head_indices(heads, h)
    index = torch.tensor(chosen, device=attn.device)
    out_cols = (index[:, None] * d + torch.arange(d, device=attn.device)).reshape(-1)
    kv_rows = ((index // group)[:, None] * d + torch.arange(d, device=attn.device)).reshape(-1)
    attn = per_element(attn, lambda a: a.index_select(-3, index)) if attn.dim() == 4 else attn.index_select(-3, index)
    return (attn, w_v.index_select(0, kv_rows.to(w_v.device)),
            w_o.index_select(1, out_cols.to(w_o.device)),
            None if b_v is None else b_v.index_select(0, kv_rows.to(b_v.device)), len(chosen))
