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
from duat_kernels import analysis, backends, reference
from duat_kernels import operator_args as args
from duat_kernels.heads import select_heads
from duat_kernels.hvo import hvo_bias, hvo_matrix


class HVOOperator:
    """Matrix-free W'_HVO for attn (h, N, N) or (B, h, N, N), w_v (h_kv·d, M_in), w_o (M_out, h·d).

    `shape` is (N·M_out, N·M_in), with a leading B for batched attn; vectors follow `layout`
    ("token": x'[n·M_in + a], "feature": x'[a·N + n]) or are (N, M) matrices X[n, a]. A 3-D attn is
    one sequence's h heads; num_heads=h, when given, is checked against it (see hvo_matrix).
    Results are in the promoted dtype of the inputs (and of x); NaN and Inf propagate as in the
    dense W' (where a different order of operations can turn a NaN into an Inf, never a finite value).
    """

    def __init__(self, attn: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, *, num_kv_heads: int | None = None,
                 b_v: torch.Tensor | None = None, b_o: torch.Tensor | None = None, layout: str = "token",
                 num_heads: int | None = None, heads: int | Sequence[int] | None = None):
        self.dims = v.check_attention(attn, w_v, w_o, num_kv_heads, num_heads)
        if heads is not None:  # W' of these heads only (b_o is kept as given): see duat_kernels.heads
            v.check_bias("b_v", b_v, self.dims.kv_heads * self.dims.head_dim)
            attn, w_v, w_o, b_v, num_kv_heads = select_heads(attn, w_v, w_o, b_v, heads, self.dims.kv_heads)
            self.dims = v.check_attention(attn, w_v, w_o, num_kv_heads)
        v.check_layout(layout)
        v.check_bias("b_v", b_v, self.dims.kv_heads * self.dims.head_dim)
        v.check_bias("b_o", b_o, self.dims.m_out)
        self.device = v.check_same_device(attn=attn, w_v=w_v, w_o=w_o, b_v=b_v, b_o=b_o)
        self.attn, self.w_v, self.w_o, self.b_v, self.b_o = attn, w_v, w_o, b_v, b_o
        self.layout = layout
        self._attn4 = attn if self.dims.batched else attn.unsqueeze(0)

    @property
    def shape(self) -> tuple[int, ...]:
        d = self.dims
        mat = (d.tokens * d.m_out, d.tokens * d.m_in)
        return (d.batch, *mat) if d.batched else mat

    def _unflatten(self, x: torch.Tensor, width: int, name: str) -> torch.Tensor:
        """x' (..., N·width) in this layout, or X (..., N, width) -> X (B, K, N, width), checking it."""
        n = self.dims.tokens
        x, matrix = args.vector_operand(x, name, tokens=n, width=width, batch=self.dims.batch,
                                        batched=self.dims.batched, device=self.device, layout=self.layout)
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

    def _factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(attn (B, h, N, N), w_v, w_o) in the promoted dtype of the inputs and x."""
        dtype = torch.promote_types(x.dtype, v.resolve_dtype(None, None, self.attn, self.w_v, self.w_o))
        return self._attn4.to(dtype), self.w_v.to(dtype), self.w_o.to(dtype)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, N, M_in) -> (B, K, N, M_out): the attention of each of the K inputs, no biases."""
        b, k, n, m = x.shape
        attn4, w_v, w_o = self._factors(x)
        if m == 0:  # W' has no columns: W' x' is an empty sum, whatever A holds
            return x.new_zeros(b, k, n, self.dims.m_out, dtype=attn4.dtype)
        x = x.to(attn4.dtype)
        attn = attn4.unsqueeze(1).expand(b, k, *attn4.shape[1:]).reshape(b * k, self.dims.heads, n, n)
        out = reference.attention_output(attn, x.reshape(b * k, n, m), w_v, w_o, num_kv_heads=self.dims.kv_heads)
        return out.reshape(b, k, n, self.dims.m_out)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """W' x' for x' (N·M_in,) or batched (B, N·M_in) (more leading dims are treated as columns)."""
        xs, lead = self._unflatten(x, self.dims.m_in, "x")
        return self._flatten(self._attention(xs), lead)

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """W'ᵀ y for y (N·M_out,) or (B, N·M_out): the attention with Aᵀ, w_oᵀ and w_vᵀ swapped in."""
        ys, lead = self._unflatten(y, self.dims.m_out, "y")
        d = self.dims
        b, k, n, _ = ys.shape
        g = d.heads // d.kv_heads
        attn4, w_v, w_o = self._factors(ys)
        if d.m_out == 0:  # W' has no rows: W'ᵀ y is an empty sum
            return self._flatten(ys.new_zeros(b, k, n, d.m_in, dtype=attn4.dtype), lead)
        u = (ys.to(w_o.dtype) @ w_o).reshape(b, k, n, d.heads, d.head_dim).transpose(2, 3)  # (B, K, h, N, d): Y Wo_i
        z = attn4.transpose(-1, -2).unsqueeze(1) @ u  # A_iᵀ Y Wo_i
        z = z.reshape(b, k, d.kv_heads, g, n, d.head_dim).sum(3)  # query heads of a group share Wv_j
        x = z.transpose(2, 3).reshape(b, k, n, d.kv_heads * d.head_dim) @ w_v
        return self._flatten(x, lead)

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        """W' X for X (N·M_in, K) or (B, N·M_in, K)."""
        args.matrix_operand(x, "X", self.shape[-1], self.dims.batched)
        return self.matvec(x.transpose(-1, -2)).transpose(-1, -2)

    def bias(self) -> torch.Tensor:
        """b' of h' = W' x' + b' (see duat_kernels.hvo_bias)."""
        return hvo_bias(self.attn, self.w_o, self.b_v, self.b_o, num_kv_heads=self.dims.kv_heads, layout=self.layout)

    def to_dense(self, **kwargs) -> torch.Tensor:
        """The dense W' (refused with DenseTooLargeError when it would not fit); kwargs go to hvo_matrix."""
        return hvo_matrix(self.attn, self.w_v, self.w_o, num_kv_heads=self.dims.kv_heads, layout=self.layout, **kwargs)

    def block(self, n: int, m: int) -> torch.Tensor:
        """Block (n, m) = Σ_i A_i[n, m] OV_i: (M_out, M_in), or (B, M_out, M_in); token-layout block.
        Negative n, m count from the end, as in Python."""
        n, m = (v.check_index(name, idx, self.dims.tokens, f"N={self.dims.tokens} tokens")
                for name, idx in (("n", n), ("m", m)))
        dtype = v.resolve_dtype(None, None, self.attn, self.w_v, self.w_o)
        ov = reference.ov_circuits(self.w_v.to(dtype), self.w_o.to(dtype), self.dims.heads, self.dims.kv_heads)
        blk = torch.einsum("bi,ica->bca", self._attn4[:, :, n, m].to(ov.dtype), ov)
        return blk if self.dims.batched else blk[0]

    def tile(self, rows: slice, cols: slice, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W'[rows, cols] for unit-step slices, written straight into a (rows, cols) buffer (64-bit offsets)."""
        total = self.shape[-2:]
        (r0, r1), (c0, c1) = (self._range(s, size, name) for s, size, name in
                              ((rows, total[0], "rows"), (cols, total[1], "cols")))
        dtype = v.resolve_dtype(dtype, None, self.attn, self.w_v, self.w_o)
        v.check_fits(f"a tile of W' of shape ({r1 - r0}, {c1 - c0})", (r1 - r0) * (c1 - c0) * self.dims.batch * dtype.itemsize,
                     self.device)
        ct = reference.compute_dtype(dtype)
        ov = reference.ov_circuits(self.w_v.to(ct), self.w_o.to(ct), self.dims.heads, self.dims.kv_heads)
        out = torch.empty(self.dims.batch, r1 - r0, c1 - c0, dtype=dtype, device=self.device)
        backend = backends.resolve("auto", self.device)
        if self.dims.batch == 0:
            pass
        elif backend != "reference" and dtype in backends.output_dtypes(backend):
            kernel = backends.tile_kernel(backend)
            with torch.no_grad():
                for b in range(self.dims.batch):
                    kernel(*backends.kron_factors(self._attn4[b].to(ct), ov, self.layout), out[b], r0, c0)
        else:  # reference: only the blocks that the tile touches
            out = self._tile_reference(ov, r0, r1, c0, c1).to(dtype)
        return out if self.dims.batched else out[0]

    def _tile_reference(self, ov: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        q_size, t_size = backends.kron_factors(self._attn4[0], ov, self.layout)[1].shape[1:]  # R_i is Q x T
        p0, p1, s0, s1 = r0 // q_size, (r1 - 1) // q_size + 1, c0 // t_size, (c1 - 1) // t_size + 1
        mats = []
        for a in self._attn4.to(ov.dtype):
            left, right = backends.kron_factors(a, ov, self.layout)
            part = sum(reference.kron(left[i, p0:p1, s0:s1], right[i]) for i in range(left.shape[0]))
            mats.append(part[r0 - p0 * q_size:r1 - p0 * q_size, c0 - s0 * t_size:c1 - s0 * t_size])
        return torch.stack(mats)

    # --- analysis without the dense matrix (duat_kernels.analysis) -----------------------------

    def block_norms(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Frobenius norms of all N x N blocks (token-layout blocks B_nm = Σ_i A_i[n, m] OV_i):
        (N, N) or (B, N, N), exactly, via the h x h Gram matrix of the OV circuits: O(N²h²) time,
        O(N²) memory. grid=(R, C) reduces them to the norms of an R x C grid of super-blocks."""
        grid = args.grid_argument(grid, self.dims.tokens)
        with torch.no_grad():
            norms = analysis.block_norms(self._attn4, self.w_v, self.w_o, self.dims.kv_heads, grid)
        return norms if self.dims.batched else norms[0]

    def frobenius_norm(self) -> torch.Tensor:
        """||W'||_F exactly (float64), () or (B,)."""
        with torch.no_grad():
            norm = analysis.frobenius_norm(self._attn4, self.w_v, self.w_o, self.dims.kv_heads)
        return norm if self.dims.batched else norm[0]

    def trace(self) -> torch.Tensor:
        """tr W' exactly (float64), () or (B,); W' must be square (M_in = M_out)."""
        if self.dims.m_in != self.dims.m_out:
            raise ValueError(f"trace needs a square W' (M_in = M_out), got M_in={self.dims.m_in}, M_out={self.dims.m_out}")
        with torch.no_grad():
            tr = analysis.trace(self._attn4, self.w_v, self.w_o, self.dims.kv_heads)
        return tr if self.dims.batched else tr[0]

    def fraction_above(self, threshold: float, samples: int = 100_000, confidence: float = 0.95, seed: int = 0,
                       batch: int = 0) -> "analysis.EntryEstimate":
        """Fraction of entries with |w| > threshold, estimated from uniformly sampled entries, with a
        Wilson confidence interval (e.g. threshold = 0.01 * frobenius_norm() / sqrt(numel))."""
        args.sampling_arguments(threshold, samples, confidence, seed)
        if self.dims.m_in == 0 or self.dims.m_out == 0:
            raise ValueError(f"W' of shape {self.shape} has no entries to sample (M_in={self.dims.m_in}, "
                             f"M_out={self.dims.m_out})")
        batch = v.check_index("batch", batch, self.dims.batch, f"B={self.dims.batch} batch elements")
        with torch.no_grad():
            return analysis.fraction_above(self._attn4, self.w_v, self.w_o, self.dims.kv_heads, threshold, samples,
                                           confidence, seed, batch)

    def as_linear_operator(self):
        """scipy.sparse.linalg.LinearOperator of W' (unbatched)."""
        return analysis.as_linear_operator(self)

    def singular_values(self, k: int = 1, tol: float = 1e-6) -> "np.ndarray":
        """The k largest singular values (scipy svds on the matrix-free operator), descending."""
        return analysis.singular_values(self, k, tol)

    def spectral_norm(self, tol: float = 1e-6) -> float:
        """||W'||_2, the largest singular value (0 for an empty W', NaN when W' has NaN or Inf entries)."""
        if min(self.shape[-2:]) == 0 and not self.dims.batched:
            return 0.0
        return float(self.singular_values(1, tol)[0])

    def contributions(self, x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """Token-to-token contributions ||W'_nm x_m||₂ of input token m to output token n, without W'.

        x: the layer input X as (N, M_in) (or (B, N, M_in) when batched), or flattened x' in this
        operator's layout. Returns (N, N) (or (B, N, N)); per_head=True gives each head's own
        ||A_i[n, m] OV_i x_m|| as (h, N, N) (or (B, h, N, N)). Biases are not included (b' is
        separate: see bias()).
        """
        d = self.dims
        xs, _ = self._unflatten(x, d.m_in, "x")
        if xs.shape[1] != 1:
            raise ValueError(f"x must be one input per batch element, got shape {tuple(x.shape)}")
        xs = xs[:, 0]
        with torch.no_grad():
            out = analysis.contributions(self._attn4, xs, self.w_v, self.w_o, d.kv_heads, per_head)
        return out if d.batched else out[0]

    def to_dask(self, chunks: tuple[int, int] | None = None, dtype: torch.dtype | None = None):
        """W' as a lazy dask.array whose (rows, cols) blocks are tiles written by the kernels; the
        factors are one task in the graph, shipped to each worker once (duat_kernels.analysis.to_dask)."""
        return analysis.to_dask(self, chunks, dtype)

    @staticmethod
    def _range(s: slice, size: int, name: str) -> tuple[int, int]:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise ValueError(f"{name} must be a slice with step 1, got {s!r}")
        start, stop, _ = s.indices(size)
        if stop <= start:
            raise ValueError(f"{name}={s!r} selects no entries of a dimension of size {size}")
        return start, stop

    def __repr__(self) -> str:
        d = self.dims
        return (f"HVOOperator(shape={tuple(self.shape)}, tokens={d.tokens}, heads={d.heads}, kv_heads={d.kv_heads}, "
                f"head_dim={d.head_dim}, M_in={d.m_in}, M_out={d.m_out}, layout={self.layout!r}, "
                f"dtype={self.attn.dtype}, device={self.device})")
