"""`duat claims` end to end on a tiny local model folder, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from duat_kernels.analysis.claims import SECTIONS
from duat_kernels.cli import main

from claims_models import tiny_model, tokenizer  # noqa: F401  (fixtures)

pytest.importorskip("peft", reason="the lora section needs peft: pip install '.[claims]'")
pytest.importorskip("matplotlib", reason="the plots need matplotlib: pip install '.[plot]'")


def test_claims_on_a_local_folder(tmp_path, tokenizer, capsys):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "report"
    assert main(["claims", "--model", str(folder), "--text", "the quick brown fox jumps", "--out", str(out)]) == 0
    result = json.loads((out / "claims.json").read_text())
    assert set(SECTIONS) <= set(result) and result["meta"]["model_type"] == "llama"
    assert result["multilayer"]["held"] and result["pruning"]["bound_held"]
    assert result["lora"]["value_output"]["rank_bound_held"]
    md = (out / "claims.md").read_text()
    for title in ("## Density", "## Dynamic", "## Pruning", "## LoRA", "## Many layers", "## Token-to-token"):
        assert title in md
    for png in ("density", "dynamic", "pruning", "multilayer", "contributions"):
        assert (out / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert f"--out {out}" in result["meta"]["command"] and "claims.md" in capsys.readouterr().out


def test_claims_refuses_an_unsupported_model(tmp_path, tokenizer, capsys):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "tiny-gpt2"
    transformers.GPT2Model(transformers.GPT2Config(vocab_size=40, n_embd=8, n_layer=1, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["claims", "--model", str(folder), "--out", str(tmp_path / "out")]) == 2  # SystemExit gave 1
    assert "duat claims: model_type='gpt2' has no layer recipe" in capsys.readouterr().err
    assert main(["claims", "--model", str(folder), "--out", str(tmp_path / "out"), "--lora-rank", "0"]) == 2
    assert capsys.readouterr().err == "duat claims: --lora-rank must be >= 1, got 0\n"
    assert main(["claims", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "duat claims: model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # the refused runs left their --out behind, empty


def test_claims_sections_subset_without_plots(tmp_path, tokenizer):
    folder = tmp_path / "tiny-bert"
    tiny_model("bert", torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "report"
    assert main(["claims", "--model", str(folder), "--sections", "multilayer", "pruning", "--no-plots",
                 "--out", str(out)]) == 0
    result = json.loads((out / "claims.json").read_text())
    assert {"multilayer", "pruning"} <= set(result) and "lora" not in result and "density" not in result
    assert "--sections multilayer pruning" in result["meta"]["command"]
    assert not list(out.glob("*.png")) and "## Many layers" in (out / "claims.md").read_text()


def test_claims_out_that_is_a_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import duat_kernels.models

    monkeypatch.setattr(duat_kernels.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["claims", "--model", "any", "--out", str(blocker)]) == 2  # was refused after every measurement
    assert capsys.readouterr().err == f"duat claims: --out {blocker}: {blocker} is a file, not a folder\n"


@pytest.mark.parametrize("text", ["", "  \n"])
def test_claims_refuses_an_empty_text_before_loading(tmp_path, capsys, monkeypatch, text):
    # '' was replaced by the built-in sentence (exit 0, a report on another text); blank text failed after
    # loading with 'input_ids of shape (1, 0) holds no tokens'
    import duat_kernels.models

    monkeypatch.setattr(duat_kernels.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["claims", "--model", "any", "--text", text, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("duat claims: --text is empty") and err.count("\n") == 1, err


def test_claims_no_progress_hides_the_bars(tmp_path, tokenizer, capsys):
    # duat claims had no --no-progress (duat corpus and duat markov have): its density and dynamic bars always went
    # to stderr
    folder = tmp_path / "tiny-bert"
    tiny_model("bert", torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    argv = ["claims", "--model", str(folder), "--text", "the fox", "--sections", "density", "--no-plots"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "density: " in err and "Loading weights" in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "density: " not in err and "Loading weights" not in err  # transformers' bar too
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()  # as before the run


@pytest.mark.parametrize("sections,words", [(["density"], 70), (["dynamic"], 60)])
def test_claims_checks_the_model_positions(tmp_path, tokenizer, capsys, sections, words):
    # past max_position_embeddings (64) torch failed with 'The expanded size of the tensor (72) must match the
    # existing size (64)'; with the dynamic section the prompted passage (the prompt adds 4 tokens) is longer
    folder = tmp_path / "tiny-bert"
    tiny_model("bert", torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = " ".join(["fox"] * words)
    assert main(["claims", "--model", str(folder), "--text", text, "--sections", *sections, "--no-plots",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the loading progress bars
    assert last.startswith("duat claims: the text") and "tokens but the model takes at most 64 positions" in last
    assert ("behind the prompt" in last) == (sections == ["dynamic"]) and "Traceback" not in err, err
    assert not (tmp_path / "out" / "claims.json").exists()


@pytest.mark.parametrize("out", ["", " "])
def test_claims_refuses_an_empty_out_before_loading(tmp_path, capsys, monkeypatch, out):
    # --out '' was Path('') = '.', the working directory: claims.md, claims.json and the PNGs were written
    # there ('written to ./'); ' ' made a folder named ' '
    import duat_kernels.models

    monkeypatch.setattr(duat_kernels.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)
    assert main(["claims", "--model", "any", "--out", out]) == 2
    assert capsys.readouterr().err == "duat claims: --out is empty; give a folder\n"
    assert not any(tmp_path.iterdir())


def test_claims_rerun_into_the_same_out_links_no_plot_of_the_earlier_run(tmp_path, tokenizer):
    """claims.md linked every <section>.png it found in --out: after a run with plots, a rerun with --no-plots
    (or another model) showed the earlier run's plots as its own. The rerun removes them."""
    folder = tmp_path / "tiny-bert"
    tiny_model("bert", torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "report"
    argv = ["claims", "--model", str(folder), "--sections", "multilayer", "pruning", "--out", str(out)]
    assert main(argv) == 0
    assert {"multilayer.png", "pruning.png"} <= {p.name for p in out.iterdir()}
    (out / "notes.png").write_bytes(b"the user's own file")
    assert main(argv + ["--no-plots"]) == 0
    assert ".png" not in (out / "claims.md").read_text()
    assert sorted(p.name for p in out.glob("*.png")) == ["notes.png"]
    assert main(["claims", "--model", str(folder), "--sections", "multilayer", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["multilayer.png", "notes.png"]


def test_claims_rerun_keeps_a_png_no_duat_run_wrote(tmp_path, tokenizer):
    """The user's own density.png in --out was deleted by a run that did not plot the density section."""
    folder = tmp_path / "tiny-bert"
    tiny_model("bert", torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "report"
    out.mkdir()
    (out / "density.png").write_bytes(b"the user's own plot")
    assert main(["claims", "--model", str(folder), "--sections", "pruning", "--out", str(out)]) == 0
    assert (out / "density.png").read_bytes() == b"the user's own plot" and (out / "pruning.png").exists()


@pytest.mark.parametrize("text,out", [("it's \"quoted\"", "my report"), ("two\nlines 🙂", "out"), ("plain", "a;b")])
def test_claims_command_line_reproduces_the_arguments(text, out):
    """claims.md's "Command:" wrote the text with Python's repr ('it\\'s ...', '\\n') and the folder unquoted:
    pasted into a shell it failed or measured another text."""
    import shlex

    from duat_kernels.analysis.claims.cli import _command
    from duat_kernels.cli import build_parser

    argv = ["claims", "--model", "my model", "--text", text, "--sections", "pruning", "--lora-rank", "2", "--out", out]
    args = build_parser().parse_args(argv)
    words = shlex.split(_command(args))
    assert words[:2] == ["duat", "claims"]
    assert vars(build_parser().parse_args(words[1:])) == vars(args)


@pytest.mark.parametrize("sections", [["lora"], ["pruning"]])
def test_claims_refuses_a_lora_rank_above_the_width_before_measuring(tmp_path, tokenizer, capsys, monkeypatch, sections):
    """--lora-rank 25 on a width-24 model was accepted: rank ΔOV_i <= 2r then holds whatever the adapters do."""
    from duat_kernels.analysis.claims import run

    folder = tmp_path / "tiny-bert"
    tiny_model("bert", torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(run, "measure_all", lambda *a, **k: pytest.fail("the claims were measured"))
    argv = ["claims", "--model", str(folder), "--sections", *sections, "--out", str(tmp_path / "out")]
    assert main(argv + ["--lora-rank", "25"]) == 2
    err = capsys.readouterr().err  # after the progress bars of loading the model
    assert err.endswith("\nduat claims: --lora-rank 25 is above the model width 24: give a rank from 1 to 24\n")
