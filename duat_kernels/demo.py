"""The demo behind `duat demo` / `python -m duat_kernels`: W' of a seeded random attention layer.

A torch.nn.MultiheadAttention layer (biases on) runs on random tokens; W' and b' are materialised
with every available backend and W' x' + b' is checked against the layer's own output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from duat_kernels import backends
from duat_kernels._memory import format_bytes
from duat_kernels.hvo import hvo_bias, hvo_matrix


@dataclass
class BackendRow:
    backend: str
    fresh_s: float  # best time with a freshly allocated output (pays page faults)
    reuse_s: float  # best time writing into a reused out= buffer
    rel_err: float  # ||W' x' + b' - module output|| / ||module output||


def best_time(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def random_mha(embed_dim: int, num_heads: int, tokens: int, seed: int):
    """A seeded nn.MultiheadAttention with nonzero biases, random inputs, its output and probabilities."""
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(embed_dim, num_heads, bias=True, batch_first=True).eval()
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_(std=0.1)
        x = torch.randn(1, tokens, embed_dim)
        out, attn = mha(x, x, x, need_weights=True, average_attn_weights=False)
    return mha, x[0], out[0], attn[0]


def run_demo(tokens: int = 24, embed_dim: int = 192, num_heads: int = 6, seed: int = 0, layout: str = "token",
             repeats: int = 3) -> tuple[list[BackendRow], float, tuple[int, int]]:
    """Materialise W' with every backend; return the rows, the fill_ floor time and W's shape."""
    mha, x, out, attn = random_mha(embed_dim, num_heads, tokens, seed)
    e = embed_dim
    w_v, b_v = mha.in_proj_weight[2 * e:].detach(), mha.in_proj_bias[2 * e:].detach()
    w_o, b_o = mha.out_proj.weight.detach(), mha.out_proj.bias.detach()
    flat = (lambda t: t.reshape(-1)) if layout == "token" else (lambda t: t.t().reshape(-1))
    bias = hvo_bias(attn, w_o, b_v, b_o, layout=layout)
    rows = []
    for name in backends.available_backends(x.device):
        w = hvo_matrix(attn, w_v, w_o, layout=layout, backend=name)
        rel = ((w @ flat(x) + bias - flat(out)).norm() / flat(out).norm()).item()
        fresh = best_time(lambda: hvo_matrix(attn, w_v, w_o, layout=layout, backend=name), repeats)
        reuse = best_time(lambda: hvo_matrix(attn, w_v, w_o, layout=layout, backend=name, out=w), repeats)
        rows.append(BackendRow(name, fresh, reuse, rel))
    floor = best_time(lambda: w.fill_(0), repeats)
    return rows, floor, tuple(w.shape)


def format_report(rows: list[BackendRow], floor: float, shape: tuple[int, int], tokens: int, embed_dim: int,
                  num_heads: int, layout: str) -> str:
    nbytes = shape[0] * shape[1] * 4
    lines = [
        f"duat-kernels demo: nn.MultiheadAttention(embed_dim={embed_dim}, num_heads={num_heads}, biases) "
        f"on N={tokens} random tokens",
        f"W' ({layout} layout): {shape[0]} x {shape[1]} float32 = {format_bytes(nbytes)}; "
        f"check: W' x' + b' against the module's own output",
        "",
        f"{'backend':<10} {'fresh':>10} {'out=':>10} {'GB/s':>7} {'vs fill_':>9} {'rel. error':>11}",
    ]
    for r in rows:
        lines.append(f"{r.backend:<10} {r.fresh_s * 1e3:>8.2f}ms {r.reuse_s * 1e3:>8.2f}ms "
                     f"{nbytes / r.reuse_s / 1e9:>7.1f} {r.reuse_s / floor:>8.2f}x {r.rel_err:>11.2e}")
    lines.append(f"{'fill_(0)':<10} {'':>10} {floor * 1e3:>8.2f}ms {nbytes / floor / 1e9:>7.1f} {1.0:>8.2f}x "
                 f"{'(floor)':>11}")
    lines.append("")
    lines.append("fresh: a new output each call (cpp: large outputs reuse freed blocks from its output cache, "
                 "others pay first-touch page faults); out=: a reused buffer; fill_: the memory-write floor on "
                 "the same buffer.")
    return "\n".join(lines)
