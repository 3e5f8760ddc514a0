"""Encoder-decoder models without decoder inputs: the decoder reads the text shifted right by the model's own
function (as given by hand, also with padding), and the cross-attention layers are named and left out."""

from __future__ import annotations

import warnings

import pytest
import torch

import duat_kernels as dk
from duat_kernels.models.encoder_decoder import cross_attention_blocks
from test_capture import Wrapper  # a plain module passing its keyword arguments on to the model it holds

transformers = pytest.importorskip("transformers", reason="the model tests need transformers: pip install '.[models]'")

TOLERANCE = 1e-5  # relative error of W' x' + b' against the module's own float32 output
START, PAD = 1, 0


def _bert2bert():
    """EncoderDecoderModel of two BERTs: the decoder's cross-attention is crossattention.self."""
    bert = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.BertConfig(**bert), transformers.BertConfig(**bert, is_decoder=True, add_cross_attention=True))
    config.decoder_start_token_id, config.pad_token_id = START, PAD
    return transformers.EncoderDecoderModel(config)


_BART_LIKE = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64, pad_token_id=PAD)
MODELS = {
    "t5": lambda: transformers.T5Model(transformers.T5Config(
        d_model=32, num_heads=2, d_kv=16, num_layers=1, d_ff=64, vocab_size=100, decoder_start_token_id=START,
        pad_token_id=PAD)),
    "bart": lambda: transformers.BartModel(transformers.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64,
        decoder_start_token_id=START, pad_token_id=PAD)),
    "bert2bert": _bert2bert,
    "marian": lambda: transformers.MarianModel(transformers.MarianConfig(
        **_BART_LIKE, decoder_attention_heads=2, decoder_start_token_id=START)),
    "mbart": lambda: transformers.MBartModel(transformers.MBartConfig(**_BART_LIKE, decoder_attention_heads=2)),
    "nllb_moe": lambda: transformers.NllbMoeModel(transformers.NllbMoeConfig(
        **_BART_LIKE, decoder_attention_heads=2, decoder_start_token_id=START, num_experts=2, expert_capacity=8)),
    "fsmt": lambda: transformers.FSMTModel(transformers.FSMTConfig(  # fairseq's tokens-first (N, B, M) attention
        langs=["en", "de"], src_vocab_size=100, tgt_vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=PAD, decoder_start_token_id=START)),
}
CROSS = {"t5": ["decoder.block.0.layer.1.EncDecAttention"], "bart": ["decoder.layers.0.encoder_attn"],
         "bert2bert": ["decoder.bert.encoder.layer.0.crossattention.self"], "marian": ["decoder.layers.0.encoder_attn"],
         "mbart": ["decoder.layers.0.encoder_attn"], "fsmt": ["decoder.layers.0.encoder_attn"],
         # its cross_attention was captured as a self-attention layer: exact only because decoder and encoder had N
         # tokens each, with capture='qk' off by 8% (taken for causal self-attention)
         "nllb_moe": ["decoder.layers.0.cross_attention"]}


def _model(family):
    torch.manual_seed(0)
    model = MODELS[family]()
    model.set_attn_implementation("eager")
    return model.eval()


def _padded_ids(tokens=7):
    ids = torch.randint(2, 100, (2, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, tokens, dtype=torch.long)
    mask[1, -2:] = 0  # right padding in the second sequence
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("family", sorted(MODELS))
def test_the_decoder_reads_the_text_shifted_right(family):
    # without decoder inputs T5 and BERT2BERT failed inside the forward pass ("You must specify exactly one of
    # input_ids or inputs_embeds"), Marian (and Pegasus) with "You cannot specify both decoder_input_ids and
    # decoder_inputs_embeds"; BART and mBART shifted by themselves but without a decoder mask; BERT2BERT's
    # crossattention.self was taken for a self-attention block; FSMT's decoder, given decoder_input_ids with its
    # config's use_cache=True, ran without its causal and padding masks
    model = _model(family)
    ids, mask = _padded_ids()
    # mBART has no start token: its last real token (the language code) goes first; FSMT's shift does the same
    last_first = family in ("mbart", "fsmt")
    first = ids.gather(1, mask.sum(1, keepdim=True) - 1) if last_first else torch.full_like(ids[:, :1], START)
    by_hand = dict(decoder_input_ids=torch.cat([first, ids[:, :-1]], dim=1),
                   decoder_attention_mask=torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1))
    layers = dk.models.attention_layers(model, input_ids=ids, attention_mask=mask)
    expected = dk.models.attention_layers(model, input_ids=ids, attention_mask=mask, **by_hand)
    assert [layer.name.split(".")[0] for layer in layers] == ["encoder", "decoder"]
    for layer, ref in zip(layers, expected, strict=True):
        assert layer.name == ref.name and layer.attn.shape == ref.attn.shape == (2, layer.num_heads, 7, 7)
        torch.testing.assert_close(layer.attn, ref.attn, rtol=0, atol=0)
        torch.testing.assert_close(layer.token_mask, ref.token_mask, rtol=0, atol=0)
        assert layer.relative_error(layer.hvo_matrix(dtype=torch.float64)) <= TOLERANCE, layer.name
    assert layers[1].num_heads == (4 if family in ("bart", "fsmt") else 2)  # the decoder's own head count
    assert bool((layers[1].attn.triu(1) == 0).all()), "the decoder's self-attention is causal"
    assert not bool((layers[0].attn[0].triu(1) == 0).all())  # the encoder's is not


