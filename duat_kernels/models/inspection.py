"""`duat inspect`: W' of every attention layer of a real model on a text, checked and summarised."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from duat_kernels._validation import DenseTooLargeError
from duat_kernels.models.capture import AttentionLayer, attention_layers

BLOCK_FRACTION_OF_MAX = 0.01  # "dense" blocks: Frobenius norm above 1% of the largest block's


@dataclass
class LayerReport:
    layer: AttentionLayer
    rel_error: float  # ||W' x' + b' - module output|| / ||module output||
    seconds: float  # time to materialise W' (nan when it would not fit: checked matrix-free instead)
    frobenius: float  # ||W'||_F
    dense_blocks: float  # fraction of the N² blocks above BLOCK_FRACTION_OF_MAX of the largest
    block_norms: torch.Tensor  # (N, N)
    matrix: torch.Tensor | None  # (N·M_out, N·M_in) token layout, kept only when saving


def inspect_layers(model, inputs: dict, layers: list[int] | None = None, backend: str = "auto", keep: bool = False,
                   progress: bool = True) -> list[LayerReport]:
    """Capture the selected layers on inputs (batch of one) and report on each."""
    from tqdm.auto import tqdm

    captured = attention_layers(model, layers=layers, **inputs)
    reports = []
    for layer in tqdm(captured, desc="layers", unit="layer", disable=not progress):
        try:
            start = time.perf_counter()
            w = layer.hvo_matrix(backend=backend)
            seconds = time.perf_counter() - start
        except DenseTooLargeError:  # long inputs: check matrix-free instead
            w, seconds = None, math.nan
        norms = layer.operator().block_norms()[0]
        reports.append(LayerReport(
            layer=layer, rel_error=layer.relative_error(w), seconds=seconds,
            frobenius=norms.double().square().sum().sqrt().item(),
            dense_blocks=(norms > BLOCK_FRACTION_OF_MAX * norms.max()).double().mean().item(),
            block_norms=norms, matrix=w[0] if keep and w is not None else None))
    return reports


def format_reports(reports: list[LayerReport], model_name: str, tokens: list[str]) -> str:
    lines = [f"{model_name}: {len(tokens)} tokens: {' '.join(tokens)}", "",
             f"{'layer':>5} {'N':>4} {'M_in':>5} {'M_out':>5} {'heads':>7} {'rel. error':>11} {'W time':>9} "
             f"{'||W||_F':>9} {'blocks>1%':>9}"]
    for r in reports:
        lay = r.layer
        heads = f"{lay.attn.shape[1]}/{lay.num_kv_heads}"
        t = "matrix-free" if math.isnan(r.seconds) else f"{r.seconds * 1e3:.1f}ms"
        lines.append(f"{lay.index:>5} {lay.attn.shape[-1]:>4} {lay.w_v.shape[1]:>5} {lay.w_o.shape[0]:>5} {heads:>7} "
                     f"{r.rel_error:>11.2e} {t:>9} {r.frobenius:>9.2f} {r.dense_blocks:>9.1%}")
    lines += ["", "rel. error: W' x' + b' against the attention module's own output; heads: query/kv; "
              f"blocks>1%: fraction of the N x N blocks whose norm exceeds 1% of the largest."]
    return "\n".join(lines)


def save(reports: list[LayerReport], path: str, tokens: list[str]) -> None:
    """W', b' and the block norms of each layer into one safetensors file ("layer{L}.W", ...)."""
    from safetensors.torch import save_file

    tensors = {}
    for r in reports:
        key = f"layer{r.layer.index}"
        if r.matrix is not None:
            tensors[f"{key}.W"] = r.matrix.contiguous()
        tensors[f"{key}.b"] = r.layer.hvo_bias()[0].contiguous()
        tensors[f"{key}.block_norms"] = r.block_norms.contiguous()
    save_file(tensors, path, metadata={"tokens": "\t".join(tokens), "layout": "token"})


def plot_block_norms(reports: list[LayerReport], path: str, tokens: list[str], title: str) -> None:
    """Heatmaps of the N x N block norms, one panel per layer, tokens on the axes."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'duat-kernels[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(reports))
    rows = -(-len(reports) // cols)
    side = 2.2 + 0.18 * len(tokens)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * side, rows * side), squeeze=False)
    for ax in axes.flat[len(reports):]:
        ax.axis("off")
    show_labels = len(tokens) <= 48
    for ax, r in zip(axes.flat, reports):
        im = ax.imshow(r.block_norms.numpy(), cmap="magma")
        ax.set_title(f"layer {r.layer.index}: ||W'_nm||_F")
        if show_labels:
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
        ax.set_xlabel("input token m")
        ax.set_ylabel("output token n")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
