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
