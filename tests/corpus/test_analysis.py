"""CorpusSettings: checked once, when made, not per text inside the run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from duat_kernels.corpus import CorpusSettings


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(grid=0), ValueError, "grid must be a positive int, got 0"),
    (dict(threads=0), ValueError, "threads must be a positive int, got 0"),
    (dict(threads=True), ValueError, "threads must be a positive int, got True"),
    (dict(threads=100000), ValueError, "threads must be at most"),  # crashed every worker in libgomp
    (dict(layers=0), TypeError, "layers must be None or a sequence of layer indices"),
    (dict(layers="01"), TypeError, "layers must be None or a sequence of layer indices"),
    (dict(layers=(0, 1.0)), TypeError, "layers must be None or a sequence of layer indices"),
], ids=["grid", "threads", "threads-bool", "threads-huge", "layers-int", "layers-str", "layers-float"])
def test_bad_settings_are_refused_when_made(kwargs, error, message):
    # They were accepted, recorded in run.json, and then failed for every text alike (grid=0: "grid must
    # be two ints in [1, N=5]", threads=0: torch's "set_num_threads expects a positive integer")
    # or crashed the run (layers=0: "'int' object is not iterable")
    with pytest.raises(error, match=message):
        CorpusSettings(model="minilm", **kwargs)


def test_numpy_and_list_layers_are_normalised():
    # layers=(np.int64(0),) crashed run_corpus with "Object of type int64 is not JSON serializable"
    # when it recorded the settings; a list made the frozen settings unhashable
    settings = CorpusSettings(model="minilm", layers=[np.int64(0), -1], grid=np.int32(8))
    assert settings.layers == (0, -1) and settings.grid == 8 and type(settings.grid) is int
    assert json.loads(json.dumps(settings.to_json())) == {"model": "minilm", "layers": [0, -1], "grid": 8, "threads": 1}
    assert hash(settings) == hash(CorpusSettings(model="minilm", layers=(0, -1), grid=8))


def test_decoder_rows_name_the_tokens_the_decoder_reads(tmp_path):
    # BART's decoder layer was stored with the input's tokens, one position off what it reads (the text shifted
    # right: decoder token 0 is the start token)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", reason="needs transformers: pip install '.[models]'")
    from duat_kernels.corpus import analysis

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat"]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path)
    torch.manual_seed(0)
    transformers.BartModel(transformers.BartConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=len(vocab), max_position_embeddings=32, pad_token_id=0,
        decoder_start_token_id=2)).save_pretrained(tmp_path)
    rows = analysis.analyse_text(CorpusSettings(model=str(tmp_path)), 0, "a", "the cat sat on the mat")
    tokens = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]
    assert [(row["layer"], row["tokens"]) for row in rows] == [(0, tokens), (1, ["[CLS]", *tokens[:-1]])]
    assert all(row["rel_error"] <= 1e-5 for row in rows)
