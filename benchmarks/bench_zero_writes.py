"""Does this machine write zeros faster than data? (It decides which memory floor is the stricter.)

One 268 MB buffer (8192 x 8192 float32, from the C++ output cache, as the materialisation benchmark
uses), written four ways, one contestant after another:
  fill_zeros    buf.fill_(0): the memory floor the materialisation benchmark reports
  fill_data     buf.fill_(0.75)
  stream_zeros  duat_kernels.cpp.stream_fill_(buf, 0x00): the kernel's non-temporal stores
  stream_data   duat_kernels.cpp.stream_fill_(buf, 0x3F): the same stores writing data (0x3F3F3F3F = 0.75)
On most machines the four pairs are equal; on the VM of the committed runs zeros were about twice as
fast through non-temporal stores.
"""

import functools

import pytest
import torch

from duat_kernels import cpp

from conftest import QUICK

SIDE = 256 if QUICK else 8192
WRITES = {
    "fill_zeros": lambda buf: buf.fill_(0),
    "fill_data": lambda buf: buf.fill_(0.75),
    "stream_zeros": lambda buf: cpp.stream_fill_(buf, 0x00),
    "stream_data": lambda buf: cpp.stream_fill_(buf, 0x3F),
}


@functools.lru_cache(maxsize=1)
def _buffer() -> torch.Tensor:
    return cpp.empty_output((SIDE, SIDE), torch.float32)


@pytest.mark.skipif(not cpp.is_available(), reason="the C++ extension is not built: no non-temporal fill")
@pytest.mark.parametrize("write", sorted(WRITES))
def test_zero_writes(benchmark, write):
    buf = _buffer()
    benchmark.group = f"zero writes {SIDE * SIDE * 4 / 1e6:.0f} MB"
    benchmark.extra_info.update(kind="zero_writes", contestant=write, bytes=buf.numel() * buf.element_size())
    benchmark.pedantic(WRITES[write], args=(buf,), rounds=1 if QUICK else 10, warmup_rounds=1)
