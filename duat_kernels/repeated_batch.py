"""Batches that repeat one element: attention expanded along the batch (attn[None].expand(B, h, N, N), or q and k
expanded alike) has stride 0 there and no memory behind its B copies. Every batch element is then the same layer, so
a batched result is element 0's result repeated: computed once, and copied into a (B, ...) buffer with one
vectorised copy. Looped over in Python instead, 10^9 elements took hours (25-50 µs each for tile, block, block_norms
and hvo_matrix). Batches whose elements differ are still looped over where the kernels take one element at a time,
with a progress bar when that takes long (duat_kernels._progress.batch_elements).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable

import torch

from duat_kernels import _validation as v
from duat_kernels import backends
from duat_kernels._memory import DenseTooLargeError, check_fits

REPEAT_HINT = ("Every batch element is the same (a batch expanded with stride 0): pass one element (attn[:1], or q[:1] "
               "and k[:1]) for one copy of the result.")


def repeats_one_element(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given (None skipped; at least one) is (B, ...) with B > 1 and stride 0 along dim 0 (one
    element expanded over the batch), with values Python may read (not meta, fake, vmap's or traced), and no gradient
    recorded through it: the gradient for the expanded tensor is one per element, which a result computed from
    element 0 cannot give."""
    given = [t for t in tensors if t is not None]
    return (bool(given) and v.has_values(*given) and not v.functorch_wrapped(*given)  # strides to read
            and all(t.dim() >= 1 and t.shape[0] > 1 and t.stride(0) == 0 for t in given)
            and not backends.tracks_grad(*given))


def per_element(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn(t) for an fn that maps each batch element (dim 0) on its own (a dtype conversion, a selection of heads):
    where t repeats one element, fn(t[:1]) expanded over the batch, a view (converting 10^9 expanded copies
    allocated them all)."""
    if repeats_one_element(t):
        one = fn(t[:1])
        return one.expand(t.shape[0], *one.shape[1:])
    return fn(t)


def repeated(one: torch.Tensor, batch: int, what: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """one (1, ...) -> (B, ...): written into out when given, else into a new buffer (callers may write into the
    result), with one copy; a new buffer that cannot fit is refused with DenseTooLargeError before allocating."""
    shape = (batch, *one.shape[1:])
    if out is None:
        check_fits(f"{what} of shape {shape} (one element repeated over the batch)",
                   math.prod(shape) * one.element_size(), one.device, REPEAT_HINT)
        out = torch.empty(shape, dtype=one.dtype, device=one.device)
    return out.copy_(one.expand(shape))


def element_zero(op):
    """A batched HVOOperator restricted to batch element 0 (B = 1, the same weights), where every element is the same
    layer (its attention source repeats one element); else None."""
    if not op.dims.batched or v.functorch_wrapped(op.w_v, op.w_o, op.b_v, op.b_o) \
            or not op.source.repeats_one_element():
        return None
    one = copy.copy(op)
    one.source, one.dims = op.source.element_zero(), dataclasses.replace(op.dims, batch=1)
    return one


def once_per_repeated_batch(operand: str | None = None):
    """Decorator of HVOOperator methods whose result is (B, ...) for a batched operator: where every batch element is
    the same layer (element_zero) and the batched operand named `operand` (x of matvec: the first argument) repeats
    one element too, the method runs on element 0 and its result is repeated over the batch (repeated)."""
    def decorate(method):
        @functools.wraps(method)
        def call(op, *args, **kwargs):
            given_args, given_kwargs = args, kwargs
            one = element_zero(op)
            if one is not None and operand is not None:
                x = args[0] if args else kwargs.get(operand)
                if not (isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == op.dims.batch
                        and repeats_one_element(x)):
                    one = None
                elif args:
                    args = (x[:1], *args[1:])
                else:
                    kwargs = {**kwargs, operand: x[:1]}
            if one is None:
                return method(op, *args, **kwargs)
            try:
                result = method(one, *args, **kwargs)
            except DenseTooLargeError:
                raise
            except (ValueError, TypeError):  # a bad operand: the whole batch's call says so, naming the shape given
                if operand is None:
                    raise
                return method(op, *given_args, **given_kwargs)
            return repeated(result, op.dims.batch, f"HVOOperator.{method.__name__}")
        return call
    return decorate


def dense_attention(op) -> torch.Tensor:
    """op.attn, the whole A of an HVOOperator; where every batch element is the same layer, element 0's A expanded
    over the batch (a view, from which hvo_matrix writes W' once)."""
    one = element_zero(op)
    if one is None:
        return op.attn
    a = one.attn
    return a.expand(op.dims.batch, *a.shape[1:])
