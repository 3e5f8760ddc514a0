"""`duat inspect` end to end on a tiny random-init model folder (offline, seconds): --json, --heads,
--dtype, --save, --plot, --html (rendered in headless Chromium), and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import duat_kernels as dk
from duat_kernels.cli import main

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install '.[models]'")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402  (a dependency of transformers)

from conftest import CHILD_CWD

WORDS = 60
POSITIONS = 256


def _save_tokenizer(path):
    """A word-level tokenizer w0 ... w59 (+ [PAD], [UNK]) saved offline."""
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", *(f"w{i}" for i in range(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.save_pretrained(path)
    return len(vocab)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 2-layer BERT (4 heads, width 32, biases) and its tokenizer, saved offline."""
    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = _save_tokenizer(path)
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=vocab, max_position_embeddings=POSITIONS)
    return _save_with_random_biases(transformers.BertModel(config), path)


def _save_with_random_biases(model, path):
    """model saved to path with every bias drawn at random (zero biases would hide a missing b')."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    model.save_pretrained(path)
    return path


def _text(n):
    return " ".join(f"w{(7 * i) % WORDS}" for i in range(n))


def _layers(folder, text):
    model, tok = dk.models.load(str(folder))
    return dk.models.attention_layers(model, **tok([text], return_tensors="pt"))


def test_json_per_head_and_dtype(folder, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["inspect", "--model", str(folder), "--text", _text(6), "--json", str(out), "--heads", "all",
                 "--dtype", "float64"]) == 0
    printed = capsys.readouterr().out
    assert "output share" in printed and f"written to {out}" in printed
    result = json.loads(out.read_text())
    assert result["passed"] and result["dtype"] == "float64" and len(result["tokens"]) == 6
    layers = _layers(folder, _text(6))
    for entry, layer in zip(result["layers"], layers):
        assert entry["rel_error"] <= 1e-5 and entry["heads"] == 4 and len(entry["per_head"]) == 4
        assert entry["frobenius"] == pytest.approx(layer.hvo_matrix(dtype=torch.float64).norm().item(), rel=1e-6)
        for head in entry["per_head"]:  # against each head's own dense W'
            dense = layer.hvo_matrix(dtype=torch.float64, heads=[head["head"]])
            assert head["frobenius"] == pytest.approx(dense.norm().item(), rel=1e-6)


def test_json_to_stdout_is_only_json(folder, capsys):
    assert main(["inspect", "--model", str(folder), "--text", _text(4), "--json", "-"]) == 0
    assert [entry["index"] for entry in json.loads(capsys.readouterr().out)["layers"]] == [0, 1]


def test_save_heads_subset_and_its_size_first(folder, tmp_path, capsys):
    from safetensors.torch import load_file

    path = tmp_path / "w.safetensors"
    assert main(["inspect", "--model", str(folder), "--text", _text(5), "--layer", "-1", "--heads", "0", "2",
                 "--save", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("writing ") < printed.index(f"W' of layer(s) 1, b' and block norms of every layer written to")
    saved = load_file(path)
    data_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    assert printed.split("writing ")[1].startswith(f"{data_bytes / 1024:.1f} KiB to {path}")
    assert sorted(saved) == ["layer1.W", "layer1.b", "layer1.block_norms"]
    torch.testing.assert_close(saved["layer1.W"], _layers(folder, _text(5))[1].hvo_matrix(heads=[0, 2])[0])


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["umask022", "umask002", "umask077"])
def test_save_gives_the_file_the_mode_open_would(folder, tmp_path, umask):
    """safetensors wrote --save files with mode 0600 (a temporary file renamed over the path), whatever the umask:
    a new file gets 0666 & ~umask, a file it replaces keeps its mode, as open(path, 'w') does."""
    import os
    import stat

    new, existing = tmp_path / "new.safetensors", tmp_path / "existing.safetensors"
    existing.write_bytes(b"old")
    existing.chmod(0o640)
    old_umask = os.umask(umask)
    try:
        for path in (new, existing):
            assert main(["inspect", "--model", str(folder), "--text", _text(3), "--layer", "0", "--save", str(path)]) == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640


@pytest.mark.parametrize("target_exists", [True, False], ids=["existing-target", "dangling-link"])
def test_save_writes_through_a_symbolic_link(folder, tmp_path, target_exists, umask_022):
    """safetensors renamed its temporary file over the --save path: a symbolic link there became a regular file and
    the file it pointed to kept its old bytes. Now the link stays and its target is written (created for a dangling
    link), in the target's mode (an existing one keeps it), as open(path, 'w'), save_dense and save_zarr do."""
    import os
    import stat

    from safetensors.torch import load_file

    target, link = tmp_path / "data" / "w.safetensors", tmp_path / "link.safetensors"
    target.parent.mkdir()
    if target_exists:
        target.write_bytes(b"old")
        target.chmod(0o640)
    link.symlink_to(os.path.relpath(target, link.parent))
    assert main(["inspect", "--model", str(folder), "--text", _text(3), "--layer", "0", "--save", str(link)]) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert sorted(load_file(target)) == ["layer0.W", "layer0.b", "layer0.block_norms"]
    assert stat.S_IMODE(target.stat().st_mode) == (0o640 if target_exists else 0o644)


