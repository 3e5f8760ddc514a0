"""Scaling sweep behind `duat scale`: time and peak memory of the matrix-free analyses as N grows.

For each N a synthetic attention layer (softmax of random low-rank scores, optionally causal) is
built and matvec, block_norms, spectral_norm and one tile are measured, next to the plain
attention forward (A @ V, then the output projection) on the same inputs. Peak memory is the
resident-set high-water mark above the level before the call, sampled every millisecond.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from duat_kernels import reference
from duat_kernels._memory import check_fits, format_bytes
from duat_kernels._validation import integer, positive_int
from duat_kernels.hvo_operator import HVOOperator

OPERATIONS = ("attention", "matvec", "block_norms", "spectral_norm", "tile")
TILE_SIDE = 1024  # the tile is the bottom-right TILE_SIDE² corner of W' (the largest offsets)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Context manager: `.peak` is the largest RSS increase seen while the block ran."""

    def __init__(self, interval: float = 1e-3):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def __enter__(self):
        self._base = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() - self._base)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() - self._base)


@dataclass
class ScaleRow:
    n: int
    seconds: dict = field(default_factory=dict)  # operation -> seconds (nan when skipped)
    peak_bytes: dict = field(default_factory=dict)  # operation -> bytes above the level before


def synthetic_layer(n: int, m: int, heads: int, rank: int = 16, causal: bool = True, seed: int = 0):
    """attn (h, N, N) = softmax(q kᵀ / √rank) with random (N, rank) q, k per head, built head by
    head in place; w_v, w_o (M, M) scaled like trained weights."""
    g = torch.Generator().manual_seed(seed)
    attn = torch.empty(heads, n, n)
    for i in range(heads):
        q, k = torch.randn(n, rank, generator=g), torch.randn(n, rank, generator=g)
        torch.mm(q, k.T, out=attn[i]).mul_(rank ** -0.5)
        if causal:
            attn[i].masked_fill_(torch.ones(n, n, dtype=torch.bool).triu_(1), float("-inf"))
        attn[i] = attn[i].softmax(-1)
    w_v = torch.randn(m, m, generator=g) / m ** 0.5
    w_o = torch.randn(m, m, generator=g) / m ** 0.5
    return attn, w_v, w_o


def synthetic_qk(n: int, m: int, heads: int, seed: int = 0):
    """Random q, k (h, N, d) with d = M / h (standard normal, as after a layer norm and projection) and
    w_v, w_o (M, M) scaled like trained weights: the inputs of HVOOperator.from_qk."""
    g = torch.Generator().manual_seed(seed)
    d = m // heads
    q, k = torch.randn(heads, n, d, generator=g), torch.randn(heads, n, d, generator=g)
    w_v = torch.randn(m, m, generator=g) / m ** 0.5
    w_o = torch.randn(m, m, generator=g) / m ** 0.5
    return q, k, w_v, w_o


def _operations(n: int, m: int, heads: int, seed: int, from_qk: bool, grid: int) -> tuple[dict, object]:
    """name -> callable for one N (and the objects that keep its inputs alive)."""
    x = torch.randn(n * m, generator=torch.Generator().manual_seed(seed))
    side = min(TILE_SIDE, n * m)
    corner = slice(n * m - side, n * m)
    if from_qk:
        q, k, w_v, w_o = synthetic_qk(n, m, heads, seed)
        op = HVOOperator.from_qk(q, k, w_v, w_o, causal=True)
        cells = (min(grid, n), min(grid, n))

        def attention():  # the plain causal attention forward: projections around torch's sdpa (4-D
            # inputs: with 3-D ones torch falls back to a kernel that materialises A)
            vals = (x.reshape(n, m) @ w_v.T).reshape(n, heads, -1).transpose(0, 1)
            out = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], vals[None], is_causal=True)[0]
            return out.transpose(0, 1).reshape(n, m) @ w_o.T
        block_norms = lambda: op.block_norms(grid=cells)  # noqa: E731
        keep = (q, k)
    else:
        attn, w_v, w_o = synthetic_layer(n, m, heads, seed=seed)
        op = HVOOperator(attn, w_v, w_o)
        attention = lambda: reference.attention_output(attn[None], x.reshape(1, n, m), w_v, w_o)  # noqa: E731
        block_norms = op.block_norms
        keep = attn
    ops = {"attention": attention, "matvec": lambda: op.matvec(x), "block_norms": block_norms,
           "spectral_norm": lambda: op.spectral_norm(tol=1e-4), "tile": lambda: op.tile(corner, corner)}
    return ops, (op, keep)


