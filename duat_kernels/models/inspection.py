"""`duat inspect`: W' of every attention layer of a real model on a text, checked and summarised."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from duat_kernels import reference
from duat_kernels._files import link_target, open_mode
from duat_kernels._memory import DenseTooLargeError, format_bytes
from duat_kernels._validation import nan_max
from duat_kernels.heads import select_heads
from duat_kernels.hvo import hvo_bias
from duat_kernels.models.capture import AttentionLayer, attention_layers, masked_relative_error
from duat_kernels.models.encoder_decoder import cross_attention_note, uncovered_note
from duat_kernels.models.inspect_plot import axis_names

BLOCK_FRACTION_OF_MAX = 0.01  # "dense" blocks: Frobenius norm above 1% of the largest block's
# W' x' + b' must reproduce the module's float32 output to this relative error; W' stored in a
# half-precision dtype carries that dtype's rounding (unit roundoff 2^-11 fp16, 2^-8 bf16).
TOLERANCES = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class HeadReport:
    head: int
    frobenius: float  # ||A_i ⊗ OV_i||_F = ||A_i||_F ||OV_i||_F
    output_share: float  # ||head i's part of the output|| / ||output|| (real tokens)


@dataclass
class LayerReport:
    layer: AttentionLayer
    rel_error: float  # ||W' x' + b' - module output|| / ||module output|| (with heads: see inspect_layers)
    seconds: float  # time to materialise W' (nan when it would not fit: checked matrix-free instead)
    frobenius: float  # ||W'||_F (of the selected heads)
    dense_blocks: float  # fraction of the N² blocks above BLOCK_FRACTION_OF_MAX of the largest
    block_norms: torch.Tensor  # (N, N_k) (of the selected heads; N_k = N but for cross-attention)
    matrix: torch.Tensor | None  # (N·M_out, N_k·M_in) token layout, kept only when saving
    heads: list[HeadReport] = field(default_factory=list)


def heads_reconstruction(layer: AttentionLayer, heads: list[int], w: torch.Tensor | None = None) -> torch.Tensor:
    """W'_S x' + b'_S of the heads S (b'_S without b_o, which belongs to no head), as (B, N, M_out): with w, their
    dense token-layout W' (B, N·M_out, N·M_in) in any dtype (a 16-bit one is applied in float32), else matrix-free."""
    x = layer.x.reshape(layer.x.shape[0], -1)
    if w is None:
        flat = layer.operator(heads=heads).matvec(x.to(layer.w_v.dtype))
    else:
        w = w if w.dtype in (torch.float32, torch.float64) else w.float()
        flat = torch.einsum("brc,bc->br", w, x.to(w.dtype))
    flat = flat + hvo_bias(layer.attn, layer.w_o, layer.b_v, None, num_kv_heads=layer.num_kv_heads,
                           heads=heads).to(flat.dtype)
    return flat.reshape(layer.output.shape)


def head_contribution(layer: AttentionLayer, head: int) -> torch.Tensor:
    """Head i's part of the attention output, Σ_m A_i[n, m] OV_i (x_m + b_v), as (B, N, M_out)."""
    return heads_reconstruction(layer, [head])


def heads_relative_error(layer: AttentionLayer, heads: list[int], w: torch.Tensor | None = None) -> float:
    """||W'_S x' + b'_S - y_S|| / ||y_S|| over the real query tokens, for the heads S: y_S is their part of the
    attention output by the reference (reference.attention_output of the layer restricted to S, in float64, without
    b_o); W'_S is w (see heads_reconstruction) or matrix-free."""
    attn, w_v, w_o, b_v, kv_heads = select_heads(layer.attn, layer.w_v, layer.w_o, layer.b_v, heads,
                                                 layer.num_kv_heads)
    expected = reference.attention_output(attn.double(), layer.x.double(), w_v.double(), w_o.double(),
                                          None if b_v is None else b_v.double(), None, kv_heads)
    return masked_relative_error(heads_reconstruction(layer, heads, w), expected, layer.token_mask)


