"""Cross-attention layers of encoder-decoder models captured with include_cross=True: A (B, h, N_dec, N_enc) over a
padded encoder, x' the encoder's output that feeds the value projection, and W' x' + b' reproducing the layer's own
output; the self-attention layers unchanged, and `duat inspect --cross`."""

from __future__ import annotations

import json

import pytest
import torch

import duat_kernels as dk
from duat_kernels.cli import main
from test_encoder_decoder import _BART_LIKE, CROSS, MODELS, PAD, START
from test_inspect_cli import _encoder_decoder_folder, _html_data, _save_tokenizer, _text

transformers = pytest.importorskip("transformers", reason="the model tests need transformers: pip install '.[models]'")

TOLERANCE = 1e-5  # relative error of W' x' + b' against the module's own float32 output
FAMILIES = {**{k: MODELS[k] for k in ("t5", "bart", "marian", "mbart", "fsmt", "bert2bert")},
            "pegasus": lambda: transformers.PegasusModel(transformers.PegasusConfig(
                **_BART_LIKE, decoder_attention_heads=2, decoder_start_token_id=START))}
CROSS = {**CROSS, "pegasus": ["decoder.layers.0.encoder_attn"]}
N_ENC, N_DEC = 9, 4


def _model(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    model.set_attn_implementation("eager")
    return model.eval()


def _inputs():
    """A padded batch of 2: the second text ends in 4 padding tokens, the first decoder sequence in 1."""
    g = torch.Generator().manual_seed(0)
    ids, dec = torch.randint(2, 100, (2, N_ENC), generator=g), torch.randint(2, 100, (2, N_DEC), generator=g)
    mask, dec_mask = torch.ones(2, N_ENC, dtype=torch.long), torch.ones(2, N_DEC, dtype=torch.long)
    mask[1, -4:] = 0
    dec_mask[0, -1] = 0
    return dict(input_ids=ids.masked_fill(mask == 0, PAD), attention_mask=mask, decoder_input_ids=dec,
                decoder_attention_mask=dec_mask)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cross_attention_reproduces_the_layer_over_a_padded_encoder(family):
    model, inputs = _model(family), _inputs()
    self_only = dk.models.attention_layers(model, **inputs)
    layers = dk.models.attention_layers(model, **inputs, include_cross=True)
    # the self-attention layers first, as without the option (names, indices, values); then the cross-attention
    head = layers[:len(self_only)]
    assert [(l.index, l.name, l.kind) for l in head] == [(l.index, l.name, "self") for l in self_only]
    for mine, theirs in zip(layers, self_only):
        torch.testing.assert_close(mine.attn, theirs.attn, rtol=0, atol=0)
    cross = layers[len(self_only):]
    assert [l.name for l in cross] == CROSS[family] and {l.kind for l in cross} == {"cross"}
    assert [l.index for l in cross] == list(range(len(self_only), len(layers)))
    assert dk.models.capture.attention_layer_names(model, include_cross=True) == [l.name for l in layers]
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model.encoder
    with torch.no_grad():
        states = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    for layer in cross:
        h, m = layer.num_heads, layer.w_v.shape[1]
        assert layer.attn.shape == (2, h, N_DEC, N_ENC)
        assert bool((layer.attn[1, :, :, -4:] == 0).all()), "the padded encoder tokens are attended by no one"
        torch.testing.assert_close(layer.x, states, rtol=0, atol=0)  # T5: after the encoder's final layer norm
        torch.testing.assert_close(layer.token_mask, inputs["decoder_attention_mask"].bool())
        w = layer.hvo_matrix(dtype=torch.float64)
        assert w.shape == (2, N_DEC * layer.w_o.shape[0], N_ENC * m)
        assert layer.relative_error(w) <= TOLERANCE, (layer.name, layer.relative_error(w))
        assert layer.relative_error() <= TOLERANCE  # matrix-free
        feature = layer.hvo_matrix(dtype=torch.float64, layout="feature")
        assert layer.relative_error(feature, layout="feature") <= TOLERANCE
        assert "kind='cross', keys=9" in repr(layer)
    picked = dk.models.attention_layers(model, **inputs, include_cross=True, layers=[-1])
    assert [l.name for l in picked] == CROSS[family][-1:]
    torch.testing.assert_close(picked[0].attn, cross[-1].attn, rtol=0, atol=0)


def test_a_wrong_dense_w_and_the_options_are_refused_clearly():
    model, inputs = _model("bart"), _inputs()
    layer = dk.models.attention_layers(model, **inputs, include_cross=True, layers=[-1])[0]
    with pytest.raises(ValueError, match=r"W' of shape \(B, N·M_out, N_k·M_in\) = \(2, 128, 288\)"):
        layer.relative_error(torch.zeros(2, 128, 128))
    with pytest.raises(TypeError, match="include_cross must be True or False, got str 'yes'"):
        dk.models.attention_layers(model, **inputs, include_cross="yes")


def test_duat_inspect_cross(tmp_path, capsys):
    folder = _encoder_decoder_folder(tmp_path / "bart", "bart")
    out = tmp_path / "r.json"
    assert main(["inspect", "--model", str(folder), "--text", _text(6), "--cross", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cross-attention layers not inspected" not in printed
    assert "cross-attention layers: N is N_dec x N_enc" in printed
    result = json.loads(out.read_text())
    assert result["passed"] and result["skipped_cross_attention"] == []
    assert [(e["name"], e.get("kind")) for e in result["layers"]] == [
        ("encoder.layers.0.self_attn", None), ("decoder.layers.0.self_attn", None),
        ("decoder.layers.0.encoder_attn", "cross")]
    entry = result["layers"][2]
    assert entry["keys"] == entry["tokens"] and entry["rel_error"] <= TOLERANCE and entry["heads"] == 4
    assert main(["inspect", "--model", str(folder), "--text", _text(6), "--cross", "--layer", "2", "--heads", "3",
                 "--json", "-"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)["layers"]] == ["decoder.layers.0.encoder_attn"]
    assert main(["inspect", "--model", str(folder), "--text", _text(6), "--layer", "2"]) == 2  # 2 layers without it


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_duat_inspect_cross_plots_decoder_tokens_by_encoder_tokens(tmp_path, capsys, monkeypatch, family):
    # --plot and --html were refused with --cross (their heatmaps had one token list on both axes), and the JSON's
    # cross-attention entry said only that it "reads" the decoder_tokens, though its columns are the text's tokens
    from test_inspect_plot import panels, recorded_figures, tick_labels  # not at the top: it imports this module

    folder = _encoder_decoder_folder(tmp_path / family, family)
    figures = recorded_figures(monkeypatch)
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    argv = ["inspect", "--model", str(folder), "--text", _text(6)]
    assert main([*argv, "--cross", "--json", str(out), "--plot", str(tmp_path / "r.png"), "--html", str(page)]) == 0
    assert "heatmap (" in capsys.readouterr().out
    model, tok = dk.models.load(str(folder))
    ids = tok([_text(6)], return_tensors="pt")["input_ids"]
    decoder_ids = torch.cat([torch.full_like(ids[:, :1], model.config.decoder_start_token_id), ids[:, :-1]], dim=1)
    tokens, shifted = tok.convert_ids_to_tokens(ids[0]), tok.convert_ids_to_tokens(decoder_ids[0])
    cross = dk.models.attention_layers(model, input_ids=ids, decoder_input_ids=decoder_ids, include_cross=True)[-1]
    assert cross.kind == "cross"
    # --json: the cross-attention entry names its rows and columns; the self-attention entries keep their keys
    result = json.loads(out.read_text())
    entry = result["layers"][-1]
    assert (entry["kind"], entry["rows"], entry["columns"]) == ("cross", "decoder_tokens", "tokens")
    assert (result["decoder_tokens"], result["tokens"]) == (shifted, tokens)
    assert main([*argv, "--json", "-"]) == 0
    without_cross = json.loads(capsys.readouterr().out)
    assert [set(e) for e in result["layers"][:-1]] == [set(e) for e in without_cross["layers"]]
    assert not {"rows", "columns"} & set(without_cross["layers"][0])
    # --plot: the cross-attention panel's rows are the decoder's tokens, its columns the text's
    panel = panels(figures[0])[-1]
    assert "cross" in panel.get_title()
    assert panel.get_images()[0].get_array().shape == (len(shifted), len(tokens))
    assert tick_labels(panel) == (tokens, shifted)
    # --html: both token lists, and the layer's block norms (to the page's 3 significant digits)
    data = _html_data(page)
    assert (data["tokens"], data["decoder_tokens"]) == (tokens, shifted)
    layer = data["layers"][-1]
    assert (layer["kind"], layer["labels"], layer["column_labels"]) == ("cross", shifted, tokens)
    norms = cross.operator().block_norms()[0]
    assert layer["total"] == [[float(f"{v:.3g}") for v in row] for row in norms.tolist()]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "tokens_first"])
@pytest.mark.parametrize("n_dec", [6, 4], ids=["N_dec>N_enc", "N_dec=N_enc"])
def test_torch_transformer_decoder_cross_attention(batch_first, n_dec):
    # nn.TransformerDecoderLayer's multihead_attn (cross-attention over the memory) was listed as a self-attention
    # layer: with N_dec = N_enc it was captured as kind 'self' over the memory (also without include_cross), with
    # N_dec != N_enc every capture of the model was refused, include_cross=True or not. A padded source
    # (src_key_padding_mask) failed in every layer: "NestedTensorImpl doesn't support sizes" (the encoder's fast path
    # handed its layers nested tensors)
    torch.manual_seed(0)
    model = torch.nn.Transformer(d_model=16, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=32,
                                 dropout=0.0, batch_first=batch_first).eval()
    src, tgt = torch.randn(2, 4, 16), torch.randn(2, n_dec, 16)
    pad = torch.tensor([[False] * 4, [False, False, True, True]])  # the second source ends in 2 padding tokens
    major = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    inputs = dict(src_key_padding_mask=pad, memory_key_padding_mask=pad)
    selves = ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn", "decoder.layers.1.self_attn"]
    crosses = ["decoder.layers.0.multihead_attn", "decoder.layers.1.multihead_attn"]
    assert [l.name for l in dk.models.attention_layers(model, major(src), major(tgt), **inputs)] == selves
    layers = dk.models.attention_layers(model, major(src), major(tgt), include_cross=True, **inputs)
    assert torch.backends.mha.get_fastpath_enabled()  # switched off for the capture only
    assert [(l.index, l.name, l.kind) for l in layers] == [
        (i, name, "self" if i < 3 else "cross") for i, name in enumerate(selves + crosses)]
    with torch.no_grad():
        memory = major(model.encoder(major(src), src_key_padding_mask=pad))  # (B, N_enc, M)
    for layer in layers[3:]:
        assert layer.attn.shape == (2, 4, n_dec, 4)
        assert bool((layer.attn[1, :, :, 2:] == 0).all()), "the padded memory tokens are attended by no one"
        torch.testing.assert_close(layer.x[~pad], memory[~pad])  # W' maps the memory (its real tokens) to the decoder
        assert layer.relative_error(layer.hvo_matrix(dtype=torch.float64)) <= TOLERANCE  # the module's own output
        assert layer.relative_error() <= TOLERANCE
    picked = dk.models.attention_layers(model, major(src), major(tgt), include_cross=True, layers=[-1], **inputs)
    assert [l.name for l in picked] == crosses[-1:]


@pytest.mark.parametrize("extra", [[], ["--layer", "1"]], ids=["all", "layer-1"])
def test_duat_inspect_cross_needs_an_encoder_decoder_model(tmp_path, capsys, extra):
    # a BERT decoder with cross-attention (add_cross_attention, no encoder of its own): --cross failed with "attention
    # layer 1 (...crossattention.self) was not called by the forward pass; select only the layers the model runs
    # (layers=[...])", and --cross --layer 1 with "--layer 1: out of range, the model has 1 attention layers" (the
    # count read from config.json before loading, without the cross-attention layer); on MiniLM --cross did nothing
    folder = tmp_path / "bert_decoder"
    vocab = _save_tokenizer(folder)
    bert = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=vocab)
    transformers.BertModel(transformers.BertConfig(**bert, is_decoder=True, add_cross_attention=True)).save_pretrained(
        folder)
    assert main(["inspect", "--model", str(folder), "--text", _text(4), "--no-progress", "--cross", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("duat inspect: --cross needs an encoder-decoder model") and "(bert)" in err, err


@pytest.mark.parametrize("capture", ["attn", "qk"])
def test_cross_attention_the_capture_cannot_read_is_named(capture):
    # GPT-2's cross-attention (c_attn computes keys and values in one projection, c_proj is shared with nothing) was
    # left out of include_cross=True without a word: the caller asked for cross-attention layers and got none. The
    # warning points at the caller's line (capture="qk" pointed into capture.py).
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100,
                                                           n_positions=32, add_cross_attention=True)).eval()
    ids, states = torch.randint(0, 100, (2, 5)), torch.randn(2, 7, 32)
    with pytest.warns(UserWarning, match=r"include_cross=True: .*cross-attention modules the capture cannot read "
                                         r"\(1: h\.0\.crossattention\)") as caught:
        layers = dk.models.attention_layers(model, input_ids=ids, encoder_hidden_states=states, include_cross=True,
                                            capture=capture)
    assert [l.name for l in layers] == ["h.0.attn"]
    assert [w.filename for w in caught if "cannot read" in str(w.message)] == [__file__]


