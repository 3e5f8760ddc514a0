"""Pruning: head outputs add up to the module's output; actual errors against direct recomputation; the bound."""

from __future__ import annotations

import torch

from duat_kernels.analysis.claims import contributions, layer_terms, pruning

from claims_models import encode, family, tiny_model, tokenizer  # noqa: F401  (fixtures)


def test_heads_add_up_and_the_bound_holds(family, tokenizer):
    terms = layer_terms.collect(tiny_model(family), encode(tokenizer))
    for t in terms:
        a = t.attention
        heads = pruning.head_outputs(a)
        b_o = 0 if a.b_o is None else a.b_o.double()
        torch.testing.assert_close(heads.sum(0) + b_o, a.output[0].double(), rtol=1e-10, atol=1e-10)
        result = pruning.prune_heads(a)
        total = heads.sum(0).norm()
        for row in result["budgets"]:
            kept = [i for i in range(heads.shape[0]) if i not in row["heads"]]
            actual = (heads.sum(0) - heads[kept].sum(0)).norm() / total  # output lost by removing the heads
            assert abs(row["actual"] - actual.item()) < 1e-10
            assert row["actual"] <= row["bound"] * (1 + 1e-12)
        sizes = [result["head_norms"][i] for i in result["budgets"][-1]["heads"]]
        assert sizes == sorted(sizes)  # greedy: smallest first
        assert result["budgets"][0]["tightness"] == 1.0 or abs(result["budgets"][0]["tightness"] - 1) < 1e-12


def test_block_pruning_against_the_pair_vectors(family, tokenizer):
    terms = layer_terms.collect(tiny_model(family), encode(tokenizer))
    for t in terms:
        pairs = contributions.pair_vectors(t)  # W'_nm x_m, (N, N, M)
        norms = pairs.norm(dim=-1)
        nonzero = (t.attention.attn[0] != 0).any(0)
        result = pruning.prune_blocks(t.attention, budgets=(0.3, 1.0))
        assert result["nonzero_blocks"] == int(nonzero.sum())
        for row in result["budgets"]:
            order = torch.argsort(torch.where(nonzero, norms, torch.inf).flatten())[:row["pruned"]]
            mask = torch.zeros(norms.numel(), dtype=torch.bool)
            mask[order] = True
            removed = (pairs * mask.reshape(norms.shape)[..., None]).sum(1)  # Σ_{m pruned} W'_nm x_m
            total = pairs.sum(1).norm()
            assert abs(row["actual"] - (removed.norm() / total).item()) < 1e-10
            assert row["actual"] <= row["bound"] * (1 + 1e-12)
        assert abs(result["budgets"][-1]["actual"] - 1.0) < 1e-10  # everything pruned: the whole output


def test_a_nan_bound_gives_nan_tightness(family, tokenizer):
    # "tightness" was `actual / bound if bound > 0 else 1.0`: a NaN bound (a NaN weight) read as a tight 1.0
    import dataclasses
    import math

    layer = layer_terms.collect(tiny_model(family), encode(tokenizer))[0].attention
    broken = dataclasses.replace(layer, w_v=layer.w_v.clone().fill_(float("nan")))
    budgets = pruning.prune_blocks(broken)["budgets"]
    assert budgets and all(math.isnan(b["bound"]) and math.isnan(b["tightness"]) for b in budgets)
