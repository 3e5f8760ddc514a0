"""Every adapter reproduces each layer's own attention output as W' x' + b' (dense W', and the
matrix-free operator): random-init GPT-2, BERT, RoBERTa, Llama, Mistral, Qwen2 through the real
transformers module code, torch.nn.MultiheadAttention, and sdpa/eager handling."""

from __future__ import annotations

import math
import warnings

import numpy as np
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


def _ids(vocab, batch=2, tokens=9, seed=0, side="left"):
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    if side == "left":  # padding in the second sequence (its padded query rows are left out of the error)
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    return dict(input_ids=ids, attention_mask=mask)


_SMALL = dict(num_hidden_layers=2, vocab_size=100)
_DECODER = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, **_SMALL)
_GQA = dict(_DECODER, num_key_value_heads=2)

# Tiny random-init configs of every family (2 layers, width 32-48); the real transformers module code runs.
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
    "opt": lambda: transformers.OPTConfig(hidden_size=32, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                                          **_SMALL),
    "phi": lambda: transformers.PhiConfig(**_DECODER),
    "phi3": lambda: transformers.Phi3Config(**_GQA, pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "gemma": lambda: transformers.GemmaConfig(**_GQA, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**_GQA, head_dim=8, sliding_window=4),  # + logit soft-capping
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**_GQA, head_dim=8, sliding_window=4,
                                                         layer_types=["sliding_attention", "full_attention"]),
    "qwen3": lambda: transformers.Qwen3Config(**_GQA, head_dim=8),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_DECODER, attention_bias=True),
    "falcon": lambda: transformers.FalconConfig(hidden_size=32, num_attention_heads=4, bias=True, **_SMALL),
    "falcon-gqa": lambda: transformers.FalconConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2, bias=True,
                                                    new_decoder_architecture=True, **_SMALL),
    "falcon-mha": lambda: transformers.FalconConfig(hidden_size=32, num_attention_heads=4, multi_query=False,
                                                    bias=True, **_SMALL),
    "gptj": lambda: transformers.GPTJConfig(n_embd=32, n_head=4, n_layer=2, rotary_dim=4, vocab_size=100,
                                            bos_token_id=1, eos_token_id=1),
    "distilbert": lambda: transformers.DistilBertConfig(dim=32, n_heads=4, n_layers=2, hidden_dim=64, vocab_size=100),
    "electra": lambda: transformers.ElectraConfig(hidden_size=32, embedding_size=32, num_attention_heads=4,
                                                  intermediate_size=64, **_SMALL),
    "deberta_v2": lambda: transformers.DebertaV2Config(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                                       relative_attention=True, pos_att_type=["p2c", "c2p"], **_SMALL),
    "bloom": lambda: transformers.BloomConfig(hidden_size=32, n_head=4, n_layer=2, vocab_size=100),
    "olmo2": lambda: transformers.Olmo2Config(**_DECODER, pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "starcoder2": lambda: transformers.Starcoder2Config(**_GQA, use_bias=True),
    "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(n_embd=32, n_head=4, n_layer=2, vocab_size=100),
    "mixtral": lambda: transformers.MixtralConfig(**_GQA, num_local_experts=2, num_experts_per_tok=1),
    "gpt_oss": lambda: transformers.GptOssConfig(**_GQA, head_dim=8, num_local_experts=2, num_experts_per_tok=1),
    "persimmon": lambda: transformers.PersimmonConfig(**_DECODER),
    "mpt": lambda: transformers.MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=100),
    "codegen": lambda: transformers.CodeGenConfig(n_embd=32, n_head=4, n_layer=2, vocab_size=100, rotary_dim=4,
                                                  bos_token_id=1, eos_token_id=1),
    "modernbert": lambda: transformers.ModernBertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                                        pad_token_id=0, bos_token_id=1, eos_token_id=1, cls_token_id=1,
                                                        sep_token_id=1, **_SMALL),
    "bart": lambda: transformers.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                            vocab_size=100),
    "t5": lambda: transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100),
    "fsmt": lambda: transformers.FSMTConfig(  # fairseq's tokens-first (N, B, M) attention; vocab_size is the target's
        langs=["en", "de"], src_vocab_size=100, tgt_vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=32),
    "gpt_neo": lambda: transformers.GPTNeoConfig(hidden_size=32, num_heads=4, num_layers=2, vocab_size=100,
                                                 attention_types=[[["global", "local"], 1]], window_size=4),
    "cohere": lambda: transformers.CohereConfig(**_GQA),
    "mobilebert": lambda: transformers.MobileBertConfig(hidden_size=32, embedding_size=16, intra_bottleneck_size=32,
                                                        true_hidden_size=32, num_attention_heads=4,
                                                        intermediate_size=64, **_SMALL),
    "siglip_vision_model": lambda: transformers.SiglipVisionConfig(hidden_size=32, num_attention_heads=4,
                                                                   intermediate_size=64, num_hidden_layers=2,
                                                                   image_size=16, patch_size=4),
    "vit": lambda: transformers.ViTConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                          num_hidden_layers=2, image_size=16, patch_size=4),
}


