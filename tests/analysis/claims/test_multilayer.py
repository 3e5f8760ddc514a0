"""Eq. 11: the hidden states rebuilt from x_0 by the frozen layers, against the models themselves."""

from __future__ import annotations

import pytest
import torch

from duat_kernels.analysis.claims import layer_terms, multilayer

from claims_models import encode, family, tiny_model, tokenizer  # noqa: F401  (fixtures)

# float64 BERT runs in float64 throughout; Llama's RMSNorm and RoPE compute in float32 even in a float64
# model, so its hidden states carry float32 rounding; float32 models must meet the 1e-4.
TOLERANCES = {("bert", torch.float64): 1e-13, ("llama", torch.float64): 1e-6,
              ("bert", torch.float32): multilayer.TOLERANCE, ("llama", torch.float32): multilayer.TOLERANCE}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_rebuilt_hidden_states_match_the_model(family, dtype, tokenizer):
    model = tiny_model(family, dtype)
    inputs = encode(tokenizer)
    terms = layer_terms.collect(model, inputs)
    hidden = model(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(terms[0].h_in, hidden[0][0].double(), rtol=0, atol=0)  # x_0: the embeddings
    rows = multilayer.rebuild(terms)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert max(r["relative_error"] for r in rows) <= TOLERANCES[family, dtype]
    assert multilayer.summarise(rows)["held"]


def test_linear_part_is_linear_and_the_split_adds_up(family, tokenizer):
    terms = layer_terms.collect(tiny_model(family), encode(tokenizer))
    x = terms[0].h_in
    g = torch.Generator().manual_seed(1)
    y = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for t in terms:
        lin = lambda v: layer_terms.replay(t, v, with_bias=False)
        torch.testing.assert_close(lin(2.0 * x - 3.0 * y), 2.0 * lin(x) - 3.0 * lin(y), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin(x) + layer_terms.replay(t, torch.zeros_like(x)), layer_terms.replay(t, x),
                                   rtol=1e-12, atol=1e-12)
    shares = multilayer.rebuild(terms)
    if family == "bert":  # random biases and LayerNorm shifts: the constant path is there
        assert all(r["constant_share"] > 0.01 for r in shares)
    else:  # Llama has no biases at all: the hidden state is all Lin_L x_0
        assert all(r["constant_share"] == 0.0 for r in shares)


def test_unsupported_model_type_is_named(tokenizer):
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=40, n_embd=8, n_layer=1, n_head=2,
                                                           attn_implementation="eager"))
    with pytest.raises(ValueError, match="model_type='gpt2'.*supported: bert"):
        layer_terms.collect(model, encode(tokenizer))


@pytest.mark.parametrize("errors", [[1e-9, float("nan")], [float("nan"), 1e-9], [1e-9, float("nan"), 1e-10]])
def test_a_nan_layer_error_fails_the_claim(errors):
    # Python's max skipped a NaN after a finite error: with a NaN weight in layer 1 the claim "held" at 1.96e-7
    rows = [{"layer": i, "relative_error": e} for i, e in enumerate(errors)]
    summary = multilayer.summarise(rows)
    assert summary["held"] is False and summary["max_relative_error"] != summary["max_relative_error"]