def measure(fn, min_seconds: float = 0.2, max_repeats: int = 5) -> tuple[float, int]:
    """(best time, peak memory) of fn; fast calls are repeated (up to max_repeats or min_seconds)."""
    with PeakMemory() as mem:
        times = []
        while not times or (sum(times) < min_seconds and len(times) < max_repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(times), mem.peak


def sweep_bytes(n: int, m: int, heads: int, from_qk: bool = False) -> int:
    """About the memory the sweep needs at N = n: attn (h, N, N) float32, the causal mask, block_norms' (N, N)
    result and a few (N, N) temporaries; w_v, w_o and the OV circuits, (h + 2) M x M; x and the products, a few
    N x M: ((h + 4) N² + (h + 2) M² + 8 N M) float32. from_qk stores no N x N: q and k (2 N M), x, the products
    and the tiles A is recomputed in (measured 385 MiB above the inputs at N = 32768, M = 768: about 4 N M),
    ((h + 2) M² + 16 N M) float32."""
    if from_qk:
        return ((heads + 2) * m * m + 16 * n * m) * 4
    return ((heads + 4) * n * n + (heads + 2) * m * m + 8 * n * m) * 4


def sweep_memory_formula(from_qk: bool) -> str:
    """sweep_bytes' formula in words, for the messages that refuse a sweep."""
    return ("(h + 2) M² + 16 N M float32: q, k, weights, OV circuits and the tiles A is recomputed in" if from_qk
            else "(h + 4) N² + (h + 2) M² + 8 N M float32: the attention probabilities, N x N work space, weights "
            "and OV circuits")


def scaling_sweep(ns: list[int], m: int = 256, heads: int = 4, spectral_max_n: int | None = None, seed: int = 0,
                  progress: bool = True, from_qk: bool = False, grid: int = 256) -> list[ScaleRow]:
    """Measure every operation of OPERATIONS for each N in ns (spectral_norm only up to spectral_max_n,
    when given: it costs tens of matvecs and rmatvecs). from_qk: the operator recomputes A from random
    causal q/k (HVOOperator.from_qk) and block_norms reduces to a grid x grid grid; otherwise A is stored.
    Every operation runs once untimed at the smallest N first (warm-up: allocator, thread pool, caches)."""
    from tqdm.auto import tqdm

    ns_given = ns
    ns = list(ns) if not isinstance(ns, (str, bytes)) and hasattr(ns, "__iter__") else []  # a NumPy array too
    if not ns or any(positive_int(n) is None for n in ns):
        raise ValueError(f"ns must be a non-empty sequence of token counts N >= 1, got {ns_given!r}")
    ns = [positive_int(n) for n in ns]
    # each failed deep inside: m=0 in tile ("rows=slice(0, 0) selects no entries"), heads=2.0 in torch.empty,
    # heads=3 for m=8 with w_o's shape and the head-averaged-attention hint
    for name, value in (("m", m), ("heads", heads), ("grid", grid)):
        if positive_int(value) is None:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if m % heads:
        raise ValueError(f"m={m} must be divisible by heads={heads} (head size m / heads)")
    if spectral_max_n is not None and (integer(spectral_max_n, tensors=False) is None or spectral_max_n < 0):
        raise ValueError(f"spectral_max_n must be None or an int >= 0, got {spectral_max_n!r}")
    m, heads, grid = positive_int(m), positive_int(heads), positive_int(grid)
    check_fits(f"scaling_sweep at N={max(ns)}, M={m}, h={heads}{', from_qk' if from_qk else ''}",
               sweep_bytes(max(ns), m, heads, bool(from_qk)), torch.device("cpu"),
               hint="Use a smaller largest N or a smaller m.")
    warm, _ = _operations(min(ns), m, heads, seed, from_qk, grid)
    with torch.no_grad():
        for fn in warm.values():
            fn()
    rows = []
    for n in tqdm(ns, desc="duat scale", unit="N", disable=not progress):
        ops, keep = _operations(n, m, heads, seed, from_qk, grid)
        row = ScaleRow(n)
        with torch.no_grad():
            for name, fn in ops.items():
                if name == "spectral_norm" and spectral_max_n is not None and n > spectral_max_n:
                    row.seconds[name], row.peak_bytes[name] = math.nan, math.nan
                    continue
                row.seconds[name], row.peak_bytes[name] = measure(fn)
        rows.append(row)
        del ops, keep
    return rows


MIN_FIT_POINTS = 3  # no exponent is fitted through fewer points


def growth_exponents(rows: list[ScaleRow], min_n: int = 256) -> dict[str, float]:
    """Least-squares slope of log(time) against log(N) per operation, over N >= min_n (nan with fewer
    than MIN_FIT_POINTS points)."""
    out = {}
    for name in OPERATIONS:
        pts = [(r.n, r.seconds[name]) for r in rows if r.n >= min_n and not math.isnan(r.seconds[name])]
        out[name] = float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]) \
            if len(pts) >= MIN_FIT_POINTS else math.nan
    return out


def format_table(rows: list[ScaleRow], m: int, heads: int, from_qk: bool = False, grid: int = 256) -> str:
    what = (f"A recomputed from random causal q/k (from_qk), block_norms on a {grid}x{grid} grid (N x N below "
            f"N = {grid})" if from_qk else "causal synthetic attention stored")
    lines = [f"M={m}, h={heads}, {what}, float32; time (peak memory above the inputs)", "",
             "| N | dense W' | " + " | ".join(OPERATIONS) + " |", "|---:|---:|" + "---:|" * len(OPERATIONS)]
    for r in rows:
        cells = ["-" if math.isnan(r.seconds[k]) else f"{r.seconds[k]:.3g} s ({format_bytes(r.peak_bytes[k])})"
                 for k in OPERATIONS]
        lines.append(f"| {r.n} | {format_bytes(4 * (r.n * m) ** 2)} | " + " | ".join(cells) + " |")
    exps = growth_exponents(rows)
    fitted = ", ".join(f"{k} {v:.2f}" for k, v in exps.items() if not math.isnan(v))
    lines += ["", f"fitted growth exponents (time ~ N^k, N >= 256, >= {MIN_FIT_POINTS} points): {fitted or 'none'}"]
    return "\n".join(lines)


def plot(rows: list[ScaleRow], path: str, m: int, heads: int) -> None:
    """Log-log plot of time against N, one line per operation, with fitted exponents in the legend."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'duat-kernels[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = growth_exponents(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in OPERATIONS:
        pts = [(r.n, r.seconds[name]) for r in rows if not math.isnan(r.seconds[name])]
        if pts:
            fit = "" if math.isnan(exps[name]) else f" (~N^{exps[name]:.2f})"
            ax.loglog(*zip(*pts), marker="o", label=f"{name}{fit}")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("time [s]")
    ax.set_title(f"W' analyses without the dense matrix (M={m}, h={heads}, 2 CPU cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
