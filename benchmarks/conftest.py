"""Benchmarks run with pytest-benchmark: `pytest benchmarks/ --benchmark-json=run.json`.

DUAT_BENCH_QUICK=1 shrinks every size to a smoke test (CI runs it so the benchmarks cannot rot;
it asserts no time).
"""

import os

import torch

QUICK = os.environ.get("DUAT_BENCH_QUICK", "") not in ("", "0")


def explicit_grid_row(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, row: int, grid: tuple[int, int]) -> torch.Tensor:
    """Super-block norms (grid[1],) of grid row `row` of a causal layer, from its rows of A computed whole in
    float64: q, k (h, N, d) (scale d^-1/2), c (h, h) the Gram factor. The check of the q/k block-norm benchmarks."""
    h, n, d = q.shape
    r0, r1 = (row * n + grid[0] - 1) // grid[0], ((row + 1) * n + grid[0] - 1) // grid[0]  # the tokens of bin `row`
    s = q[:, r0:r1].double() @ k.double().transpose(-1, -2) * d ** -0.5
    cols = torch.arange(n, device=q.device)
    s.masked_fill_(cols[None, :] > torch.arange(r0, r1, device=q.device)[:, None], float("-inf"))
    sq = (c.double() @ s.softmax(-1).reshape(h, -1)).square().sum(0).reshape(r1 - r0, n).sum(0)
    return torch.zeros(grid[1], dtype=torch.float64, device=q.device).index_add_(0, cols * grid[1] // n, sq).sqrt()