def test_duat_inspect_cross_names_only_the_layers_it_cannot_read(tmp_path, capsys):
    # --cross --layer 0 listed BART's encoder_attn as "cross-attention layers not inspected ...: inspect them with
    # --cross" (and in the JSON's skipped_cross_attention): the layers left out were taken as those not reported, not
    # those --cross cannot read; GPT-2's cross-attention, which --cross cannot read, was also told to use --cross
    bart = _encoder_decoder_folder(tmp_path / "bart", "bart")
    out = tmp_path / "r.json"
    assert main(["inspect", "--model", str(bart), "--text", _text(5), "--cross", "--layer", "0", "--json", str(out)]) == 0
    assert "cross-attention layers not inspected" not in capsys.readouterr().out
    assert json.loads(out.read_text())["skipped_cross_attention"] == []
    folder = tmp_path / "bert_gpt2"
    vocab = _save_tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                vocab_size=vocab),
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=vocab, n_positions=32, is_decoder=True,
                                add_cross_attention=True))
    config.decoder_start_token_id, config.pad_token_id = START, PAD
    transformers.EncoderDecoderModel(config).save_pretrained(folder)
    assert main(["inspect", "--model", str(folder), "--text", _text(5), "--cross", "--no-progress"]) == 0
    captured = capsys.readouterr()
    note = next(line for line in captured.out.splitlines() if line.startswith("cross-attention layers not inspected"))
    assert "(1: decoder.transformer.h.0.crossattention)" in note and "--cross" not in note, note
    assert "UserWarning" not in captured.err  # the note names them, as for the self-attention modules