def head_reports(layer: AttentionLayer, heads: list[int]) -> list[HeadReport]:
    """Size of each head's W' and of its part of the output (batch element 0 and real tokens)."""
    ov = reference.ov_circuits(layer.w_v.double(), layer.w_o.double(), layer.attn.shape[1], layer.num_kv_heads)
    ov_norms = ov.flatten(1).norm(dim=1)
    out = layer.output.double() if layer.token_mask is None else layer.output.double()[layer.token_mask]
    result = []
    for i in heads:
        part = head_contribution(layer, i).double()
        part = part if layer.token_mask is None else part[layer.token_mask]
        result.append(HeadReport(i, (layer.attn[0, i].double().norm() * ov_norms[i]).item(),
                                 (part.norm() / out.norm()).item()))
    return result


def inspect_layers(model, inputs: dict, layers: list[int] | None = None, backend: str = "auto", keep: bool = False,
                   progress: bool = True, dtype: torch.dtype = torch.float32, heads: list[int] | None = None,
                   per_head: list[int] | str | None = None, include_cross: bool = False) -> list[LayerReport]:
    """Capture the selected layers on inputs (batch of one) and report on each.

    heads: W' (saved, norms, plots) of these heads only. The exactness check (rel_error) is of the W' built: without
        heads, W' x' + b' against the module's own output; with heads, the larger of the capture's check (all heads,
        matrix-free, against the module) and heads_relative_error of the W' built (its dtype, these heads).
    per_head: heads whose own W' and output share are reported (HeadReport); "all": every head of each layer
        (a decoder may have a head count of its own, BART's decoder_attention_heads).
    include_cross: also the cross-attention layers of an encoder-decoder model (attention_layers(include_cross=True)).
    """
    from tqdm.auto import tqdm

    captured = attention_layers(model, layers=layers, include_cross=include_cross, **inputs)
    reports = []
    for layer in tqdm(captured, desc="layers", unit="layer", disable=not progress):
        try:
            start = time.perf_counter()
            w = layer.hvo_matrix(backend=backend, dtype=dtype, heads=heads)
            seconds = time.perf_counter() - start
        except DenseTooLargeError:  # long inputs: check matrix-free instead
            w, seconds = None, math.nan
        if heads is None:  # the W' built (a 16-bit one applied in float32) against the module's own output
            rel_error = layer.relative_error(w if w is None or w.dtype in (torch.float32, torch.float64) else w.float())
        else:  # the capture against the module (all heads, matrix-free), the W' built against its heads' reference
            rel_error = nan_max([layer.relative_error(), heads_relative_error(layer, heads, w)])
        norms = layer.operator(heads=heads).block_norms()[0]
        reports.append(LayerReport(
            layer=layer, rel_error=rel_error, seconds=seconds,
            frobenius=norms.double().square().sum().sqrt().item(),
            dense_blocks=(norms > BLOCK_FRACTION_OF_MAX * norms.max()).double().mean().item(),
            block_norms=norms, matrix=w[0] if keep and w is not None else None,
            heads=head_reports(layer, list(range(layer.num_heads)) if per_head == "all" else per_head)
            if per_head else []))
    return reports


def encoder_decoder_notes(decoder_note: str | None = None, skipped: list[str] = (), uncovered: list[str] = (),
                          unreadable: list[str] = ()) -> str:
    """The lines under both tables (duat inspect's, --long's): what an encoder-decoder's decoder read, the
    cross-attention layers left out (unreadable: those --cross cannot read either), the self-attention modules the
    capture cannot read; "" when there is nothing to say."""
    lines = [decoder_note] if decoder_note else []
    if skipped:
        lines.append(cross_attention_note(skipped, unreadable))
    if uncovered:
        lines.append(uncovered_note(uncovered))
    return "\n".join(lines)


