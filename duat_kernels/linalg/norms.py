"""Frobenius norms of all N² blocks of W' from the h x h Gram matrix of the OV circuits.

Block (n, m) is B_nm = Σ_i α_i OV_i with α = A[:, n, m], so ||B_nm||_F² = αᵀ G α with
G_ij = ⟨OV_i, OV_j⟩_F. G comes from the low-rank factors, never from OV itself:
⟨Wo_i Wv_i, Wo_j Wv_j⟩_F = Σ (Wo_iᵀ Wo_j) ⊙ (Wv_i Wv_jᵀ)  (d x d matrices).
Writing G = CᵀC (C = Λ^½ Uᵀ from G's eigendecomposition), ||B_nm||² = ||C α||², so a chunk of
rows of A is one (h x h) @ (h x rows·N) product: O(N²h²) time, O(N²) memory plus one chunk.
"""

from __future__ import annotations

import torch

from duat_kernels import backends, cpp, reference
from duat_kernels._memory import check_fits
from duat_kernels._progress import batch_elements
from duat_kernels._validation import all_finite, check_heads, check_tensor, has_values
from duat_kernels.linalg import gram_norms, norm_scaling
from duat_kernels.operator_args import grid_argument
from duat_kernels.attention_source import ExplicitAttention, as_source
from duat_kernels.qk_attention import QKAttention
from duat_kernels.reference import head_factors

# Rows of A per step (torch path): the (h, rows, N) product stays ~64 MiB at N = 8192, h = 12 (fp32).
CHUNK_ENTRIES = 1 << 24


def gram_factor(w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """C (h, h) in float64, upper triangular, with CᵀC = G, G_ij = ⟨OV_i, OV_j⟩_F, from w_v (h_kv·d, M_in),
    w_o (M_out, h·d). Triangular, ||C α|| costs the C++ pass h(h+1)/2 multiply-adds instead of h²."""
    c, e = scaled_gram_factor(w_v, w_o, num_heads, num_kv_heads)
    return norm_scaling.unscaled(c, torch.tensor(float(e), dtype=torch.float64))


# Weights with max|w| in [2^-GRAM_WEIGHT_LIMIT, 2^GRAM_WEIGHT_LIMIT] form the float64 Gram matrix as they are: its
# entries stay inside float64 (d²·M_out·M_in·2^640 < 2^1023), and float32, bfloat16 or float16 weights are never
# scaled (their C, and the norms of ordinary float64 weights, bitwise what they were).
GRAM_WEIGHT_LIMIT = 160


def scaled_gram_factor(w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int,
                       num_kv_heads: int) -> tuple[torch.Tensor, int]:
    """gram_factor as (C', e) with C = C'·2^e: C' from the weights scaled by powers of two (norm_scaling, in
    float64's range) where the products of the float64 Gram matrix could overflow or vanish (weights of 1e200 and
    1e-210: G overflowed, and eigh failed or the norms were NaN), e = e_v + e_o (|e| <= 2044)."""
    check_tensor("w_v", w_v, (2,))
    check_tensor("w_o", w_o, (2,))
    num_kv_heads, _ = check_heads(num_heads, num_kv_heads, w_v, w_o)
    most = norm_scaling.MAX_EXPONENT_FLOAT64
    (w_v, e_v), (w_o, e_o) = (norm_scaling.scaled_down(w, GRAM_WEIGHT_LIMIT, most, torch.float64)
                              for w in (w_v, w_o))
    gram = gram_matrix(w_v, w_o, num_heads, num_kv_heads, torch.float64)
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)  # G may be singular: no Cholesky
    root = evals.clamp_min(0).sqrt()[:, None] * evecs.T  # rootᵀ root = G
    return torch.linalg.qr(root, mode="r").R.contiguous(), e_v + e_o  # root = QR, so RᵀR = G


