"""`duat inspect --long`: W' analyses of a real model on a long text without storing any attention.

Layers are captured as q and k (attention_layers(..., capture="qk"), sdpa, the pass stops after the
last selected layer); every number comes from HVOOperator.from_qk: the exactness check W' x' + b'
against the module's output, ||W'||_F, block norms on a grid and the spectral norm.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from duat_kernels._validation import nan_max
from duat_kernels.models.capture import attention_layers, unread_cross_attention

AUTO_WORDS = 1500  # texts longer than this (whitespace-separated words) are inspected with --long
GRID = 64  # block norms are reported on a GRID x GRID grid of super-blocks


@dataclass
class LongLayerReport:
    index: int
    tokens: int
    heads: str  # "h/h_kv"
    rel_error: float  # ||W' x' + b' - module output|| / ||module output||
    frobenius: float
    spectral: float  # nan when not computed
    grid_norms: torch.Tensor  # (GRID, GRID) super-block norms
    seconds: dict  # analysis -> seconds


def wants_long(args) -> bool:
    """--long, or a text long enough that eager attention probabilities of every layer would be large."""
    return bool(getattr(args, "long", False)) or is_long(read_text(args.text) if getattr(args, "text", None) else "")


def is_long(text: str) -> bool:
    """More than AUTO_WORDS whitespace-separated words: inspected with --long."""
    return len(text.split()) > AUTO_WORDS


def read_text(text: str) -> str:
    """The text itself, or the contents of a file given as @path."""
    return Path(text[1:]).read_text() if text.startswith("@") else text


def inspect_long(model, inputs: dict, layers: list[int] | None = None, spectral: bool = True, grid: int = GRID,
                 spectral_tol: float = 1e-3) -> list[LongLayerReport]:
    """Capture the selected layers as q/k on inputs (batch of one) and analyse each matrix-free."""
    key = next((k for k in ("input_ids", "inputs_embeds") if isinstance(inputs.get(k), torch.Tensor)), None)
    if key is not None and (inputs[key].dim() < 2 or inputs[key].shape[0] != 1):
        raise ValueError(f"inspect_long analyses one sequence (batch of one), got {key} of shape "
                         f"{tuple(inputs[key].shape)}")
    start = time.perf_counter()
    captured = attention_layers(model, layers=layers, capture="qk", **inputs)
    capture_s = time.perf_counter() - start
    reports = []
    for layer in captured:
        op = layer.operator()
        n = op.dims.tokens
        seconds = {"capture": capture_s}
        t = time.perf_counter()
        rel = layer.relative_error()
        seconds["check"] = time.perf_counter() - t
        t = time.perf_counter()
        cells = op.block_norms(grid=(min(grid, n), min(grid, n)))[0]
        seconds["block_norms"] = time.perf_counter() - t
        sigma = math.nan
        if spectral:
            t = time.perf_counter()
            single = layer.operator() if not op.dims.batched else _unbatched(layer)
            sigma = single.spectral_norm(tol=spectral_tol)
            seconds["spectral_norm"] = time.perf_counter() - t
        reports.append(LongLayerReport(layer.index, n, f"{op.dims.heads}/{op.dims.kv_heads}", rel,
                                       cells.double().square().sum().sqrt().item(), sigma, cells, seconds))
    return reports


def _unbatched(layer):
    from duat_kernels.hvo_operator import HVOOperator

    return HVOOperator.from_qk(layer.q[0], layer.k[0], layer.w_v, layer.w_o, causal=layer.causal,
                               attention_mask=None if layer.attended_keys is None else layer.attended_keys[0],
                               scale=layer.scale, b_v=layer.b_v, b_o=layer.b_o, softcap=layer.softcap,
                               sliding_window=layer.sliding_window)


def format_long_reports(reports: list[LongLayerReport], model_name: str) -> str:
    lines = [f"{model_name}: {reports[0].tokens if reports else 0} tokens, q/k capture (no attention stored)", "",
             f"{'layer':>5} {'N':>6} {'heads':>7} {'rel. error':>11} {'||W||_F':>9} {'||W||_2':>9} "
             f"{'norms time':>10} {'spectral time':>13}"]
    for r in reports:
        spec_t = r.seconds.get("spectral_norm", math.nan)
        lines.append(f"{r.index:>5} {r.tokens:>6} {r.heads:>7} {r.rel_error:>11.2e} {r.frobenius:>9.2f} "
                     f"{r.spectral:>9.3f} {r.seconds['block_norms']:>9.2f}s {spec_t:>12.2f}s")
    return "\n".join(lines)


def run_inspect_long(args, model, inputs: dict, decoder_note: str | None = None) -> int:
    """The CLI path of `duat inspect --long` (args from duat inspect's parser; the loaded model and its
    tokenized text, a batch of one; decoder_note: what an encoder-decoder's decoder read, printed under the table)."""
    from duat_kernels.models.encoder_decoder import (cross_attention_blocks, cross_attention_note,
                                                     uncovered_attention_modules, uncovered_note)

    from duat_kernels.models.qk_capture import QkCaptureUnsupported

    try:
        reports = inspect_long(model, inputs, args.layer)
    except QkCaptureUnsupported as exc:  # "use capture='attn'": in duat inspect that is the dense inspection
        raise ValueError(f"{exc}. duat inspect without --long captures A itself (texts of more than {AUTO_WORDS} "
                         "words take --long by themselves: give a shorter text)") from None
    print(format_long_reports(reports, f"{args.model} ({model.config.model_type})"))
    if decoder_note:
        print(decoder_note)
    skipped = cross_attention_blocks(model)
    if skipped:
        print(cross_attention_note(skipped, unread_cross_attention(model)))
    if uncovered := uncovered_attention_modules(model):
        print(uncovered_note(uncovered))
    worst = nan_max(r.rel_error for r in reports)
    if not worst <= 1e-5:
        print(f"FAILED: W' x' + b' differs from a layer's output by {worst:.2e} > 1e-05", file=sys.stderr)
        return 1
    return 0