def test_save_refuses_a_link_into_a_missing_folder_before_loading(folder, tmp_path, capsys):
    """A link whose target's folder does not exist passed the check (the link's own folder exists): the
    command loaded the model and computed every layer, then failed writing."""
    link = tmp_path / "w.safetensors"
    link.symlink_to(tmp_path / "missing" / "w.safetensors")
    assert main(["inspect", "--model", str(folder), "--text", _text(3), "--save", str(link)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("duat inspect: --save ") and "does not exist" in err, err
    assert "loading" not in err and link.is_symlink() and not (tmp_path / "missing").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be created")
@pytest.mark.parametrize("option", ["--save", "--json", "--plot", "--html"])
def test_an_output_in_a_folder_where_no_file_can_be_created_is_refused_before_loading(folder, capsys, option):
    """os.access says yes to root in /proc (and on read-only file systems): every layer was computed, then
    --save failed as 'internal error: SafetensorError ... please report it' (exit 1), --json with a bare errno."""
    path = "/proc/w" + {"--save": ".safetensors", "--json": ".json", "--plot": ".png", "--html": ".html"}[option]
    assert main(["inspect", "--model", str(folder), "--text", _text(3), option, path]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"duat inspect: {option} {path}: cannot write in /proc"), err
    assert "loading" not in err


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:4] == b"\x89PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_of_a_long_input_stays_small(folder, tmp_path, capsys):
    png = tmp_path / "long.png"
    assert main(["inspect", "--model", str(folder), "--text", _text(200), "--plot", str(png)]) == 0
    width, height = _png_size(png)
    assert f"heatmap ({width}x{height} px)" in capsys.readouterr().out
    assert width <= 2600 and height <= 2600


chromium = shutil.which("chromium") or shutil.which("chromium-browser")


def _rendered(page, tmp_path, fragment: str = "selftest") -> str:
    """The page's DOM after its scripts ran in headless Chromium (#selftest hovers the first heatmap; #selftest-j
    that of the layer in row j of the exactness table)."""
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                           "--dump-dom", f"file://{page}#{fragment}"], capture_output=True, text=True, timeout=120)
    return done.stdout


def _html_data(page) -> dict:
    """The data (JSON) inlined in an --html page."""
    text, tag = page.read_text(), '<script id="data" type="application/json">'
    start = text.index(tag) + len(tag)
    return json.loads(text[start:text.index("</script>", start)].replace("<\\/", "</"))