class MemoryDecoder(torch.nn.Module):
    """A decoder block of nn.MultiheadAttention: self-attention, then cross_attn over a memory."""

    def __init__(self):
        super().__init__()
        self.self_attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.cross_attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x, memory):
        x = x + self.self_attn(x, x, x)[0]
        return x + self.cross_attn(x, memory, memory)[0]


def test_multihead_attention_named_cross_attention_is_cross_attention():
    # an nn.MultiheadAttention under a cross-attention name (cross_attn) was listed as self-attention: over a memory
    # of the decoder's length it was captured as kind 'self' (with or without include_cross), over another length
    # every capture of the model was refused
    torch.manual_seed(0)
    model = MemoryDecoder().eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    assert [l.name for l in dk.models.attention_layers(model, x, memory)] == ["self_attn"]
    layers = dk.models.attention_layers(model, x, memory, include_cross=True)
    assert [(l.name, l.kind) for l in layers] == [("self_attn", "self"), ("cross_attn", "cross")]
    torch.testing.assert_close(layers[1].x, memory, rtol=0, atol=0)
    assert layers[1].relative_error(layers[1].hvo_matrix(dtype=torch.float64)) <= TOLERANCE


def test_duat_inspect_cross_save_says_which_layers_are_cross_attention(tmp_path, capsys):
    # --cross --save wrote layer 2's W' (N_dec·M x N_enc·M) and block norms (N_dec, N_enc) with the metadata saying only
    # that layers 1 and 2 read decoder_tokens: nothing said that layer 2's columns are the text's tokens
    from safetensors import safe_open

    folder = _encoder_decoder_folder(tmp_path / "bart", "bart")
    path = tmp_path / "w.safetensors"
    assert main(["inspect", "--model", str(folder), "--text", _text(5), "--cross", "--save", str(path)]) == 0
    capsys.readouterr()
    with safe_open(str(path), "pt") as saved:
        meta, norms = saved.metadata(), saved.get_tensor("layer2.block_norms")
    assert meta["decoder_layers"] == "1,2" and meta["cross_layers"] == "2"
    assert norms.shape == (len(meta["decoder_tokens"].split("\t")), len(meta["tokens"].split("\t")))
