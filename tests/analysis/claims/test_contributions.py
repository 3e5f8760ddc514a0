"""Token-to-token contributions against the module's own value vectors, and the ALTI rollout's identities."""

from __future__ import annotations

import re

import torch

from duat_kernels.analysis.claims import contributions, layer_terms

from claims_models import encode, family, tiny_model, tokenizer  # noqa: F401  (fixtures)


def own_value_vectors(model, inputs) -> list[torch.Tensor]:
    """Each layer's value projection output minus its bias, as the module computed it: (N, h_kv·d)."""
    values, handles = [], []
    # The value projections by their names in BERT and Llama (independent of the adapters' lookup).
    for module in [m for n, m in model.named_modules() if re.search(r"(attention\.self\.value|self_attn\.v_proj)$", n)]:
        handles.append(module.register_forward_hook(
            lambda m, _a, out: values.append((out[0] - (m.bias if m.bias is not None else 0)).detach())))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return values


def test_contributions_match_the_modules_value_vectors(family, tokenizer):
    model = tiny_model(family)
    inputs = encode(tokenizer)
    terms = layer_terms.collect(model, inputs)
    for t, v in zip(terms, own_value_vectors(model, inputs)):
        a = t.attention
        h, n = a.attn.shape[1], a.attn.shape[-1]
        d = a.w_o.shape[1] // h
        heads = v.double().reshape(n, a.num_kv_heads, d).repeat_interleave(h // a.num_kv_heads, 1)  # (N, h, d)
        projected = torch.einsum("nid,cid->inc", heads, a.w_o.double().reshape(-1, h, d))  # Wo_i v_i[m]
        per_pair = a.attn[0].double()[..., None] * projected[:, None]  # (h, n, m, M_out)
        op, x = t.operator(), a.x[0].double()
        torch.testing.assert_close(op.contributions(x, per_head=True), per_pair.norm(dim=-1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.contributions(x), per_pair.sum(0).norm(dim=-1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(contributions.pair_vectors(t), per_pair.sum(0), rtol=1e-10, atol=1e-12)
        # the pairs and the bias add up to the module's output
        total = contributions.pair_vectors(t).sum(1) + op.bias().reshape(n, -1)
        torch.testing.assert_close(total, a.output[0].double(), rtol=1e-10, atol=1e-10)


def test_alti_vectors_add_up_to_the_attention_block_output(family, tokenizer):
    model = tiny_model(family)
    inputs = encode(tokenizer)
    fam = layer_terms.family_of(model)
    outputs = []
    target = "attention.output.LayerNorm" if family == "bert" else "post_attention_layernorm"
    hooks = [m.register_forward_hook(lambda _m, _a, out: outputs.append(out[0].detach())) if family == "bert" else
             m.register_forward_pre_hook(lambda _m, args: outputs.append(args[0][0].detach()))
             for n, m in model.named_modules() if n.endswith(target)]
    terms = layer_terms.collect(model, inputs)
    for h in hooks:
        h.remove()
    assert fam.norm_ffn and len(outputs) == len(terms)
    for t, y in zip(terms, outputs):
        vectors, constant = contributions.transformed_vectors(t)
        tol = 1e-12 if family == "bert" else 1e-6  # Llama's module normalises in float32
        torch.testing.assert_close(vectors.sum(1) + constant, y.double(), rtol=tol, atol=tol)
        alti = contributions.alti_matrix(t)
        assert (alti >= 0).all()
        torch.testing.assert_close(alti.sum(1), torch.ones(alti.shape[0], dtype=alti.dtype))


def test_measure_rolls_out_the_layers(tokenizer):
    terms = layer_terms.collect(tiny_model("llama"), encode(tokenizer))
    result = contributions.measure(terms)
    rollout = torch.eye(result["tokens"], dtype=torch.float64)
    for row in result["layers"]:
        rollout = torch.tensor(row["alti"], dtype=torch.float64) @ rollout
        assert len(row["head_share"]) == 6 and abs(sum(row["head_share"]) - 1) < 1e-12
        per_head = torch.tensor(row["per_head"], dtype=torch.float64)  # (h, N, N)
        assert per_head.shape == (6, result["tokens"], result["tokens"])
        assert (per_head.sum(0) >= torch.tensor(row["summed"], dtype=torch.float64) - 1e-12).all()  # triangle
    torch.testing.assert_close(torch.tensor(result["rollout"], dtype=torch.float64), rollout)
    torch.testing.assert_close(torch.tensor(result["rollout"], dtype=torch.float64).triu(1), torch.zeros_like(rollout))  # causal


def test_rollout_is_skipped_for_long_inputs(tokenizer, monkeypatch):
    monkeypatch.setattr(contributions, "ROLLOUT_MAX_TOKENS", 3)
    result = contributions.measure(layer_terms.collect(tiny_model("bert"), encode(tokenizer)))
    assert result["rollout"] is None and "> 3 tokens" in result["rollout_skipped"]
    assert "alti" not in result["layers"][0]
