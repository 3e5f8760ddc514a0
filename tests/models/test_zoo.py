"""models.load: what it refuses before any loading."""

from __future__ import annotations

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