def _random_model(family):
    torch.manual_seed(0)
    config = CONFIGS[family]()
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random-init biases are zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    return config, model


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_random_init_models_are_exact(family):
    config, model = _random_model(family)
    vision = family in ("vit", "siglip_vision_model")
    inputs = dict(pixel_values=torch.randn(2, 3, 16, 16)) if vision else _ids(config.vocab_size)
    count = config.num_hidden_layers
    if config.is_encoder_decoder:  # encoder and decoder self-attention (cross-attention is skipped)
        decoder = _ids(config.vocab_size, tokens=6, seed=1)
        inputs.update(decoder_input_ids=decoder["input_ids"], decoder_attention_mask=decoder["attention_mask"])
        count += config.num_decoder_layers if family == "t5" else config.decoder_layers
    layers = dk.models.attention_layers(model, **inputs)
    _assert_exact(layers, count)
    if config.is_encoder_decoder:
        assert [layer.attn.shape[-1] for layer in layers] == [9] * (count // 2) + [6] * (count // 2)
        assert all(layer.token_mask is not None for layer in layers)
    layer = layers[0]
    assert layer.attn.shape[:2] == (2, config.num_attention_heads)
    assert layer.num_heads == config.num_attention_heads
    if family in ("mistral", "falcon", "gpt_bigcode"):
        assert layer.num_kv_heads == 1  # multi-query
    elif not vision:
        expected_kv = 2 if family == "falcon-gqa" else getattr(config, "num_key_value_heads", None)
        assert layer.num_kv_heads == (expected_kv or config.num_attention_heads)
    if family in ("qwen2", "gpt_neox", "bloom", "falcon-mha", "starcoder2"):
        assert layer.b_v is not None and layer.b_v.abs().sum() > 0  # the value bias is used


@pytest.mark.parametrize("family", ["gpt2", "bloom", "falcon", "deberta_v2", "gemma2"])
def test_right_padding(family):
    config, model = _random_model(family)
    _assert_exact(dk.models.attention_layers(model, **_ids(config.vocab_size, side="right")), config.num_hidden_layers)


def test_value_split_of_interleaved_qkv_is_checked():
    """Reading GPT-NeoX's fused projection as [q | k | v] (the wrong split) must not reproduce it."""
    config, model = _random_model("gpt_neox")
    right = dk.models.attention_layers(model, **_ids(100))[0]
    saved = dk.models.ARCHITECTURES["gpt_neox"]
    try:
        dk.models.register_architecture("gpt_neox", "query_key_value", "dense",
                                        value_weights=dk.models.architectures.packed_value)
        wrong = dk.models.attention_layers(model, **_ids(100))[0]
    finally:
        dk.models.ARCHITECTURES["gpt_neox"] = saved
    assert right.relative_error() <= TOLERANCE < wrong.relative_error()


def test_layer_selection_keeps_only_what_is_asked():
    config = CONFIGS["llama"]()
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    layers = dk.models.attention_layers(model, layers=[-1], **_ids(100))
    assert [layer.index for layer in layers] == [1]
    with pytest.raises(IndexError, match="layer 5 is out of range: the model has 2 attention layers"):
        dk.models.attention_layers(model, layers=[5], **_ids(100))
    layers = dk.models.attention_layers(model, layers=(np.int64(0),), **_ids(100))
    assert [layer.index for layer in layers] == [0] and type(layers[0].index) is int
    for capture in ("attn", "qk"):  # a bare int, floats, bools, strings: refused before the model runs
        for bad in (0, [1.0], [True], ["0"], torch.tensor([0])):
            with pytest.raises(TypeError, match="layers must be a list of int layer indices"):
                dk.models.attention_layers(model, layers=bad, capture=capture, **_ids(100))


def test_sdpa_models_are_switched_or_refused():
    config = CONFIGS["bert"]()
    model = transformers.AutoModel.from_config(config, attn_implementation="sdpa").eval()
    with pytest.raises(RuntimeError, match="attn_implementation='sdpa'.*load it with attn_implementation='eager'"):
        dk.models.attention_layers(model, switch_to_eager=False, **_ids(100))
    layers = dk.models.attention_layers(model, **_ids(100))
    _assert_exact(layers, 2)
    assert model.config._attn_implementation == "sdpa"  # restored
    with pytest.raises(TypeError, match="switch_to_eager must be True or False, got str 'no'"):  # was truthy
        dk.models.attention_layers(model, switch_to_eager="no", **_ids(100))


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


class OddAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wv, self.wo = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        attn = torch.softmax(x @ x.transpose(-1, -2), -1)
        return self.wo(attn @ self.wv(x)), attn.unsqueeze(1)


class OddModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.config.model_type = "odd"
        self.attn = OddAttention()

    def forward(self, x):
        return self.attn(x)[0]


def test_unknown_family_names_what_was_found_and_can_be_registered():
    model, x = OddModel(), torch.randn(2, 5, 8)
    expected = r"model_type='odd'.*found attn \(OddAttention: wv, wo\).*register_architecture"
    with pytest.raises(ValueError, match=expected):
        dk.models.attention_layers(model, x)
    try:
        dk.models.register_architecture("odd", "wv", "wo")
        _assert_exact(dk.models.attention_layers(model, x), 1)
    finally:
        del dk.models.ARCHITECTURES["odd"]
    with pytest.raises(TypeError, match="value_weights must be a callable"):
        dk.models.register_architecture("odd", "wv", "wo", value_weights=3)


def test_albert_gives_one_layer_per_application_of_its_shared_layer():
    # was refused ("called more than once in one forward pass"): ALBERT runs one layer num_hidden_layers times
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(transformers.AlbertConfig(
        embedding_size=16, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3,
        vocab_size=100), attn_implementation="eager").eval()
    layers = dk.models.attention_layers(model, **_ids(100))
    _assert_exact(layers, 3)
    assert [(layer.index, layer.application) for layer in layers] == [(0, 0), (1, 1), (2, 2)]
    assert "application=1, batch=2" in repr(layers[1])
    selected = dk.models.attention_layers(model, layers=[-1, 1], **_ids(100))
    assert [(layer.index, layer.application) for layer in selected] == [(1, 1), (2, 2)]
    for layer, ref in zip(selected, layers[1:]):
        torch.testing.assert_close(layer.attn, ref.attn, rtol=0, atol=0)


class SharedTwice(torch.nn.Module):
    """One nn.MultiheadAttention applied at two depths, in a model the capture knows nothing about."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        x = x + self.attn(x, x, x)[0]
        return x + self.attn(x, x, x)[0]


def test_unknown_layers_shared_across_depth_are_refused():
    with pytest.raises(ValueError, match="attn was called more than once in one forward pass .2 times"):
        dk.models.attention_layers(SharedTwice().eval(), torch.randn(1, 5, 16))


def test_attention_layer_repr_shows_shapes():
    config, model = _random_model("llama")
    text = repr(dk.models.attention_layers(model, **_ids(100))[0])
    assert text.startswith("AttentionLayer(index=0, name='layers.0.self_attn', batch=2, tokens=9, heads=6, kv_heads=2")
    assert "tensor(" not in text and len(text) < 300


def test_relative_error_names_a_dense_w_of_the_wrong_shape():
    config, model = _random_model("llama")
    layer = dk.models.attention_layers(model, layers=[0], **_ids(100))[0]
    for bad in (torch.zeros(3, 3), layer.hvo_matrix()[0], layer.hvo_matrix()[:, :-1]):
        with pytest.raises(ValueError, match=r"w must be this layer's dense token-layout W' of shape .*\(2, 432, 432\)"):
            layer.relative_error(bad)


@pytest.mark.parametrize("capture", ["attn", "qk"])
@pytest.mark.parametrize("positional", [False, True])
def test_sequences_without_tokens_are_refused_by_name(capture, positional):
    # transformers failed inside the forward pass: "cannot reshape tensor of 0 elements into shape ..."
    config, model = _random_model("llama")
    ids = torch.zeros(1, 0, dtype=torch.long)
    args, kwargs = ((ids,), {}) if positional else ((), {"input_ids": ids})
    with pytest.raises(ValueError, match=r"input_ids of shape \(1, 0\) holds no tokens"):
        dk.models.attention_layers(model, *args, capture=capture, **kwargs)
    # an empty batch failed the same way ('cannot reshape tensor of 0 elements into shape [0, 9, -1, 8]')
    ids = torch.zeros(0, 9, dtype=torch.long)
    args, kwargs = ((ids,), {}) if positional else ((), {"input_ids": ids})
    with pytest.raises(ValueError, match=r"input_ids of shape \(0, 9\) holds no sequences"):
        dk.models.attention_layers(model, *args, capture=capture, **kwargs)


def test_layer_hvo_matrix_names_the_arguments_the_layer_fixes():
    # "hvo_matrix() got multiple values for keyword argument 'num_kv_heads'"
    config, model = _random_model("llama")
    layer = dk.models.attention_layers(model, layers=[0], **_ids(100))[0]
    with pytest.raises(TypeError, match=r"AttentionLayer.hvo_matrix takes its own num_kv_heads \(num_kv_heads="):
        layer.hvo_matrix(num_kv_heads=1)


def test_relative_error_of_an_all_padding_batch_is_refused():
    # every query row padded: 0 / 0 gave NaN
    config, model = _random_model("llama")
    inputs = _ids(100, batch=2, tokens=4)
    inputs["attention_mask"] = torch.zeros_like(inputs["attention_mask"])
    layer = dk.models.attention_layers(model, layers=[0], **inputs)[0]
    with pytest.raises(ValueError, match="every query token of this batch is padding"):
        layer.relative_error()


@pytest.mark.parametrize("capture", ["attn", "qk"])
@pytest.mark.parametrize("key", ["past_key_values", "cache"])
def test_cached_keys_are_refused_by_name(capture, key):
    # with a filled cache the layer attends to keys whose x it never sees: capture='attn' failed with
    # 'returned no attention probabilities (attn_implementation='eager'); load the model with eager', and
    # capture='qk' returned layers whose operator() failed on q (2, 6, 4, 8) against k (2, 2, 9, 8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()
    ids = _ids(100)["input_ids"]
    with torch.no_grad():
        cache = model(ids[:, :5], use_cache=True).past_key_values
    with pytest.raises(ValueError, match=rf"{key} holds 5 cached tokens.*whole sequence"):
        dk.models.attention_layers(model, input_ids=ids[:, 5:], capture=capture, **{key: cache})
    empty = transformers.DynamicCache(config=model.config)  # an empty cache is no cached key
    layers = dk.models.attention_layers(model, input_ids=ids, capture=capture, use_cache=True, **{key: empty})
    assert all(layer.relative_error() <= TOLERANCE for layer in layers)


class DecoderLayer(torch.nn.Module):
    """torch.nn.TransformerDecoderLayer: self-attention (layer 0), then cross-attention over memory (include_cross)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.TransformerDecoderLayer(16, 4, 32, batch_first=True, dropout=0.0)

    def forward(self, x, memory):
        return self.layer(x, memory)


@pytest.mark.parametrize("extra", [dict(add_bias_kv=True), dict(add_zero_attn=True)])
def test_attention_over_other_keys_is_refused_at_capture(extra):
    # A over keys that are not the tokens x (an extra bias/zero key, or cross-attention over a memory of another
    # length) was returned, and failed only at use: operator()/relative_error() raised 'attn must have shape
    # (h, N, N) or (B, h, N, N) with h, N >= 1, got (2, 4, 5, 6)'
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True, **extra).eval()
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"attention probabilities of shape \(2, 4, 5, 6\) are not N x N over the 5 "
                                         r"tokens.*layers="):
        dk.models.attention_layers(mha, x, x, x)
    model = DecoderLayer().eval()
    memory = torch.randn(2, 7, 16)
    # its multihead_attn is cross-attention over the memory: left out, as a Hugging Face model's (include_cross=True
    # captures it: tests/models/test_cross_capture.py)
    layers = dk.models.attention_layers(model, x, memory)
    assert [l.name for l in layers] == ["layer.self_attn"]
    _assert_exact(layers, 1)


