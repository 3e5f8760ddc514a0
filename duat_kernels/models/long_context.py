"""`duat inspect --long`: W' analyses of a real model on a long text without storing any attention.

Layers are captured as q and k (attention_layers(..., capture="qk"), sdpa, the pass stops after the
last selected layer); every number comes from HVOOperator.from_qk: the exactness check W' x' + b'
against the module's output, ||W'||_F, block norms on a grid and the spectral norm. With --cross
(include_cross=True) an encoder-decoder's cross-attention layers too, as decoder q over encoder k:
their grid is min(GRID, N_dec) x min(GRID, N_enc).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from duat_kernels.models.capture import attention_layers

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
    grid_norms: torch.Tensor  # (R, C) super-block norms, R = min(GRID, N), C = min(GRID, N_k)
    seconds: dict  # analysis -> seconds
    layer: object = field(default=None, repr=False)  # the QKAttentionLayer (kind "cross": N_dec x N_enc)

    @property
    def keys(self) -> int:
        """N_k: the keys (encoder tokens of a cross-attention layer; N for self-attention)."""
        return self.tokens if self.layer is None else self.layer.k.shape[-2]

    @property
    def block_norms(self) -> torch.Tensor:
        """The grid norms (R, C), under the name inspect_plot.reduced_norms reads."""
        return self.grid_norms


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
                 spectral_tol: float = 1e-3, include_cross: bool = False) -> list[LongLayerReport]:
    """Capture the selected layers as q/k on inputs (batch of one) and analyse each matrix-free; include_cross: also
    an encoder-decoder's cross-attention layers (grid norms (min(grid, N_dec), min(grid, N_enc)))."""
    key = next((k for k in ("input_ids", "inputs_embeds") if isinstance(inputs.get(k), torch.Tensor)), None)
    if key is not None and (inputs[key].dim() < 2 or inputs[key].shape[0] != 1):
        raise ValueError(f"inspect_long analyses one sequence (batch of one), got {key} of shape "
                         f"{tuple(inputs[key].shape)}")
    start = time.perf_counter()
    captured = attention_layers(model, layers=layers, capture="qk", include_cross=include_cross, **inputs)
    capture_s = time.perf_counter() - start
    reports = []
    for layer in captured:
        op = layer.operator()
        n, n_k = op.dims.tokens, op.dims.keys
        seconds = {"capture": capture_s}
        t = time.perf_counter()
        rel = layer.relative_error()
        seconds["check"] = time.perf_counter() - t
        t = time.perf_counter()
        cells = op.block_norms(grid=(min(grid, n), min(grid, n_k)))[0]
        seconds["block_norms"] = time.perf_counter() - t
        sigma = math.nan
        if spectral:
            t = time.perf_counter()
            single = layer.operator() if not op.dims.batched else _unbatched(layer)
            sigma = single.spectral_norm(tol=spectral_tol)
            seconds["spectral_norm"] = time.perf_counter() - t
        reports.append(LongLayerReport(layer.index, n, f"{op.dims.heads}/{op.dims.kv_heads}", rel,
                                       cells.double().square().sum().sqrt().item(), sigma, cells, seconds, layer))
    return reports


def _unbatched(layer):
    from duat_kernels.hvo_operator import HVOOperator

    return HVOOperator.from_qk(layer.q[0], layer.k[0], layer.w_v, layer.w_o, causal=layer.causal,
                               attention_mask=None if layer.attended_keys is None else layer.attended_keys[0],
                               scale=layer.scale, b_v=layer.b_v, b_o=layer.b_o, softcap=layer.softcap,
                               sliding_window=layer.sliding_window)


def format_long_reports(reports: list[LongLayerReport], model_name: str) -> str:
    """The table of duat inspect --long; a cross-attention layer's N is N_dec x N_enc (inspection.tokens_column)."""
    from duat_kernels.models.inspection import tokens_column

    lines = [f"{model_name}: {reports[0].tokens if reports else 0} tokens, q/k capture (no attention stored)", "",
             f"{'layer':>5} {'N':>9} {'heads':>7} {'rel. error':>11} {'||W||_F':>9} {'||W||_2':>9} "
             f"{'norms time':>10} {'spectral time':>13}"]
    for r in reports:
        spec_t = r.seconds.get("spectral_norm", math.nan)
        n = str(r.tokens) if r.layer is None else tokens_column(r.layer)
        lines.append(f"{r.index:>5} {n:>9} {r.heads:>7} {r.rel_error:>11.2e} {r.frobenius:>9.2f} "
                     f"{r.spectral:>9.3f} {r.seconds['block_norms']:>9.2f}s {spec_t:>12.2f}s")
    if any(r.layer is not None and r.layer.kind == "cross" for r in reports):
        lines.append("cross-attention layers: N is N_dec x N_enc (decoder queries over encoder keys), x' the "
                     f"encoder's output; their grid is min({GRID}, N_dec) x min({GRID}, N_enc).")
    return "\n".join(lines)


def as_long_json(reports: list[LongLayerReport], tolerance: float, decoder_layers=frozenset()) -> list[dict]:
    """The per-layer JSON entries of duat inspect --long: the fields of duat inspect's (inspection.layer_json; a
    cross-attention layer's "kind", "keys", "rows", "columns"), with W' never materialised ("w_seconds" null,
    "dense_blocks" null: the norms are on a grid, "per_head" empty), plus "spectral" (||W'||_2) and "grid" (R, C)."""
    from duat_kernels.models.inspection import layer_json

    return [layer_json(r.layer, decoder_layers, rel_error=r.rel_error, w_seconds=None, materialised=False,
                       frobenius=r.frobenius, dense_blocks=None, passed=r.rel_error <= tolerance, per_head=[],
                       spectral=r.spectral, grid=list(r.grid_norms.shape), seconds=r.seconds) for r in reports]


def long_reports(args, model, inputs: dict) -> list[LongLayerReport]:
    """inspect_long for duat inspect --long (--layer, --cross), a layer the q/k capture cannot read refused with what
    to do instead (ValueError)."""
    from duat_kernels.models.qk_capture import QkCaptureUnsupported

    try:
        return inspect_long(model, inputs, args.layer, include_cross=args.cross)
    except QkCaptureUnsupported as exc:  # "use capture='attn'": in duat inspect that is the dense inspection
        instead = "; with --cross, --layer may select the layers --long can read (T5: its cross-attention layers " \
            "alone)" if args.cross else ""
        raise ValueError(f"{exc}. duat inspect without --long captures A itself (texts of more than {AUTO_WORDS} "
                         f"words take --long by themselves: give a shorter text){instead}") from None
