"""`duat inspect --target`: an encoder-decoder model's encoder reads --text, its decoder the target (teacher forcing:
the target tokenised as labels, shifted right), so that decoder layers have N_dec tokens and cross-attention layers
are N_dec x N_enc; on tiny random-init BART, T5 and Marian folders (offline, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

import duat_kernels as dk
from duat_kernels.cli import main
from test_inspect_cli import (ENCODER_DECODER, _html_data, _rendered, _save_tokenizer, _save_with_random_biases,
                              _text, chromium)
from test_token_labels import SOURCE_WORDS, TARGET_WORDS, fsmt_folder, marian_tokenizer  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install '.[models]'")

TOLERANCE = 1e-5  # relative error of W' x' + b' against each layer's own float32 output
FAMILIES = {"bart": ENCODER_DECODER["bart"], "t5": ENCODER_DECODER["t5"],
            "marian": lambda vocab: transformers.MarianConfig(
                d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=vocab, max_position_embeddings=64,
                pad_token_id=0, decoder_start_token_id=0)}
TEXT, TARGET = _text(6), "w3 w9 w11 w40"  # N_enc = 6, N_dec = 4 (the word-level tokenizer adds no special tokens)


def _folder(path, family):
    vocab = _save_tokenizer(path)
    torch.manual_seed(0)
    return _save_with_random_biases(transformers.AutoModel.from_config(FAMILIES[family](vocab)), path)


@pytest.fixture(scope="module")
def bart_folder(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("bart"), "bart")


def _refusal(capsys, starts: str) -> list[str]:
    """stderr's lines before the refusal (the loading messages, if the model was loaded), checking that the
    refusal is one last line and no traceback."""
    *before, last = capsys.readouterr().err.rstrip("\n").split("\n")
    assert last.startswith(f"duat inspect: {starts}"), last
    assert not any("Traceback" in line or line.startswith("duat inspect:") for line in before), before
    return before


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_decoder_reads_the_target(tmp_path, capsys, monkeypatch, family):
    from test_inspect_plot import panels, recorded_figures, tick_labels  # not at the top: imports test_cross_capture

    folder = _folder(tmp_path / family, family)
    figures = recorded_figures(monkeypatch)
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    argv = ["inspect", "--model", str(folder), "--text", TEXT, "--no-progress"]
    assert main([*argv, "--target", TARGET, "--cross", "--dtype", "float64", "--json", str(out),
                 "--plot", str(tmp_path / "r.png"), "--html", str(page)]) == 0
    assert "the decoder layers read the target shifted right (decoder token 0 is " in capsys.readouterr().out
    # independently: the target as labels, shifted right by hand (decoder start token first, last token dropped)
    model, tok = dk.models.load(str(folder))
    ids, labels = tok([TEXT], return_tensors="pt")["input_ids"], tok(text_target=[TARGET], return_tensors="pt")[
        "input_ids"]
    decoder_ids = torch.cat([torch.full_like(labels[:, :1], model.config.decoder_start_token_id), labels[:, :-1]], 1)
    tokens, shifted = tok.convert_ids_to_tokens(ids[0]), tok.convert_ids_to_tokens(decoder_ids[0])
    assert len(tokens) == 6 and len(shifted) == 4 and shifted[1:] == TARGET.split()[:-1]
    result = json.loads(out.read_text())
    assert (result["target"], result["tokens"], result["decoder_tokens"]) == (TARGET, tokens, shifted)
    layers = dk.models.attention_layers(model, input_ids=ids, decoder_input_ids=decoder_ids, include_cross=True)
    assert [(e["name"], e["tokens"], e.get("keys")) for e in result["layers"]] == [
        (layers[0].name, 6, None), (layers[1].name, 4, None), (layers[2].name, 4, 6)]  # encoder, decoder, cross
    assert result["passed"]
    for entry, layer in zip(result["layers"], layers):
        assert entry["rel_error"] <= TOLERANCE, (entry["name"], entry["rel_error"])
        w = layer.hvo_matrix(dtype=torch.float64, backend="reference")  # W' x' + b' of the independent capture
        x, expected = layer.x.double().reshape(1, -1), layer.output.double().reshape(1, -1)
        torch.testing.assert_close(torch.einsum("brc,bc->br", w, x) + layer.hvo_bias().double(), expected,
                                   rtol=TOLERANCE, atol=TOLERANCE)
        assert entry["frobenius"] == pytest.approx(w.norm().item(), rel=1e-6)
    # --plot: the decoder's self-attention panel is N_dec x N_dec, the cross-attention panel N_dec x N_enc
    decoder_panel, cross_panel = panels(figures[0])[1:]
    assert decoder_panel.get_images()[0].get_array().shape == (4, 4) and tick_labels(decoder_panel)[1] == shifted
    assert cross_panel.get_images()[0].get_array().shape == (4, 6)
    assert tick_labels(cross_panel) == (tokens, shifted)
    # --html: the cross-attention layer's rows are the target's tokens, its columns the text's
    data = _html_data(page)
    assert (data["tokens"], data["decoder_tokens"]) == (tokens, shifted)
    layer = data["layers"][-1]
    assert (layer["kind"], layer["labels"], layer["column_labels"]) == ("cross", shifted, tokens)
    assert [len(row) for row in layer["total"]] == [6] * 4
    # without --target: nothing changes, the decoder reads the text shifted right (N_dec = N_enc) and no "target"
    assert main([*argv, "--cross", "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "target" not in result and len(result["decoder_tokens"]) == 6
    assert [e["tokens"] for e in result["layers"]] == [6, 6, 6]


def test_a_marian_target_is_named_from_the_target_vocabulary(tmp_path, capsys):
    # MarianTokenizer(separate_vocabs=True) encodes text_target with its target vocabulary: the decoder tokens are
    # its words, the encoder tokens the source vocabulary's
    tok = marian_tokenizer(tmp_path)
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    transformers.MarianModel(transformers.MarianConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=len(TARGET_WORDS) + 3, max_position_embeddings=32,
        pad_token_id=2, decoder_start_token_id=2, eos_token_id=0)).save_pretrained(tmp_path)
    target = " ".join(TARGET_WORDS[i] for i in (0, 1, 4))  # "der Fuchs nach": N_dec = 4 (with </s>), N_enc = 5
    assert main(["inspect", "--model", str(tmp_path), "--text", " ".join(SOURCE_WORDS), "--target", target,
                 "--cross", "--json", "-", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == [*("\u2581" + w for w in SOURCE_WORDS), "</s>"]
    assert result["decoder_tokens"] == ["<pad>", *("\u2581" + w for w in target.split())]
    assert [e["tokens"] for e in result["layers"]] == [5, 4, 4] and result["layers"][-1]["keys"] == 5
    assert result["passed"] and max(e["rel_error"] for e in result["layers"]) <= TOLERANCE


def test_an_fsmt_target_is_named_from_the_source_vocabulary_that_encoded_it(fsmt_folder, tmp_path, capsys):
    # transformers' FSMTTokenizer has no target mode: text_target is encoded with the source vocabulary, whose
    # words then name the decoder tokens; the note says the decoder looks these ids up in its target embedding
    capsys.readouterr()
    assert main(["inspect", "--model", str(fsmt_folder), "--text", " ".join(SOURCE_WORDS), "--target", "home fox",
                 "--no-progress", "--cross", "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "decoder token 0 is '</s>', the target's last token, which FSMTModel's shift puts first" in printed
    assert "FSMTModel's decoder looks these source-vocabulary ids up in its target-vocabulary embedding" in printed
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["decoder_tokens"] == ["</s>", "home</w>", "fox</w>"] and result["target"] == "home fox"
    assert [e["tokens"] for e in result["layers"]] == [5, 3, 3] and result["passed"]


def test_target_needs_an_encoder_decoder_model(tmp_path, capsys, monkeypatch):
    # refused in one line from the config alone (nothing loaded), or, where the config says nothing, once loaded
    capsys.readouterr()
    assert main(["inspect", "--model", "minilm", "--target", "hello"]) == 2
    assert _refusal(capsys, "--target needs an encoder-decoder model, whose decoder reads the target") == []
    from duat_kernels.models import inspect_cli

    vocab = _save_tokenizer(tmp_path)
    transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32, vocab_size=vocab)).save_pretrained(tmp_path)
    capsys.readouterr()
    monkeypatch.setattr(inspect_cli, "_declared_encoder_decoder", lambda model: None)
    assert main(["inspect", "--model", str(tmp_path), "--text", "w1 w2", "--target", "w3"]) == 2
    before = _refusal(capsys, f"--target needs an encoder-decoder model, whose decoder reads the target while its "
                              f"encoder reads --text; {tmp_path} (bert) is not one: leave out --target")
    assert before[0] == f"loading {tmp_path} ..."


@pytest.mark.parametrize("target, message", [
    ("", "--target is empty; give some text, or leave --target out"),
    (" \n ", "--target is empty"),
    ("@{tmp}/empty.txt", "--target @{tmp}/empty.txt is empty"),
    ("@{tmp}/missing.txt", "--target @{tmp}/missing.txt: cannot read"),
])
def test_an_empty_or_unreadable_target_is_refused(bart_folder, tmp_path, capsys, target, message):
    (tmp_path / "empty.txt").write_text("  \n")
    capsys.readouterr()
    assert main(["inspect", "--model", str(bart_folder), "--target", target.format(tmp=tmp_path)]) == 2
    assert _refusal(capsys, message.format(tmp=tmp_path)) == []  # before loading


@pytest.mark.parametrize("family", ["bart", "marian"])
def test_cross_long_reads_q_and_k_of_the_cross_attention_layers(tmp_path, capsys, monkeypatch, family):
    # --cross and --target were refused with --long ("--cross is not available with --long"), and --long wrote no
    # --json or --plot; now the q/k capture (A never stored) reports the cross-attention layer N_dec x N_enc
    from test_inspect_plot import panels, recorded_figures, tick_labels  # not at the top: imports test_cross_capture

    folder = _folder(tmp_path / family, family)
    figures = recorded_figures(monkeypatch)
    argv = ["inspect", "--model", str(folder), "--text", TEXT, "--target", TARGET, "--no-progress", "--cross"]
    out, page, dense_page = tmp_path / "r.json", tmp_path / "r.html", tmp_path / "dense.html"
    assert main([*argv, "--long", "--json", str(out), "--plot", str(tmp_path / "r.png"), "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    assert "q/k capture" in printed and "cross-attention layers: N is N_dec x N_enc" in printed
    assert "cross-attention layers not inspected" not in printed and "heatmap (" in printed
    long = json.loads(out.read_text())
    assert main([*argv, "--json", "-", "--html", str(dense_page)]) == 0  # the same layers with A stored
    dense = json.loads(capsys.readouterr().out)
    assert long["passed"] and (long["tokens"], long["decoder_tokens"]) == (dense["tokens"], dense["decoder_tokens"])
    assert [(e["name"], e["tokens"], e.get("keys"), e.get("kind")) for e in long["layers"]] == [
        (e["name"], e["tokens"], e.get("keys"), e.get("kind")) for e in dense["layers"]]
    assert [e.get("keys") for e in long["layers"]] == [None, None, 6]  # encoder 6, decoder 4, cross 4 x 6
    for mine, theirs in zip(long["layers"], dense["layers"]):
        assert set(theirs) <= set(mine) and mine["rel_error"] <= TOLERANCE, (mine["name"], mine["rel_error"])
        assert mine["grid"] == [mine["tokens"], mine.get("keys", mine["tokens"])]
        assert mine["frobenius"] == pytest.approx(theirs["frobenius"], rel=1e-5)  # from q/k and from stored A
        assert {k: mine[k] for k in ("reads", "rows", "columns") if k in theirs} == \
            {k: theirs[k] for k in ("reads", "rows", "columns") if k in theirs}
    # --plot: the cross-attention panel is N_dec x N_enc, the target's tokens by the text's, the norms of stored A's W'
    model, tok = dk.models.load(str(folder))
    ids, labels = tok([TEXT], return_tensors="pt")["input_ids"], tok(text_target=[TARGET], return_tensors="pt")[
        "input_ids"]
    decoder_ids = torch.cat([torch.full_like(labels[:, :1], model.config.decoder_start_token_id), labels[:, :-1]], 1)
    cross = dk.models.attention_layers(model, input_ids=ids, decoder_input_ids=decoder_ids, include_cross=True)[-1]
    panel = panels(figures[0])[-1]
    assert "cross" in panel.get_title() and tick_labels(panel) == (long["tokens"], long["decoder_tokens"])
    torch.testing.assert_close(torch.as_tensor(panel.get_images()[0].get_array().data),
                               cross.operator().block_norms()[0].clamp_min(1e-30), rtol=1e-4, atol=0)
    # --html: the same page as with A stored (labels, grids; norms to the page's 3 digits), per head from q/k
    mine, theirs = _html_data(page), _html_data(dense_page)
    assert (mine["tokens"], mine["decoder_tokens"]) == (theirs["tokens"], theirs["decoder_tokens"])
    for layer, dense_layer in zip(mine["layers"], theirs["layers"]):
        assert layer["qk"] and not dense_layer["qk"] and layer["dense_blocks"] is None
        assert {k: layer[k] for k in ("kind", "labels", "column_labels", "grid", "heads")} == \
            {k: dense_layer[k] for k in ("kind", "labels", "column_labels", "grid", "heads")}
        for maps, dense_maps in ((layer["per_head"], dense_layer["per_head"]), (layer["total"], dense_layer["total"])):
            torch.testing.assert_close(torch.tensor(maps), torch.tensor(dense_maps), rtol=5e-3, atol=0)
    assert mine["layers"][-1]["grid"] == [4, 6]
    if chromium is not None and family == "bart":  # the page draws the cross-attention layer (4 heads + all) from q/k
        dom = _rendered(page, tmp_path, "selftest-2")
        assert "rendered layer 2: 5 heatmaps of 4x6" in dom and "n/a (q/k)" in dom, dom[-2000:]


def test_cross_long_refuses_what_the_q_k_capture_cannot_read(tmp_path, capsys, fsmt_folder):  # noqa: F811
    t5 = _folder(tmp_path / "t5", "t5")
    argv = ["inspect", "--text", TEXT, "--no-progress", "--cross", "--long"]
    instead = "duat inspect without --long captures A itself"
    assert main([*argv, "--model", str(t5), "--json", "-"]) == 2  # T5's self-attention: its position bias
    assert capsys.readouterr().out == ""
    assert main([*argv, "--model", str(t5)]) == 2
    err = capsys.readouterr().err
    assert err.count("duat inspect:") == 1 and "position bias" in err and instead in err, err
    assert "--layer may select the layers --long can read (T5: its cross-attention layers alone)" in err, err
    assert main([*argv, "--model", str(t5), "--layer", "2"]) == 0  # its cross-attention layer alone
    assert "    2       6x6" in capsys.readouterr().out
    assert main([*argv, "--model", str(fsmt_folder)]) == 2  # FSMT: its attention reads x tokens first
    err = capsys.readouterr().err
    assert err.count("duat inspect:") == 1 and "FSMTModel" in err and instead in err, err
    assert main([*argv, "--model", str(fsmt_folder), "--save", str(tmp_path / "w.safetensors")]) == 2  # no W'
    assert _refusal(capsys, "--save is not available with --long") == []  # before loading


def test_a_target_read_from_a_file(bart_folder, tmp_path, capsys):
    (tmp_path / "target.txt").write_text(TARGET)
    assert main(["inspect", "--model", str(bart_folder), "--text", TEXT, "--target", f"@{tmp_path}/target.txt",
                 "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == TARGET and result["decoder_tokens"][1:] == TARGET.split()[:-1]