def gram_matrix(w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int, num_kv_heads: int,
                dtype: torch.dtype) -> torch.Tensor:
    """G (h, h), G_ij = ⟨OV_i, OV_j⟩_F, in `dtype` from checked w_v (h_kv·d, M_in), w_o (M_out, h·d)."""
    wo, wv = head_factors(w_v.to(dtype), w_o.to(dtype), num_heads, num_kv_heads)  # (h, M_out, d), (h, d, M_in)
    oo = torch.einsum("icd,jce->ijde", wo, wo)  # Wo_iᵀ Wo_j
    vv = torch.einsum("ida,jea->ijde", wv, wv)  # Wv_i Wv_jᵀ
    return (oo * vv).sum((-1, -2))


# The torch path of an analysis forms the whole A; where it would not fit, what takes the fused pass instead.
TORCH_PATH_HINT = ("The analysis takes torch operations on the whole A here, because autograd or a torch.func "
                   "transform tracks an input (or the tensors are traced or fake); on plain tensors, under "
                   "torch.no_grad() or with detached inputs, the fused pass never forms A.")


def tracks_gradient(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on these tensors, or a torch.func transform (grad, jacrev, vmap)
    wraps one of them: the analysis then takes torch operations throughout (the fused passes run under
    no_grad, write into plain buffers and branch on the data)."""
    return backends.tracks_grad(*tensors) or backends.functorch_wrapped(*tensors)


def block_norms(source, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
    """||B_nm||_F for the A of `source` (an AttentionSource, or attn (B, h, N, N_k)) -> (B, N, N_k); with
    grid=(R, C), the Frobenius norms of an R x C grid of super-blocks (rows and columns of blocks
    split as evenly as possible; R for an R x R grid) -> (B, R, C). Float32 A on the CPU goes through the fused
    C++ pass. Computed and returned in float64 when A or a weight is float64 (as contributions and to_dense),
    else in float32 (squares formed from power-of-two-scaled factors: linalg.norm_scaling). Where autograd or a
    torch.func transform tracks an input (tracks_gradient), or the tensors are traced or fake, torch operations on
    the whole A instead (differentiable; O(B·h·N²) memory)."""
    return _block_norms(source, w_v, w_o, num_kv_heads, grid, float64=False)


def grid_norms64(source, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int,
                 grid: tuple[int, int]) -> torch.Tensor:
    """block_norms(grid=grid) (B, R, C) returned in float64 whatever the inputs: the root of the float64 sums,
    not rounded to float32 (finite where the norms of float32 factors exceed float32's range)."""
    return _block_norms(source, w_v, w_o, num_kv_heads, grid, float64=True)


def _block_norms(source, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int, grid: tuple[int, int] | None,
                 float64: bool) -> torch.Tensor:
    source = as_source(source, num_kv_heads, w_v, w_o)
    h, num_kv_heads = source.heads, source.kv_heads
    grid = grid_argument(grid, None)  # HVOOperator.block_norms takes at most N per side
    if tracks_gradient(w_v, w_o, *source.inputs()) or not backends.direct_kernel_call(w_v, w_o, *source.inputs()) \
            or not has_values(w_v, w_o, *source.inputs()):  # meta tensors: the scaling read their values (.item())
        return _block_norms_torch(source, w_v, w_o, num_kv_heads, grid, float64)  # autograd, torch.func, compile, fake
    wide = _wide(source, w_v, w_o)
    whole = not wide and gram_norms.available(source) and isinstance(source, ExplicitAttention)
    # A stored A is checked for NaN/Inf after the fused pass, not before it (a second read of A, 25% of the
    # time): a non-finite α makes its ||C α||² non-finite, so only a non-finite result needs the check.
    finite = all_finite(w_v, w_o) and (whole or all_finite(*source.inputs()))
    _check_output_fits(source, grid, finite, wide)
    dtype = torch.float64 if wide or float64 else torch.float32
    if not finite:
        return _block_norms_direct(source, w_v, w_o, num_kv_heads, grid).to(dtype)
    c, weight_shift = scaled_gram_factor(w_v, w_o, h, num_kv_heads)
    c = c.to(source.device)
    # ||C α||² of C scaled to max|C| in [1/2, 1) where it could leave float32 (for |α| <= 1 and h < 2^20,
    # h³ max|C|² < 2^124), the norms scaled back in float64 (norm_scaling), with the weights' scale
    c, shift = norm_scaling.scaled_down(c, GRAM_FACTOR_LIMIT, most=1000)
    shift += weight_shift
    out = _scaled_norms(source, c, grid, wide)
    if not all_finite(out):
        if whole and not source.finite():
            _check_output_fits(source, grid, False, wide)
            return _block_norms_direct(source, w_v, w_o, num_kv_heads, grid).to(dtype)
        if not wide:  # finite factors whose float32 squares overflowed (a stored A with entries far above 1)
            _check_output_fits(source, grid, True, True)
            out = _scaled_norms(source, c, grid, True)
        if not all_finite(out) and isinstance(source, ExplicitAttention):
            # finite factors whose float64 squares overflowed too: a stored float64 A with entries far above 1
            # (1e160 gave Inf norms where W' is finite)
            scaled, attn_shift = scaled_attention(source, "block norms")
            out, shift = _scaled_norms(scaled, c, grid, True), shift + attn_shift
    return _unscaled64(out, shift).to(dtype)


def scaled_attention(source: ExplicitAttention, what: str) -> tuple[ExplicitAttention, int]:
    """(a float64 copy of the stored A scaled by 2^-e to max|A| in [1/2, 1), e) (norm_scaling): for `what` (norms,
    contributions) whose float64 squares overflowed on an A with entries far above 1; the copy is checked to fit."""
    check_fits(f"a scaled float64 copy of attn of shape {tuple(source.attn.shape)} ({what} overflowed float64)",
               source.attn.numel() * 8, source.device, TORCH_PATH_HINT)
    attn, e = norm_scaling.scaled_down(source.attn, 1, norm_scaling.MAX_EXPONENT_FLOAT64, torch.float64)
    return ExplicitAttention(attn, source.kv_heads), e


def _unscaled64(norms: torch.Tensor, e: int) -> torch.Tensor:
    """norms · 2^e in float64 (|e| <= 2·MAX_EXPONENT_FLOAT64; 2.0 ** e overflows past 1023); norms for e = 0."""
    return norm_scaling.unscaled(norms.double(), torch.tensor(float(e), dtype=torch.float64)) if e else norms


# Gram factors with max|C| in [2^-GRAM_FACTOR_LIMIT, 2^GRAM_FACTOR_LIMIT] are taken as they are (norm_scaling).
GRAM_FACTOR_LIMIT = 32
# Columns C α (torch path) or α (autograd's αᵀGα) whose largest entry is at least 2^-COLUMN_LIMIT (or 0) are squared
# as they are, smaller ones scaled up (norm_scaling.scaled_up): squares above 2^-80, with 2^-46 left for G's entries.
COLUMN_LIMIT = 40


def _scaled_norms(source, c: torch.Tensor, grid: tuple[int, int] | None, wide: bool) -> torch.Tensor:
    """||C α|| for every block (B, N, N_k), or the roots of their grid sums (B, R, C), for finite factors: float32
    for grid=None (float64 A aside), else float64; in float64 throughout when wide. c (h, h) float64."""
    batch, h, n, n_k = source.batch, source.heads, source.tokens, source.keys
    fused = not wide and gram_norms.available(source)
    whole = fused and isinstance(source, ExplicitAttention)  # one pass over the stored A, every entry written
    rooted = whole and grid is None  # that pass writes every norm (roots taken per row, in cache)
    if (grid is not None and isinstance(source, QKAttention) and source.device.type == "cuda" and not wide
            and not source.wide_logits() and _triton_launches(max(n, n_k))):  # the q/k Triton pass forms float32 logits
        return _block_norms_triton(source, c, grid).double()
    c = c.to(torch.float64 if wide else torch.float32)
    out_rows, out_cols = grid if grid is not None else (n, n_k)
    if not wide and gram_norms.qk_available(source):  # logits, softmax and ||C α||² fused in C++: A never written
        bins = _bins(n, out_rows, source.device), _bins(n_k, out_cols, source.device)
        if grid is None:  # float32 squares of tiny norms underflow: those norms come from the pass itself
            return gram_norms.qk_norms(source, c)
        return gram_norms.qk_squared_norms(source, c, grid, *bins).clamp_min_(0).sqrt_()
    if rooted:  # from the output cache: huge pages, no page zeroing on repeated calls
        out = cpp.empty_output((batch, out_rows, out_cols), torch.float32)
    else:
        out = torch.zeros(batch, out_rows, out_cols, device=source.device,
                          dtype=torch.float64 if wide or grid is not None else torch.float32)  # grid sums in float64
    col_bins, row_bins = _bins(n_k, out_cols, source.device), _bins(n, out_rows, source.device)
    rows = n if whole else max(1, CHUNK_ENTRIES // max(1, batch * h * n_k))
    for r0, r1, c0, c1, alpha in source.row_blocks(rows):
        for b in batch_elements(batch, "block norms"):
            if fused:  # one multithreaded pass: ||C α||² and the grid sums, nothing else written
                if grid is None:
                    # the roots: the float32 squares of tiny α vanish, their norms come from the pass itself
                    gram_norms.squared_(alpha[b], c, out[b, r0:r1, c0:c1], root=True)
                else:
                    gram_norms.grid_(alpha[b], c, row_bins[r0:r1], col_bins[c0:c1], out[b])
                continue
            # C α scaled up by a power of two per column where its largest entry is tiny (a softmax tail: the float32
            # squares of ~1e-25 vanished), its norm or square scaled back
            c_alpha, e = norm_scaling.scaled_up(c @ alpha[b].to(c.dtype).reshape(h, -1), COLUMN_LIMIT, (0,))
            sq = c_alpha.square_().sum(0, keepdim=True)  # (1, rows·cols), as e
            if grid is None:
                out[b, r0:r1, c0:c1] = norm_scaling.unscaled(sq.sqrt_(), e).reshape(r1 - r0, c1 - c0)
            else:  # accumulate squared norms into super-blocks
                per_row = torch.zeros(r1 - r0, out_cols, dtype=out.dtype, device=sq.device).index_add_(
                    1, col_bins[c0:c1], norm_scaling.unscaled(sq.to(out.dtype), 2 * e).reshape(r1 - r0, c1 - c0))
                out[b].index_add_(0, row_bins[r0:r1], per_row)
    return out if grid is None else out.clamp_min_(0).sqrt_()  # grid=None: the norms themselves written


def _block_norms_torch(source, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int,
                       grid: tuple[int, int] | None, float64: bool = False) -> torch.Tensor:
    """block_norms in torch operations, for autograd, torch.func, torch.compile and FakeTensorMode (the fused
    passes read NumPy views and branch on the data): ||B_nm||² = αᵀ G α from the whole A (B, h, N, N) and G.
    A zero norm gets gradient 0 (the subgradient torch.linalg.vector_norm takes). float64: the grid's root
    taken in float64 (grid_norms64). Factors with NaN or Inf take _block_norms_direct, as on plain tensors (αᵀGα
    gave NaN for Inf, Inf · G_ii · Inf + Inf · G_ij · (-Inf), where the dense W' has Inf)."""
    wide = _wide(source, w_v, w_o)
    if has_values(w_v, w_o, *source.inputs()) and not all_finite(w_v, w_o, *source.inputs()):
        _check_output_fits(source, grid, False, wide)
        return _block_norms_direct(source, w_v, w_o, num_kv_heads, grid).to(torch.float64 if wide or float64
                                                                              else torch.float32)
    norms = _block_norms_torch_in(source, w_v, w_o, num_kv_heads, grid, torch.float64 if wide else torch.float32,
                                  float64)
    if not wide and has_values(norms) and not all_finite(norms) and all_finite(w_v, w_o, *source.inputs()):
        # finite factors whose float32 squares overflowed (a stored A with entries far above 1): in float64, A
        # and the squared norms in float64 beside A
        batch, h, n, n_k = source.batch, source.heads, source.tokens, source.keys
        check_fits(f"attention probabilities of shape ({batch}, {h}, {n}, {n_k}) in float64 (block norms recomputed: "
                   "their float32 squares overflowed)", batch * n * n_k * (h * (8 + source.dtype.itemsize) + 8),
                   source.device, TORCH_PATH_HINT)
        norms = _block_norms_torch_in(source, w_v, w_o, num_kv_heads, grid, torch.float64, float64)
        norms = norms if float64 else norms.float()
    return norms


# Weights with max|w| in [2^-WEIGHT_LIMIT, 2^WEIGHT_LIMIT] are taken as they are (norm_scaling): G <= d²·M²·2^32.
WEIGHT_LIMIT = 8


def _block_norms_torch_in(source, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int,
                          grid: tuple[int, int] | None, dtype: torch.dtype, float64: bool) -> torch.Tensor:
    """_block_norms_torch computed in dtype from the weights scaled by powers of two (norm_scaling)."""
    most = norm_scaling.max_exponent(dtype)
    e_v, e_o = (norm_scaling.exponent_of(w, WEIGHT_LIMIT, most=most) for w in (w_v, w_o))
    w_v, w_o = norm_scaling.scaled(w_v.to(dtype), e_v), norm_scaling.scaled(w_o.to(dtype), e_o)
    gram = gram_matrix(w_v, w_o, source.heads, num_kv_heads, dtype).to(source.device)
    # α scaled up by a power of two per column (b, n, m) where its largest entry is tiny (a softmax tail: float32
    # squares of ~1e-25 vanished), the norms scaled back (the squares, summed in float64, for a grid)
    attn, e = norm_scaling.scaled_up(source.dense(TORCH_PATH_HINT).to(dtype), COLUMN_LIMIT, (1,))
    e = e[:, 0]
    sq = torch.einsum("binm,ij,bjnm->bnm", attn, gram, attn)
    if grid is None:
        norms = norm_scaling.unscaled(root_with_zero_subgradient(sq.double() if float64 else sq), e)
    else:
        if not norm_scaling.known_zero(e):  # the squares of scaled columns scaled back in float64
            sq = norm_scaling.unscaled(sq.double(), 2 * e)
        sums = grid_sums(sq, grid)
        norms = root_with_zero_subgradient(sums.double() if float64 else sums).to(torch.float64 if float64 else dtype)
    return norm_scaling.unscaled(norms, (e_v + e_o).to(norms.device))


def root_with_zero_subgradient(sq: torch.Tensor) -> torch.Tensor:
    """sqrt of squared norms (0 where sq <= 0, NaN where sq is NaN) whose gradient at 0 is 0, not Inf (then NaN
    through 0 · Inf). A NaN is kept: NaN > 0 is false, and the norms of a NaN block came out 0."""
    rooted = (sq > 0) | sq.isnan()
    return torch.where(rooted, torch.where(rooted, sq, 1).sqrt(), 0)


def _wide(source, w_v: torch.Tensor, w_o: torch.Tensor) -> bool:
    """Whether the norms are computed in float64: A or a weight is float64 (float32 A with float64
    weights lost the weights' precision: relative errors of 1e-7 where to_dense is exact to 1e-16)."""
    return torch.float64 in (source.dtype, w_v.dtype, w_o.dtype)


def _check_output_fits(source, grid: tuple[int, int] | None, finite: bool, wide: bool) -> None:
    """Refuse, before allocating, norms that cannot fit: (B, R, C) sums in float64 (float32 for
    grid=None, float64 A aside), plus the float32 result of a grid; non-finite factors form all
    (B, N, N_k) squared norms first, whatever the grid."""
    batch, n, n_k = source.batch, source.tokens, source.keys
    rows, cols = grid if grid is not None else (n, n_k)
    per_entry = 8 if wide or grid is not None else 4
    needed = batch * rows * cols * (per_entry + (4 if grid is not None and not wide else 0))
    if not finite:
        needed += batch * n * n_k * (8 if wide else 4)
    check_fits(f"block norms of shape ({batch}, {rows}, {cols})", needed, source.device,
               "Ask for the norms of a coarser grid of super-blocks: block_norms(grid=(R, C)).")


def _triton_launches(n: int) -> bool:
    """Whether the q/k Triton pass launches for n tokens (queries and keys; CUDA's 65535 programs per grid axis)."""
    from duat_kernels.triton.attention_norms import MAX_TOKENS

    return n <= MAX_TOKENS


def _block_norms_triton(source: QKAttention, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The fused q/k pass on the GPU (duat_kernels.triton.attention_norms) for the Gram factor c (h, h): A is never
    written."""
    from duat_kernels.triton.attention_norms import block_norms_qk

    c = c.to(source.device, torch.float32)
    key_mask = None if source.key_mask is None else source.key_mask[:, 0, 0]
    return block_norms_qk(source.q, source.k, c, _bins(source.tokens, grid[0], source.device),
                          _bins(source.keys, grid[1], source.device), grid, causal=source.causal, key_mask=key_mask,
                          scale=source.scale, softcap=source.softcap, window=source.window)


def _block_norms_direct(source, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int,
                        grid: tuple[int, int] | None) -> torch.Tensor:
    """block_norms for factors with NaN or Inf: αᵀGα cannot see 0 · NaN = NaN or Inf - Inf = NaN,
    so each block Σ_i α_i OV_i is formed (a chunk at a time) and its entries summed, as in the
    dense W': O(N² h M_out M_in) time, the cost of materialising. OV is formed a few of its rows at a time
    (whole, an (h, M_out, M_in) OV of h = 2, M = 100000 failed to allocate 80 GB)."""
    batch, h, n, n_k = source.batch, source.heads, source.tokens, source.keys
    dtype = torch.float64 if _wide(source, w_v, w_o) else torch.float32
    # the weights scaled by powers of two from their largest finite entries (norm_scaling; NaN and Inf stay)
    most = norm_scaling.max_exponent(dtype)
    (w_v, e_v), (w_o, e_o) = (norm_scaling.scaled_down(w, WEIGHT_LIMIT, most, dtype) for w in (w_v, w_o))
    sq = torch.zeros(batch, n, n_k, dtype=dtype, device=source.device)
    # the squared entries of a few rows of every block at a time, summed; ov (h, rows, M_in)
    for _, ov in reference.ov_row_blocks(w_v, w_o, h, num_kv_heads, CHUNK_ENTRIES):
        cols_per_step = max(1, min(n_k, CHUNK_ENTRIES // max(1, ov[0].numel())))
        # the blocks of the columns a row block skips (A = 0: causal, sliding window) are Σ_i 0 · OV_i: their
        # squared entries sum to 0, or to NaN where OV is not finite (they were left at 0)
        skipped = (0 * ov).square().sum()
        for r0, r1, c0, c1, alpha_rows in source.row_blocks(1):
            sq[:, r0, :c0] += skipped
            sq[:, r0, c1:] += skipped
            for b in range(batch):
                for m0 in range(c0, c1, cols_per_step):
                    m1 = min(c1, m0 + cols_per_step)
                    alpha = alpha_rows[b, :, 0, m0 - c0:m1 - c0].to(dtype)  # (h, cols)
                    sq[b, r0, m0:m1] += torch.einsum("im,ica->mca", alpha, ov).square().sum((-1, -2))
    if grid is not None:
        sq = grid_sums(sq, grid)
    return _unscaled64(sq.sqrt_(), e_v + e_o).to(dtype)


def grid_sums(sq: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Squared block norms sq (B, N, N_k) summed into an R x C grid of super-blocks -> (B, R, C) (rows and columns
    split as _bins does). A side of 1 is a plain sum: inductor failed on index_add into a dimension of size 1
    (InductorError under torch.compile, for grid=(1, 1), (R, 1) and frobenius_norm)."""
    rows, cols = grid
    for dim, parts in ((2, cols), (1, rows)):
        if parts == 1:
            sq = sq.sum(dim, keepdim=True)
        else:
            shape = (sq.shape[0], parts, sq.shape[2]) if dim == 1 else (sq.shape[0], sq.shape[1], parts)
            sq = sq.new_zeros(shape).index_add(dim, _bins(sq.shape[dim], parts, sq.device), sq)
    return sq


def _bins(n: int, parts: int, device) -> torch.Tensor:
    """Super-block index of each of n rows when split into `parts` near-equal groups."""
    return (torch.arange(n, device=device) * parts) // n