def test_tokens_first_layout_is_declared(monkeypatch):
    # FSMT's (fairseq's) attention reads x as (N, B, M): it was refused ("only batch-first (B, N, M) layers are
    # supported"); its layout is now declared, and an undeclared one is refused with the way to declare it
    config, model = _random_model("fsmt")
    inputs = _ids(config.vocab_size, tokens=7)
    layers = dk.models.attention_layers(model, **inputs)
    _assert_exact(layers, 4)
    x = layers[0].x
    with torch.no_grad():
        embeddings = model.encoder.embed_tokens(inputs["input_ids"]) * model.encoder.embed_scale
        positions = model.encoder.embed_positions(inputs["input_ids"])
    torch.testing.assert_close(x, embeddings + positions, rtol=0, atol=0)  # (B, N, M): the first layer's input
    monkeypatch.delitem(dk.models.ARCHITECTURES, "fsmt")
    with pytest.raises(ValueError, match=r"encoder.layers.0.self_attn: its value projection reads x of shape "
                                         r"\(7, 2, 32\), tokens first.*register_architecture\(.*tokens_first=True"):
        dk.models.attention_layers(model, **inputs)
    dk.models.register_architecture("fsmt", "v_proj", "out_proj", tokens_first=True)
    _assert_exact(dk.models.attention_layers(model, **inputs), 4)
    with pytest.raises(TypeError, match="tokens_first must be a bool, got 'yes'"):
        dk.models.register_architecture("fsmt", "v_proj", "out_proj", tokens_first="yes")


