"""Every adapter reproduces each layer's own attention output as W' x' + b' (dense W', and the
matrix-free operator): random-init GPT-2, BERT, RoBERTa, Llama, Mistral, Qwen2 through the real
transformers module code, torch.nn.MultiheadAttention, and sdpa/eager handling."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk

transformers = pytest.importorskip("transformers", reason="the model tests need transformers: pip install '.[models]'")

TOLERANCE = 1e-5  # relative error of W' x' + b' against the module's own float32 output


def _assert_exact(layers, expected_count):
    assert len(layers) == expected_count
    for layer in layers:
        w = layer.hvo_matrix(dtype=torch.float64)
        assert layer.relative_error(w) <= TOLERANCE, (layer.name, layer.relative_error(w))
        assert layer.relative_error() <= TOLERANCE, layer.name  # matrix-free route


def _ids(vocab, batch=2, tokens=9, seed=0):
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1, -3:] = 0  # padding in the second sequence
    return dict(input_ids=ids, attention_mask=mask)


CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=100, n_positions=32),
    "bert": lambda: transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=100),
    "roberta": lambda: transformers.RobertaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                                  intermediate_size=64, vocab_size=100),
    "llama": lambda: transformers.LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                              num_key_value_heads=2, intermediate_size=64, vocab_size=100),
    "mistral": lambda: transformers.MistralConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=1, intermediate_size=64, vocab_size=100),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                              num_key_value_heads=3, intermediate_size=64, vocab_size=100),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_random_init_models_are_exact(family):
    torch.manual_seed(0)
    config = CONFIGS[family]()
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random-init biases are zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    layers = dk.models.attention_layers(model, **_ids(config.vocab_size))
    _assert_exact(layers, config.num_hidden_layers)
    assert layers[0].num_kv_heads == (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    assert layers[0].num_heads == config.num_attention_heads == layers[0].attn.shape[1]
    if family == "qwen2":
        assert layers[0].b_v is not None and layers[0].b_v.abs().sum() > 0  # Qwen2's value bias is used


def test_layer_selection_keeps_only_what_is_asked():
    config = CONFIGS["llama"]()
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    layers = dk.models.attention_layers(model, layers=[-1], **_ids(100))
    assert [layer.index for layer in layers] == [1]
    with pytest.raises(IndexError, match="layer 5 is out of range: the model has 2 attention layers"):
        dk.models.attention_layers(model, layers=[5], **_ids(100))


def test_sdpa_models_are_switched_or_refused():
    config = CONFIGS["bert"]()
    model = transformers.AutoModel.from_config(config, attn_implementation="sdpa").eval()
    with pytest.raises(RuntimeError, match="attn_implementation='sdpa'.*load it with attn_implementation='eager'"):
        dk.models.attention_layers(model, switch_to_eager=False, **_ids(100))
    layers = dk.models.attention_layers(model, **_ids(100))
    _assert_exact(layers, 2)
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_bare_and_nested(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(24, 3, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    x = torch.randn(2, 7, 24) if batch_first else torch.randn(7, 2, 24)
    captured = dk.models.attention_layers(mha, x, x, x)
    _assert_exact(captured, 1)
    assert captured[0].num_heads == 3 and captured[0].attn.shape[1] == 3  # per-head maps, never averaged

    layer = torch.nn.TransformerEncoderLayer(24, 3, dim_feedforward=32, batch_first=batch_first, dropout=0.0).eval()
    encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    layers = dk.models.attention_layers(encoder, x)  # (hooks keep torch off its fused encoder path)
    _assert_exact(layers, 2)


class TwoHeads(torch.nn.Module):
    """Holds two attention modules but calls only the first."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.unused = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.used(x, x, x)[0]


def test_uncalled_layer_is_reported():
    model = TwoHeads().eval()
    _assert_exact(dk.models.attention_layers(model, torch.randn(1, 4, 8), layers=[0]), 1)
    with pytest.raises(RuntimeError, match=r"attention layer 1 \(unused\) was not called"):
        dk.models.attention_layers(model, torch.randn(1, 4, 8))


def test_unknown_architecture():
    with pytest.raises(ValueError, match="no adapter for model_type=None .*Linear"):
        dk.models.attention_layers(torch.nn.Linear(3, 3), torch.randn(3))
