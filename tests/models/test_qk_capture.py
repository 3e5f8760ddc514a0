"""capture="qk" against the capture of A: the same probabilities (recomputed from q and k), the same
operator results, the module's own output reproduced; the forward pass stops after the last layer."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk

transformers = pytest.importorskip("transformers", reason="the model tests need transformers: pip install '.[models]'")

TOLERANCE = 1e-5


def compare_captures(model, enc, layers):
    with_attn = dk.models.attention_layers(model, layers=layers, **enc)
    with_qk = dk.models.attention_layers(model, layers=layers, capture="qk", **enc)
    real = enc["attention_mask"].bool()[:, None, :, None] if "attention_mask" in enc else True
    for a, b in zip(with_attn, with_qk, strict=True):
        assert b.attn is None and (a.index, a.name) == (b.index, b.name)
        diff = ((a.attn - b.attention()).abs() * real).max().item()  # padded query rows are not compared
        assert diff <= TOLERANCE, (a.name, diff)
        assert b.relative_error() <= TOLERANCE, (b.name, b.relative_error())
        op_a, op_b = a.operator(), b.operator()
        norms_a, norms_b = op_a.block_norms(grid=(3, 3)), op_b.block_norms(grid=(3, 3))
        if "attention_mask" not in enc:
            torch.testing.assert_close(norms_b, norms_a, rtol=TOLERANCE, atol=0)
    return with_qk


def _tiny(family, **extra):
    torch.manual_seed(0)
    config = {
        "bert": lambda: transformers.BertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                                intermediate_size=64, vocab_size=100, **extra),
        "llama": lambda: transformers.LlamaConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                                  num_key_value_heads=2, intermediate_size=64, vocab_size=100, **extra),
        "mistral": lambda: transformers.MistralConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=1, intermediate_size=64, vocab_size=100,
                                                      **extra),
    }[family]()
    return transformers.AutoModel.from_config(config, attn_implementation="eager").eval()


def _ids(batch=2, tokens=12, padded=True):
    ids = torch.randint(0, 100, (batch, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    if padded:
        mask[1, -4:] = 0
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("family,extra", [("bert", {}), ("llama", {}), ("mistral", {"sliding_window": 4})])
def test_random_init_models(family, extra):
    model = _tiny(family, **extra)
    compare_captures(model, _ids(), [0, -1])
    layer = compare_captures(model, _ids(padded=False), [1])[0]
    assert layer.causal == (family != "bert")
    assert layer.sliding_window == extra.get("sliding_window")
    assert model.config._attn_implementation == "eager"  # restored


def test_forward_stops_after_the_last_selected_layer():
    model = _tiny("llama")
    calls = []
    handle = model.layers[2].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        dk.models.attention_layers(model, layers=[1], capture="qk", **_ids())
        assert calls == []
        dk.models.attention_layers(model, layers=[2], capture="qk", **_ids())
        assert calls == [1]
    finally:
        handle.remove()


def test_bad_capture_is_rejected():
    with pytest.raises(ValueError, match="capture must be"):
        dk.models.attention_layers(_tiny("llama"), capture="probs", **_ids())
