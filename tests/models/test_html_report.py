"""`duat inspect --html`'s page with cross-attention layers: N_dec x N_enc heatmaps (rows the decoder's tokens,
columns the encoder's), their norms those of the layer's W', both token lists, rendered in headless Chromium."""

from __future__ import annotations

import numpy as np
import pytest

from duat_kernels.models import html_report
from test_inspect_cli import _html_data, _rendered, chromium
from test_inspect_plot import DECODER_TOKENS, ENCODER_TOKENS, FAMILIES, N_DEC, N_ENC, cross_reports, expected_axes

PAGE_DIGITS = 5e-3  # the page's norms have 3 significant digits: within half a unit of the third of the exact ones


def _page(family: str, max_cells: int, monkeypatch) -> tuple[dict, list]:
    monkeypatch.setattr(html_report, "HTML_MAX_CELLS", max_cells)
    reports, decoder_layers = cross_reports(family)
    data = html_report.page_data(reports, ENCODER_TOKENS, "t", 1e-5, None, DECODER_TOKENS, decoder_layers)
    return data, reports


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cross_attention_layer_has_its_own_rows_and_columns(family, monkeypatch):
    data, reports = _page(family, 64, monkeypatch)
    _, decoder_layers = cross_reports(family)
    assert data["tokens"] == ENCODER_TOKENS and data["decoder_tokens"] == DECODER_TOKENS
    for entry, r in zip(data["layers"], reports):
        rows, columns = expected_axes(r.layer, decoder_layers)
        assert tuple(entry["grid"]) == (len(rows), len(columns)) and entry["kind"] == r.layer.kind
        assert (entry["labels"] or data["labels"]) == rows
        assert (entry["column_labels"] or entry["labels"] or data["labels"]) == columns
        op = r.layer.operator()
        # exactly the layer's block norms, rounded to the page's 3 significant digits
        assert entry["total"] == [[float(f"{v:.3g}") for v in row] for row in op.block_norms()[0].tolist()]
        assert len(entry["per_head"]) == r.layer.num_heads
        for i, head in enumerate(entry["per_head"]):
            exact = r.layer.operator(heads=[i]).block_norms()[0].double().numpy()
            np.testing.assert_allclose(head, exact, rtol=PAGE_DIGITS, atol=0)
    cross = data["layers"][-1]
    assert cross["labels"] == DECODER_TOKENS and cross["column_labels"] == ENCODER_TOKENS
    assert [e["column_labels"] for e in data["layers"][:-1]] == [None, None]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_long_encoder_is_shown_as_super_blocks(family, monkeypatch):
    # at most 5 cells a side: the decoder's 4 tokens stay tokens, the encoder's 9 become 5 super-blocks (tokens
    # 0-1, 2-3, 4-5, 6-7, 8: token m in cell m·5 // 9)
    data, reports = _page(family, 5, monkeypatch)
    cross, layer = data["layers"][-1], reports[-1].layer
    assert tuple(cross["grid"]) == (N_DEC, 5)
    assert cross["labels"] == DECODER_TOKENS and len(cross["column_labels"]) == 5
    assert cross["column_labels"][0] == "0-1: e0 ... e1" and cross["column_labels"][-1] == "8-8: e8 ... e8"
    expected = layer.operator().block_norms(grid=(N_DEC, 5))[0].double().numpy()
    np.testing.assert_allclose(cross["total"], expected, rtol=PAGE_DIGITS, atol=0)
    for i, head in enumerate(cross["per_head"]):
        exact = layer.operator(heads=[i]).block_norms(grid=(N_DEC, 5))[0].double().numpy()
        np.testing.assert_allclose(head, exact, rtol=PAGE_DIGITS, atol=0)


@pytest.mark.skipif(chromium is None, reason="needs headless Chromium (apt-get install chromium)")
def test_a_cross_attention_heatmap_renders_in_chromium(tmp_path):
    reports, decoder_layers = cross_reports("bart")
    page = tmp_path / "r.html"
    html_report.write_html(str(page), reports, ENCODER_TOKENS, "t", 1e-5, None, DECODER_TOKENS, decoder_layers)
    assert _html_data(page)["decoder_tokens"] == DECODER_TOKENS
    dom = _rendered(page, tmp_path, "selftest-2")
    heads = reports[-1].layer.num_heads
    assert f"rendered layer 2: {1 + heads} heatmaps of {N_DEC}x{N_ENC}" in dom  # the cross-attention layer (row 2)
    assert f"{N_ENC} tokens: {' '.join(ENCODER_TOKENS)}\n{N_DEC} decoder tokens: {' '.join(DECODER_TOKENS)}" in dom
    hover = dom.split("hover: ")[1]  # the centre of a 4 x 9 heatmap: decoder token 2, encoder token 4
    assert "output n=2: d2" in hover and "input m=4: e4" in hover
