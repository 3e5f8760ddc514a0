"""§ pruning (§4.3, Eq. 12-15): contribution norms of heads and blocks bound the error of removing them.

Heads: the layer output is Σ_i H_i + b_o with H_i = A_i (X Wv_iᵀ + b_v,i) Wo_iᵀ (h x N x M_out), so
removing a set S changes it by Σ_{i∈S} H_i and ||Σ_S H_i||_F <= Σ_S ||H_i||_F (triangle inequality).
Heads are removed greedily, smallest ||H_i||_F first (each step adds the least to the bound).
Blocks: token n's output changes by Σ_{m∈S_n} W'_nm x_m when blocks (n, m ∈ S_n) are removed, so
||ΔH||_F <= sqrt(Σ_n (Σ_{m∈S_n} ||W'_nm x_m||)²); the actual ΔH is W' of A restricted to the removed
blocks applied to x'. Budgets are fractions of the nonzero blocks, removed smallest contribution first.
"""

from __future__ import annotations

import torch

from duat_kernels.hvo_operator import HVOOperator
from duat_kernels.models import AttentionLayer
from duat_kernels.reference import head_factors

BLOCK_BUDGETS = (0.1, 0.25, 0.5, 0.75, 0.9)
SLACK = 1e-9  # relative rounding slack on "actual <= bound" (float64)


def head_outputs(layer: AttentionLayer) -> torch.Tensor:
    """H_i for each head, (h, N, M_out), float64, batch element 0 (value bias included, b_o not)."""
    a = layer.attn[0].double()
    h = a.shape[0]
    wo, wv = head_factors(layer.w_v.double(), layer.w_o.double(), h, layer.num_kv_heads)  # (h, M, d), (h, d, M)
    values = torch.einsum("ida,na->ind", wv, layer.x[0].double())
    if layer.b_v is not None:
        d = wv.shape[1]
        values = values + layer.b_v.double().reshape(layer.num_kv_heads, d).repeat_interleave(h // layer.num_kv_heads, 0)[:, None]
    return torch.einsum("inm,imd,icd->inc", a, values, wo)


def prune_heads(layer: AttentionLayer) -> dict:
    """Greedy head pruning for every budget k = 1 .. h: actual and bound, relative to ||Σ_i H_i||_F."""
    heads = head_outputs(layer)
    norms = heads.flatten(1).norm(dim=1)
    total = heads.sum(0).norm().item()
    order = torch.argsort(norms).tolist()
    rows = []
    for k in range(1, len(order) + 1):
        removed = order[:k]
        actual = heads[removed].sum(0).norm().item()
        bound = norms[removed].sum().item()
        if actual > bound * (1 + SLACK):
            raise AssertionError(f"triangle bound violated: actual {actual} > bound {bound}")
        rows.append({"pruned": k, "heads": removed, "actual": actual / total, "bound": bound / total,
                     "tightness": 1.0 if bound == 0 else actual / bound})  # NaN stays NaN
    return {"head_norms": (norms / total).tolist(), "budgets": rows}


def prune_blocks(layer: AttentionLayer, budgets=BLOCK_BUDGETS) -> dict:
    """Greedy block pruning: for each budget (fraction of nonzero blocks) actual and bound, relative to ||W' x'||."""
    a = layer.attn[0].double()
    op = HVOOperator(a, layer.w_v.double(), layer.w_o.double(), num_kv_heads=layer.num_kv_heads)
    x = layer.x[0].double()
    contrib = op.contributions(x)  # (N, N) ||W'_nm x_m||
    nonzero = (a != 0).any(0)
    total = op.matvec(x.reshape(-1)).norm().item()
    flat = torch.where(nonzero, contrib, torch.inf).flatten()
    order = torch.argsort(flat)[: int(nonzero.sum())]
    rows = []
    for budget in budgets:
        k = int(round(budget * len(order)))
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[order[:k]] = True
        mask = mask.reshape(contrib.shape)
        removed = HVOOperator(a * mask, layer.w_v.double(), layer.w_o.double(), num_kv_heads=layer.num_kv_heads)
        actual = removed.matvec(x.reshape(-1)).norm().item()
        bound = (contrib * mask).sum(1).square().sum().sqrt().item()
        if actual > bound * (1 + SLACK):
            raise AssertionError(f"triangle bound violated: actual {actual} > bound {bound}")
        rows.append({"fraction": budget, "pruned": k, "actual": actual / total, "bound": bound / total,
                     "tightness": 1.0 if bound == 0 else actual / bound})  # NaN stays NaN
    return {"nonzero_blocks": int(nonzero.sum()), "budgets": rows}


def measure(terms) -> dict:
    """The pruning section for a list of LayerTerms."""
    layers = [{"layer": t.attention.index, "heads": prune_heads(t.attention), "blocks": prune_blocks(t.attention)}
              for t in terms]
    held = all(b["actual"] <= b["bound"] * (1 + SLACK) for r in layers for part in ("heads", "blocks")
               for b in r[part]["budgets"])
    return {"block_budgets": list(BLOCK_BUDGETS), "bound_held": held, "layers": layers}
