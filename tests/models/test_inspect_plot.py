"""`duat inspect --plot`'s figure (matplotlib objects, not pixels) with cross-attention layers: a cross-attention
panel has the N_dec decoder tokens as rows and the N_enc encoder tokens as columns; self-attention panels keep one
token list on both axes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from duat_kernels.models import inspection
from duat_kernels.models.inspect_plot import block_norm_figure
from test_cross_capture import _model

pytest.importorskip("transformers", reason="the model tests need transformers: pip install '.[models]'")
plt = pytest.importorskip("matplotlib.pyplot", reason="--plot needs matplotlib: pip install '.[plot]'")

N_ENC, N_DEC = 9, 4  # a rectangular A: the decoder given decoder_input_ids of its own length
ENCODER_TOKENS = [f"e{m}" for m in range(N_ENC)]
DECODER_TOKENS = [f"d{n}" for n in range(N_DEC)]
FAMILIES = ["bart", "marian", "t5"]


@functools.cache
def cross_reports(family: str) -> tuple[list, frozenset]:
    """duat inspect's reports of every layer (self-attention, then cross-attention) of a tiny random-init model on
    N_ENC encoder and N_DEC decoder tokens (batch of one), and the indices of its decoder layers."""
    g = torch.Generator().manual_seed(1)
    inputs = dict(input_ids=torch.randint(2, 100, (1, N_ENC), generator=g),
                  decoder_input_ids=torch.randint(2, 100, (1, N_DEC), generator=g))
    reports = inspection.inspect_layers(_model(family), inputs, progress=False, include_cross=True)
    return reports, frozenset(r.layer.index for r in reports if "decoder" in r.layer.name.split("."))


def expected_axes(layer, decoder_layers) -> tuple[list[str], list[str]]:
    """The tokens of a layer's rows and columns: a decoder layer's rows are the decoder's tokens, a cross-attention
    layer's columns the encoder's, a self-attention layer's columns its rows."""
    rows = DECODER_TOKENS if layer.index in decoder_layers else ENCODER_TOKENS
    return rows, ENCODER_TOKENS if layer.kind == "cross" else rows


def panels(fig) -> list:
    """The figure's heatmap panels (axes with an image: not the colour bar, not the unused axes)."""
    return [ax for ax in fig.axes if ax.get_images()]


def recorded_figures(monkeypatch) -> list:
    """The figures duat inspect --plot draws (inspect_plot.block_norm_figure) from now on, kept for their axes."""
    from duat_kernels.models import inspect_plot

    figures, figure = [], inspect_plot.block_norm_figure

    def recorded(*args, **kwargs):
        figures.append(figure(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(inspect_plot, "block_norm_figure", recorded)
    return figures


def tick_labels(ax) -> tuple[list[str], list[str]]:
    """(column labels, row labels) of a panel."""
    return [t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cross_attention_panel_is_decoder_tokens_by_encoder_tokens(family):
    reports, decoder_layers = cross_reports(family)
    assert [r.layer.kind for r in reports] == ["self", "self", "cross"]
    fig = block_norm_figure(reports, ENCODER_TOKENS, "t", decoder_tokens=DECODER_TOKENS, decoder_layers=decoder_layers)
    try:
        assert len(panels(fig)) == len(reports)
        for ax, r in zip(panels(fig), reports):
            rows, columns = expected_axes(r.layer, decoder_layers)
            image = ax.get_images()[0]
            assert image.get_array().shape == (len(rows), len(columns)), r.layer.name
            assert tick_labels(ax) == (columns, rows)
            # the block norms of the layer's W', clamped to the bottom of the shared log scale
            norms = r.layer.operator().block_norms()[0].clamp_min(image.norm.vmin)
            np.testing.assert_array_equal(image.get_array(), norms.numpy())
            assert ("cross" in ax.get_title()) == (r.layer.kind == "cross")
    finally:
        plt.close(fig)


@pytest.mark.parametrize("family", FAMILIES)
def test_self_attention_panels_are_the_same_with_a_cross_attention_panel(family):
    reports, decoder_layers = cross_reports(family)
    figures = [block_norm_figure(chosen, ENCODER_TOKENS, "t", decoder_tokens=DECODER_TOKENS,
                                 decoder_layers=decoder_layers) for chosen in (reports, reports[:-1])]
    try:
        with_cross, self_only = map(panels, figures)
        assert len(with_cross) == len(self_only) + 1
        for a, b in zip(with_cross, self_only):
            assert a.get_title() == b.get_title() and "cross" not in a.get_title()
            assert tick_labels(a) == tick_labels(b)
            assert a.get_images()[0].get_array().shape == b.get_images()[0].get_array().shape
    finally:
        for fig in figures:
            plt.close(fig)


def test_panels_with_other_super_blocks_name_their_own():
    """An encoder of 150 tokens is drawn on 96 super-blocks (~1.6 tokens each) while the decoder's 4 tokens stay
    single tokens: each panel's axes say what its own cells hold (the figure's one label named the encoder's
    super-blocks for every panel)."""
    g = torch.Generator().manual_seed(2)
    n_enc = 150
    inputs = dict(input_ids=torch.randint(2, 100, (1, n_enc), generator=g),
                  decoder_input_ids=torch.randint(2, 100, (1, N_DEC), generator=g))
    # T5: relative positions, so 150 tokens fit its tiny config (the others have 64 positions)
    reports = inspection.inspect_layers(_model("t5"), inputs, progress=False, include_cross=True)
    decoder_layers = frozenset(r.layer.index for r in reports if "decoder" in r.layer.name.split("."))
    encoder_tokens = [f"e{m}" for m in range(n_enc)]
    fig = block_norm_figure(reports, encoder_tokens, "t", decoder_tokens=DECODER_TOKENS, decoder_layers=decoder_layers)
    try:
        labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in panels(fig)]
        encoder, decoder = f"super-block (~{n_enc / 96:.1f} tokens)", "token"
        assert labels == [(f"input {encoder} m", f"output {encoder} n"),
                          (f"input {decoder} m", f"output {decoder} n"),
                          (f"input {encoder} m", f"output {decoder} n")]
        assert fig._supxlabel is None and fig._supylabel is None
    finally:
        plt.close(fig)
