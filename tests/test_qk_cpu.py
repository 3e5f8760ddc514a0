"""Aᵀ U from q and k in C++ (QKAttention.mix_transposed on float32 CPU sources, what rmatvec needs)
against the stored A in float64, in every ISA variant the CPU can run.

Tolerance: relative 1e-5 in the Frobenius norm per head (float32 logits and softmax, ~1e-6 in practice)."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import cpp, qk_cpu
from duat_kernels.attention_source import ExplicitAttention
from duat_kernels.qk_attention import QKAttention

from conftest import qk_sources

pytestmark = pytest.mark.skipif(not cpp.is_available(), reason=f"C++ extension not built: {cpp.IMPORT_ERROR}")

CAPABILITIES = cpp.supported_capabilities()

CASES = {  # batch, h, h_kv, N, d, options
    "full": (1, 4, 4, 37, 16, {}),
    "one_token": (1, 1, 1, 1, 3, dict(causal=True)),
    "two_tokens": (2, 2, 1, 2, 5, {}),
    "causal_gqa": (2, 6, 2, 53, 24, dict(causal=True)),
    "causal_padding": (2, 4, 2, 53, 64, dict(causal=True, mask=True)),
    "window_padding": (2, 4, 2, 45, 8, dict(mask=True, sliding_window=5)),
    "causal_window_softcap": (1, 4, 2, 71, 64, dict(causal=True, softcap=2.0, sliding_window=9)),
    "long_rows": (1, 2, 1, 301, 32, dict(causal=True)),
}


def _sources(case, seed=0):
    return qk_sources(*CASES[case], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("isa", CAPABILITIES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("width", [64, 21])
def test_mix_transposed_equals_stored_attention(isa, case, width):
    fused, exact = _sources(case)
    assert qk_cpu.handles(fused)
    u = torch.randn(fused.batch, fused.heads, fused.tokens, width, generator=torch.Generator().manual_seed(1))
    with cpp.using_capability(isa):
        got = fused.mix_transposed(u)
    want = ExplicitAttention(exact.dense(), exact.kv_heads).mix_transposed(u.double())
    assert got.dtype == u.dtype and got.shape == want.shape
    err = (got.double() - want).norm(dim=(-1, -2)) / want.norm(dim=(-1, -2)).clamp_min(1e-300)
    assert err.max() <= 1e-5, err.max()


def test_rmatvec_from_qk_equals_explicit_operator():
    fused, exact = _sources("causal_padding")
    g = torch.Generator().manual_seed(2)
    m = 40
    w_v = torch.randn(fused.kv_heads * 64, m, generator=g) / 8
    w_o = torch.randn(m, fused.heads * 64, generator=g) / 8
    mask = fused.key_mask[:, 0, 0]
    op = dk.HVOOperator.from_qk(fused.q, fused.k, w_v, w_o, causal=True, attention_mask=mask)
    ref = dk.HVOOperator(exact.dense(), w_v.double(), w_o.double(), num_kv_heads=fused.kv_heads)
    y = torch.randn(fused.batch, fused.tokens * m, generator=g)
    want = ref.rmatvec(y.double())
    torch.testing.assert_close(op.rmatvec(y).double(), want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_non_finite_inputs_take_the_torch_path():
    fused, _ = _sources("full")
    q = fused.q.clone()
    q[0, 0, 3, 1] = float("nan")
    assert not qk_cpu.handles(QKAttention(q, fused.k))


def test_bad_buffers_are_rejected():
    fused, _ = _sources("full")
    q, k = fused.q.numpy(), fused.k.numpy()
    u = torch.zeros(1, 4, 37, 8)
    with pytest.raises(ValueError, match="u must be"):
        cpp._C.qk_mix_transposed(q, k, None, torch.zeros(1, 3, 37, 8).numpy(), torch.zeros(1, 3, 37, 8).numpy(),
                                 scale=1.0)
    with pytest.raises(ValueError, match=r"out must be \(B, h, N_k, e\) = \(1, 4, 37, 8\)"):
        cpp._C.qk_mix_transposed(q, k, None, u.numpy(), torch.zeros(1, 4, 37, 9).numpy(), scale=1.0)
    with pytest.raises(ValueError, match="float32"):
        cpp._C.qk_mix_transposed(q, k, None, u.double().numpy(), u.numpy(), scale=1.0)


@pytest.mark.parametrize("isa", CAPABILITIES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("width", [64, 21])
def test_mix_equals_stored_attention(isa, case, width):
    """A V in C++ (used by QKAttention.mix for soft-capped sources, which torch's sdpa cannot form)."""
    fused, exact = _sources(case)
    values = torch.randn(fused.batch, fused.kv_heads, fused.tokens, width, generator=torch.Generator().manual_seed(4))
    with cpp.using_capability(isa):
        got = qk_cpu.mix(fused, values)
    want = ExplicitAttention(exact.dense(), exact.kv_heads).mix(values.double())
    assert got.dtype == values.dtype and got.shape == want.shape
    err = (got.double() - want).norm(dim=(-1, -2)) / want.norm(dim=(-1, -2)).clamp_min(1e-300)
    assert err.max() <= 1e-5, err.max()


def test_softcapped_matvec_goes_through_the_cpp_pass(monkeypatch):
    fused, exact = _sources("causal_window_softcap")
    calls = []
    monkeypatch.setattr(qk_cpu, "mix", lambda source, values, _mix=qk_cpu.mix: calls.append(1) or _mix(source, values))
    values = torch.randn(fused.batch, fused.kv_heads, fused.tokens, 16, generator=torch.Generator().manual_seed(5))
    got = fused.mix(values)
    want = ExplicitAttention(exact.dense(), exact.kv_heads).mix(values.double())
    assert calls and ((got.double() - want).norm() / want.norm()).item() <= 1e-5
