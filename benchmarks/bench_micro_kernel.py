"""How close do the C++ micro-kernels run to each ISA variant's FMA limit, with memory out of the way?

The full benchmarks time W' against max(fill_, FMA floor), where the two limits and two threads mix.
Here one thread runs the Kronecker-sum micro-kernels alone, every operand in L1
(`_C.micro_kernel_gflops`: 12 whole segments of 128 columns from one h x 128 slab, regular stores,
the path of a whole W' row) and the same variant's one-thread FMA probe (`_C.fma_peak_gflops`), both
in CPU time of the thread. The ratio says what the loads, broadcasts and stores around the FMAs cost;
float32 against bfloat16 and float16 says what the rounding of a 16-bit output costs where the FMAs
bound the time. `report.py` prints GFLOP/s and the share of the probe per variant, h and dtype.
"""

import functools

import pytest

from duat_kernels import cpp

from conftest import QUICK

HEADS = [8] if QUICK else [8, 12, 32]
DTYPES = ["float32", "bfloat16", "float16"]
VARIANTS = cpp.supported_capabilities() if cpp.is_available() else []
REPS = 200 if QUICK else 20_000


@functools.lru_cache(maxsize=None)
def one_thread_peak(isa: str) -> float:
    """The variant's FMA probe on one thread, best of three."""
    with cpp.using_capability(isa):
        return max(cpp._C.fma_peak_gflops(200_000 if QUICK else 20_000_000, 1) for _ in range(3))


@pytest.mark.skipif(not VARIANTS, reason="the C++ extension is not built")
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("h", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_micro_kernel_in_l1(benchmark, dtype, h, isa):
    rates = []

    def rate():
        rates.append(cpp._C.micro_kernel_gflops(dtype, h, 128, 12, REPS))

    benchmark.group = "micro-kernel in L1, one thread"
    benchmark.extra_info.update(kind="micro_kernel", isa=isa, h=h, dtype=dtype)
    with cpp.using_capability(isa):
        benchmark.pedantic(rate, rounds=1 if QUICK else 5, warmup_rounds=1)
    benchmark.extra_info.update(gflops=max(rates), fma_peak_1thread_gflops=one_thread_peak(isa))
    assert max(rates) > 0
