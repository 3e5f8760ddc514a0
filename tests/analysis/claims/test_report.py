"""claims.json, written by report.write: valid JSON when measurements are not finite."""

from __future__ import annotations

import json

import pytest
import torch

from duat_kernels.cli import main

from claims_models import tiny_model, tokenizer  # noqa: F401  (fixtures)


def _strict(constant):
    raise ValueError(f"not JSON: bare {constant}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_measurements_are_null(tmp_path, tokenizer, capsys, value):
    # Python's bare NaN/Infinity made claims.json invalid JSON (JSON.parse and jq refuse it)
    folder = tmp_path / "bert"
    model = tiny_model("bert", torch.float32)
    with torch.no_grad():
        model.encoder.layer[1].attention.self.value.weight[0, 0] = value
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "report"
    main(["claims", "--model", str(folder), "--text", "the quick brown fox", "--sections", "multilayer", "pruning",
          "--no-plots", "--out", str(out)])
    capsys.readouterr()
    result = json.loads((out / "claims.json").read_text(), parse_constant=_strict)
    assert result["multilayer"]["layers"][1]["relative_error"] is None  # the layer of the non-finite weight
    assert result["multilayer"]["layers"][0]["relative_error"] < 1e-4  # the finite layer before it is kept
    assert None in result["pruning"]["layers"][2]["heads"]["head_norms"]


def _pruning(head_tightness: float, block_tightness: float, heads: int = 4) -> dict:
    """A pruning result of two layers with the given tightness everywhere (actual = tightness · bound)."""
    def budget(pruned, tightness):
        return {"pruned": pruned, "actual": tightness * 0.5, "bound": 0.5, "tightness": tightness}
    layer = {"heads": {"budgets": [budget(k, head_tightness) for k in range(1, heads + 1)]},
             "blocks": {"budgets": [budget(None, block_tightness) for _ in (0.1, 0.5)]}}
    return {"block_budgets": [0.1, 0.5], "bound_held": True, "layers": [dict(layer, layer=i) for i in range(2)]}


@pytest.mark.parametrize("heads,blocks", [(0.5, 1.0), (0.95, 0.4), (0.5, 0.5), (0.95, 0.99)])
def test_pruning_verdict_names_each_part_loose_or_tight(heads, blocks):
    """With heads at 0.50 of the bound and blocks at 1.00 (one token: one block a row) the report said "It is close
    to tight: ... 0.50 of the bound ... because the pruned outputs partly cancel": one verdict from the larger."""
    from duat_kernels.analysis.claims.report import pruning_md

    verdict = pruning_md(_pruning(heads, blocks))[-1]
    for name, value in (("heads", heads), ("blocks", blocks)):
        word = "loose" if value < 0.9 else "close to tight"
        assert f"{name}: {value:.2f} of the bound on average ({word})" in verdict
    assert ("partly cancel" in verdict) == (min(heads, blocks) < 0.9)


def test_pruning_verdict_of_a_one_head_model():
    from duat_kernels.analysis.claims.report import pruning_md

    verdict = pruning_md(_pruning(1.0, 0.5, heads=1))[-1]  # statistics.mean of no budget raised StatisticsError
    assert "heads: no budget prunes two or more heads" in verdict and "blocks: 0.50 of the bound" in verdict


def _density(tokens: int, attention_blocks: float, conv_blocks: float) -> dict:
    ts = ["0.001", "0.01", "0.1"]
    attention = {"entries": {t: {"fraction": 0.5} for t in ts}, "blocks": {t: attention_blocks for t in ts},
                 "nonzero_blocks": attention_blocks, "method": "exact"}
    layer = {"layer": 0, "attention": attention, "ffn_in": {"entries": {t: 0.3 for t in ts}}}
    return {"thresholds": [0.001, 0.01, 0.1], "tokens": tokens, "layers": [layer],
            "conv1d": {"entries": {t: 0.9 for t in ts}, "blocks": {t: conv_blocks for t in ts}}}


@pytest.mark.parametrize("tokens,attention,conv,verdict", [
    (1, 1.0, 1.0, "could not be judged at the block level"), (2, 0.75, 1.0, "could not be judged at the block level"),
    (8, 0.9, 0.34, "held at the block level"), (8, 0.2, 0.34, "did not hold at the block level")])
def test_density_verdict_when_the_convolution_reaches_every_block(tokens, attention, conv, verdict):
    """With one or two tokens the kernel-3 convolution reaches every block: attention at 100% of its blocks was
    reported as "did not hold" (100% is not more than 100%)."""
    from duat_kernels.analysis.claims.report import density_md

    assert verdict in density_md(_density(tokens, attention, conv))[-1]