def format_reports(reports: list[LayerReport], model_name: str, tokens: list[str], heads: list[int] | None = None,
                   decoder_note: str | None = None, skipped: list[str] = (), uncovered: list[str] = (),
                   unreadable: list[str] = ()) -> str:
    """The table `duat inspect` prints; decoder_note: what an encoder-decoder's decoder read
    (encoder_decoder.decoder_inputs_note); skipped: names of the cross-attention layers left out, of which unreadable
    are those --cross cannot read either; uncovered: self-attention modules the capture cannot read."""
    shown = tokens if len(tokens) <= 64 else [*tokens[:30], f"... ({len(tokens) - 60} more) ...", *tokens[-30:]]
    lines = [f"{model_name}: {len(tokens)} tokens: {' '.join(shown)}", "",
             f"{'layer':>5} {'N':>4} {'M_in':>5} {'M_out':>5} {'heads':>7} {'rel. error':>11} {'W time':>11} "
             f"{'||W||_F':>9} {'blocks>1%':>9}"]
    for r in reports:
        lay = r.layer
        count = f"{lay.attn.shape[1]}/{lay.num_kv_heads}"
        t = "matrix-free" if math.isnan(r.seconds) else f"{r.seconds * 1e3:.1f}ms"
        n = tokens_column(lay)
        lines.append(f"{lay.index:>5} {n:>4} {lay.w_v.shape[1]:>5} {lay.w_o.shape[0]:>5} {count:>7} "
                     f"{r.rel_error:>11.2e} {t:>11} {r.frobenius:>9.2f} {r.dense_blocks:>9.1%}")
    checked = "(all heads) against the attention module's own output" if heads is None else \
        "of the selected heads against their part of the output (reference, float64), or the capture's own check " \
        "(all heads, against the module) if larger"
    lines += ["", f"rel. error: W' x' + b' {checked}; heads: query/kv; "
              "blocks>1%: fraction of the N x N blocks whose norm exceeds 1% of the largest."]
    if heads is not None:
        lines.append(f"W' time, ||W||_F and blocks>1% are of heads {', '.join(map(str, heads))} only.")
    if any(r.layer.kind == "cross" for r in reports):
        lines.append("cross-attention layers: N is N_dec x N_enc, x' the encoder's output (what their value "
                     "projection reads), W' (N_dec·M_out) x (N_enc·M_in).")
    if notes := encoder_decoder_notes(decoder_note, skipped, uncovered, unreadable):
        lines.append(notes)
    if any(r.heads for r in reports):
        lines += ["", f"{'layer':>5} {'head':>5} {'||A_i (x) OV_i||_F':>19} {'output share':>13}"]
        for r in reports:
            lines += [f"{r.layer.index:>5} {h.head:>5} {h.frobenius:>19.3f} {h.output_share:>13.1%}" for h in r.heads]
        lines.append("output share: ||head i's part of the attention output|| / ||attention output||.")
    return "\n".join(lines)


def layer_shape(layer) -> tuple[int, int, int]:
    """(h, N, N_k) of a captured layer: from A (B, h, N, N_k), or from q (B, h, N, d) and k (B, h_kv, N_k, d) of one
    captured as q/k (attn None)."""
    if layer.attn is not None:
        return tuple(layer.attn.shape[1:])
    return layer.q.shape[1], layer.q.shape[-2], layer.k.shape[-2]


def tokens_column(layer) -> str:
    """The N column of the tables: N, or N_dec x N_enc for a cross-attention layer."""
    _, n, n_k = layer_shape(layer)
    return str(n) if layer.kind == "self" else f"{n}x{n_k}"


def layer_json(layer, decoder_layers=frozenset(), **measured) -> dict:
    """A layer's JSON entry (both `duat inspect` and `duat inspect --long`): its index, name, shape, what its rows
    read, then the `measured` fields, then a cross-attention layer's "kind", "keys" (N_enc), "rows" and "columns"."""
    heads, n, n_k = layer_shape(layer)
    rows, columns = axis_names(layer, decoder_layers)
    cross = {} if layer.kind == "self" else dict(kind=layer.kind, keys=n_k, rows=rows, columns=columns)
    return dict(index=layer.index, name=layer.name, application=layer.application, tokens=n,
                reads=rows,  # the tokens of the layer's queries: its rows
                m_in=layer.w_v.shape[1], m_out=layer.w_o.shape[0], heads=heads, kv_heads=layer.num_kv_heads,
                **measured, **cross)


def results_json(layers: list[dict], model_name: str, model_type: str, tokens: list[str], dtype: torch.dtype,
                 tolerance: float, heads: list[int] | None, skipped: list[str] = (), uncovered: list[str] = (),
                 decoder_tokens: list[str] | None = None, target: str | None = None) -> dict:
    """The JSON document around the per-layer entries (as_json, long_context.as_long_json)."""
    given = {} if target is None else dict(target=target)
    return dict(model=model_name, model_type=model_type, tokens=tokens, **given, decoder_tokens=decoder_tokens,
                dtype=str(dtype).removeprefix("torch."),
                tolerance=tolerance, selected_heads=heads, skipped_cross_attention=list(skipped),
                uncovered_attention=list(uncovered),
                passed=all(item["passed"] for item in layers), layers=layers)


