"""Where HVOOperator gets the attention probabilities A from: a stored tensor, or q and k.

Every analysis reads A row block by row block, so a source only has to hand out row blocks
A[:, :, r0:r1, c0:c1] (B, h, rows, cols) of A (B, h, N, N_k) (N_k keys: N but for a stored cross-attention A)
(columns outside [c0, c1) are zero, e.g. above a causal
diagonal) plus a few derived quantities. `ExplicitAttention` slices a stored (B, h, N, N) tensor;
`duat_kernels.qk_attention.QKAttention` recomputes A = softmax(scale·q kᵀ + masks) tile by tile,
as flash attention does, so memory stays O(h · rows · N) and A is never stored whole.
"""

from __future__ import annotations

import torch

from duat_kernels import _validation as v
from duat_kernels._memory import DENSE_HINT, check_fits
from duat_kernels.repeated_batch import repeats_one_element

# Entries of A per row block (B·h·rows·cols): 64 MiB of float32 per step.
BLOCK_ENTRIES = 1 << 24


class AttentionSource:
    """A (B, h, N, N) handed out in row blocks; subclasses implement `block`."""

    batch: int
    heads: int
    kv_heads: int
    tokens: int
    dtype: torch.dtype  # dtype of the blocks
    device: torch.device

    @property
    def keys(self) -> int:
        """N_k, the columns of A: the N tokens themselves (self-attention) but for a stored cross-attention A."""
        return self.tokens

    def rows_per_step(self, entries: int | None = None) -> int:
        return max(1, (entries or BLOCK_ENTRIES) // max(1, self.batch * self.heads * self.keys))

    def column_range(self, r0: int, r1: int) -> tuple[int, int]:
        """[c0, c1): the columns that can be non-zero in rows [r0, r1)."""
        return 0, self.keys

    def block(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """A[:, :, r0:r1, c0:c1] (B, h, rows, cols) for columns [c0, c1) that contain
        column_range(r0, r1): a source that computes A from logits normalises each row over the
        columns it is given. For any other columns use part()."""
        raise NotImplementedError

    def row_blocks(self, rows: int | None = None):
        """Yield (r0, r1, c0, c1, A[:, :, r0:r1, c0:c1]) over all rows, skipping known-zero columns."""
        step = rows or self.rows_per_step()
        for r0 in range(0, self.tokens, step):
            r1 = min(self.tokens, r0 + step)
            c0, c1 = self.column_range(r0, r1)
            yield r0, r1, c0, c1, self.block(r0, r1, c0, c1)

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """A[:, :, r0:r1, :] (B, h, rows, N_k)."""
        c0, c1 = self.column_range(r0, r1)  # zeros around the block, out of place (vmap cannot write into a buffer)
        return torch.nn.functional.pad(self.block(r0, r1, c0, c1), (c0, self.keys - c1))

    def part(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """A[:, :, r0:r1, c0:c1] (B, h, rows, cols) for any columns, formed a row block at a time, so
        that a tall narrow part (one column of W' over every row) never forms whole rows of A."""
        step = self.rows_per_step()
        if r1 - r0 <= step:  # one row block (under vmap too, which cannot write into a plain buffer)
            return self.rows(r0, r1)[..., c0:c1]
        out = torch.empty(self.batch, self.heads, r1 - r0, c1 - c0, dtype=self.dtype, device=self.device)
        for s in range(r0, r1, step):
            e = min(r1, s + step)
            out[:, :, s - r0:e - r0] = self.rows(s, e)[..., c0:c1]
        return out

    def dense(self, hint: str = DENSE_HINT) -> torch.Tensor:
        """The whole A (B, h, N, N_k) (refused with DenseTooLargeError, ending with `hint`, when it would not fit)."""
        n = self.tokens
        check_fits(f"attention probabilities of shape ({self.batch}, {self.heads}, {n}, {self.keys})",
                   self.batch * self.heads * n * self.keys * self.dtype.itemsize, self.device, hint)
        return self.rows(0, n)

    def mix(self, values: torch.Tensor) -> torch.Tensor:
        """A_i V_{i//g}: values (B, h_kv, N_k, e) -> (B, h, N, e)."""
        g = self.heads // self.kv_heads
        vals = values.to(self.dtype).repeat_interleave(g, dim=1)
        if not v.has_values(*self.inputs(), values):  # vmap cannot write batched rows into a plain buffer
            return torch.cat([(a @ vals[:, :, c0:c1]) for _, _, c0, c1, a in self.row_blocks()], 2).to(values.dtype)
        out = values.new_empty(self.batch, self.heads, self.tokens, values.shape[-1])
        for r0, r1, c0, c1, a in self.row_blocks():
            out[:, :, r0:r1] = (a @ vals[:, :, c0:c1]).to(out.dtype)
        return out

    def mix_transposed(self, u: torch.Tensor) -> torch.Tensor:
        """A_iᵀ U_i: u (B, h, N, e) -> (B, h, N_k, e)."""
        out = torch.zeros(self.batch, self.heads, self.keys, u.shape[-1], dtype=self.dtype, device=self.device)
        uc = u.to(self.dtype)
        in_place = v.has_values(*self.inputs(), u)  # vmap cannot add batched terms into a plain buffer
        for r0, r1, c0, c1, a in self.row_blocks():
            term = a.transpose(-1, -2) @ uc[:, :, r0:r1]
            if in_place:
                out[:, :, c0:c1] += term
            else:
                out = out + torch.nn.functional.pad(term, (0, 0, c0, self.keys - c1))
        return out.to(u.dtype)

    def diagonal(self) -> torch.Tensor:
        """A_i[n, n] (B, h, N)."""
        raise NotImplementedError

    def row_sums(self) -> torch.Tensor:
        """Σ_m A_i[n, m] (B, h, N)."""
        raise NotImplementedError

    def entries(self, batch: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """A[batch, :, rows[s], cols[s]] (h, S) for index vectors rows, cols (S,)."""
        raise NotImplementedError

    def fingerprint(self) -> list[torch.Tensor]:
        """Tensors that identify A (for restartable writes): small samples of the inputs."""
        raise NotImplementedError

    def inputs(self) -> list[torch.Tensor]:
        """The tensors A is computed from (checked once for NaN/Inf before shortcuts that assume finite A)."""
        raise NotImplementedError

    def finite(self) -> bool:
        """Whether every entry of A is finite (finite inputs() prove it; see qk_attention.QKAttention for the rest)."""
        return v.all_finite(*self.inputs())

    def batched_inputs(self) -> list[torch.Tensor]:
        """The tensors with a batch dimension (dim 0) that A is computed from."""
        return self.inputs()

    def repeats_one_element(self) -> bool:
        """Whether every batch element is the same A: B > 1 and every batched input expanded along the batch
        (stride 0; duat_kernels.repeated_batch)."""
        return repeats_one_element(*self.batched_inputs())

    def element_zero(self) -> "AttentionSource":
        """This source restricted to batch element 0 (B = 1)."""
        raise NotImplementedError


class ExplicitAttention(AttentionSource):
    """A stored attn (B, h, N, N_k) (N_k != N: cross-attention)."""

    def __init__(self, attn4: torch.Tensor, kv_heads: int):
        self.attn = attn4
        self.batch, self.heads, self.tokens = attn4.shape[0], attn4.shape[1], attn4.shape[-2]
        self.kv_heads, self.dtype, self.device = kv_heads, attn4.dtype, attn4.device

    @property
    def keys(self) -> int:
        return self.attn.shape[-1]

    def block(self, r0, r1, c0, c1):
        return self.attn[:, :, r0:r1, c0:c1]

    def rows(self, r0, r1):
        return self.attn[:, :, r0:r1]

    def part(self, r0, r1, c0, c1):
        return self.attn[:, :, r0:r1, c0:c1]

    def dense(self, hint: str = DENSE_HINT):
        return self.attn

    def mix(self, values):
        dtype = torch.promote_types(self.attn.dtype, values.dtype)  # the promoted dtype of A and the vectors
        return self.attn.to(dtype) @ values.to(dtype).repeat_interleave(self.heads // self.kv_heads, dim=1)

    def mix_transposed(self, u):
        dtype = torch.promote_types(self.attn.dtype, u.dtype)
        return self.attn.to(dtype).transpose(-1, -2) @ u.to(dtype)

    def diagonal(self):
        return self.attn.diagonal(dim1=-2, dim2=-1)

    def row_sums(self):
        return self.attn.sum(-1)

    def entries(self, batch, rows, cols):
        return self.attn[batch][:, rows, cols]

    def inputs(self):
        return [self.attn]

    def fingerprint(self):
        flat = self.attn.detach().reshape(-1)
        return [flat[::max(1, flat.numel() >> 20)]]

    def element_zero(self):
        return ExplicitAttention(self.attn[:1], self.kv_heads)


def as_source(attn, num_kv_heads: int, w_v: torch.Tensor | None = None,
              w_o: torch.Tensor | None = None) -> AttentionSource:
    """attn as an AttentionSource: a source as it is; a tensor (B, h, N, N_k), checked against the weights
    when they are given, as ExplicitAttention. The duat_kernels.linalg functions take either; called
    directly with a wrong shape they failed deep inside torch ("shape '[2, 1, 3]' is invalid"), with anything
    else (a list, None) with "'list' object has no attribute 'heads'"."""
    if isinstance(attn, AttentionSource):
        return attn
    v.check_tensor("attn", attn, (4,))  # a list or None failed later: "'list' object has no attribute 'heads'"
    if w_o is not None or w_v is not None:  # num_kv_heads=None is h, as in hvo_matrix: callers read source.kv_heads
        num_kv_heads = v.check_attention(attn, w_v, w_o, num_kv_heads).kv_heads
    return ExplicitAttention(attn, num_kv_heads)
