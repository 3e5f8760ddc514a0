"""HVOOperator: W' (and b') of one attention layer without materialising it.

matvec is attention itself (project to values, mix with A, project out): O(h·N²·d + N·M·h·d),
never O((N·M)²). Parts of W' (one block, any tile) are written directly by the kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from duat_kernels import _validation as v
from duat_kernels import backends, linalg, reference
from duat_kernels import operator_args as args
from duat_kernels._memory import check_fits
from duat_kernels._progress import batch_elements
from duat_kernels.attention_source import AttentionSource, ExplicitAttention
from duat_kernels.heads import select_heads
from duat_kernels.hvo import hvo_bias, hvo_matrix
from duat_kernels.operator_parts import check_products_fit, check_qk, operator_bias, tile_factors, weighted_ov
from duat_kernels.qk_attention import QKAttention
from duat_kernels.repeated_batch import dense_attention, once_per_repeated_batch


class HVOOperator:
    """Matrix-free W'_HVO for attn (h, N, N_k) or (B, h, N, N_k), w_v (h_kv·d, M_in), w_o (M_out, h·d).

    N_k = N for self-attention; a cross-attention A (N decoder queries over N_k encoder keys) gives a
    rectangular W' of shape (N·M_out, N_k·M_in) whose x' is the encoder states (methods that need a
    square W', such as trace, refuse it).

    The attention probabilities come from `source` (duat_kernels.attention_source): the stored attn
    given here, or q and k (HVOOperator.from_qk), recomputed row block by row block.

    `shape` is (N·M_out, N_k·M_in), with a leading B for batched attn; vectors follow `layout`
    ("token": x'[n·M_in + a], "feature": x'[a·N + n]) or are (N, M) matrices X[n, a]. A 3-D attn is
    one sequence's h heads; num_heads=h, when given, is checked against it (see hvo_matrix).
    Results are in the promoted dtype of the inputs (and of x); NaN and Inf propagate as in the
    dense W' (where a different order of operations can turn a NaN into an Inf, never a finite value).
    """

    def __init__(self, attn: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, *, num_kv_heads: int | None = None,
                 b_v: torch.Tensor | None = None, b_o: torch.Tensor | None = None, layout: str = "token",
                 num_heads: int | None = None, heads: int | Sequence[int] | None = None):
        dims = v.check_attention(attn, w_v, w_o, num_kv_heads, num_heads)
        if heads is not None:  # W' of these heads only (b_o is kept as given): see duat_kernels.heads
            v.check_bias("b_v", b_v, dims.kv_heads * dims.head_dim)
            attn, w_v, w_o, b_v, num_kv_heads = select_heads(attn, w_v, w_o, b_v, heads, dims.kv_heads)
            dims = v.check_attention(attn, w_v, w_o, num_kv_heads)
        self._setup(ExplicitAttention(attn if dims.batched else attn.unsqueeze(0), dims.kv_heads), dims,
                    w_v, w_o, b_v, b_o, layout, attn=attn)

    @classmethod
    def from_qk(cls, q: torch.Tensor, k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, *,
                num_kv_heads: int | None = None, causal: bool = False, attention_mask: torch.Tensor | None = None,
                scale: float | None = None, b_v: torch.Tensor | None = None, b_o: torch.Tensor | None = None,
                layout: str = "token", softcap: float | None = None,
                sliding_window: int | None = None) -> "HVOOperator":
        """W' of the layer whose A = softmax(scale·q kᵀ + masks) is recomputed tile by tile, never stored.

        q (h, N, d) or (B, h, N, d); k (h_kv, N_k, d) or (B, h_kv, N_k, d) (GQA: query head i reads key
        head i // (h / h_kv); N_k != N: cross-attention, without causal mask or sliding window, which are
        refused there); attention_mask a key mask (N_k,) or (B, N_k), True = attend; causal: key
        m <= query n; scale defaults to d^-0.5; softcap c: logits c·tanh(logits / c) (Gemma 2);
        sliding_window w: keys with n - w < m (< n + w when not causal) (Mistral). Rows that attend
        no key are zero. Memory O(h · rows · N) per step; every method gives what it gives on the
        explicit A.
        """
        dims = check_qk(q, k, w_v, w_o, num_kv_heads, scale, softcap, sliding_window)
        q4, k4 = (q, k) if dims.batched else (q.unsqueeze(0), k.unsqueeze(0))
        source = QKAttention(q4, k4, causal=causal, attention_mask=attention_mask, scale=scale, softcap=softcap,
                             sliding_window=sliding_window)
        op = cls.__new__(cls)
        op._setup(source, dims, w_v, w_o, b_v, b_o, layout, q=q, k=k)
        return op

    def _setup(self, source: AttentionSource, dims: v.HeadDims, w_v, w_o, b_v, b_o, layout: str, **inputs) -> None:
        self.dims, self.source = dims, source
        v.check_layout(layout)
        v.check_bias("b_v", b_v, self.dims.kv_heads * self.dims.head_dim)
        v.check_bias("b_o", b_o, self.dims.m_out)
        self.device = v.check_same_device(w_v=w_v, w_o=w_o, b_v=b_v, b_o=b_o, **inputs)
        self.w_v, self.w_o, self.b_v, self.b_o = w_v, w_o, b_v, b_o
        self.layout = layout

    @property
    def attn(self) -> torch.Tensor:
        """The attention probabilities (h, N, N_k) or (B, h, N, N_k); from q/k they are computed here
        (refused with DenseTooLargeError when they would not fit)."""
        a = self.source.dense()
        return a if self.dims.batched else a[0]

    @property
    def shape(self) -> tuple[int, ...]:
        d = self.dims
        mat = (d.tokens * d.m_out, d.keys * d.m_in)
        return (d.batch, *mat) if d.batched else mat

    def _unflatten(self, x: torch.Tensor, width: int, name: str, n: int) -> torch.Tensor:
        """x' (..., n·width) in this layout, or X (..., n, width) -> X (B, K, n, width), checking it (n: N_k for an
        input of W', N for an output)."""
        axis = "N_k" if n == self.dims.keys and not self.dims.square else "N"
        x, matrix = args.vector_operand(x, name, tokens=n, width=width, batch=self.dims.batch,
                                        batched=self.dims.batched, device=self.device, layout=self.layout, axis=axis)
        x = x if self.dims.batched else x.unsqueeze(0)
        lead, k = x.shape[1:-1], math.prod(x.shape[1:-1])
        x = x.reshape(x.shape[0], k, n, width) if self.layout == "token" else \
            x.reshape(x.shape[0], k, width, n).transpose(-1, -2)
        return x, (lead, matrix)

    def _flatten(self, y: torch.Tensor, lead: tuple[torch.Size, bool]) -> torch.Tensor:
        lead, matrix = lead
        if matrix:  # X came as (..., N, M): Y as (..., N, M_out)
            y = y.reshape(y.shape[0], *lead, *y.shape[-2:])
            return y if self.dims.batched else y[0]
        y = y if self.layout == "token" else y.transpose(-1, -2)
        y = y.reshape(y.shape[0], *lead, y.shape[-1] * y.shape[-2])
        return y if self.dims.batched else y[0]

    @property
    def dtype(self) -> torch.dtype:
        """The promoted dtype of A and the weights: the default dtype of W', its parts and products."""
        return torch.promote_types(self.source.dtype, torch.promote_types(self.w_v.dtype, self.w_o.dtype))

    def _factors(self, x: torch.Tensor) -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
        """(dtype, w_v, w_o) in the promoted dtype of the inputs and x."""
        dtype = torch.promote_types(x.dtype, self.dtype)
        return dtype, self.w_v.to(dtype), self.w_o.to(dtype)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, N_k, M_in) -> (B, K, N, M_out): the attention of each of the K inputs, no biases.
        The K inputs ride along the value dimension: A_i (V_1 | ... | V_K) in one product."""
        d = self.dims
        b, k, n, m = x.shape
        dtype, w_v, w_o = self._factors(x)
        check_products_fit("W' x'", d, k, m, d.m_out, dtype, self.device)
        if m == 0:  # W' has no columns: W' x' is an empty sum, whatever A holds
            return x.new_zeros(b, k, d.tokens, d.m_out, dtype=dtype)
        vals = (x.to(dtype) @ w_v.T).reshape(b, k, n, d.kv_heads, d.head_dim).permute(0, 3, 2, 1, 4)
        z = self.source.mix(vals.reshape(b, d.kv_heads, n, k * d.head_dim).contiguous())  # (B, h, N, K·d)
        z = z.to(dtype).reshape(b, d.heads, d.tokens, k, d.head_dim).permute(0, 3, 2, 1, 4)
        z = z.reshape(b, k, d.tokens, d.heads * d.head_dim)
        return z @ w_o.T

    @once_per_repeated_batch("x")
    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """W' x' for x' (N_k·M_in,) or batched (B, N_k·M_in) (more leading dims are treated as columns)."""
        xs, lead = self._unflatten(x, self.dims.m_in, "x", self.dims.keys)
        return self._flatten(self._attention(xs), lead)

    @once_per_repeated_batch("y")
    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """W'ᵀ y for y (N·M_out,) or (B, N·M_out): the attention with Aᵀ, w_oᵀ and w_vᵀ swapped in."""
        ys, lead = self._unflatten(y, self.dims.m_out, "y", self.dims.tokens)
        d = self.dims
        b, k, n, _ = ys.shape
        g = d.heads // d.kv_heads
        dtype, w_v, w_o = self._factors(ys)
        check_products_fit("W'ᵀ y", d, k, d.m_out, d.m_in, dtype, self.device)
        if d.m_out == 0:  # W' has no rows: W'ᵀ y is an empty sum
            return self._flatten(ys.new_zeros(b, k, d.keys, d.m_in, dtype=dtype), lead)
        u = (ys.to(dtype) @ w_o).reshape(b, k, n, d.heads, d.head_dim).permute(0, 3, 2, 1, 4)  # Y Wo_i: (B, h, N, K, d)
        z = self.source.mix_transposed(u.reshape(b, d.heads, n, k * d.head_dim)).to(dtype)  # A_iᵀ Y Wo_i
        z = z.reshape(b, d.kv_heads, g, d.keys, k, d.head_dim).sum(2)  # query heads of a group share Wv_j
        x = z.permute(0, 3, 2, 1, 4).reshape(b, k, d.keys, d.kv_heads * d.head_dim) @ w_v
        return self._flatten(x, lead)

    @once_per_repeated_batch("x")
    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        """W' X for X (N_k·M_in, K) or (B, N_k·M_in, K)."""
        args.matrix_operand(x, "X", self.shape[-1], self.dims.batch, self.dims.batched)
        xs, lead = self._unflatten(x.transpose(-1, -2), self.dims.m_in, "X", self.dims.keys)  # columns of X as vectors
        return self._flatten(self._attention(xs), lead).transpose(-1, -2)

    @once_per_repeated_batch()
    def bias(self) -> torch.Tensor:
        """b' of h' = W' x' + b' (see duat_kernels.hvo_bias)."""
        if isinstance(self.source, ExplicitAttention):
            return hvo_bias(self.attn, self.w_o, self.b_v, self.b_o, num_kv_heads=self.dims.kv_heads, layout=self.layout)
        bias = operator_bias(self.source, self.w_o, self.b_v, self.b_o, self.layout)
        return bias if self.dims.batched else bias[0]

    def to_dense(self, **kwargs) -> torch.Tensor:
        """The dense W' (refused with DenseTooLargeError when it would not fit); kwargs go to hvo_matrix."""
        v.check_not_given("HVOOperator.to_dense", kwargs, layout=self.layout, num_kv_heads=self.dims.kv_heads)
        return hvo_matrix(dense_attention(self), self.w_v, self.w_o, num_kv_heads=self.dims.kv_heads, layout=self.layout,
                          **kwargs)

    @once_per_repeated_batch()
    def block(self, n: int, m: int) -> torch.Tensor:
        """Block (n, m) = Σ_i A_i[n, m] OV_i: (M_out, M_in), or (B, M_out, M_in); token-layout block.
        Negative n, m count from the end, as in Python."""
        n, m = (v.check_index(name, idx, size, axis) for name, idx, size, axis in
                (("n", n, self.dims.tokens, f"N={self.dims.tokens} tokens"),
                 ("m", m, self.dims.keys, f"N_k={self.dims.keys} keys" if not self.dims.square
                  else f"N={self.dims.tokens} tokens")))
        dtype = self.dtype
        idx = torch.tensor([n], device=self.device), torch.tensor([m], device=self.device)
        alpha = torch.stack([self.source.entries(b, *idx)[:, 0] for b in batch_elements(self.dims.batch, "blocks")]) \
            if self.dims.batch else torch.zeros(0, self.dims.heads, dtype=dtype, device=self.device)
        blk = weighted_ov(alpha.to(dtype), self.w_v.to(dtype), self.w_o.to(dtype), self.dims.heads, self.dims.kv_heads)
        return blk if self.dims.batched else blk[0]

    @once_per_repeated_batch()
    def tile(self, rows: slice, cols: slice, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W'[rows, cols] for unit-step slices: (rows, cols), or (B, rows, cols) for a batch.

        Written straight into the buffer by the kernel backend (64-bit offsets). When autograd is on
        and one of the weights or the tensors A comes from requires grad, the tile is computed with
        differentiable torch operations on the factor ranges it touches instead (same values, within
        rounding), so gradients flow back to them."""
        total = self.shape[-2:]
        (r0, r1), (c0, c1) = (self._range(s, size, name) for s, size, name in
                              ((rows, total[0], "rows"), (cols, total[1], "cols")))
        dtype = v.resolve_dtype(self.dtype if dtype is None else dtype, None)
        check_fits(f"a tile of W' of shape ({r1 - r0}, {c1 - c0})",
                   (r1 - r0) * (c1 - c0) * self.dims.batch * dtype.itemsize, self.device)
        factors = (self.w_v, self.w_o, *self.source.inputs())
        wrapped = backends.functorch_wrapped(*factors)  # vmap's: no storage
        if backends.tracks_grad(*factors) or wrapped:
            return self._tile_differentiable(r0, r1, c0, c1, dtype)
        ct = reference.compute_dtype(dtype)
        out = torch.empty(self.dims.batch, r1 - r0, c1 - c0, dtype=dtype, device=self.device)
        backend = backends.resolve("auto", self.device)
        with torch.no_grad():
            w_v, w_o = self.w_v.to(ct), self.w_o.to(ct)
            attn, ov_rows, ov_cols, row0, col0 = tile_factors(self.source, (w_o.shape[0], w_v.shape[1]), self.layout,
                                                              r0, r1, c0, c1)
            ov_entries = self.dims.heads * (ov_rows.stop - ov_rows.start) * (ov_cols.stop - ov_cols.start)
            if (dtype in backends.output_dtypes(backend) and backends.fuses_ov(backend, self.layout, 1, w_v)
                    and (self.dims.batch == 1 or ov_entries > (r1 - r0) * (c1 - c0))):
                # OV's slabs for the tile's rows q and columns t only, in cache, per batch element: no
                # (h, M, M) OV for a tile spanning several tokens. A batch recomputes the slabs per
                # element, so it takes this path only where the OV part would outgrow the tile itself.
                for b in batch_elements(self.dims.batch, "tiles"):
                    backends.materialise_fused(attn[b:b + 1], w_v[:, ov_cols], w_o[ov_rows], self.dims.kv_heads,
                                               out[b:b + 1], row0, col0)
                return out if self.dims.batched else out[0]
            ov = backends.ov_part(backend, w_v, w_o, self.dims.heads, self.dims.kv_heads, ov_rows, ov_cols)
            kernel = (backend != "reference" and dtype in backends.output_dtypes(backend)
                      and backends.direct_kernel_call(attn, ov, out))  # no FakeTensor, dispatch mode or trace
            for b in batch_elements(self.dims.batch, "tiles"):
                left, right = backends.kron_factors(attn[b].to(ct), ov, self.layout)
                if kernel:
                    backends.tile_kernel(backend)(left, right, out[b], row0, col0)
                else:  # reference: the Kronecker products of the factor ranges the tile touches
                    out[b] = self._kron_part(left, right, row0, col0, r1 - r0, c1 - c0)
        return out if self.dims.batched else out[0]

    @staticmethod
    def _kron_part(left: torch.Tensor, right: torch.Tensor, row0: int, col0: int, rows: int, cols: int) -> torch.Tensor:
        """(Σ_i left_i ⊗ right_i)[row0:row0 + rows, col0:col0 + cols] with torch operations."""
        part = sum(reference.kron(left[i], right[i]) for i in range(left.shape[0]))
        return part[row0:row0 + rows, col0:col0 + cols]

    def _tile_differentiable(self, r0: int, r1: int, c0: int, c1: int, dtype: torch.dtype) -> torch.Tensor:
        """tile() through autograd: OV and the Kronecker products of the touched factor ranges."""
        ct = reference.compute_dtype(dtype)
        w_v, w_o = self.w_v.to(ct), self.w_o.to(ct)
        attn, ov_rows, ov_cols, row0, col0 = tile_factors(self.source, (w_o.shape[0], w_v.shape[1]), self.layout,
                                                          r0, r1, c0, c1)
        ov = reference.ov_circuits(w_v[:, ov_cols], w_o[ov_rows], self.dims.heads, self.dims.kv_heads)
        parts = [self._kron_part(*backends.kron_factors(attn[b].to(ct), ov, self.layout), row0, col0, r1 - r0, c1 - c0)
                 for b in batch_elements(self.dims.batch, "tiles")]
        out = (torch.stack(parts) if parts else attn.new_zeros(0, r1 - r0, c1 - c0, dtype=ct)).to(dtype)
        return out if self.dims.batched else out[0]

    # --- analysis without the dense matrix (duat_kernels.linalg) -------------------------------

    @once_per_repeated_batch()
    def block_norms(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Frobenius norms of all N x N_k blocks (token-layout blocks B_nm = Σ_i A_i[n, m] OV_i):
        (N, N_k) or (B, N, N_k), exactly, via the h x h Gram matrix of the OV circuits: O(N²h²) time,
        O(N²) memory. grid=(R, C) reduces them to the norms of an R x C grid of super-blocks.
        Differentiable: where autograd records (grad mode on and an input requires grad, e.g. an
        nn.Parameter) or a torch.func transform runs, they are torch operations on the whole A
        (O(B·h·N²) memory); call under torch.no_grad() for the fused pass."""
        grid = args.grid_argument(grid, (self.dims.tokens, self.dims.keys))
        norms = linalg.block_norms(self.source, self.w_v, self.w_o, self.dims.kv_heads, grid)  # differentiable
        return norms if self.dims.batched else norms[0]

    @once_per_repeated_batch()
    def frobenius_norm(self) -> torch.Tensor:
        """||W'||_F exactly (float64), () or (B,); differentiable as block_norms is."""
        norm = linalg.frobenius_norm(self.source, self.w_v, self.w_o, self.dims.kv_heads)  # differentiable
        return norm if self.dims.batched else norm[0]

    @once_per_repeated_batch()
    def trace(self) -> torch.Tensor:
        """tr W' exactly (float64), () or (B,); W' must be square (M_in = M_out)."""
        tr = linalg.trace(self.source, self.w_v, self.w_o, self.dims.kv_heads)  # torch operations: differentiable
        return tr if self.dims.batched else tr[0]

    def fraction_above(self, threshold: float, samples: int = 100_000, confidence: float = 0.95, seed: int = 0,
                       batch: int = 0) -> "linalg.EntryEstimate":
        """Fraction of entries with |w| > threshold, estimated from uniformly sampled entries, with a
        Wilson confidence interval (e.g. threshold = 0.01 * frobenius_norm() / sqrt(numel))."""
        with torch.no_grad():
            return linalg.fraction_above(self.source, self.w_v, self.w_o, self.dims.kv_heads, threshold, samples,
                                           confidence, seed, batch)

    def as_linear_operator(self):
        """scipy.sparse.linalg.LinearOperator of W' (unbatched)."""
        return linalg.as_linear_operator(self)

    def singular_values(self, k: int = 1, tol: float = 1e-6) -> "np.ndarray":
        """The k largest singular values (scipy svds on the matrix-free operator), descending."""
        return linalg.singular_values(self, k, tol)

    def spectral_norm(self, tol: float = 1e-6) -> float:
        """||W'||_2, the largest singular value (0 for an empty W', NaN when W' has NaN or Inf entries)."""
        if min(self.shape[-2:]) == 0 and not self.dims.batched:
            return 0.0
        return float(self.singular_values(1, tol)[0])

    @once_per_repeated_batch("x")
    def contributions(self, x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """Token-to-token contributions ||W'_nm x_m||₂ of input token m to output token n, without W'.

        x: the layer input X as (N_k, M_in) (or (B, N_k, M_in) when batched), or flattened x' in this
        operator's layout. Returns (N, N_k) (or (B, N, N_k)); per_head=True gives each head's own
        ||A_i[n, m] OV_i x_m|| as (h, N, N_k) (or (B, h, N, N_k)). Biases are not included (b' is
        separate: see bias()). Differentiable in A (or q, k), the weights and x, as block_norms is.
        """
        d = self.dims
        xs, _ = self._unflatten(x, d.m_in, "x", d.keys)
        if xs.shape[1] != 1:
            raise ValueError(f"x must be one input per batch element, got shape {tuple(x.shape)}")
        xs = xs[:, 0]
        out = linalg.contributions(self.source, xs, self.w_v, self.w_o, d.kv_heads, per_head)  # differentiable
        return out if d.batched else out[0]

    def to_dask(self, chunks: tuple[int, int] | None = None, dtype: torch.dtype | None = None):
        """W' as a lazy dask.array whose (rows, cols) blocks are tiles written by the kernels; the
        factors are one task in the graph, shipped to each worker once (duat_kernels.analysis.to_dask)."""
        from duat_kernels.analysis.dask_tiles import to_dask  # the tools floor imports this module

        return to_dask(self, chunks, dtype)

    @staticmethod
    def _range(s: slice, size: int, name: str) -> tuple[int, int]:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise ValueError(f"{name} must be a slice with step 1, got {s!r}")
        if any(bound is not None and v.integer(bound) is None for bound in (s.start, s.stop)):  # slice(True, 3) was 1:3
            raise TypeError(f"{name} must be a slice of ints (or None), got {s!r}")
        try:
            start, stop, _ = s.indices(size)
        except TypeError:  # Python's "slice indices must be integers or None or have an __index__ method"
            raise TypeError(f"{name} must be a slice of ints (or None), got {s!r}") from None
        if stop <= start:
            raise ValueError(f"{name}={s!r} selects no entries of a dimension of size {size}")
        return start, stop

    def __repr__(self) -> str:
        d = self.dims
        keys = "" if d.square else f", keys={d.keys}"
        return (f"HVOOperator(shape={tuple(self.shape)}, tokens={d.tokens}{keys}, heads={d.heads}, "
                f"kv_heads={d.kv_heads}, "
                f"head_dim={d.head_dim}, M_in={d.m_in}, M_out={d.m_out}, layout={self.layout!r}, "
                f"source={type(self.source).__name__}, dtype={self.source.dtype}, device={self.device})")