def test_local_attention_is_named_as_such():
    # LongT5's encoder attends over local blocks ((B, 1, blocks, block, 3 block) probabilities): the error was a
    # RuntimeError (a traceback in duat inspect) telling to load the eager attention the model already ran
    torch.manual_seed(0)
    model = transformers.LongT5Model(transformers.LongT5Config(
        d_model=16, num_heads=2, d_kv=8, num_layers=1, d_ff=32, vocab_size=100, decoder_start_token_id=0,
        pad_token_id=0, local_radius=2)).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"encoder.block.0.layer.0.LocalSelfAttention runs eager attention but "
                                         r"returned no \(B, h, N, N\) attention probabilities.*local blocks"):
        dk.models.attention_layers(model, input_ids=ids)
    (layer,) = dk.models.attention_layers(model, input_ids=ids, layers=[-1])  # the decoder's full self-attention
    assert layer.name == "decoder.block.0.layer.0.SelfAttention" and layer.relative_error() <= 1e-5


def _bert_to_gpt2():
    """EncoderDecoderModel: a BERT encoder and a GPT-2 decoder (fused c_attn, cross-attention)."""
    encoder = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=100)
    decoder = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, add_cross_attention=True,
                                      is_decoder=True, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    return transformers.EncoderDecoderModel(config).eval()


