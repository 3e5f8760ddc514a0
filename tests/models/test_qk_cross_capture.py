"""Cross-attention layers captured as q and k (attention_layers(include_cross=True, capture="qk")): the same A as
the capture of A over a padded encoder (recomputed from the decoder's q, the encoder's k and the encoder's key
mask), W' x' + b' reproducing the layer's own output, and the layers capture='qk' cannot read refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import duat_kernels as dk
from duat_kernels.models.qk_capture import QkCaptureUnsupported, _key_padding
from test_cross_capture import FAMILIES, N_DEC, N_ENC, _inputs, _model
from test_encoder_decoder import _BART_LIKE, MODELS, START

transformers = pytest.importorskip("transformers", reason="the model tests need transformers: pip install '.[models]'")

TOLERANCE = 1e-5
QK_FAMILIES = sorted({*FAMILIES, "nllb_moe"} - {"fsmt"})  # FSMT: tokens first, refused below


def _family(family):
    if family in FAMILIES:
        return _model(family)
    torch.manual_seed(0)
    model = MODELS[family]()
    model.set_attn_implementation("eager")
    return model.eval()


def _cross_indices(model) -> list[int]:
    names = dk.models.capture.attention_layer_names(model, include_cross=True)
    return [i for i, name in enumerate(names) if dk.models.architectures.is_cross_attention_module(model, name)]


@pytest.mark.parametrize("family", QK_FAMILIES)
def test_cross_attention_from_q_and_k_is_the_captured_attention(family):
    model, inputs = _family(family), _inputs()
    cross = _cross_indices(model)  # T5's self-attention has a position bias: capture='qk' refuses it (below)
    with_attn = dk.models.attention_layers(model, **inputs, include_cross=True, layers=cross)
    with_qk = dk.models.attention_layers(model, **inputs, include_cross=True, capture="qk", layers=cross)
    assert [(l.index, l.name, l.kind) for l in with_qk] == [(l.index, l.name, "cross") for l in with_attn]
    for a, b in zip(with_attn, with_qk, strict=True):
        h, d = b.num_heads, b.w_o.shape[1] // b.num_heads
        assert b.attn is None and b.q.shape == (2, h, N_DEC, d) and b.k.shape == (2, b.num_kv_heads, N_ENC, d)
        assert b.scale == (1.0 if family == "t5" else pytest.approx(d ** -0.5)) and not b.causal
        torch.testing.assert_close(b.key_mask, inputs["attention_mask"].bool(), rtol=0, atol=0)  # the encoder's
        torch.testing.assert_close(b.token_mask, inputs["decoder_attention_mask"].bool(), rtol=0, atol=0)
        # the encoder states the value projection reads (its self-attention run by sdpa here, eager there)
        torch.testing.assert_close(b.x, a.x, rtol=TOLERANCE, atol=TOLERANCE)
        attn = b.attention()
        assert attn.shape == (2, h, N_DEC, N_ENC) and bool((attn[1, :, :, -4:] == 0).all())
        torch.testing.assert_close(attn, a.attn, rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(b.operator().block_norms(grid=(2, 3)), a.operator().block_norms(grid=(2, 3)),
                                   rtol=TOLERANCE, atol=0)
        assert b.relative_error() <= TOLERANCE, (b.name, b.relative_error())  # against the layer's own output
        assert b.relative_error(b.hvo_matrix(dtype=torch.float64)) <= TOLERANCE
        assert b.relative_error(b.hvo_matrix(layout="feature", dtype=torch.float64), layout="feature") <= TOLERANCE
        x = torch.randn(2, N_ENC * b.w_v.shape[1])
        torch.testing.assert_close(b.operator(heads=[1]).matvec(x), a.operator(heads=[1]).matvec(x), rtol=TOLERANCE,
                                   atol=TOLERANCE)
        unmasked = dataclasses.replace(b, key_mask=None)  # the padded encoder tokens attended: the output is missed
        assert unmasked.relative_error() > 1e-3
        assert f"kind='cross', keys={N_ENC}" in repr(b)


def test_self_and_cross_layers_in_one_pass_stop_after_the_last_to_run():
    # indices put the cross-attention layers after all the self-attention layers, but the decoder runs them in
    # between: stopping after the highest index (decoder.layers.0.encoder_attn) lost decoder.layers.1.self_attn
    torch.manual_seed(0)
    model = transformers.BartModel(transformers.BartConfig(**{**_BART_LIKE, "decoder_layers": 2},
                                                           decoder_attention_heads=2, decoder_start_token_id=START))
    model.set_attn_implementation("eager")
    model.eval()
    inputs = _inputs()
    names = dk.models.capture.attention_layer_names(model, include_cross=True)
    assert names[3:] == ["decoder.layers.0.encoder_attn", "decoder.layers.1.encoder_attn"]
    calls = []
    handle = model.decoder.layers[1].encoder_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        picked = dk.models.attention_layers(model, **inputs, include_cross=True, capture="qk", layers=[2, 3])
    finally:
        handle.remove()
    assert [(l.name, l.kind) for l in picked] == [("decoder.layers.1.self_attn", "self"),
                                                   ("decoder.layers.0.encoder_attn", "cross")]
    assert not calls  # the pass stopped after decoder.layers.1.self_attn's output projection
    assert all(l.relative_error() <= TOLERANCE for l in picked)
    every = dk.models.attention_layers(model, **inputs, include_cross=True, capture="qk")
    assert [(l.name, l.kind) for l in every] == [(name, "cross" if i >= 3 else "self") for i, name in enumerate(names)]
    assert all(l.relative_error() <= TOLERANCE for l in every)


def test_cross_attention_the_q_k_capture_cannot_read_is_refused():
    inputs = _inputs()
    with pytest.raises(QkCaptureUnsupported, match="FSMTModel.*tokens first.*use capture='attn'"):
        dk.models.attention_layers(_family("fsmt"), **inputs, include_cross=True, capture="qk", layers=[-1])
    with pytest.raises(RuntimeError, match="position bias"):  # T5's self-attention layers, with their cross layer
        dk.models.attention_layers(_family("t5"), **inputs, include_cross=True, capture="qk")
    with pytest.raises(TypeError, match="include_cross must be True or False, got str 'yes'"):
        dk.models.attention_layers(_family("bart"), **inputs, include_cross="yes", capture="qk")
    torch.manual_seed(0)
    transformer = torch.nn.Transformer(d_model=16, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                       dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    with pytest.raises(ValueError, match="capture='qk' needs a Hugging Face model"):
        dk.models.attention_layers(transformer, torch.randn(2, 4, 16), torch.randn(2, 3, 16), include_cross=True,
                                   capture="qk")


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_cross_attention_mask_is_read_as_a_key_mask_or_refused(dtype):
    keys = torch.tensor([[True, True, False], [True, True, True]])
    mask = keys[:, None, None, :].expand(2, 1, 4, 3)
    mask = mask if dtype == torch.bool else torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(dtype).min)
    assert torch.equal(_key_padding("Attn", mask, 2), keys)
    assert torch.equal(_key_padding("Attn", mask[:1], 3), keys[:1].expand(3, 3))  # a mask broadcast over the batch
    assert _key_padding("Attn", None, 2) is None
    causal = mask.clone()
    causal[0, 0, 0, 1] = False if dtype == torch.bool else torch.finfo(dtype).min  # query 0 may not see key 1
    with pytest.raises(QkCaptureUnsupported, match=r"Attn: .*forbids different keys to different queries"):
        _key_padding("Attn", causal, 2)
    with pytest.raises(QkCaptureUnsupported, match=r"Attn: cross-attention mask of shape \(2, 3\) is not"):
        _key_padding("Attn", keys, 2)
