"""A recomputed from q and k: softmax(scale·q kᵀ (soft-capped) + masks), a row block at a time, as flash
attention does, so memory stays O(h · rows · N) and A is never stored whole (an AttentionSource, see
duat_kernels.attention_source).

Masks follow Hugging Face: key mask True = attend; causal: key m <= query n; sliding window w:
n - w < m (and m < n + w without causal). Rows that may attend no key are zero rows of A. Cross-attention
(k of N_k != N keys): a key mask over the N_k keys only (causal masks and windows index keys by query position).
"""

from __future__ import annotations

import copy

import torch

from duat_kernels import _validation as v
from duat_kernels import backends, qk_cpu, reference
from duat_kernels._progress import batch_elements
from duat_kernels.attention_source import AttentionSource
from duat_kernels.repeated_batch import per_element, repeats_one_element


def key_mask_4d(mask: torch.Tensor | None, batch: int, tokens: int, device: torch.device,
                keys_name: str = "N") -> torch.Tensor | None:
    """attention_mask (N,) or (B, N) (tokens = N keys, named keys_name: N_k for cross-attention), True/1 = attend
    -> bool (B, 1, 1, N) on `device` (q's), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (1, 2) or mask.shape[-1] != tokens or (
            mask.dim() == 2 and mask.shape[0] not in (1, batch)):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be a key mask of shape ({keys_name},) = ({tokens},) or (B, {keys_name}) = "
                         f"({batch}, {tokens}), True = attend, got {got}")
    v.check_strided("attention_mask", mask)
    if mask.dim() == 2 and repeats_one_element(mask):  # one mask expanded over the batch: checked and converted once
        return key_mask_4d(mask[:1], batch, tokens, device, keys_name)
    if mask.device.type == "meta" and device.type != "meta":  # a meta mask has no values to move to q's device
        raise ValueError(f"attention_mask is on {mask.device} but q and k are on {device}; put them on one device")
    if (mask.is_floating_point() or mask.is_complex()) and not torch.compiler.is_compiling() and \
            v.functorch_level_is(torch._C._functorch.is_batchedtensor, mask):
        # the check below cannot read vmap's batched values; a floating mask is the one an additive mask would be
        raise ValueError(f"attention_mask must hold True/1 (attend) and False/0 (masked) only, which a {mask.dtype} "
                         "mask batched under torch.func.vmap cannot be checked for: pass a bool mask "
                         "(attention_mask.bool() for a 1/0 keep mask, attention_mask == 0 for an additive one)")
    if mask.dtype != torch.bool and (torch.compiler.is_compiling() or v.has_values(mask)):  # traced: a graph break
        # 1/0 keep masks (tokenizers give int64) only: an additive mask (0 = attend, -inf or a large
        # negative = masked) read as one would be silently inverted
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"attention_mask must hold True/1 (attend) and False/0 (masked) only, got {mask.dtype} "
                             "values other than 0 and 1 (an additive mask, 0 = attend and -inf = masked? pass "
                             "attention_mask == 0 for one)")
    mask = mask.bool().reshape(-1, 1, 1, tokens)
    return mask.to(device).expand(batch, 1, 1, tokens)


class QKAttention(AttentionSource):
    """A = softmax(scale·q kᵀ (soft-capped) + masks) (B, h, N, N_k) from q (B, h, N, d), k (B, h_kv, N_k, d)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = False,
                 attention_mask: torch.Tensor | None = None, scale: float | None = None,
                 softcap: float | None = None, sliding_window: int | None = None):
        causal = v.check_flag("causal", causal)  # "no" would be truthy
        ct = reference.compute_dtype(q.dtype)
        self.q, self.k = (per_element(t, lambda one: one.to(ct)) for t in (q, k))  # an expanded batch stays so
        self.batch, self.heads, self.tokens, d = q.shape
        self.kv_heads, self.key_count = k.shape[1], k.shape[2]
        if self.key_count != self.tokens and (causal or sliding_window is not None):
            raise ValueError(f"{'causal=True' if causal else f'sliding_window={sliding_window!r}'} needs self-attention "
                             f"(k of N = {self.tokens} keys, one per query), got k of N_k = {self.key_count} keys: a causal "
                             "mask or sliding window indexes keys by query position, which cross-attention keys do not "
                             "have; pass causal=False and sliding_window=None (an attention_mask over the N_k keys masks "
                             "encoder padding)")
        self.dtype, self.device = ct, q.device
        self.scale = d ** -0.5 if scale is None else float(scale)
        self.causal, self.softcap = bool(causal), softcap
        # a NumPy integer as an int; a window of N or more keys is every key (the kernels take int64: 10**20
        # overflowed there, 2**63 wrapped to a negative index)
        self.window = None if sliding_window is None else min(int(sliding_window), self.tokens)
        self.key_mask = key_mask_4d(attention_mask, self.batch, self.keys, self.device,
                                    "N" if self.keys == self.tokens else "N_k")
        self._qk_finite: bool | None = None
        self._wide: bool | None = None
        self._normalisers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.empty_rows = self._rows_without_keys()  # (B, N) bool or None

    @property
    def keys(self) -> int:
        """N_k, the keys of k: N for self-attention."""
        return self.key_count

    # --- masks ------------------------------------------------------------------------------

    def column_range(self, r0, r1):
        c0 = max(0, r0 - self.window + 1) if self.window else 0
        c1 = r1 if self.causal else (min(self.tokens, r1 - 1 + self.window) if self.window else self.keys)
        return c0, max(c1, c0 + 1)

    def allowed(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
        """bool (B or 1, 1, len(rows), len(cols)) of the attended (query, key) pairs; None if all are."""
        n, m = rows[:, None], cols[None, :]
        ok = None
        if self.causal:
            ok = m <= n
        if self.window:
            win = (n - m < self.window) & ((m - n < self.window) if not self.causal else True)
            ok = win if ok is None else ok & win
        ok = None if ok is None else ok[None, None]
        if self.key_mask is not None:
            keys = self.key_mask[..., cols]
            ok = keys if ok is None else ok & keys
        return ok

    def _rows_without_keys(self) -> torch.Tensor | None:
        if self.key_mask is None and not self.window:
            return None  # causal rows see themselves; full rows see every key
        keys = self.key_mask[:, 0, 0] if self.key_mask is not None else \
            torch.ones(1, self.keys, dtype=torch.bool, device=self.device)
        keys = keys[:1] if repeats_one_element(keys) else keys  # one mask for the batch: its rows, expanded below
        count = torch.nn.functional.pad(keys.long().cumsum(-1), (1, 0))  # count[j] = keys before j
        n = torch.arange(self.tokens, device=self.device)
        lo = (n - self.window + 1).clamp_min(0) if self.window else torch.zeros_like(n)
        hi = n + 1 if self.causal else ((n + self.window).clamp_max(self.tokens) if self.window else
                                        torch.full_like(n, self.keys))
        empty = (count[:, hi] - count[:, lo]) == 0
        # None (no row to zero) only where Python can read the mask: a meta, fake, vmap's or traced one is kept
        return empty.expand(self.batch, -1) if not v.has_values(empty) or empty.any() else None

    # --- blocks -----------------------------------------------------------------------------

    def logits(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """scale·q kᵀ (soft-capped) with -inf where masked: (B, h, rows, cols)."""
        b, g = self.batch, self.heads // self.kv_heads
        q = self.q[:, :, r0:r1].reshape(b, self.kv_heads, g, r1 - r0, self.q.shape[-1])  # no -1: B may be 0
        k = self.k[:, :, None, c0:c1]
        if self.wide_logits():
            q, k = q.double(), k.double()
        s = (q @ k.transpose(-1, -2)).reshape(b, self.heads, r1 - r0, c1 - c0)
        s.mul_(self.scale)
        if self.softcap and s.requires_grad:  # tanh's backward reads its output: no mul_ on it
            s = torch.tanh(s / self.softcap) * self.softcap
        elif self.softcap:
            s.div_(self.softcap).tanh_().mul_(self.softcap)
        ok = self.allowed(torch.arange(r0, r1, device=self.device), torch.arange(c0, c1, device=self.device))
        if ok is not None:
            s.masked_fill_(~ok, float("-inf"))
        return s

    def block(self, r0, r1, c0, c1):
        p = self.logits(r0, r1, c0, c1).softmax(-1)
        if p.requires_grad:  # softmax's backward reads its output: the zeroing below must not write into it
            p = p.clone()
        if not self._finite_qk():
            # masked pairs are exact zeros, as entries() and the fused passes have them, also in a row
            # whose logits hold a NaN (softmax would spread it over the masked keys of the row block,
            # not over those of other blocks); finite logits give exact zeros there already
            ok = self.allowed(torch.arange(r0, r1, device=self.device), torch.arange(c0, c1, device=self.device))
            if ok is not None:
                p.masked_fill_(~ok, 0.0)
        return self._zero_empty(p, r0, r1).to(self.dtype)

    def wide_logits(self) -> bool:
        """Whether float32 logits could overflow: |scale|·d·max|q|·max|k| (a bound of every product and partial
        sum of every q·k, from one min/max pass, no copy) beyond float32's range. Such logits are formed in
        float64, where they cannot overflow, as are their softmax and log-sum-exp, and the C++ and Triton passes
        (float32) are not used: in float32 a logit of 1e40 came out as Inf or NaN depending on each path's order
        of operations, so to_dense gave NaN rows where block_norms and rmatvec gave finite numbers (the exact A
        is a finite one-hot row there)."""
        if self._wide is None:
            self._wide = False
            if self.dtype == torch.float32 and self.device.type != "meta" and self.q.numel() and self.k.numel() \
                    and v.has_values(self.q, self.k) and self._finite_qk():
                q_max, k_max = (max(-float(lo), float(hi)) for lo, hi in
                                (torch.aminmax(self.q.detach()), torch.aminmax(self.k.detach())))
                self._wide = abs(self.scale) * self.q.shape[-1] * q_max * k_max > torch.finfo(torch.float32).max
        return self._wide

    def _finite_qk(self) -> bool:
        """Whether q and k are known to be finite (v.all_finite): False under vmap, torch.compile and for meta or fake
        tensors too, whose A then takes the path that is exact for NaN and Inf."""
        if self._qk_finite is None:
            self._qk_finite = v.all_finite(self.q, self.k)
        return self._qk_finite

    def _zero_empty(self, p, r0, r1):
        if self.empty_rows is not None:
            p.masked_fill_(self.empty_rows[:, None, r0:r1, None], 0.0)
        return p

    def softmax_normalisers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(max_m logits[n, m], Σ_m exp(logits[n, m] - max)) per row, each (B, h, N), computed once (max -inf
        for rows without keys). Kept apart, not as log Σ exp = max + log Σ: that sum rounds away its log Σ
        once ulp(max) > log N (logits of 1e17 in float64, 1e8 in float32), and exp(s - lse) gave 1, not 1/N."""
        if self._normalisers is None and self.repeats_one_element():  # element 0's, as a view over the batch
            self._normalisers = tuple(t.expand(self.batch, *t.shape[1:])
                                      for t in self.element_zero().softmax_normalisers())
        if self._normalisers is None:
            tops, totals = [], []  # per row block, concatenated (vmap cannot write batched rows into a buffer)
            for r0 in range(0, self.tokens, self.rows_per_step()):
                r1 = min(self.tokens, r0 + self.rows_per_step())
                s = self.logits(r0, r1, *self.column_range(r0, r1))
                tops.append(s.amax(-1))
                totals.append((s - tops[-1][..., None]).exp().sum(-1))
            shape, dtype = (self.batch, self.heads, 0), torch.float64 if self.wide_logits() else self.dtype
            self._normalisers = tuple(torch.cat(parts, -1) if parts else torch.empty(shape, device=self.device,
                                                                                     dtype=dtype)
                                      for parts in (tops, totals))
        return self._normalisers

    # --- products through scaled_dot_product_attention ---------------------------------------

    def mix_transposed(self, u):
        """A_iᵀ U_i; float32 CPU sources through the fused C++ pass (duat_kernels.qk_cpu)."""
        out = qk_cpu.mix_transposed(self, u) if self._cpp_products(u) else super().mix_transposed(u)
        return self._masked_terms(out, u)

    def mix(self, values):
        """A V with torch's fused attention (same masks, same A); soft-capped logits, which sdpa cannot
        form, through the C++ pass (duat_kernels.qk_cpu) on float32 CPU sources, else in blocks."""
        return self._masked_terms(self._mix(values), values)

    def _cpp_products(self, vectors: torch.Tensor) -> bool:
        """Whether the C++ pass computes A V or Aᵀ U: it reads NumPy views, which autograd cannot follow
        (q or k lost their gradient silently, vectors that require grad failed in numpy()); under autograd
        the torch row blocks serve."""
        return qk_cpu.handles(self) and backends.direct_call(self.q, self.k, vectors)  # vmap's vectors: no storage

    def _masked_terms(self, out: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """out (B, h, N, e) plus what the pairs every path skips (masked, outside the causal or sliding window,
        rows without keys: A = 0 there) contribute to A V or Aᵀ U: 0 · vectors, so zero, or NaN in every row
        for a column of vectors (B, h or h_kv, N, e) that holds a NaN or Inf (0 · Inf = NaN, as in the dense
        W'). Those were lost: matvec gave 0 for a row without keys where W' x' is NaN."""
        if v.all_finite(vectors):
            return out
        skipped = (0 * vectors).sum(-2, keepdim=True)  # (B, h or h_kv, 1, e): 0, or NaN where a vector is not finite
        return out + skipped.repeat_interleave(out.shape[1] // vectors.shape[1], dim=1).to(out.dtype)

    def _mix(self, values):
        if self.softcap:
            return qk_cpu.mix(self, values) if self._cpp_products(values) else super().mix(values)
        if not self._finite_qk() or self.wide_logits() or backends.has_tangent(self.q, self.k, values):
            return super().mix(values)  # sdpa writes zeros for a row of NaN logits, and has no forward-mode AD
        sdpa = self._sdpa
        vals = values.to(self.dtype)
        if self.key_mask is None and not self.window:
            out = sdpa(self.q, self.k, vals, is_causal=self.causal, scale=self.scale, enable_gqa=True)
            return out.to(values.dtype)
        if not v.has_values(self.q, self.k, values):  # vmap cannot write batched row blocks into the buffer below
            return super().mix(values)
        out = torch.empty(self.batch, self.heads, self.tokens, vals.shape[-1], dtype=self.dtype, device=self.device)
        step = self.rows_per_step()
        for r0 in range(0, self.tokens, step):
            r1 = min(self.tokens, r0 + step)
            c0, c1 = self.column_range(r0, r1)
            ok = self.allowed(torch.arange(r0, r1, device=self.device), torch.arange(c0, c1, device=self.device))
            out[:, :, r0:r1] = sdpa(self.q[:, :, r0:r1], self.k[:, :, c0:c1], vals[:, :, c0:c1], attn_mask=ok,
                                    scale=self.scale, enable_gqa=True)
            self._zero_empty(out[:, :, r0:r1], r0, r1)
        return out.to(values.dtype)

    @staticmethod
    def _sdpa(q, k, vals, **kwargs):
        """torch's sdpa with values of any width: its fused CPU kernel needs value width = d, so wider
        values go through in slices of d columns (the last one zero-padded)."""
        sdpa = torch.nn.functional.scaled_dot_product_attention
        d, e = q.shape[-1], vals.shape[-1]
        if e == d:
            return sdpa(q, k, vals, **kwargs)
        if e == 0:  # value head size 0 (w_o of no columns): nothing to mix, and no slices to concatenate
            return vals.new_zeros(*q.shape[:-1], 0)
        parts = []
        for j in range(0, e, d):
            part = vals[..., j:j + d]
            width = part.shape[-1]
            if width < d:
                part = torch.nn.functional.pad(part, (0, d - width))
            parts.append(sdpa(q, k, part, **kwargs)[..., :width])
        return torch.cat(parts, -1)

    # --- derived quantities -------------------------------------------------------------------

    def entries(self, batch, rows, cols):
        out = []  # per step of 8192 pairs, concatenated (vmap cannot write batched entries into a buffer)
        top, total = (t[batch] for t in self.softmax_normalisers())
        g = self.heads // self.kv_heads
        for s0 in range(0, rows.shape[0], 8192):
            n, m = rows[s0:s0 + 8192], cols[s0:s0 + 8192]
            q, k = self.q[batch][:, n].reshape(self.kv_heads, g, n.shape[0], -1), self.k[batch][:, None, m]
            if self.wide_logits():
                q, k = q.double(), k.double()
            s = (q * k).sum(-1).reshape(self.heads, -1) * self.scale
            if self.softcap:
                s = torch.tanh(s / self.softcap) * self.softcap
            row_max = top[:, n]
            p = (s - row_max).exp() / total[:, n]
            # a row with a +Inf or NaN logit has a maximum of Inf or NaN, and softmax makes every
            # entry of it NaN (its sum is NaN); exp(s - max) alone would give 0 beside the NaN
            p = torch.where(row_max.isfinite() | (row_max == float("-inf")), p, float("nan"))
            ok = self._pair_allowed(batch, n, m)
            out.append(torch.where(ok, p, 0.0).to(self.dtype))
        return torch.cat(out, 1) if out else torch.empty(self.heads, 0, dtype=self.dtype, device=self.device)

    def _pair_allowed(self, batch: int, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ok = torch.ones_like(n, dtype=torch.bool)
        if self.causal:
            ok &= m <= n
        if self.window:
            ok &= n - m < self.window
            if not self.causal:
                ok &= m - n < self.window
        if self.key_mask is not None:
            ok &= self.key_mask[batch, 0, 0, m]
        if self.empty_rows is not None:  # rows without keys (log-sum-exp -inf) are zero rows
            ok &= ~self.empty_rows[batch, n]
        return ok

    def diagonal(self):
        n = torch.arange(min(self.tokens, self.keys), device=self.device)  # A_i[n, n] for n < min(N, N_k)
        if self.batch == 0:  # an empty batch: nothing to stack
            return torch.zeros(0, self.heads, n.shape[0], dtype=self.dtype, device=self.device)
        return torch.stack([self.entries(b, n, n) for b in batch_elements(self.batch, "diagonals of A")])

    def row_sums(self):
        if not self._finite_qk():  # a row with a NaN or Inf logit sums to NaN, as its entries say
            return torch.cat([a.sum(-1) for *_, a in self.row_blocks()], -1)
        full = torch.ones(self.batch, self.tokens, dtype=self.dtype, device=self.device)
        if self.empty_rows is not None:
            full = full.masked_fill(self.empty_rows, 0.0)
        return full[:, None].expand(self.batch, self.heads, self.tokens)

    def inputs(self):
        return [self.q, self.k]

    def batched_inputs(self):
        return [self.q, self.k, self.key_mask]

    def element_zero(self):
        one = copy.copy(self)  # the options, and what is known of q and k (finite, wide logits), are element 0's too
        one.batch, one.q, one.k = 1, self.q[:1], self.k[:1]
        one.key_mask = None if self.key_mask is None else self.key_mask[:1]
        one.empty_rows = None if self.empty_rows is None else self.empty_rows[:1]
        one._normalisers = None if self._normalisers is None else tuple(t[:1] for t in self._normalisers)
        return one

    def finite(self):
        """A NaN or Inf in q or k need not reach A: a masked key's, or an Inf logit soft-capped to c.
        Softmax entries lie in [0, 1] or are NaN, so A is finite exactly where its row sums are."""
        return self._finite_qk() or v.all_finite(self.row_sums())

    def fingerprint(self):
        mask = [] if self.key_mask is None else [self.key_mask.reshape(-1).to(torch.uint8)]
        opts = torch.tensor([self.scale, float(self.causal), float(self.softcap or 0), float(self.window or 0)],
                            dtype=torch.float64)
        return [self.q.reshape(-1)[::max(1, self.q.numel() >> 20)], self.k.reshape(-1)[::max(1, self.k.numel() >> 20)],
                opts, *mask]