@pytest.mark.parametrize("capture", ["attn", "qk"])
def test_sub_models_of_a_composite_model_keep_their_own_family(capture):
    # the fused families (ARCHITECTURES) were looked up by the top model_type ('encoder-decoder') only, so the
    # GPT-2 decoder's self-attention layers were silently missing: one layer (the BERT encoder's) instead of 3
    model = _bert_to_gpt2()
    enc = _ids(100)
    layers = dk.models.attention_layers(model, capture=capture, input_ids=enc["input_ids"],
                                        attention_mask=enc["attention_mask"], decoder_input_ids=enc["input_ids"][:, :5])
    assert [layer.name for layer in layers] == ["encoder.encoder.layer.0.attention.self", "decoder.transformer.h.0.attn",
                                                "decoder.transformer.h.1.attn"]
    for layer in layers:
        assert layer.relative_error() <= TOLERANCE, layer.name


@pytest.mark.parametrize("capture", ["attn", "qk"])
def test_each_sub_model_gets_its_own_attention_implementation_back(capture):
    # the capture switched the model to eager (attn) or sdpa (qk) and back with the top config's one string:
    # an encoder set to eager beside an sdpa decoder came back as sdpa
    model = _bert_to_gpt2()
    model.set_attn_implementation({"encoder": "eager", "decoder": "sdpa"})
    before = [(m.config._attn_implementation, m.config.output_attentions) for m in (model, model.encoder, model.decoder)]
    assert [b[0] for b in before] == ["sdpa", "eager", "sdpa"]
    enc = _ids(100)
    dk.models.attention_layers(model, capture=capture, input_ids=enc["input_ids"], decoder_input_ids=enc["input_ids"])
    assert [(m.config._attn_implementation, m.config.output_attentions)
            for m in (model, model.encoder, model.decoder)] == before


