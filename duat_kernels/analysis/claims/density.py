"""§ density (§4.2, ICL): how many entries and blocks of W' matter, against a convolution and the FFN.

Attention: the fraction of W' entries with |w| > t·max|w| (exact, tile by tile, up to EXACT_ENTRIES
entries; sampled with a Wilson interval beyond) and of N x N blocks with ||B_nm||_F > t·max (exact,
from the Gram matrix of the OV circuits). Peers over the same N tokens, computed from their weights:
a Conv1d (kernel 3, padding 1, M -> M), whose W' is banded block-Toeplitz (block (n, m) is tap
m - n + 1), and each FFN linear map W, whose W' = I_N ⊗ W is block diagonal.
"""

from __future__ import annotations

import math

import torch

from duat_kernels.linalg.stats import sample_entries
from duat_kernels.hvo_operator import HVOOperator
from duat_kernels.reference import ov_circuits

THRESHOLDS = (1e-3, 1e-2, 1e-1)
EXACT_ENTRIES = 4 * 10 ** 8  # above this many entries of W', the entry fractions are sampled
TILE_ENTRIES = 1 << 24
SAMPLES = 200_000


def attention_density(op: HVOOperator, thresholds=THRESHOLDS, exact_entries: int = EXACT_ENTRIES,
                      samples: int = SAMPLES) -> dict:
    """Entry and block fractions above t·max for an unbatched operator of N x N_k blocks (M_out x M_in; N_k = N
    but for cross-attention)."""
    n = op.dims.tokens
    norms = op.block_norms().double()
    # a NaN or Inf entry of W' makes its block's norm non-finite: "above t·max" then means nothing, and
    # comparisons with NaN are false (the max over tiles below would even depend on their order)
    finite = bool(norms.isfinite().all())
    blocks = {str(t): (norms > t * norms.max()).double().mean().item() if finite else math.nan for t in thresholds}
    total = op.shape[-2] * op.shape[-1]
    if not finite:
        entries = {str(t): {"fraction": math.nan, "low": math.nan, "high": math.nan} for t in thresholds}
        method = "non-finite (W' has NaN or Inf entries: no fractions)"
    elif total <= exact_entries:
        entries = _exact_entry_fractions(op, thresholds)
        method = "exact"
    else:
        entries = _sampled_entry_fractions(op, norms, thresholds, samples)
        method = f"sampled ({samples} entries, 95% Wilson intervals; max over the largest block and the sample)"
    structural = (op.attn != 0).any(0).double().mean().item()  # blocks that A does not mask out (causal: ~1/2)
    return {"entries": entries, "blocks": blocks, "nonzero_blocks": structural, "method": method, "tokens": n,
            "shape": list(op.shape)}


def _row_chunks(op: HVOOperator):
    n, m_out, cols = op.dims.tokens, op.dims.m_out, op.shape[-1]
    step = max(1, TILE_ENTRIES // (m_out * cols))
    for n0 in range(0, n, step):
        yield op.tile(slice(n0 * m_out, min(n, n0 + step) * m_out), slice(0, cols), dtype=torch.float32).abs_()


def _exact_entry_fractions(op: HVOOperator, thresholds) -> dict:
    largest = max(t.max().item() for t in _row_chunks(op))  # pass 1: max |w|; pass 2: counts
    counts = {t: 0 for t in thresholds}
    for tile in _row_chunks(op):
        for t in thresholds:
            counts[t] += int((tile > t * largest).sum())
    total = op.shape[-1] * op.shape[-2]
    return {str(t): {"fraction": c / total, "low": c / total, "high": c / total} for t, c in counts.items()}


def _sampled_entry_fractions(op: HVOOperator, norms: torch.Tensor, thresholds, samples: int) -> dict:
    """The reference max|w| is the largest entry of the block with the largest norm (exact) or of the sample."""
    n, m = divmod(int(norms.argmax()), norms.shape[-1])
    ov = ov_circuits(op.w_v.float(), op.w_o.float(), op.dims.heads, op.dims.kv_heads)
    sample = sample_entries(op.source.dense(), ov, samples, torch.Generator().manual_seed(1))
    largest = max(op.block(n, m).abs().max().item(), sample.abs().max().item())
    result = {}
    for t in thresholds:
        est = op.fraction_above(t * largest, samples=samples)
        result[str(t)] = {"fraction": est.fraction, "low": est.low, "high": est.high, "largest_entry": largest}
    return result


def conv1d_density(conv: torch.nn.Conv1d, tokens: int, thresholds=THRESHOLDS) -> dict:
    """Exact fractions for the W' of conv (kernel 3, padding 1) over `tokens` tokens: tap k fills the
    blocks (n, n + k - 1), i.e. N blocks for the centre tap and N - 1 for each side tap."""
    taps = conv.weight.detach().double().permute(2, 0, 1)  # (3, M_out, M_in), block (n, m) = taps[m - n + 1]
    if taps.shape[0] != 3 or conv.padding != (1,):
        raise ValueError(f"conv must have kernel 3 and padding 1, got kernel {taps.shape[0]}, padding {conv.padding}")
    copies = torch.tensor([tokens - 1, tokens, tokens - 1], dtype=torch.float64)
    m_out, m_in = taps.shape[1:]
    total_entries, total_blocks = (tokens * m_out) * (tokens * m_in), tokens * tokens
    largest, largest_block = taps.abs().max(), taps.flatten(1).norm(dim=1).max()
    entries = {str(t): ((taps.abs() > t * largest).flatten(1).sum(1).double() * copies).sum().item() / total_entries
               for t in thresholds}
    blocks = {str(t): ((taps.flatten(1).norm(dim=1) > t * largest_block).double() * copies).sum().item() / total_blocks
              for t in thresholds}
    return {"entries": entries, "blocks": blocks}


def block_diagonal_density(weight: torch.Tensor, tokens: int, thresholds=THRESHOLDS) -> dict:
    """Exact fractions for I_N ⊗ W, W (M_out, M_in): the entries of W above t·max|W|, once per diagonal block."""
    w = weight.detach().double().abs()
    entries = {str(t): (w > t * w.max()).double().mean().item() / tokens for t in thresholds}
    return {"entries": entries, "blocks": {str(t): 1.0 / tokens for t in thresholds}}


def measure(terms, conv_seed: int = 0, thresholds=THRESHOLDS, progress: bool = True) -> dict:
    """The density section for a list of LayerTerms (one per layer); progress: a tqdm bar over the layers."""
    from tqdm import tqdm

    width = terms[0].h_in.shape[-1]
    tokens = terms[0].h_in.shape[0]
    torch.manual_seed(conv_seed)
    conv = torch.nn.Conv1d(width, width, 3, padding=1)
    rows = []
    for t in tqdm(terms, desc="density", leave=False, disable=not progress):
        w_in, w_out = t.ffn_matrices()
        rows.append({"layer": t.attention.index, "attention": attention_density(t.operator(), thresholds),
                     "ffn_in": block_diagonal_density(w_in, tokens, thresholds),
                     "ffn_out": block_diagonal_density(w_out, tokens, thresholds)})
    return {"thresholds": list(thresholds), "tokens": tokens,
            "conv1d": {"kernel": 3, "seed": conv_seed, "init": "torch default", **conv1d_density(conv, tokens, thresholds)},
            "layers": rows}
