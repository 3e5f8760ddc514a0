"""How fast does the C++ backend form the OV circuits, against torch?

OV_i = Wo_i Wv_i for N = 16-style layers: M = 768, h = 12, d = 64 (0.9 GFLOP), fp32. Contestants:
  cpp       duat_kernels.cpp.ov_circuits: the materialisation's micro-kernel, (M_out, h, M_in)
  cpp@ISA   the same forced to each ISA variant this CPU supports
  torch     reference.ov_circuits: torch.bmm over the heads (what the registered op and the other
            backends use)
Both give OV to float32 rounding (tests/test_cpp.py checks the kernel against float64).
"""

import pytest
import torch

from duat_kernels import cpp, reference

from conftest import QUICK

M, H, D = (96, 4, 16) if QUICK else (768, 12, 64)
CONTESTANTS = ["torch"] + (["cpp"] + [f"cpp@{isa}" for isa in cpp.supported_capabilities()] if cpp.is_available() else [])


@pytest.mark.parametrize("contestant", CONTESTANTS)
def test_ov_circuits(benchmark, contestant):
    g = torch.Generator().manual_seed(0)
    w_v, w_o = torch.randn(H * D, M, generator=g) / M ** 0.5, torch.randn(M, H * D, generator=g) / M ** 0.5
    benchmark.group = f"ov circuits M={M} h={H} d={D}"
    benchmark.extra_info.update(kind="ov_circuits", contestant=contestant, flops=2 * H * M * M * D)
    if contestant == "torch":
        benchmark.pedantic(lambda: reference.ov_circuits(w_v, w_o, H, H), rounds=1 if QUICK else 20, warmup_rounds=1)
        return
    isa = contestant.partition("@")[2] or cpp.cpu_capability()
    with cpp.using_capability(isa):
        benchmark.pedantic(lambda: cpp.ov_circuits(w_v, w_o, H, H), rounds=1 if QUICK else 20, warmup_rounds=1)
