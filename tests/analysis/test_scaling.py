"""duat scale --from-qk and the growth-exponent fit (never through fewer than 3 points)."""

from __future__ import annotations

import math

from duat_kernels.analysis import scaling
from duat_kernels.cli import main


def test_scale_from_qk_table(capsys):
    assert main(["scale", "--from-qk", "--n", "16", "32", "64", "--m", "8", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "from_qk" in out and "| 64 |" in out and "fitted growth exponents" in out
    assert "256x256 grid (N x N below N = 256)" in out  # it said "a 256x256 grid" where N < 256 took N x N


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
    # the other sizes failed deep inside (tile's "selects no entries", torch.empty's "takes 1 positional
    # argument", w_o's shape with the head-averaged-attention hint); a NumPy array of N was "ambiguous"
    for kwargs, message in ((dict(m=0), "m must be a positive int"), (dict(heads=2.0), "heads must be a positive int"),
                            (dict(m=8, heads=3), "m=8 must be divisible by heads=3"),
                            (dict(spectral_max_n=-1), "spectral_max_n must be None or an int >= 0"),
                            (dict(grid=0), "grid must be a positive int")):
        with pytest.raises(ValueError, match=message):
            scaling.scaling_sweep([4], **{"m": 4, "heads": 1, **kwargs}, progress=False)
    import numpy as np

    assert [r.n for r in scaling.scaling_sweep(np.array([4, 5]), m=4, heads=1, progress=False)] == [4, 5]


def test_sweep_refuses_sizes_that_do_not_fit_before_allocating():
    # with a huge m it reached the allocator (torch.randn of an m x m weight: "DefaultCPUAllocator: can't allocate")
    import pytest

    from duat_kernels import DenseTooLargeError

    with pytest.raises(DenseTooLargeError, match=r"scaling_sweep at N=4, M=1000000000, h=1 needs .* Use a smaller"):
        scaling.scaling_sweep([2, 4], m=10 ** 9, heads=1, progress=False)
    with pytest.raises(DenseTooLargeError, match=r"scaling_sweep at N=10000000, M=8, h=2 needs"):
        scaling.scaling_sweep([10 ** 7], m=8, heads=2, progress=False)


def test_from_qk_sweep_is_checked_for_what_it_stores(monkeypatch, capsys):
    # the check counted A (h, N, N) for from_qk too: docs/long-context.md's `duat scale --from-qk --m 768 --heads 12
    # --n ... 65536` was refused ("needs about 257.5 GiB"), and so was scaling_sweep(from_qk=True) at N = 65536
    import pytest

    from duat_kernels import DenseTooLargeError, _memory

    class Reached(Exception):
        pass

    def stop(*_args):
        raise Reached("the memory check passed")

    monkeypatch.setattr(_memory, "available_memory", lambda _device: 8 << 30)
    monkeypatch.setattr(scaling, "_operations", stop)  # the check passed: stop before any work
    with pytest.raises(Reached):
        scaling.scaling_sweep([1024, 65536], m=768, heads=12, from_qk=True, progress=False)
    main(["scale", "--from-qk", "--m", "768", "--heads", "12", "--n", "1024", "65536", "--spectral-max-n", "0"])
    assert "the memory check passed" in capsys.readouterr().err  # the CLI makes every error one line
    with pytest.raises(DenseTooLargeError, match=r"scaling_sweep at N=65536, M=768, h=12 needs"):
        scaling.scaling_sweep([1024, 65536], m=768, heads=12, progress=False)
    assert main(["scale", "--m", "768", "--heads", "12", "--n", "1024", "65536"]) == 2
    assert "(h + 4) N² + (h + 2) M² + 8 N M float32" in capsys.readouterr().err
