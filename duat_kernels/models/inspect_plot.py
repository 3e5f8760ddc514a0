"""Block-norm heatmaps for `duat inspect --plot` (PNG) and the grid reduction shared with --html."""

from __future__ import annotations

import torch

MAX_CELLS = 96  # longer inputs are shown as a grid of at most this many super-blocks per side
DYNAMIC_RANGE = 1e-4  # the log colour scale spans [max · 1e-4, max]: an attention-sink column stays one bright
# column instead of pushing every other block to the bottom of a linear scale
MAX_FIGURE_INCHES = 24.0  # the whole figure
MAX_PANEL_INCHES = 8.0


def grid_size(tokens: int, max_cells: int = MAX_CELLS) -> int:
    return min(tokens, max_cells)


def cell_edges(tokens: int, cells: int) -> list[int]:
    """Token boundaries of `cells` near-equal groups: token t is in cell (t · cells) // tokens, the grid
    of linalg.block_norms, so cell k starts at ceil(k · tokens / cells)."""
    return [-(-k * tokens // cells) for k in range(cells + 1)]


def cell_labels(tokens: list[str], cells: int) -> list[str]:
    """One label per grid cell: the token itself, or 'a-b: first ... last' for a group."""
    if cells == len(tokens):
        return list(tokens)
    edges = cell_edges(len(tokens), cells)
    return [f"{a}-{b - 1}: {tokens[a]} ... {tokens[b - 1]}" for a, b in zip(edges, edges[1:])]


def cell_unit(tokens: int, cells: int) -> str:
    """What one of `cells` grid cells over `tokens` tokens holds, for an axis label."""
    return "token" if cells == tokens else f"super-block (~{tokens / cells:.1f} tokens)"


def axis_names(layer, decoder_layers=frozenset()) -> tuple[str, str]:
    """Which token list names the rows (output tokens n) and the columns (input tokens m) of the layer's block
    norms: "tokens" (the text) or "decoder_tokens" (what an encoder-decoder's decoder reads, for the layers of index
    in decoder_layers); a cross-attention layer's columns are the encoder's tokens, the text's."""
    rows = "decoder_tokens" if layer.index in decoder_layers else "tokens"
    return rows, "tokens" if layer.kind == "cross" else rows


def axis_tokens(layer, tokens: list[str], decoder_tokens: list[str] | None = None,
                decoder_layers=frozenset()) -> tuple[list[str], list[str]]:
    """The token strings of the layer's rows (N) and columns (N_k): see axis_names."""
    named = {"tokens": tokens, "decoder_tokens": decoder_tokens}
    rows, columns = axis_names(layer, decoder_layers)
    return named[rows], named[columns]


def reduced_norms(report, grid: tuple[int, int], heads: list[int] | None = None) -> torch.Tensor:
    """(R, C) = grid Frobenius norms of the super-blocks of the report's W' (of `heads`), exactly: its own block_norms
    when they are on that grid (all N x N_k blocks, or duat inspect --long's grid), else from its layer's operator."""
    if tuple(grid) == tuple(report.block_norms.shape):
        return report.block_norms
    return report.layer.operator(heads=heads).block_norms(grid=tuple(grid))[0]


def block_norm_figure(reports, tokens: list[str], title: str, heads: list[int] | None = None,
                      decoder_tokens: list[str] | None = None, decoder_layers=frozenset()):
    """The matplotlib figure of plot_block_norms: one panel per layer, rows the output tokens n, columns the input
    tokens m (axis_tokens: a cross-attention layer's panel is N_dec x N_enc, the decoder's tokens by the text's)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'duat-kernels[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    axes_tokens = [axis_tokens(r.layer, tokens, decoder_tokens, decoder_layers) for r in reports]
    grids = [(grid_size(len(rows)), grid_size(len(columns))) for rows, columns in axes_tokens]
    cells = max(max(grid) for grid in grids)
    maps = [reduced_norms(r, grid, heads) for r, grid in zip(reports, grids)]
    top = max(m.max().item() for m in maps)
    norm = LogNorm(vmin=max(top * DYNAMIC_RANGE, 1e-30), vmax=max(top, 1e-30), clip=True)
    cols = min(4, len(reports))
    rows = -(-len(reports) // cols)
    side = min(2.5 + 0.12 * cells, MAX_PANEL_INCHES, MAX_FIGURE_INCHES / cols, MAX_FIGURE_INCHES / rows)
    side = max(side, 1.8)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * side + 1.2, rows * side + 0.6), squeeze=False)
    for ax in axes.flat[len(reports):]:
        ax.axis("off")
    labelled = cells <= 40 and side >= 3
    image = None
    for ax, r, m, (row_tokens, column_tokens), grid in zip(axes.flat, reports, maps, axes_tokens, grids):
        image = ax.imshow(m.clamp_min(norm.vmin).numpy(), cmap="magma", norm=norm, interpolation="nearest")
        cross = " (cross: decoder x encoder)" if r.layer.kind == "cross" else ""
        ax.set_title(f"layer {r.layer.index}{cross}", fontsize=9)
        if labelled:
            ax.set_xticks(range(grid[1]), cell_labels(column_tokens, grid[1]), rotation=90, fontsize=6)
            ax.set_yticks(range(grid[0]), cell_labels(row_tokens, grid[0]), fontsize=6)
        else:
            ax.tick_params(labelsize=6)
    # what one cell of each panel's columns and rows holds: shared by all panels, or per panel (a decoder or
    # cross-attention panel of fewer tokens has finer super-blocks than the encoder's)
    units = [(cell_unit(len(columns), grid[1]), cell_unit(len(rows), grid[0]))
             for (rows, columns), grid in zip(axes_tokens, grids)]
    if len(set(units)) == 1:
        fig.supxlabel(f"input {units[0][0]} m", fontsize=9)
        fig.supylabel(f"output {units[0][1]} n", fontsize=9)
    else:
        for ax, (column_unit, row_unit) in zip(axes.flat, units):
            ax.set_xlabel(f"input {column_unit} m", fontsize=7)
            ax.set_ylabel(f"output {row_unit} n", fontsize=7)
    fig.colorbar(image, ax=axes, fraction=0.03, pad=0.02, label="||W'_nm||_F (log, shared by all layers)")
    fig.suptitle(title, fontsize=10)
    return fig


def plot_block_norms(reports, path: str, tokens: list[str], title: str, heads: list[int] | None = None,
                     decoder_tokens: list[str] | None = None, decoder_layers=frozenset()) -> tuple[int, int]:
    """Heatmaps of the block norms ||W'_nm||_F, one panel per layer, on one log colour scale; the panels of the
    layers of index in decoder_layers are labelled with decoder_tokens (what an encoder-decoder's decoder reads), a
    cross-attention layer's columns with the tokens (the encoder's): block_norm_figure.

    Long inputs are reduced to at most MAX_CELLS super-blocks a side (exact super-block norms)
    and the figure is kept under MAX_FIGURE_INCHES a side. Returns the PNG size in pixels.
    """
    fig = block_norm_figure(reports, tokens, title, heads, decoder_tokens, decoder_layers)  # imports matplotlib
    import matplotlib.pyplot as plt

    dpi = 100
    fig.savefig(path, dpi=dpi)
    size = fig.get_size_inches() * dpi
    plt.close(fig)
    return int(size[0]), int(size[1])
