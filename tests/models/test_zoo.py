"""models.load: what it refuses before any loading."""

from __future__ import annotations

import os

import pytest

from duat_kernels.models import load


@pytest.mark.parametrize("name,exc,message", [
    (5, TypeError, r"name_or_path must be a file path \(a str or os.PathLike\), got int 5"),  # pathlib's
    (None, TypeError, "name_or_path must be a file path .*got NoneType None"),  # "expected str, bytes or os.PathLike"
    # '' is Path('.'): the working directory was taken for a model folder ("model folder '' has no config.json")
    ("", ValueError, "the model name or path is empty"),
    ("  ", ValueError, "the model name or path is empty"),
])
def test_load_names_a_model_that_is_no_name_or_path(name, exc, message):
    with pytest.raises(exc, match=message):
        load(name)


@pytest.mark.parametrize("flag", ["no", None, 2])
def test_load_refuses_a_causal_lm_flag_that_is_no_bool(flag):
    # "no" was truthy: minilm came with a newly initialised language-model head, silently
    with pytest.raises(TypeError, match=f"causal_lm must be True or False, got {type(flag).__name__}"):
        load("minilm", causal_lm=flag)


def test_an_encoder_decoder_model_folder_loads_and_is_inspected(tmp_path, capsys):
    # a saved BERT2BERT (EncoderDecoderModel) failed in AutoModel: "Unrecognized configuration class
    # EncoderDecoderConfig for this kind of AutoModel: AutoModel. Model type should be one of ..." (10 kB)
    transformers = pytest.importorskip("transformers", reason="needs transformers: pip install '.[models]'")
    import torch

    from duat_kernels.cli import main
    from duat_kernels.models import attention_layers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat"]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path)
    bert = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=len(words))
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.BertConfig(**bert), transformers.BertConfig(**bert, is_decoder=True, add_cross_attention=True))
    config.decoder_start_token_id, config.pad_token_id = 2, 0
    torch.manual_seed(0)
    transformers.EncoderDecoderModel(config).save_pretrained(tmp_path)
    model, tokenizer = load(str(tmp_path))
    assert type(model).__name__ == "EncoderDecoderModel" and not model.training
    layers = attention_layers(model, **tokenizer(["the cat sat on the mat"], return_tensors="pt"))
    assert [layer.name for layer in layers] == ["encoder.encoder.layer.0.attention.self",
                                                "decoder.bert.encoder.layer.0.attention.self"]
    assert all(layer.relative_error() <= 1e-5 for layer in layers)
    assert main(["inspect", "--model", str(tmp_path), "--text", "the cat sat on the mat"]) == 0
    assert "cross-attention layers not inspected (1: decoder.bert.encoder.layer.0.crossattention.self)" in \
        capsys.readouterr().out


@pytest.mark.parametrize("transformers_on, hub_on", [(True, True), (True, False), (False, True), (False, False)])
def test_progress_bars_are_as_they_were_after_the_block(transformers_on, hub_on):
    """With transformers' bars off and huggingface_hub's on, the block (--no-progress) left huggingface_hub's off:
    transformers' disable_progress_bar turns both off, and only transformers' state was restored."""
    pytest.importorskip("transformers", reason="needs transformers: pip install '.[models]'")
    if hub_on and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS is set: huggingface_hub's bars cannot be turned on here")
    from huggingface_hub import utils as hub
    from transformers.utils import logging

    from duat_kernels.models.zoo import transformers_progress_bars

    was = logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    try:
        (logging.enable_progress_bar if transformers_on else logging.disable_progress_bar)()
        (hub.enable_progress_bars if hub_on else hub.disable_progress_bars)()
        with transformers_progress_bars(False):
            assert not logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
        assert (logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()) == (transformers_on, not hub_on)
    finally:
        (logging.enable_progress_bar if was[0] else logging.disable_progress_bar)()
        (hub.disable_progress_bars if was[1] else hub.enable_progress_bars)()


def test_no_progress_hides_the_gguf_conversion_bar_too():
    # transformers' GGUF loader runs a plain tqdm ("Converting and de-quantizing GGUF tensors..."): duat markov
    # --no-progress --model smollm2 showed it
    gguf = pytest.importorskip("transformers.modeling_gguf_pytorch_utils", reason="needs transformers with GGUF")
    from duat_kernels.models.zoo import transformers_progress_bars

    before = gguf.tqdm
    with transformers_progress_bars(False):
        assert gguf.tqdm(range(3), desc="x").disable
    assert gguf.tqdm is before
    with transformers_progress_bars(True):
        assert gguf.tqdm is before
