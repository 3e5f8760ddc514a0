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
        "fsmt": lambda: transformers.FSMTConfig(langs=["en", "de"], src_vocab_size=100, tgt_vocab_size=100, d_model=32,
                                                encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                max_position_embeddings=32, **extra),
    }[family]()
    return transformers.AutoModel.from_config(config, attn_implementation="eager").eval()


def _ids(batch=2, tokens=12, padded=True, side="right"):
    ids = torch.randint(0, 100, (batch, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    if padded:  # the second sequence's first (left) or last (right) 4 tokens are padding
        mask[1, slice(0, 4) if side == "left" else slice(tokens - 4, tokens)] = 0
    return dict(input_ids=ids, attention_mask=mask)


def test_tokens_first_attention_is_refused_by_name():
    # FSMT's attention (fairseq's (N, B, M) layout) computes A in its own code: the capture ran the model, found no
    # q and k and said only that layer 0 "was not called through transformers' attention functions"
    from duat_kernels.models.qk_capture import QkCaptureUnsupported

    model = _tiny("fsmt")
    with pytest.raises(QkCaptureUnsupported, match=r"capture='qk' cannot record FSMTModel: its attention layers "
                                                   r"\(encoder.layers.0.self_attn, \.\.\.\) read x tokens first.*"
                                                   r"use capture='attn'$"):
        dk.models.attention_layers(model, capture="qk", **_ids())
    with pytest.raises(QkCaptureUnsupported, match=r"\(decoder.layers.0.self_attn\) read x tokens first"):
        dk.models.attention_layers(model, capture="qk", layers=[-1], **_ids())
    assert all(layer.relative_error() <= TOLERANCE for layer in dk.models.attention_layers(model, **_ids()))


@pytest.mark.parametrize("family,extra", [("bert", {}), ("llama", {}), ("mistral", {"sliding_window": 4})])
def test_random_init_models(family, extra):
    model = _tiny(family, **extra)
    compare_captures(model, _ids(), [0, -1])
    layer = compare_captures(model, _ids(padded=False), [1])[0]
    assert layer.causal == (family != "bert")
    assert layer.sliding_window == extra.get("sliding_window")
    assert model.config._attn_implementation == "eager"  # restored


def _gemma2(softcap: float):
    """Tiny Gemma 2: layer 0 with a sliding window of 4 tokens, layer 1 full, 4 query / 2 kv heads; the
    q and k weights are scaled up so that the logits (|s| ~ 50) reach far past the soft-cap."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, intermediate_size=64, vocab_size=100, sliding_window=4,
                                       attn_logit_softcapping=softcap)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.q_proj.weight.mul_(30)
            block.self_attn.k_proj.weight.mul_(30)
    return model


def _real_rows_close(expected, actual, real):
    """||actual - expected|| / ||expected|| <= TOLERANCE over the real (unpadded) query tokens; (B, N, ...)."""
    diff, ref = (actual - expected).double()[real], expected.double()[real]
    assert (diff.norm() / ref.norm()).item() <= TOLERANCE


@pytest.mark.parametrize("padding", ["left", "right", None], ids=["left-padded", "right-padded", "unpadded"])
def test_gemma2_soft_cap_and_sliding_window(padding):
    from transformers.modeling_utils import AttentionInterface

    softcap = 5.0  # Gemma 2 uses 50; a cap of logits |s| ~ 30-50 changes A only where the capped range
    # (-5, 5) leaves the softmax far from one-hot
    model = _gemma2(softcap)
    enc = _ids(padded=padding is not None, side=padding or "right")
    real = enc["attention_mask"].bool()  # (B, N)
    with_attn = dk.models.attention_layers(model, **enc)
    with_qk = compare_captures(model, enc, [0, 1])  # A of the real query rows and W' x' + b' = output, to 1e-5
    assert [layer.sliding_window for layer in with_qk] == [4, None]
    assert [layer.softcap for layer in with_qk] == [softcap, softcap]
    assert "eager" not in AttentionInterface._global_mapping and model.config._attn_implementation == "eager"
    x = torch.randn(2, 12 * 32, generator=torch.Generator().manual_seed(1))
    for a, b in zip(with_attn, with_qk, strict=True):
        op_a, op_b = a.operator(), b.operator()
        _real_rows_close(a.attn, op_b.source.dense(), real[:, None, :].expand(a.attn.shape[:3]))
        _real_rows_close(op_a.matvec(x).reshape(2, 12, 32), op_b.matvec(x).reshape(2, 12, 32), real)
        _real_rows_close(op_a.block_norms(), op_b.block_norms(), real)
        uncapped = dk.HVOOperator.from_qk(b.q, b.k, b.w_v, b.w_o, causal=True, attention_mask=b.token_mask,
                                          scale=b.scale, sliding_window=b.sliding_window).attn
        assert ((uncapped - a.attn).abs() * real[:, None, :, None]).max() > 0.1  # the cap changes A
    # layer 0 not selected: the forward pass still soft-caps it (layer 1 reads its output)
    compare_captures(model, enc, [1])


def test_attention_the_operator_does_not_model_is_refused(monkeypatch):
    torch.manual_seed(0)
    config = transformers.GptOssConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, intermediate_size=64, vocab_size=100, num_local_experts=2,
                                       num_experts_per_tok=1)
    gpt_oss = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    with pytest.raises(RuntimeError, match="attention sinks"):
        dk.models.attention_layers(gpt_oss, capture="qk", **_ids())
    t5 = transformers.T5Model(transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                                    vocab_size=100)).eval()
    with pytest.raises(RuntimeError, match="position bias"):  # T5's relative position bias: A would be wrong
        dk.models.attention_layers(t5, capture="qk", **_ids(), decoder_input_ids=_ids()["input_ids"])
    gemma2 = _gemma2(softcap=5.0)
    monkeypatch.setattr(type(gemma2), "_supports_sdpa", True)  # as if sdpa could run it: the cap would be lost
    with pytest.raises(RuntimeError, match="no soft-capping"):
        dk.models.attention_layers(gemma2, capture="qk", **_ids())
    assert gemma2.config._attn_implementation == "eager"  # restored after the error


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


def test_decoder_layers_of_an_encoder_decoder_model_take_the_decoder_mask():
    """BART: the decoder's self-attention (6 tokens) keys are masked by decoder_attention_mask, not the
    encoder's attention_mask (9 tokens), as with capture='attn'."""
    torch.manual_seed(0)
    config = transformers.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    enc, dec = _ids(tokens=9, side="left"), _ids(tokens=6)
    layers = dk.models.attention_layers(model, capture="qk", **enc, decoder_input_ids=dec["input_ids"],
                                        decoder_attention_mask=dec["attention_mask"])
    assert [layer.q.shape[2] for layer in layers] == [9, 6]
    assert torch.equal(layers[0].token_mask, enc["attention_mask"].bool())
    assert torch.equal(layers[1].token_mask, dec["attention_mask"].bool())
    for layer in layers:
        assert layer.relative_error() <= TOLERANCE, layer.name


def test_positional_and_four_dimensional_masks():
    """model(ids, mask) passed positionally is the key mask too; a 4-D mask, which from_qk cannot model, is
    refused (it was ignored: A of the padded batch attended to the padding)."""
    model = _tiny("llama")
    enc = _ids(side="left")
    layer = dk.models.attention_layers(model, enc["input_ids"], enc["attention_mask"], layers=[0], capture="qk")[0]
    assert torch.equal(layer.token_mask, enc["attention_mask"].bool())
    assert layer.relative_error() <= TOLERANCE
    with_attn = dk.models.attention_layers(model, enc["input_ids"], enc["attention_mask"], layers=[0])[0]
    assert torch.equal(with_attn.token_mask, enc["attention_mask"].bool())  # padded rows left out of the error
    mask4 = enc["attention_mask"].bool()[:, None, None, :].expand(2, 1, 12, 12)
    with pytest.raises(ValueError, match=r"attention_mask as a \(B, N\) mask.*capture='attn'"):
        dk.models.attention_layers(model, input_ids=enc["input_ids"], attention_mask=mask4, capture="qk")


def test_per_head_operators_match_the_captured_attention():
    # QKAttentionLayer.operator(heads=...) used to raise TypeError (from_qk has no heads argument)
    model = _tiny("llama").eval()
    enc = _ids(padded=False)
    (a,), (b,) = (dk.models.attention_layers(model, layers=[1], capture=c, **enc) for c in ("attn", "qk"))
    x = torch.randn(b.operator().shape[0], b.operator().shape[-1])
    for heads in ([1, 4], 2, [5, 0, 3]):  # GQA: 6 query heads on 2 kv heads
        want, got = a.operator(heads=heads), b.operator(heads=heads)
        torch.testing.assert_close(got.matvec(x), want.matvec(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.hvo_matrix(heads=heads), a.hvo_matrix(heads=heads), rtol=1e-5, atol=1e-5)


def test_a_mask_of_another_length_is_refused():
    # cached keys (past_key_values) make the 2-D mask longer than the layer's tokens: capture='qk' used to
    # drop it silently (token_mask None); the attention capture still ignores it (it only marks padded rows)
    from duat_kernels.models.capture import _token_mask

    model = _tiny("llama")
    inputs = {"attention_mask": torch.ones(2, 12, dtype=torch.long)}
    assert _token_mask(model, "model.layers.0.self_attn", 2, 8, inputs) is None
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 12\), not the layer's \(B, N\) = \(2, 8\)"):
        _token_mask(model, "model.layers.0.self_attn", 2, 8, inputs, strict=True)
    assert torch.equal(_token_mask(model, "x", 2, 12, inputs, strict=True), torch.ones(2, 12, dtype=torch.bool))


def test_decoder_with_its_own_head_count():
    # BART with 4 encoder and 2 decoder heads: the head count came from config.num_attention_heads (the
    # encoder's) for every layer: capture='attn' failed at use ('num_heads=4 but attn of shape (2, 2, 6, 6) has
    # 2 heads') and capture='qk' labelled the decoder layers 4 heads on 4 kv heads
    torch.manual_seed(0)
    config = transformers.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    enc, dec = _ids(), _ids(tokens=6, side="left")
    inputs = dict(enc, decoder_input_ids=dec["input_ids"], decoder_attention_mask=dec["attention_mask"])
    with_attn = dk.models.attention_layers(model, **inputs)
    with_qk = dk.models.attention_layers(model, capture="qk", **inputs)
    for layers in (with_attn, with_qk):
        assert [(layer.num_heads, layer.num_kv_heads) for layer in layers] == [(4, 4), (2, 2)]
        for layer in layers:
            assert layer.relative_error(layer.hvo_matrix(dtype=torch.float64)) <= TOLERANCE, layer.name
    real = dec["attention_mask"].bool()[:, None, :, None]
    torch.testing.assert_close(with_qk[1].attention() * real, with_attn[1].attn * real, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("family,extra", [("llama", {"attention_dropout": 0.5}), ("bert", {})])
def test_attention_dropout_in_training_mode_is_refused(family, extra):
    # a model in training mode drops attention weights at random in sdpa; from_qk's A has none of that, so W'
    # x' + b' was off by 14-61% of the layer's output (relative_error 0.61 for the Llama), silently
    model = _tiny(family, **extra).train()
    with pytest.raises(RuntimeError, match=r"attention dropout \(p=0\.[15]\).*model\.eval\(\).*capture='attn'"):
        dk.models.attention_layers(model, capture="qk", **_ids())
    assert model.training and model.config._attn_implementation == "eager"  # left as it was
    layers = dk.models.attention_layers(model.eval(), capture="qk", **_ids())
    assert all(layer.relative_error() <= TOLERANCE for layer in layers)


def test_feature_layout_w_is_checked_in_its_own_layout():
    # QKAttentionLayer.hvo_matrix(layout='feature') raised "hvo_matrix() got multiple values for keyword argument
    # 'layout'", and relative_error(w) read any W' as token layout: a feature-layout W' of the same shape gave 1.26
    model = _tiny("llama")
    enc = _ids(side="left")
    (a,), (b,) = (dk.models.attention_layers(model, layers=[1], capture=c, **enc) for c in ("attn", "qk"))
    for layer in (a, b):
        w = layer.hvo_matrix(layout="feature", dtype=torch.float64)
        want = a.hvo_matrix(layout="feature", dtype=torch.float64)  # sequence 0 (unpadded: padded rows differ)
        torch.testing.assert_close(w[0], want[0], rtol=1e-5, atol=1e-6)
        assert layer.relative_error(w, layout="feature") <= TOLERANCE
        assert layer.relative_error(layout="feature") <= TOLERANCE  # matrix-free
        torch.testing.assert_close(layer.reconstruct(w, layout="feature")[0], layer.reconstruct()[0].double(),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layout"):
        a.relative_error(layout="Feature")


def _albert(layers, groups, inner):
    torch.manual_seed(0)
    model = transformers.AlbertModel(transformers.AlbertConfig(
        embedding_size=16, hidden_size=32, num_hidden_layers=layers, num_hidden_groups=groups, inner_group_num=inner,
        num_attention_heads=2, intermediate_size=64, vocab_size=100))
    model.set_attn_implementation("eager")
    with torch.no_grad():  # random-init biases are zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    return model.eval()


@pytest.mark.parametrize("layers,groups,inner", [(3, 1, 1), (4, 2, 2)], ids=["3x1-layer", "2-groups-of-2"])
def test_albert_gives_each_application_of_its_shared_layers(layers, groups, inner):
    # capture="qk" returned the first application of ALBERT's shared layer only (one layer for 3), while
    # capture="attn" refused the model; now both give one layer per application, the same W'
    model = _albert(layers, groups, inner)
    enc = _ids()
    with_qk = compare_captures(model, enc, None)
    count = layers * inner
    assert [layer.index for layer in with_qk] == list(range(count))
    depth_group = [int(depth / (layers / groups)) for depth in range(layers)]  # as ALBERT picks a group
    assert [layer.name for layer in with_qk] == [f"encoder.albert_layer_groups.{g}.albert_layers.{k}.attention"
                                                 for g in depth_group for k in range(inner)]
    assert [layer.application for layer in with_qk] == [depth_group[:d].count(g)
                                                       for d, g in enumerate(depth_group) for _ in range(inner)]
    with_attn = dk.models.attention_layers(model, **enc)
    for a, b in zip(with_attn, with_qk, strict=True):
        assert a.application == b.application
        torch.testing.assert_close(b.hvo_matrix(dtype=torch.float64), a.hvo_matrix(dtype=torch.float64),
                                   rtol=TOLERANCE, atol=TOLERANCE)
        assert a.relative_error() <= TOLERANCE and b.relative_error() <= TOLERANCE
    inputs = [layer.x for layer in with_attn]
    assert all(not torch.equal(x, inputs[0]) for x in inputs[1:])  # each application reads its own input
    last = compare_captures(model, enc, [-1])  # selected by depth; the pass stops after it
    assert (last[0].index, last[0].application) == (count - 1, with_qk[-1].application)


@pytest.mark.parametrize("padding", ["left", "right", None], ids=["left-padded", "right-padded", "unpadded"])
def test_causal_mask_of_a_module_not_marked_causal(padding):
    # BigBirdPegasus's decoder self-attention has is_causal=False and runs eager (no sdpa): its causality is only
    # in the 4-D mask the model builds; the q/k capture took the layer for bidirectional (relative error 0.8-0.9)
    torch.manual_seed(0)
    config = transformers.BigBirdPegasusConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64,
        attention_type="original_full")
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    enc = _ids(tokens=7, padded=padding is not None, side=padding or "right")
    dec = dict(decoder_input_ids=enc["input_ids"], decoder_attention_mask=enc["attention_mask"])
    (a,), (b,) = (dk.models.attention_layers(model, **enc, **dec, capture=c, layers=[-1]) for c in ("attn", "qk"))
    assert b.name == "decoder.layers.0.self_attn" and b.causal
    assert b.relative_error() <= TOLERANCE
    real = enc["attention_mask"].bool()[:, None, :, None]
    torch.testing.assert_close(b.attention() * real, a.attn * real, rtol=0, atol=TOLERANCE)