@pytest.mark.parametrize("family", sorted(MODELS))
def test_cross_attention_blocks_are_named_and_left_out(family):
    model = _model(family)
    assert cross_attention_blocks(model) == CROSS[family]
    captured = {layer.name for layer in dk.models.attention_layers(model, input_ids=_padded_ids()[0])}
    assert not captured & set(CROSS[family])


def test_missing_start_token_is_one_clear_error():
    model = _bert2bert().eval()
    model.config.decoder_start_token_id = None
    with pytest.raises(ValueError, match="no decoder_start_token_id in its config.*pass decoder_input_ids"):
        dk.models.attention_layers(model, input_ids=_padded_ids()[0])


def _whisper():
    """A speech encoder-decoder: the encoder reads input_features (B, mel bins, 2·N_enc), there are no input_ids."""
    return transformers.WhisperModel(transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, num_mel_bins=8, max_source_positions=8,
        max_target_positions=16, pad_token_id=PAD, decoder_start_token_id=START, bos_token_id=START,
        eos_token_id=2))


@pytest.mark.parametrize("capture", ["attn", "qk"])
def test_no_input_ids_to_shift_is_one_clear_error(capture):
    # Whisper given input_features only failed inside its decoder with "You cannot specify both decoder_input_ids
    # and decoder_inputs_embeds at the same time" (neither was given)
    torch.manual_seed(0)
    model = _whisper().eval()
    features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError,
                       match=r"WhisperModel .*no input_ids.*\(got input_features\).*pass decoder_input_ids"):
        dk.models.attention_layers(model, input_features=features, capture=capture)
    decoder_ids = torch.tensor([[START, 5, 6], [START, 7, 8]])
    layers = dk.models.attention_layers(model, input_features=features, decoder_input_ids=decoder_ids, capture=capture)
    assert [(layer.name, layer.x.shape[1]) for layer in layers] == [("encoder.layers.0.self_attn", 8),
                                                                      ("decoder.layers.0.self_attn", 3)]
    for layer in layers:
        assert layer.relative_error() <= TOLERANCE, layer.name


@pytest.mark.parametrize("family", ["t5", "bart", "fsmt"])
def test_labels_are_the_decoder_inputs(family):
    # given labels (a target text), the models shift them into decoder_input_ids themselves; the capture added the
    # input text shifted right instead, so the decoder layers were captured on the wrong text (labels of another
    # length failed in the loss); FSMT shifts the input ids whatever the labels, and the capture left it so
    torch.manual_seed(0)
    model = {"t5": transformers.T5ForConditionalGeneration, "bart": transformers.BartForConditionalGeneration,
             "fsmt": transformers.FSMTForConditionalGeneration}[family](MODELS[family]().config).eval()
    model.set_attn_implementation("eager")
    ids, mask = _padded_ids()
    for tokens in (7, 5):
        labels = torch.randint(2, 100, (2, tokens), generator=torch.Generator().manual_seed(1))
        first = labels[:, -1:] if family == "fsmt" else torch.full_like(labels[:, :1], START)  # FSMT: the last first
        by_hand = torch.cat([first, labels[:, :-1]], dim=1)
        layers = dk.models.attention_layers(model, input_ids=ids, attention_mask=mask, labels=labels)
        expected = dk.models.attention_layers(model, input_ids=ids, attention_mask=mask, decoder_input_ids=by_hand)
        assert "decoder" in layers[1].name.split(".") and layers[1].x.shape[1] == tokens
        for layer, ref in zip(layers, expected, strict=True):
            assert layer.name == ref.name
            torch.testing.assert_close(layer.x, ref.x, rtol=0, atol=0)
            assert layer.relative_error() <= TOLERANCE, layer.name


@pytest.mark.parametrize("capture", ["attn", "qk"])
def test_cross_attention_under_an_unknown_name_is_refused(monkeypatch, capture):
    # a cross-attention block whose name the capture did not know (NLLB-MoE's cross_attention, before it was named)
    # passed for a self-attention layer whenever decoder and encoder had the same number of tokens
    from duat_kernels.models import architectures

    names = tuple(n for n in architectures.CROSS_ATTENTION_NAMES if n != "cross_attention")
    monkeypatch.setattr(architectures, "CROSS_ATTENTION_NAMES", names)
    model = _model("nllb_moe")
    ids, mask = _padded_ids()
    with pytest.raises(ValueError, match=r"decoder.layers.0.cross_attention was given the encoder's states.*"
                                         r"cross-attention.*layers="):
        dk.models.attention_layers(model, input_ids=ids, attention_mask=mask, capture=capture)
    layers = dk.models.attention_layers(model, input_ids=ids, attention_mask=mask, capture=capture, layers=[0, 1])
    assert [layer.name for layer in layers] == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn"]


