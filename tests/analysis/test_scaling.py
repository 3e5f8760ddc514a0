"""duat scale --from-qk and the growth-exponent fit (never through fewer than 3 points)."""

from __future__ import annotations

import math

from duat_kernels.analysis import scaling
from duat_kernels.cli import main


def test_scale_from_qk_table(capsys):
    assert main(["scale", "--from-qk", "--n", "16", "32", "64", "--m", "8", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "from_qk" in out and "| 64 |" in out and "fitted growth exponents" in out


def test_no_exponent_from_fewer_than_three_points():
    def row(n, t):
        r = scaling.ScaleRow(n)
        r.seconds = {name: t for name in scaling.OPERATIONS}
        return r

    two = [row(256, 1.0), row(512, 4.0)]
    assert all(math.isnan(v) for v in scaling.growth_exponents(two).values())
    three = two + [row(1024, 16.0)]
    assert all(abs(v - 2) < 1e-9 for v in scaling.growth_exponents(three).values())


def test_sweep_refuses_no_or_bad_sizes():
    import pytest

    for ns in ([], [0], [4, -1], [2.5]):
        with pytest.raises(ValueError, match="ns must be a non-empty sequence of token counts"):
            scaling.scaling_sweep(ns, m=4, heads=1, progress=False)
