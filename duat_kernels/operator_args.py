"""Argument checks of HVOOperator's methods: every bad argument is a ValueError/TypeError that names
it, and what is sensible is accepted (negative indices, X given as an (N, M) matrix, grid=R for R x R).
"""

from __future__ import annotations

import math
import numbers

import torch

from duat_kernels import _validation as v


def vector_operand(x, name: str, *, tokens: int, width: int, batch: int, batched: bool, device: torch.device,
                   layout: str, axis: str = "N") -> tuple[torch.Tensor, bool]:
    """x' (..., N·width) flattened in `layout`, or X (..., N, width) with tokens as rows (`axis` names N in
    errors: "N_k" for the encoder keys of a cross-attention input).

    Returns x' (..., N·width) and whether X was given as a matrix (the result is then reshaped to
    (..., N, width_out) too). A batched operator needs the batch B as the leading dimension.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    v.check_real_dtype(name, x)
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the operator's tensors are on {device}; move {name} there")
    flat = tokens * width
    lead = "(B, ..., " if batched else "(..., "
    want = f"last dimension {axis}*M = {tokens}*{width} = {flat}"
    matrix_hint = f" (or pass X of shape {lead}{axis}, M) = {lead}{tokens}, {width}))"
    if x.dim() == 0:
        raise ValueError(f"{name} must have {want}, got a 0-d tensor{matrix_hint}")
    matrix = x.dim() >= 2 and tuple(x.shape[-2:]) == (tokens, width) and x.shape[-1] != flat
    if matrix:  # X[n, a] -> x' in this layout
        x = (x if layout == "token" else x.transpose(-1, -2)).reshape(*x.shape[:-2], flat)
    elif x.shape[-1] != flat:
        raise ValueError(f"{name} must have {want}, got {tuple(x.shape)}{matrix_hint}")
    if batched and (x.dim() < 2 or x.shape[0] != batch):
        raise ValueError(f"{name} must have a leading batch dimension of {batch} (attn is batched), got "
                         f"{tuple(x.shape)}")
    return x, matrix


def matrix_operand(x, name: str, rows: int, batch: int, batched: bool) -> None:
    """X of matmat: (N·M_in, K), or (B, N·M_in, K) for a batched operator (dtype and device are
    checked with the columns, by vector_operand)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    want = 3 if batched else 2
    shape = "(B, N*M_in, K)" if batched else "(N*M_in, K)"
    expected = shape.replace("N*M_in", str(rows)).replace("B,", f"{batch},")
    if x.dim() != want:
        raise ValueError(f"{name} must have shape {shape} = {expected}, got {tuple(x.shape)}; use matvec for vectors")
    if x.shape[-2] != rows or (batched and x.shape[0] != batch):
        raise ValueError(f"{name} must have shape {shape} = {expected}, got {tuple(x.shape)}")


def grid_argument(grid, tokens: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """grid=None, R (an R x R grid) or (R, C), each in [1, N] (R in [1, N], C in [1, N_k] for tokens=(N, N_k), the
    blocks of a cross-attention W'; each >= 1 for tokens=None: linalg.block_norms takes more super-blocks than
    tokens, the empty ones of norm 0)."""
    limits = tokens if isinstance(tokens, tuple) else (tokens, tokens)
    if grid is None:
        return None
    parts = (grid, grid) if v.integer(grid) is not None else grid
    try:
        rows, cols = parts
    except (TypeError, ValueError):
        raise TypeError(f"grid must be None, an int R or a pair (R, C), got {grid!r}") from None
    for g, limit in zip((rows, cols), limits):
        if v.integer(g) is None:
            raise TypeError(f"grid must be None, an int R or a pair (R, C) of ints, got {grid!r}")
        if tokens is None and v.integer(g) < 1:
            raise ValueError(f"grid must be two ints >= 1 (or one for a square grid), got {grid!r}")
        if limit is not None and limits[0] == limits[1] and not 1 <= v.integer(g) <= limit:
            raise ValueError(f"grid must be two ints in [1, N={limit}] (or one for a square grid), got {grid!r}")
        if limit is not None and not 1 <= v.integer(g) <= limit:
            raise ValueError(f"grid must be (R, C) with R in [1, N={limits[0]}] and C in [1, N_k={limits[1]}] "
                             f"(or one int for a square grid), got {grid!r}")
    return v.integer(rows), v.integer(cols)


def sampling_arguments(threshold, samples, confidence, seed) -> tuple[float, int, float, int]:
    """Arguments of fraction_above: a real threshold, samples >= 1, 0 < confidence < 1, an int seed
    (NumPy numbers too; bools are refused), returned as Python numbers."""
    if not _real(threshold):
        raise TypeError(f"threshold must be a real number, got {type(threshold).__name__} {threshold!r}")
    if math.isnan(threshold):  # |w| > NaN is false for every entry: a fraction of 0 that means nothing
        raise ValueError("threshold must be a number, got nan")
    if v.integer(samples, tensors=False) is None:
        raise TypeError(f"samples must be an int, got {type(samples).__name__} {samples!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not _real(confidence) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if v.integer(seed, tensors=False) is None:
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not -(1 << 63) <= seed < 1 << 64:  # torch.Generator's range (2**64: "Overflow when unpacking long long")
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    return float(threshold), v.integer(samples), float(confidence), v.integer(seed)


def _real(x) -> bool:
    """A real number (int, float, NumPy number), not a bool or a tensor."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def positive_tolerance(tol) -> None:
    if not _real(tol) or not tol >= 0 or math.isinf(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