def test_cross_attention_without_known_projections_is_named_as_cross_attention():
    # GPT-2's crossattention (fused c_attn, q_attn: no projections SHAPES knows) was named by
    # uncovered_attention_modules as self-attention the capture could not read, and attention_layers warned so
    from duat_kernels.models.encoder_decoder import uncovered_attention_modules

    encoder = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100)
    decoder = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, add_cross_attention=True,
                                      is_decoder=True)
    torch.manual_seed(0)
    model = transformers.EncoderDecoderModel(transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        encoder, decoder)).eval()
    assert cross_attention_blocks(model) == [f"decoder.transformer.h.{i}.crossattention" for i in (0, 1)]
    assert uncovered_attention_modules(model) == []
    ids = _padded_ids()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = dk.models.attention_layers(model, input_ids=ids, decoder_input_ids=ids)
    assert [layer.name for layer in layers] == ["encoder.encoder.layer.0.attention.self", "decoder.transformer.h.0.attn",
                                                "decoder.transformer.h.1.attn"]
    assert not [w for w in caught if "cannot read" in str(w.message)]


class _Names:
    """A stand-in tokenizer: token id i is called 't<i>'."""

    @staticmethod
    def convert_ids_to_tokens(ids):
        return [f"t{int(i)}" for i in ids]


@pytest.mark.parametrize("family", ["t5", "bart", "mbart", "fsmt"])
def test_the_note_names_what_decoder_token_0_is(family):
    # duat inspect's note said "decoder token 0 is the decoder start token" for every model; mBART's and FSMT's
    # shift_tokens_right put the text's last real token first (the language code, the end-of-sentence token)
    from duat_kernels.models.encoder_decoder import decoder_inputs_note

    model = _model(family)
    ids = _padded_ids()[0][:1]  # duat inspect: one sequence, no padding
    note = decoder_inputs_note(model, _Names, ids)
    if family in ("mbart", "fsmt"):
        assert f"decoder token 0 is 't{int(ids[0, -1])}', the text's last token" in note
        assert "decoder start token 't" not in note
    else:
        assert f"decoder token 0 is the decoder start token 't{START}'" in note
    assert note.startswith("encoder-decoder model: the decoder layers read the text shifted right")
    assert "token n the text's token n-1" in note
    assert decoder_inputs_note(transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)), _Names, ids) is None


class _Renaming(Wrapper):
    """A plain module whose forward calls the model it holds with arguments of other names, positionally (and
    decoder_input_ids as None)."""

    def forward(self, tokens, mask=None):
        return self.inner(tokens, mask, None)


@pytest.mark.parametrize("family,wrapper", [("t5", Wrapper), ("bart", Wrapper), ("fsmt", Wrapper),
                                            ("t5", _Renaming)])
def test_a_wrapped_encoder_decoder_model_gets_the_same_decoder_inputs(family, wrapper):
    # inside a plain module, T5 failed with "You must specify exactly one of input_ids or inputs_embeds", FSMT with
    # "returned no (B, h, N, N) attention probabilities", and BART's decoder ran without the shifted decoder mask
    # (its layer's token mask was the encoder's, one token off)
    model = _model(family)
    ids, mask = _padded_ids()
    expected = dk.models.attention_layers(model, input_ids=ids, attention_mask=mask)
    given = dict(tokens=ids, mask=mask) if wrapper is _Renaming else dict(input_ids=ids, attention_mask=mask)
    layers = dk.models.attention_layers(wrapper(model), **given)
    assert [layer.name for layer in layers] == [f"inner.{ref.name}" for ref in expected]
    for layer, ref in zip(layers, expected, strict=True):
        assert layer.num_heads == ref.num_heads
        torch.testing.assert_close(layer.attn, ref.attn, rtol=0, atol=0)
        torch.testing.assert_close(layer.token_mask, ref.token_mask, rtol=0, atol=0)
        assert layer.relative_error() <= TOLERANCE, layer.name


def test_a_wrapped_encoder_decoder_model_without_input_ids_is_one_clear_error():
    model = _model("t5")
    embeds = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"T5Model .*no input_ids.*pass decoder_input_ids.*inside Wrapper"):
        dk.models.attention_layers(Wrapper(model), inputs_embeds=embeds)
    layers = dk.models.attention_layers(Wrapper(model), inputs_embeds=embeds, decoder_input_ids=_padded_ids()[0])
    assert all(layer.relative_error() <= TOLERANCE for layer in layers)
