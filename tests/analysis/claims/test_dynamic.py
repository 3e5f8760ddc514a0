"""Dynamic W': the prompted inputs, and the distances against dense matrices."""

from __future__ import annotations

import torch

import duat_kernels as dk
from duat_kernels.analysis.claims import dynamic, layer_terms

from claims_models import family, tiny_model, tokenizer  # noqa: F401  (fixtures)

PASSAGE = "the quick brown fox jumps over the lazy dog"


def test_prompt_goes_before_the_passage(tokenizer):
    inputs, positions = dynamic.prompted_inputs(tokenizer, PASSAGE, "summarize :")
    ids = inputs["input_ids"][0].tolist()
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "summarize", ":", *PASSAGE.split(), "[SEP]"]
    assert [ids[p] for p in positions] == tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]


def test_distances_against_dense_matrices(family, tokenizer):
    model = tiny_model(family)
    base_inputs, p_base = dynamic.prompted_inputs(tokenizer, PASSAGE, "")
    other_inputs, p_other = dynamic.prompted_inputs(tokenizer, PASSAGE, "translate into french :")
    base, other = layer_terms.collect(model, base_inputs), layer_terms.collect(model, other_inputs)
    for b, o in zip(base, other):
        a = b.attention
        shared = lambda t, p: t.attention.attn[:, :, p][:, :, :, p]
        w = lambda t, p: dk.hvo_matrix(shared(t, p), a.w_v, a.w_o, num_kv_heads=a.num_kv_heads, backend="reference")
        expected = (w(o, p_other) - w(b, p_base)).norm() / w(b, p_base).norm()
        assert abs(dynamic.attention_distance(b, o, p_base, p_other) - expected.item()) < 1e-10
        w_in, w_out = b.ffn_matrices()
        per_token = lambda t, p: torch.stack([w_out @ torch.diag(t.gate[n]) @ w_in for n in p])  # W2 D_n W1
        expected = (per_token(o, p_other) - per_token(b, p_base)).norm() / per_token(b, p_base).norm()
        got = dynamic.linearised_ffn_distance(b, o, p_base, p_other, dynamic.ffn_gram(b))
        assert abs(got - expected.item()) < 1e-10


def test_measure_reports_exact_zero_for_the_ffn_maps(tokenizer):
    result = dynamic.measure(tiny_model("llama"), tokenizer, PASSAGE, prompts=("summarize :",))
    assert result["ffn_linear_maps_exactly_zero"] is True
    assert all(r["attention"]["summarize :"] > 0 for r in result["layers"])
