"""LoRA as ΔW': peft's merged model against Σ_i A_i ⊗ ΔOV_i, the rank bound, the attention/weight split."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels.analysis.claims import layer_terms, lora
from duat_kernels.models import attention_layers

from claims_models import encode, family, tiny_model, tokenizer  # noqa: F401  (fixtures)

pytest.importorskip("peft", reason="the lora section needs peft: pip install '.[claims]'")


def dense(attn, w_v, w_o, kv):
    return dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=kv, backend="reference")[0]


@pytest.mark.parametrize("rank", [1, 2])
def test_value_output_adapter_is_a_kron_sum_of_low_rank_changes(family, tokenizer, rank):
    model = tiny_model(family)
    inputs = encode(tokenizer)
    fam = layer_terms.family_of(model)
    base = attention_layers(model, **inputs)
    merged_model, deltas = lora.adapt(model, fam.value_out, rank)
    assert len(deltas) == 2 * len(base) and all(d.abs().max() > 0 for d in deltas.values())  # B is nonzero
    merged = attention_layers(merged_model, **inputs)
    torch.testing.assert_close(merged[0].attn, base[0].attn, rtol=0, atol=0)  # first layer: A unchanged
    for b, m in zip(base, merged):
        h, kv = b.attn.shape[1], b.num_kv_heads
        d_v, d_o = deltas[b.index, fam.value_out[0]], deltas[b.index, fam.value_out[1]]
        torch.testing.assert_close(m.w_v, b.w_v + d_v, rtol=1e-12, atol=1e-12)  # peft merged what we read
        dov = lora.delta_ov(b.w_v, b.w_o, d_v, d_o, h, kv)
        expected = sum(torch.kron(m.attn[0, i], dov[i]) for i in range(h))  # Σ_i A_i ⊗ ΔOV_i
        actual = dense(m.attn, m.w_v, m.w_o, kv) - dense(m.attn, b.w_v, b.w_o, kv)  # same A
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
        ranks = [int(torch.linalg.matrix_rank(x)) for x in dov]
        assert ranks == lora.delta_ov_rank(b.w_v, b.w_o, d_v, d_o, h, kv) == [2 * rank] * h
    rows = lora.compare(base, merged, deltas, fam.value_out, rank)
    assert max(r["identity_relative_error"] for r in rows) < 1e-12
    assert rows[0]["attention_part"] == 0.0 and rows[0]["max_attention_change"] == 0.0


def test_query_key_adapter_splits_into_attention_and_weight_parts(family, tokenizer):
    model = tiny_model(family)
    inputs = encode(tokenizer)
    fam = layer_terms.family_of(model)
    base = attention_layers(model, **inputs)
    merged_model, deltas = lora.adapt(model, fam.query_key + fam.value_out, 2)
    merged = attention_layers(merged_model, **inputs)
    rows = lora.compare(base, merged, deltas, fam.value_out, 2)
    for b, m, r in zip(base, merged, rows):
        kv = b.num_kv_heads
        w_base = dense(b.attn, b.w_v, b.w_o, kv)
        total = dense(m.attn, m.w_v, m.w_o, kv) - w_base
        attention = dense(m.attn - b.attn, b.w_v, b.w_o, kv)  # Σ (A' − A) ⊗ OV
        assert r["max_attention_change"] > 0
        torch.testing.assert_close(torch.tensor(r["relative_change"], dtype=torch.float64), total.norm() / w_base.norm(), rtol=1e-9, atol=0)
        torch.testing.assert_close(torch.tensor(r["attention_part"], dtype=torch.float64), attention.norm() / total.norm(), rtol=1e-9, atol=0)
        torch.testing.assert_close(torch.tensor(r["weight_part"], dtype=torch.float64), (total - attention).norm() / total.norm(),
                                   rtol=1e-9, atol=0)


def test_kron_sum_inner_is_the_frobenius_inner_product():
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(3, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    y, y2 = torch.randn(3, 2, 5, generator=g, dtype=torch.float64), torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    left = sum(torch.kron(x[i], y[i]) for i in range(3))
    right = sum(torch.kron(x2[i], y2[i]) for i in range(3))
    assert lora.kron_sum_inner(x, y, x2, y2) == pytest.approx((left * right).sum().item(), rel=1e-12)


def test_measure_refuses_a_rank_above_the_width(family, tokenizer, monkeypatch):
    model = tiny_model(family)  # width 24
    monkeypatch.setattr(lora, "adapt", lambda *a, **k: pytest.fail("an adapter was built"))
    with pytest.raises(ValueError, match="^rank 25 is above the model width 24: give a rank from 1 to 24$"):
        lora.measure(model, encode(tokenizer), rank=25)