def as_json(reports: list[LayerReport], model_name: str, model_type: str, tokens: list[str], dtype: torch.dtype,
            tolerance: float, heads: list[int] | None, skipped: list[str] = (), uncovered: list[str] = (),
            decoder_tokens: list[str] | None = None, decoder_layers=frozenset(), target: str | None = None) -> dict:
    """Machine-readable per-layer results (what format_reports prints); target: the text an encoder-decoder's
    decoder read (duat inspect --target; "target", only when given); skipped: the cross-attention layers
    left out ("skipped_cross_attention"); uncovered: the self-attention modules not read ("uncovered_attention");
    decoder_tokens: what the layers of index in decoder_layers read (each layer's "reads": "tokens" or
    "decoder_tokens"); a cross-attention layer's entry also names its "rows" ("decoder_tokens") and "columns"
    ("tokens": the encoder's)."""
    layers = [layer_json(
        r.layer, decoder_layers, rel_error=r.rel_error,
        w_seconds=None if math.isnan(r.seconds) else r.seconds, materialised=not math.isnan(r.seconds),
        frobenius=r.frobenius, dense_blocks=r.dense_blocks, passed=r.rel_error <= tolerance,
        per_head=[dict(head=h.head, frobenius=h.frobenius, output_share=h.output_share) for h in r.heads])
        for r in reports]
    return results_json(layers, model_name, model_type, tokens, dtype, tolerance, heads, skipped, uncovered,
                        decoder_tokens, target)


def saved_tensors(reports: list[LayerReport]) -> dict[str, torch.Tensor]:
    """What `save` writes: "layer{L}.W" (when materialised), "layer{L}.b", "layer{L}.block_norms"."""
    tensors = {}
    for r in reports:
        key = f"layer{r.layer.index}"
        if r.matrix is not None:
            tensors[f"{key}.W"] = r.matrix.contiguous()
        tensors[f"{key}.b"] = r.layer.hvo_bias()[0].contiguous()
        tensors[f"{key}.block_norms"] = r.block_norms.contiguous()
    return tensors


def save(reports: list[LayerReport], path: str, tokens: list[str], log=print, heads: list[int] | None = None,
         decoder_tokens: list[str] | None = None, decoder_layers=frozenset()) -> None:
    """W', b' and the block norms of each layer into one safetensors file, saying what and how much first.
    With heads, W' and the block norms are of those heads (metadata "heads"), b' of the whole layer. An
    encoder-decoder's decoder layers (metadata "decoder_layers") read decoder_tokens (metadata "decoder_tokens");
    of those, the cross-attention layers (metadata "cross_layers") map the tokens to them: their rows (and b') are
    the decoder_tokens, their columns the tokens."""
    from safetensors.torch import save_file

    tensors = saved_tensors(reports)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    log(f"writing {format_bytes(size)} to {path} ...")
    metadata = {"tokens": "\t".join(tokens), "layout": "token",
                "heads": "all" if heads is None else ",".join(map(str, heads))}
    if decoder_tokens is not None:
        metadata["decoder_tokens"] = "\t".join(decoder_tokens)
        metadata["decoder_layers"] = ",".join(str(r.layer.index) for r in reports if r.layer.index in decoder_layers)
    if cross := [str(r.layer.index) for r in reports if r.layer.kind == "cross"]:
        metadata["cross_layers"] = ",".join(cross)
    # safetensors renames a temporary file (mode 0600) over the path it is given: given the file a link at path
    # points to, the link stays, and the file keeps its mode (0666 & ~umask for a new one), as with open(path, 'w')
    target = link_target("--save", Path(path))
    mode = open_mode(target)
    save_file(tensors, str(target), metadata=metadata)
    os.chmod(target, mode)
    with_w = [r.layer.index for r in reports if r.matrix is not None]
    without = [r.layer.index for r in reports if r.matrix is None]
    what = f"W' of layer(s) {', '.join(map(str, with_w))}, " if with_w else ""
    log(f"{what}b' and block norms of every layer written to {path}")
    if without:
        log(f"W' of layer(s) {', '.join(map(str, without))} not written: too large for memory (checked matrix-free); "
            "use duat_kernels.analysis.save_dense for it")