class Wrapper(torch.nn.Module):
    """A plain module holding a Hugging Face model (no config, no set_attn_implementation of its own)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        return self.inner(**inputs)


def test_a_model_inside_a_plain_module_is_captured_and_restored():
    # failed with "'Wrapper' object has no attribute 'config'" (the weights' split read the top config) and,
    # once that was found, "'Wrapper' object has no attribute 'set_attn_implementation'"
    torch.manual_seed(0)
    wrapper = Wrapper(transformers.AutoModel.from_config(CONFIGS["llama"](), attn_implementation="sdpa")).eval()
    _assert_exact(dk.models.attention_layers(wrapper, **_ids(100)), 2)
    assert wrapper.inner.config._attn_implementation == "sdpa"


UNREADABLE_ENCODER = {  # encoder self-attention whose value and output projections are not where the capture looks
    "led": lambda: transformers.LEDConfig(  # Longformer attention
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_encoder_position_embeddings=64,
        max_decoder_position_embeddings=64, attention_window=4, pad_token_id=0, decoder_start_token_id=1),
    "bigbird_pegasus": lambda: transformers.BigBirdPegasusConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64,
        attention_type="original_full", pad_token_id=0, decoder_start_token_id=1),
}


@pytest.mark.parametrize("family", sorted(UNREADABLE_ENCODER))
def test_self_attention_the_capture_cannot_read_is_warned_about(family):
    # LED's and BigBirdPegasus's encoder attention was left out without a word: only the decoder's layer came back
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(UNREADABLE_ENCODER[family]()).eval()
    with pytest.warns(UserWarning, match=r"cannot read \(1: encoder\.layers\.0\.self_attn\)"):
        layers = dk.models.attention_layers(model, input_ids=_ids(100, tokens=6)["input_ids"][:1])
    _assert_exact(layers, 1)
    assert [layer.name for layer in layers] == ["decoder.layers.0.self_attn"]


def test_an_encoder_decoder_read_in_full_is_not_warned_about():
    _, model = _random_model("bart")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = dk.models.attention_layers(model, input_ids=_ids(100, tokens=6)["input_ids"][:1])
    assert [layer.name.split(".")[0] for layer in layers] == ["encoder"] * 2 + ["decoder"] * 2
    assert not [w for w in caught if "cannot read" in str(w.message)]


def test_relative_error_of_an_exactly_zero_output():
    # An output of exact zeros (a text of zero-embedding tokens) reproduced exactly was 0 / 0 = NaN, and
    # duat inspect reported the layer FAILED; a nonzero reconstruction of it is infinitely wrong, NaN stays NaN.
    from duat_kernels.models.capture import masked_relative_error

    zeros = torch.zeros(1, 3, 4)
    assert masked_relative_error(zeros, zeros, None) == 0.0
    assert masked_relative_error(zeros + 1e-30, zeros, None) == float("inf")
    assert math.isnan(masked_relative_error(zeros + float("nan"), zeros, torch.ones(1, 3, dtype=torch.bool)))
