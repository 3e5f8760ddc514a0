"""`duat inspect --html`: one self-contained page (inline data, CSS and JS, no network) with each
layer's and each head's block-norm heatmap, tokens on hover, and the exactness table."""

from __future__ import annotations

import html
import math

import torch

from duat_kernels import strict_json
from duat_kernels.models.inspection import layer_shape
from duat_kernels.models.inspect_plot import axis_names, axis_tokens, cell_labels, grid_size, reduced_norms
from duat_kernels.reference import ov_circuits

HTML_MAX_CELLS = 64  # heatmaps of longer inputs show super-blocks (exact norms of groups of tokens)


def _rounded(t: torch.Tensor) -> list:
    return [[float(f"{v:.3g}") for v in row] for row in t.double().tolist()]


def head_block_norms(layer, grid: tuple[int, int]) -> torch.Tensor:
    """(h, R, C) = grid: ||A_i ⊗ OV_i|| on each super-block = ||OV_i||_F · sqrt(Σ_cell A_i[n, m]²); a layer captured
    as q/k (attn None, duat inspect --long): each head's operator's grid norms, A_i recomputed from q_i and k."""
    if layer.attn is None:
        return torch.stack([layer.operator(heads=[i]).block_norms(grid=tuple(grid))[0].double()
                            for i in range(layer.q.shape[1])])
    attn = layer.attn[0].double()
    h, n, n_k = attn.shape
    rows, columns = grid
    ov = ov_circuits(layer.w_v.double(), layer.w_o.double(), h, layer.num_kv_heads).flatten(1).norm(dim=1)
    sq = torch.zeros(h, rows, n_k, dtype=torch.float64).index_add_(1, torch.arange(n) * rows // n, attn.square())
    sq = torch.zeros(h, rows, columns, dtype=torch.float64).index_add_(2, torch.arange(n_k) * columns // n_k, sq)
    return sq.sqrt() * ov[:, None, None]


def page_data(reports, tokens: list[str], title: str, tolerance: float, heads: list[int] | None,
              decoder_tokens: list[str] | None = None, decoder_layers=frozenset()) -> dict:
    """The page's data; the layers of index in decoder_layers read decoder_tokens (their own row labels,
    "labels"), a cross-attention layer's columns are the tokens ("column_labels"); "grid": a layer's rows x columns."""
    cells = grid_size(len(tokens), HTML_MAX_CELLS)
    layers = []
    for r in reports:
        lay = r.layer
        rows, columns = axis_names(lay, decoder_layers)
        row_tokens, column_tokens = axis_tokens(lay, tokens, decoder_tokens, decoder_layers)
        grid = (grid_size(len(row_tokens), HTML_MAX_CELLS), grid_size(len(column_tokens), HTML_MAX_CELLS))
        layers.append(dict(
            index=lay.index, name=lay.name, kind=lay.kind, heads=layer_shape(lay)[0], kv_heads=lay.num_kv_heads,
            rel_error=r.rel_error, passed=r.rel_error <= tolerance, frobenius=r.frobenius,
            qk=lay.attn is None,  # duat inspect --long: W' never materialised, norms on a grid only
            dense_blocks=None if lay.attn is None else r.dense_blocks,
            w_ms=None if lay.attn is None or math.isnan(r.seconds) else r.seconds * 1e3,
            total=_rounded(reduced_norms(r, grid, heads)),
            per_head=[_rounded(m) for m in head_block_norms(lay, grid)], grid=grid,
            labels=cell_labels(row_tokens, grid[0]) if rows == "decoder_tokens" else None,
            column_labels=cell_labels(column_tokens, grid[1]) if columns != rows else None))
    return dict(title=title, tokens=tokens, labels=cell_labels(tokens, cells), cells=cells, tolerance=tolerance,
                decoder_tokens=decoder_tokens if decoder_layers else None, selected_heads=heads, layers=layers)


def write_html(path: str, reports, tokens: list[str], title: str, tolerance: float, heads: list[int] | None,
               decoder_tokens: list[str] | None = None, decoder_layers=frozenset()) -> int:
    """Write the page; returns its size in bytes."""
    data = strict_json.dumps(page_data(reports, tokens, title, tolerance, heads, decoder_tokens, decoder_layers),
                             separators=(",", ":"))
    page = PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data.replace("</", "<\\/"))
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return len(page.encode("utf-8"))


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:18px}h2{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
tr.fail td{background:#fdd}tr.sel td{background:#def}tr{cursor:pointer}
.maps{display:flex;flex-wrap:wrap;gap:10px}.map{font-size:11px;text-align:center}
canvas{image-rendering:pixelated;border:1px solid #999;display:block}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;font-size:12px;padding:4px 6px;
border-radius:3px;display:none;max-width:420px;white-space:pre-wrap}
#legend{font-size:12px;margin:6px 0}.tokens{font-size:12px;color:#555;max-height:60px;overflow:auto;
white-space:pre-wrap}
</style></head><body>
<h1>__TITLE__</h1>
<div class="tokens" id="tokens"></div>
<h2>Exactness: W' x' + b' against each attention module's output</h2>
<table id="exactness"><thead><tr><th>layer</th><th>module</th><th>heads (q/kv)</th><th>rel. error</th>
<th>pass</th><th>||W'||_F</th><th>blocks&gt;1%</th><th>W' time</th></tr></thead><tbody></tbody></table>
<h2 id="maptitle"></h2>
<div id="legend"></div>
<div class="maps" id="maps"></div>
<div id="tip"></div>
<div id="status"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const C = D.cells, tip = document.getElementById("tip");
// magma-like colour ramp, interpolated
const RAMP = [[0,0,4],[40,11,84],[101,21,110],[159,42,99],[212,72,66],[245,125,21],[250,193,39],[252,253,191]];
function colour(t) {
  t = Math.min(1, Math.max(0, t)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(t)), f = t - i, a = RAMP[i], b = RAMP[i + 1];
  return [0, 1, 2].map(k => Math.round(a[k] + f * (b[k] - a[k])));
}
function shown(v, format) {  // null: a NaN or infinite number (JSON has none)
  return v === null ? "not finite" : format(v);
}
function logRange(maps) {  // one log scale shared by all maps of a kind: [max * 1e-4, max]
  let top = 0;
  for (const m of maps) for (const row of m) for (const v of row) if (v > top) top = v;
  top = top > 0 ? top : 1;
  return [Math.log10(top * 1e-4), Math.log10(top)];
}
const totalRange = logRange(D.layers.map(l => l.total));
const headRange = logRange(D.layers.flatMap(l => l.per_head));
function draw(canvas, m, range, grid) {  // grid: [rows, columns] of m
  const side = Math.max(grid[0], grid[1]), px = Math.max(2, Math.floor(Math.min(320, Math.max(160, 4 * side)) / side));
  canvas.width = px * grid[1];
  canvas.height = px * grid[0];
  const ctx = canvas.getContext("2d");
  for (let n = 0; n < grid[0]; n++) for (let k = 0; k < grid[1]; k++) {
    const v = m[n][k], t = v > 0 ? (Math.log10(v) - range[0]) / (range[1] - range[0]) : 0;
    const [r, g, b] = colour(t);
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(k * px, n * px, px, px);
  }
  canvas.dataset.px = px;
}
function describe(canvas, m, what, labels, ev) {  // labels: [row labels, column labels]
  const px = +canvas.dataset.px, rect = canvas.getBoundingClientRect();
  const k = Math.floor((ev.clientX - rect.left) / px), n = Math.floor((ev.clientY - rect.top) / px);
  if (n < 0 || k < 0 || n >= labels[0].length || k >= labels[1].length) return null;
  const norm = shown(m[n][k], v => v.toPrecision(3));
  return `${what}\\noutput n=${n}: ${labels[0][n]}\\ninput m=${k}: ${labels[1][k]}\\nnorm: ${norm}`;
}
function heatmap(parent, m, range, caption, labels) {
  const box = document.createElement("div"), canvas = document.createElement("canvas");
  box.className = "map";
  draw(canvas, m, range, [labels[0].length, labels[1].length]);
  const show = ev => {
    const text = describe(canvas, m, caption, labels, ev);
    if (text === null) { tip.style.display = "none"; return; }
    tip.textContent = text; tip.style.display = "block";
    tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 14) + "px";
  };
  canvas.addEventListener("mousemove", show);
  canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  box.appendChild(canvas);
  box.appendChild(document.createTextNode(caption));
  parent.appendChild(box);
  return canvas;
}
function showLayer(j) {
  const L = D.layers[j], maps = document.getElementById("maps");
  maps.innerHTML = "";
  document.querySelectorAll("#exactness tbody tr").forEach((tr, i) => tr.classList.toggle("sel", i === j));
  const heads = D.selected_heads ? `heads ${D.selected_heads.join(", ")}` : "all heads";
  const cross = L.kind === "cross" ? " (cross-attention: rows n the decoder's tokens, columns m the encoder's)" : "";
  document.getElementById("maptitle").textContent =
    `Layer ${L.index} (${L.name})${cross}: block norms ||W'_nm||_F, ${heads}, then each head's ||A_i[n,m] OV_i||_F`;
  const rows = L.labels || D.labels;  // a decoder layer reads the text shifted right
  const labels = [rows, L.column_labels || rows];  // a cross-attention layer's columns: the encoder's tokens
  heatmap(maps, L.total, totalRange, `layer ${L.index}: ${heads}`, labels);
  L.per_head.forEach((m, i) => heatmap(maps, m, headRange, `head ${i}`, labels));
  document.getElementById("status").textContent =
    `rendered layer ${L.index}: ${1 + L.per_head.length} heatmaps of ${L.grid[0]}x${L.grid[1]}`;
}
const body = document.querySelector("#exactness tbody");
D.layers.forEach((L, j) => {
  const tr = document.createElement("tr");
  if (!L.passed) tr.className = "fail";
  const cells = [L.index, L.name, `${L.heads}/${L.kv_heads}`, shown(L.rel_error, v => v.toExponential(2)),
    L.passed ? "yes" : "NO", shown(L.frobenius, v => v.toFixed(2)),
    L.qk ? "n/a (q/k)" : shown(L.dense_blocks, v => (100 * v).toFixed(1) + "%"),
    L.w_ms === null ? "matrix-free" : L.w_ms.toFixed(1) + " ms"];
  for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
  tr.addEventListener("click", () => showLayer(j));
  body.appendChild(tr);
});
document.getElementById("tokens").textContent = `${D.tokens.length} tokens: ${D.tokens.join(" ")}` +
  (D.decoder_tokens ? `\\n${D.decoder_tokens.length} decoder tokens: ${D.decoder_tokens.join(" ")}` : "");
document.getElementById("legend").textContent =
  `Colour: log scale over 4 decades, shared by all layers (and by all heads);` +
  (C < D.tokens.length ? ` ${D.tokens.length} tokens shown as ${C}x${C} super-blocks (exact norms).` : "") +
  ` Click a row of the table to show its layer; hover a cell for its tokens.`;
showLayer(0);
const selftest = location.hash.match(/^#selftest(?:-(\\d+))?$/);
if (selftest) {  // for the headless test: hover the first heatmap's centre (#selftest-j: of row j's layer)
  if (selftest[1] !== undefined) showLayer(+selftest[1]);
  const canvas = document.querySelector("canvas"), rect = canvas.getBoundingClientRect();
  const centre = {clientX: rect.left + rect.width / 2, clientY: rect.top + rect.height / 2};
  canvas.dispatchEvent(new MouseEvent("mousemove", centre));
  document.getElementById("status").textContent += "; hover: " + tip.textContent.replace(/\\n/g, " | ");
}
</script></body></html>
"""