@pytest.mark.skipif(chromium is None, reason="needs headless Chromium (apt-get install chromium)")
def test_html_report_renders_in_chromium(folder, tmp_path):
    page = tmp_path / "report.html"
    assert main(["inspect", "--model", str(folder), "--text", _text(7), "--html", str(page)]) == 0
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script src" not in text  # self-contained
    dom = _rendered(page, tmp_path)
    assert "rendered layer 0: 5 heatmaps of 7x7" in dom  # all heads + 4 heads
    assert dom.count("<canvas") == 5 and dom.count("<tr") == 3  # header + 2 layers in the exactness table
    hover = dom.split("hover: ")[1]
    assert "output n=3: w21" in hover and "input m=3: w21" in hover  # tokens of the hovered (centre) cell


@pytest.mark.parametrize("argv,message", [
    (["--layer", "7"], "--layer 7: out of range, the model has 2 attention layers"),
    (["--layer", "0", "-3"], "--layer -3: out of range"),
    (["--save", "{tmp}/missing/w.safetensors"], "does not exist"),
    (["--save", "{tmp}"], "is a directory"),
    (["--html", "{tmp}/nowhere/r.html"], "does not exist"),
    (["--text", ""], "--text is empty"),
    (["--text", _text(POSITIONS + 5)], f"--text has {POSITIONS + 5} tokens but"),
    (["--heads", "4"], "--heads 4: head 4 is not a head of layer 0 (encoder.layer.0.attention.self), which has 4 "
                       "heads (valid: -4 ... 3)"),
    (["--heads", "1", "-3"], "--heads: heads must be distinct, got [1, -3]"),
    (["--heads", "1", "1"], "--heads: heads must be distinct, got [1, 1]"),  # refused before loading now
    (["--heads", "x"], "--heads takes 'all' or head indices"),
    (["--plot", "{tmp}/w.jgp"], "matplotlib cannot write .jgp files"),  # was savefig's error after every layer
    (["--plot", "{tmp}/out.png", "--html", "{tmp}/./out.png"], "is the file --plot writes too"),  # the last write won
])
def test_bad_input_is_one_line(folder, tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    text = [] if "--text" in argv else ["--text", _text(3)]
    assert main(["inspect", "--model", str(folder), *text, *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("duat inspect: ") and message in lines[-1], captured.err
    assert "Traceback" not in captured.err and "layers:" not in captured.err  # nothing computed
    if "--layer" in argv or "--save" in argv or "--html" in argv or "--plot" in argv or argv[-2:] == ["1", "1"]:
        assert "loading" not in captured.err  # refused before the model loaded


def test_bad_model_paths_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "duat_kernels", "inspect", "--model", str(empty)],  # the console path
                          capture_output=True, text=True, cwd=CHILD_CWD)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "has no config.json" in done.stderr, done.stderr
    assert main(["inspect", "--model", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.gguf' does not exist" in err and "there is no model hub here" in err


def test_unsupported_model_is_one_line(tmp_path, capsys):
    vocab = _save_tokenizer(tmp_path)  # DeBERTa v1: its value bias lies outside its fused in_proj
    transformers.DebertaModel(transformers.DebertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        vocab_size=vocab)).save_pretrained(tmp_path)
    assert main(["inspect", "--model", str(tmp_path), "--text", _text(3)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("duat inspect: no adapter for model_type='deberta'")
    assert "Traceback" not in err


def test_albert_layers_are_its_applications(tmp_path, capsys):
    # was refused ("called more than once in one forward pass"); --layer counts ALBERT's depth (3 here), not its
    # one shared module
    vocab = _save_tokenizer(tmp_path)
    torch.manual_seed(0)
    transformers.AlbertModel(transformers.AlbertConfig(
        embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        vocab_size=vocab)).save_pretrained(tmp_path)
    assert main(["inspect", "--model", str(tmp_path), "--text", _text(5), "--json", "-", "--layer", "0", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and [(e["index"], e["application"]) for e in result["layers"]] == [(0, 0), (2, 2)]
    assert main(["inspect", "--model", str(tmp_path), "--text", _text(5), "--layer", "3"]) == 2
    assert "--layer 3: out of range, the model has 3 attention layers" in capsys.readouterr().err


def test_backend_choices_are_checked(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--backend", "cpu"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'cpu' (choose from 'auto', 'reference', 'cpp', 'triton')" in capsys.readouterr().err


@pytest.mark.parametrize("long", [False, True])
def test_text_from_a_file_is_read_in_both_modes(folder, tmp_path, capsys, long):
    # '--text @file' was read only by --long: without it the text inspected was the literal '@/tmp/.../t.txt'
    text = tmp_path / "t.txt"
    text.write_text(_text(5) + "\n")
    assert main(["inspect", "--model", str(folder), "--text", f"@{text}", *(["--long"] if long else [])]) == 0
    out = capsys.readouterr().out
    assert (" 5 tokens" in out) if long else (f"5 tokens: {_text(5)}" in out), out
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    for argv, message in (([f"@{empty}"], "is empty"), ([f"@{tmp_path}/missing.txt"], "cannot read")):
        assert main(["inspect", "--model", str(folder), "--text", *argv, *(["--long"] if long else [])]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("duat inspect: --text @") and message in err, err


@pytest.mark.parametrize("argv", [["--save", "{tmp}/w.safetensors"], ["--heads", "all"],
                                  ["--heads", "1"], ["--dtype", "float64"], ["--backend", "reference"]])
def test_long_mode_refuses_the_options_it_does_not_serve(folder, tmp_path, capsys, argv):
    # --long (also automatic past 1500 words) ignored them silently: no JSON, no file, exit status 0
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["inspect", "--model", str(folder), "--text", _text(3), "--long", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{argv[0]} is not available with --long" in err, err
    assert not any(tmp_path.iterdir())


def test_long_mode_checks_the_model_positions(folder, capsys):
    # was torch's 'The expanded size of the tensor (261) must match the existing size (256) ...'
    assert main(["inspect", "--model", str(folder), "--text", _text(POSITIONS + 5), "--long"]) == 2
    err = capsys.readouterr().err
    assert f"--text has {POSITIONS + 5} tokens but" in err and "at most 256 positions" in err, err


def _strict(constant):
    raise ValueError(f"not JSON: bare {constant}")


def _with_nan_value_weight(folder, path, layer: int):
    """The tiny BERT of `folder` saved to `path` with one NaN in layer `layer`'s value weights."""
    model = transformers.BertModel.from_pretrained(folder)
    with torch.no_grad():
        model.encoder.layer[layer].attention.self.value.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            shutil.copy(folder / name, path / name)
    return path


@pytest.fixture(scope="module")
def nan_folder(folder, tmp_path_factory):
    """The tiny BERT with one NaN in layer 0's value weights: its W', norms and errors are NaN."""
    return _with_nan_value_weight(folder, tmp_path_factory.mktemp("nan_bert"), 0)


@pytest.mark.parametrize("long", [False, True], ids=["dense", "long"])
def test_a_nan_error_in_the_last_layer_fails(folder, tmp_path, capsys, long):
    # the worst error was Python's max over the layers, which skips a NaN after a finite error: exit status 0
    path = _with_nan_value_weight(folder, tmp_path / "nan_last", 1)
    assert main(["inspect", "--model", str(path), "--text", _text(5), *(["--long"] if long else [])]) == 1
    assert "FAILED: W' x' + b' differs from a layer's output by nan" in capsys.readouterr().err


def test_non_finite_numbers_are_null_in_json_and_html(nan_folder, tmp_path, capsys):
    # Python's bare NaN/Infinity made --json and the --html page's data invalid JSON (JSON.parse and jq refuse it)
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    assert main(["inspect", "--model", str(nan_folder), "--text", _text(5), "--heads", "all", "--json", str(out),
                 "--html", str(page)]) == 1  # FAILED: a NaN error is no pass
    capsys.readouterr()
    result = json.loads(out.read_text(), parse_constant=_strict)
    first = result["layers"][0]
    assert first["rel_error"] is None and first["frobenius"] is None and not first["passed"] and not result["passed"]
    data = page.read_text().split('<script id="data" type="application/json">')[1].split("</script>")[0]
    layers = json.loads(data, parse_constant=_strict)["layers"]
    assert layers[0]["rel_error"] is None and layers[0]["frobenius"] is None
    assert any(v is None for row in layers[0]["total"] for v in row)


@pytest.mark.skipif(chromium is None, reason="needs headless Chromium (apt-get install chromium)")
def test_html_report_of_non_finite_numbers_renders_in_chromium(nan_folder, tmp_path, capsys):
    # the page's null numbers (NaN in the model) must not stop its script (null.toExponential is a TypeError)
    page = tmp_path / "r.html"
    assert main(["inspect", "--model", str(nan_folder), "--text", _text(7), "--html", str(page)]) == 1
    dom = _rendered(page, tmp_path)
    assert "rendered layer 0: 5 heatmaps of 7x7" in dom and dom.count("<tr") == 3
    assert "not finite" in dom.split("<tbody>")[1].split("</tbody>")[0]  # layer 0's error and norm


ENCODER_DECODER = {  # one layer each, its own head count in BART's decoder; cross-attention in every decoder layer
    "t5": lambda vocab: transformers.T5Config(d_model=32, num_heads=2, d_kv=16, num_layers=1, d_ff=64,
                                              vocab_size=vocab, decoder_start_token_id=0, pad_token_id=0),
    "bart": lambda vocab: transformers.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                  encoder_attention_heads=2, decoder_attention_heads=4,
                                                  encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=vocab,
                                                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                                  eos_token_id=1, decoder_start_token_id=1),
    "fsmt": lambda vocab: transformers.FSMTConfig(langs=["en", "de"], src_vocab_size=vocab, tgt_vocab_size=vocab,
                                                  d_model=32, encoder_layers=1, decoder_layers=1,
                                                  encoder_attention_heads=2, decoder_attention_heads=4,
                                                  encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                                  pad_token_id=0, bos_token_id=1, eos_token_id=1,
                                                  decoder_start_token_id=1),
}
CROSS_ATTENTION = {"t5": "decoder.block.0.layer.1.EncDecAttention", "bart": "decoder.layers.0.encoder_attn",
                   "fsmt": "decoder.layers.0.encoder_attn"}


def _encoder_decoder_folder(path, family):
    vocab = _save_tokenizer(path)
    torch.manual_seed(0)
    return _save_with_random_biases(transformers.AutoModel.from_config(ENCODER_DECODER[family](vocab)), path)


@pytest.mark.parametrize("family", sorted(ENCODER_DECODER))
def test_encoder_decoder_models_are_inspected(tmp_path, capsys, family):
    # failed: T5 with "You must specify exactly one of input_ids or inputs_embeds" (its decoder had no inputs), and
    # the layers of BART's decoder came without a word on the cross-attention left out
    folder = _encoder_decoder_folder(tmp_path / family, family)
    out = tmp_path / "r.json"
    assert main(["inspect", "--model", str(folder), "--text", _text(6), "--json", str(out), "--layer", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"cross-attention layers not inspected (1: {CROSS_ATTENTION[family]})" in printed
    # decoder token 0, named: FSMT's shift puts the text's last token first (the note called it the start token)
    model, tok = dk.models.load(str(folder))
    ids = tok([_text(6)], return_tensors="pt")["input_ids"]
    first = f"{tok.convert_ids_to_tokens(ids[0])[-1]!r}, the text's last token, which FSMTModel's shift puts first" \
        if family == "fsmt" else \
        f"the decoder start token {tok.convert_ids_to_tokens([model.config.decoder_start_token_id])[0]!r}"
    note = f"the decoder layers read the text shifted right (decoder token 0 is {first}"
    assert note in printed
    if family == "bart":  # --long (q/k capture; T5's position bias is refused there) says it too
        assert main(["inspect", "--model", str(folder), "--text", _text(6), "--long"]) == 0
        printed = capsys.readouterr().out
        assert f"cross-attention layers not inspected (1: {CROSS_ATTENTION[family]})" in printed
        assert note in printed  # --long said nothing of what the decoder layers read
    else:  # the refusal pointed to capture='attn', an API option a command-line user cannot give
        assert main(["inspect", "--model", str(folder), "--text", _text(6), "--long"]) == 2
        err = capsys.readouterr().err
        why = "cannot record FSMTModel" if family == "fsmt" else "position bias"  # FSMT: its attention, its own code
        assert why in err and "duat inspect without --long captures A itself" in err
    result = json.loads(out.read_text())
    assert result["passed"] and result["skipped_cross_attention"] == [CROSS_ATTENTION[family]]
    assert main(["inspect", "--model", str(folder), "--text", _text(6), "--json", "-", "--dtype", "float64",
                 "--heads", "all"]) == 0
    result = json.loads(capsys.readouterr().out)
    # independently: the decoder fed the text shifted right by hand, each layer's dense W' (reference backend) on x'
    start = ids[:, -1:] if family == "fsmt" else torch.full_like(ids[:, :1], model.config.decoder_start_token_id)
    decoder_ids = torch.cat([start, ids[:, :-1]], dim=1)  # FSMT's shift puts the last token first
    layers = dk.models.attention_layers(model, input_ids=ids, decoder_input_ids=decoder_ids)
    assert [entry["name"] for entry in result["layers"]] == [layer.name for layer in layers]
    assert [layer.name.split(".")[0] for layer in layers] == ["encoder", "decoder"]
    heads = (2, 4) if family in ("bart", "fsmt") else (2, 2)
    for entry, layer, h in zip(result["layers"], layers, heads):
        w = layer.hvo_matrix(dtype=torch.float64, backend="reference")
        x, expected = layer.x.double().reshape(1, -1), layer.output.double().reshape(1, -1)
        reconstructed = torch.einsum("brc,bc->br", w, x) + layer.hvo_bias().double()
        torch.testing.assert_close(reconstructed, expected, rtol=1e-5, atol=1e-5)
        assert entry["heads"] == h and entry["tokens"] == 6 and entry["rel_error"] <= 1e-5
        assert entry["frobenius"] == pytest.approx(w.norm().item(), rel=1e-6)
        # every head of each layer (BART's decoder: 4, its encoder: 2; the decoder's heads 2, 3 were missing)
        assert [head["head"] for head in entry["per_head"]] == list(range(h))
        for head in entry["per_head"]:
            dense = layer.hvo_matrix(dtype=torch.float64, heads=[head["head"]], backend="reference")
            assert head["frobenius"] == pytest.approx(dense.norm().item(), rel=1e-6)



UNREADABLE_ENCODER = {  # encoder self-attention whose value and output projections are not where the capture looks
    "led": lambda vocab: transformers.LEDConfig(  # Longformer attention
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=vocab, max_encoder_position_embeddings=64,
        max_decoder_position_embeddings=64, attention_window=4, pad_token_id=0, decoder_start_token_id=1),
    "bigbird_pegasus": lambda vocab: transformers.BigBirdPegasusConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=vocab, max_position_embeddings=64,
        attention_type="original_full", pad_token_id=0, decoder_start_token_id=1),
}


@pytest.mark.parametrize("family", sorted(UNREADABLE_ENCODER))
def test_self_attention_the_capture_cannot_read_is_named(tmp_path, capsys, recwarn, family):
    # duat inspect reported the decoder's layer alone, without a word on the encoder's attention it left out; its
    # note is the only word on it (attention_layers' own warning about the same modules is silenced)
    vocab = _save_tokenizer(tmp_path)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(UNREADABLE_ENCODER[family](vocab)).save_pretrained(tmp_path)
    note = "self-attention modules not inspected (1: encoder.layers.0.self_attn)"
    assert main(["inspect", "--model", str(tmp_path), "--text", _text(6), "--json", str(tmp_path / "r.json")]) == 0
    assert note in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert [entry["name"] for entry in result["layers"]] == ["decoder.layers.0.self_attn"]
    assert result["uncovered_attention"] == ["encoder.layers.0.self_attn"] and result["passed"]
    if family == "bigbird_pegasus":  # LED's decoder attention is not run through transformers' functions: no --long
        assert main(["inspect", "--model", str(tmp_path), "--text", _text(6), "--long"]) == 0
        assert note in capsys.readouterr().out
    assert not [w for w in recwarn if "cannot read" in str(w.message)]


@pytest.mark.parametrize("family", ["bart", "fsmt"])
def test_decoder_layers_are_labelled_with_the_tokens_they_read(tmp_path, capsys, monkeypatch, family):
    # the heatmaps' hover labels (--html) and tick labels (--plot) of BART's decoder layer named the input tokens,
    # one position off what the decoder reads (the text shifted right: token n is the text's token n - 1), and
    # --json did not say which; FSMT: decoder token 0 is the text's last token (its shift puts it first)
    folder = _encoder_decoder_folder(tmp_path / family, family)
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    import matplotlib.axes

    ticks, set_yticks = [], matplotlib.axes.Axes.set_yticks  # --plot: each panel's output-token labels
    def recording(ax, where, labels=None, **kw):
        ticks.append(list(labels))
        return set_yticks(ax, where, labels, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_yticks", recording)
    assert main(["inspect", "--model", str(folder), "--text", _text(6), "--json", str(out), "--html", str(page),
                 "--plot", str(tmp_path / "r.png"), "--save", str(tmp_path / "w.safetensors")]) == 0
    capsys.readouterr()
    model, tok = dk.models.load(str(folder))
    ids = tok([_text(6)], return_tensors="pt")["input_ids"][0].tolist()
    tokens = tok.convert_ids_to_tokens(ids)
    first = ids[-1] if family == "fsmt" else model.config.decoder_start_token_id
    shifted = tok.convert_ids_to_tokens([first, *ids[:-1]])
    result = json.loads(out.read_text())
    assert result["tokens"] == tokens and result["decoder_tokens"] == shifted
    assert [(entry["name"].split(".")[0], entry["reads"]) for entry in result["layers"]] == [
        ("encoder", "tokens"), ("decoder", "decoder_tokens")]
    data = _html_data(page)
    assert data["labels"] == tokens and [layer["labels"] for layer in data["layers"]] == [None, shifted]
    assert ticks == [tokens, shifted]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), "pt") as saved:  # --save
        meta = saved.metadata()
    assert meta["tokens"].split("\t") == tokens and meta["decoder_tokens"].split("\t") == shifted
    assert meta["decoder_layers"] == "1"


def _heads_output(layer, heads, w=None):
    """By hand, in float64, over the real tokens: the given heads' part of the attention output, Σ_{i in heads}
    A_i (x W_v,i^T + b_v,i) W_o,i^T (b_o belongs to no head); with w (their dense token-layout W'), W' x' plus
    their part of b' instead."""
    h, kv = layer.num_heads, layer.num_kv_heads
    d = layer.w_o.shape[1] // h
    x = layer.x.double()
    b_v = torch.zeros(layer.w_v.shape[0], dtype=torch.float64) if layer.b_v is None else layer.b_v.double()
    total = torch.zeros(layer.output.shape, dtype=torch.float64)
    for i in heads:
        rows = slice((i // (h // kv)) * d, (i // (h // kv) + 1) * d)
        values = x @ layer.w_v.double()[rows].T if w is None else torch.zeros(*x.shape[:2], d, dtype=torch.float64)
        total += layer.attn.double()[:, i] @ (values + b_v[rows]) @ layer.w_o.double()[:, i * d:(i + 1) * d].T
    if w is not None:
        total += torch.einsum("brc,bc->br", w.double(), x.reshape(x.shape[0], -1)).reshape(total.shape)
    return total if layer.token_mask is None else total[layer.token_mask]


def test_bfloat16_w_of_a_head_subset_is_what_is_checked(folder, capsys):
    # the check was W' x' + b' of all heads in float32 (matrix-free): the bfloat16 W' of heads 0 and 2 that
    # --save writes was never compared with anything (its rel. error was ~1e-7, float32's, not bfloat16's)
    assert main(["inspect", "--model", str(folder), "--text", _text(6), "--json", "-", "--dtype", "bfloat16",
                 "--heads", "0", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tolerance"] == 1.6e-2 and result["passed"]
    for entry, layer in zip(result["layers"], _layers(folder, _text(6))):
        expected = _heads_output(layer, [0, 2])
        built = _heads_output(layer, [0, 2], layer.hvo_matrix(dtype=torch.bfloat16, heads=[0, 2]))
        error = ((built - expected).norm() / expected.norm()).item()
        assert 1e-5 < error <= 1.6e-2  # bfloat16's rounding, visible above float32's tolerance
        assert entry["rel_error"] == pytest.approx(error, rel=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_wrong_w_of_a_head_subset_fails(folder, capsys, monkeypatch, dtype):
    from duat_kernels.models import capture

    def doubled(*args, heads=None, **kwargs):
        w = hvo_matrix(*args, heads=heads, **kwargs)
        return w if heads is None else 2 * w

    hvo_matrix = capture.hvo_matrix
    monkeypatch.setattr(capture, "hvo_matrix", doubled)
    assert main(["inspect", "--model", str(folder), "--text", _text(6), "--dtype", dtype, "--heads", "1", "3"]) == 1
    assert "FAILED: W' x' + b' differs from a layer's output by " in capsys.readouterr().err


@pytest.fixture(scope="module")
def bart_folder(tmp_path_factory):
    """BART with 2 heads in its encoder layer (layer 0) and 4 in its decoder layer (layer 1)."""
    return _encoder_decoder_folder(tmp_path_factory.mktemp("bart"), "bart")


def test_heads_are_checked_per_layer(bart_folder, capsys):
    # --heads was limited to the smallest head count of all layers: --heads 3 --layer 1 was refused although
    # layer 1 has 4 heads, and the refusal ("heads must be in [-2, 2)") named no layer
    assert main(["inspect", "--model", str(bart_folder), "--text", _text(5), "--layer", "1", "--heads", "3",
                 "--json", "-", "--dtype", "float64"]) == 0
    result = json.loads(capsys.readouterr().out)
    [entry] = result["layers"]
    assert result["selected_heads"] == [3] and entry["heads"] == 4 and [h["head"] for h in entry["per_head"]] == [3]
    model, tok = dk.models.load(str(bart_folder))
    [layer] = dk.models.attention_layers(model, layers=[1], **tok([_text(5)], return_tensors="pt"))
    assert entry["frobenius"] == pytest.approx(layer.hvo_matrix(dtype=torch.float64, heads=[3]).norm().item(),
                                               rel=1e-6)
    for argv, message in ((["--heads", "1", "3"], "--heads 1 3: head 3 is not a head of layer 0 "
                                                   "(encoder.layers.0.self_attn), which has 2 heads (valid: -2 ... 1)"),
                          (["--heads", "-1"], "--heads -1: negative head indices count from each layer's last "
                                              "head, and the layers have different head counts (layer 0: 2, "
                                              "layer 1: 4); give indices >= 0")):
        assert main(["inspect", "--model", str(bart_folder), "--text", _text(5), *argv]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == f"duat inspect: {message}", err
        assert "layers:" not in err  # refused before any W'


def test_no_progress_hides_the_bars(folder, capsys):
    # duat inspect had no --no-progress (duat markov, claims and corpus have): its layers bar and transformers'
    # "Loading weights" bar always went to stderr
    from transformers.utils import logging

    argv = ["inspect", "--model", str(folder), "--text", _text(6)]
    for extra, shown in (([], True), (["--no-progress"], False)):
        assert main([*argv, *extra]) == 0
        captured = capsys.readouterr()
        assert ("layers: " in captured.err) == shown and ("Loading weights" in captured.err) == shown, captured.err
        assert "loaded " in captured.err and "rel. error" in captured.out  # the rest as before
        assert logging.is_progress_bar_enabled()  # as before the run
