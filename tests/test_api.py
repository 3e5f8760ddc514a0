"""Public API contract: defaults, dispatch, and a clear exception for every kind of bad input."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import cpp

from conftest import random_layer

needs_cpp = pytest.mark.skipif(not cpp.is_available(), reason=f"C++ extension not built: {cpp.IMPORT_ERROR}")


@pytest.fixture
def lay():
    return random_layer(2, 4, 2, tokens=5, head_dim=3, m_in=7, m_out=6)


def call(lay, **kw):
    args = dict(attn=lay["attn"], w_v=lay["w_v"], w_o=lay["w_o"])
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    kw.setdefault("num_kv_heads", lay["num_kv_heads"])
    return dk.hvo_matrix(args["attn"], args["w_v"], args["w_o"], **kw)


def test_shapes_and_default_dtype(lay):
    assert call(lay).shape == (2, 30, 35)
    assert call(lay, attn=lay["attn"][0]).shape == (30, 35)
    assert call(lay, layout="feature").shape == (2, 30, 35)
    assert call(lay, w_v=lay["w_v"].double()).dtype == torch.float64  # promoted
    assert call(lay, dtype=torch.bfloat16).dtype == torch.bfloat16


@needs_cpp
def test_auto_picks_cpp_on_cpu(lay):
    assert dk.available_backends("cpu")[0] == "reference" and dk.available_backends("cpu")[-1] == "cpp"
    torch.testing.assert_close(call(lay), call(lay, backend="cpp"), rtol=0, atol=0)


def test_bias_shapes(lay):
    b = dk.hvo_bias(lay["attn"], lay["w_o"], lay["b_v"], lay["b_o"], num_kv_heads=2)
    assert b.shape == (2, 30)
    assert dk.hvo_bias(lay["attn"][0], lay["w_o"], num_kv_heads=2).abs().sum() == 0
    torch.testing.assert_close(dk.hvo_bias(lay["attn"][0], lay["w_o"], b_o=lay["b_o"]), lay["b_o"].repeat(5))


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(attn=torch.rand(5, 5)), ValueError, r"attn must be 3-D or 4-D, got shape \(5, 5\)"),
    (dict(attn=torch.rand(2, 4, 5, 0)), ValueError, r"attn must have shape \(h, N, N_k\) or \(B, h, N, N_k\) "
     r"\(N_k = N for self-attention, .* with h, N, N_k >= 1, got \(2, 4, 5, 0\)"),
    (dict(attn=torch.ones(2, 4, 5, 5, dtype=torch.int64)), TypeError, "attn must have a floating-point dtype"),
    (dict(attn=[[1.0]]), TypeError, "attn must be a torch.Tensor, got list"),
    (dict(w_v=torch.rand(7, 7)), ValueError, r"w_v must have shape \(h_kv\*d, M_in\) = \(2\*3, M_in\)"),
    (dict(w_o=torch.rand(6, 13)), ValueError, r"w_o must have shape \(M_out, h\*d\) with h=4 heads"),
    (dict(w_o=torch.rand(6)), ValueError, "w_o must be 2-D"),
    (dict(w_v=None), TypeError, "w_v must be a torch.Tensor, got NoneType"),  # was AttributeError 'dtype'
    (dict(num_kv_heads=3), ValueError, "num_kv_heads=3 must divide the number of query heads h=4"),
    (dict(num_kv_heads=0), ValueError, "num_kv_heads must be a positive int"),
    (dict(layout="row"), ValueError, "layout must be 'token' or 'feature'"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(dtype=torch.int32), TypeError, "dtype must be one of float32, float64, float16, bfloat16"),
    (dict(w_o=torch.rand(6, 12, device="meta")), ValueError, "w_o is on meta but attn is on cpu"),
])
def test_bad_input(lay, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        call(lay, **kwargs)


@pytest.mark.parametrize("make_out,exc,message", [
    (lambda: torch.empty(2, 30, 36), ValueError, r"out must have shape \(2, 30, 35\), got \(2, 30, 36\)"),
    (lambda: torch.empty(2, 30, 35, dtype=torch.float64), TypeError, "out has dtype torch.float64 but dtype=torch.float32"),
    (lambda: torch.empty(2, 35, 30).transpose(1, 2), ValueError, "out must be contiguous"),
    (lambda: torch.empty(1, 30, 35).expand(2, 30, 35), ValueError, "out must be contiguous"),
    (lambda: "buffer", TypeError, "out must be a torch.Tensor"),
])
def test_bad_out(lay, make_out, exc, message):
    with pytest.raises(exc, match=message):
        call(lay, out=make_out(), dtype=torch.float32)


def test_out_overlapping_an_input_is_refused():
    lay = random_layer(1, 1, tokens=2, head_dim=1, m_in=1, m_out=1, batched=False)
    storage = torch.zeros(8)
    attn = storage[:4].view(1, 2, 2).copy_(lay["attn"])
    with pytest.raises(ValueError, match="out overlaps the memory of an input"):
        dk.hvo_matrix(attn, lay["w_v"], lay["w_o"], out=storage[2:6].view(2, 2))


def test_meta_out_is_not_an_overlap(lay):
    """Meta tensors have no memory (every data_ptr() is 0): a meta out= was refused as overlapping the
    meta inputs, where the call without out= gives the meta result (as FakeTensorMode does with out=)."""
    meta = {k: v.to("meta") for k, v in lay.items() if isinstance(v, torch.Tensor)}
    out = torch.empty(2, 30, 35, device="meta")
    got = dk.hvo_matrix(meta["attn"], meta["w_v"], meta["w_o"], num_kv_heads=2, out=out)
    assert got is out and got.shape == (2, 30, 35)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_inference_tensor_out_is_refused_by_name(lay, backend):
    """An out= made under torch.inference_mode, used outside it: the reference backend failed in its
    copy_ with torch's raw 'Inplace update to inference tensor outside InferenceMode' and the C++
    backend wrote it anyway. Both refuse it as torch's own out= ops do; inside inference_mode it is taken."""
    with torch.inference_mode():
        out = torch.empty(2, 30, 35)
    with pytest.raises(ValueError, match="out is an inference tensor .*torch.inference_mode"):
        call(lay, out=out, backend=backend)
    with torch.inference_mode():
        got = call(lay, out=out, backend=backend)
    torch.testing.assert_close(got, call(lay, backend=backend))


def test_too_large_is_refused_before_allocating(lay):
    attn = torch.full((1, 1, 1, 1), 1.0).expand(1, 12, 8192, 8192)  # no memory behind the expansion
    w_v, w_o = torch.zeros(768, 768), torch.zeros(768, 768)
    with pytest.raises(dk.DenseTooLargeError, match=r"needs 144\.0 TiB .* available .*HVOOperator") as info:
        dk.hvo_matrix(attn, w_v, w_o)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)
    assert "W' of shape (1, 6291456, 6291456)" in str(info.value)


def test_out_refuses_gradients(lay):
    out = torch.empty(2, 30, 35)
    with pytest.raises(RuntimeError, match="out= writes W' in place and records no gradient"):
        call(lay, attn=lay["attn"].requires_grad_(), out=out)
    with torch.no_grad():
        call(lay, attn=lay["attn"].requires_grad_(), out=out)


@needs_cpp
def test_cpp_refuses_other_devices(lay):
    meta = {k: v.to("meta") for k, v in lay.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="backend='cpp' runs on CPU tensors, but the inputs are on meta"):
        dk.hvo_matrix(meta["attn"], meta["w_v"], meta["w_o"], num_kv_heads=2, backend="cpp")


def test_bias_bad_input(lay):
    with pytest.raises(ValueError, match=r"b_v must have shape \(6,\), got \(12,\)"):
        dk.hvo_bias(lay["attn"], lay["w_o"], torch.zeros(12), num_kv_heads=2)
    with pytest.raises(ValueError, match=r"b_o must have shape \(6,\)"):
        dk.hvo_bias(lay["attn"], lay["w_o"], b_o=torch.zeros(5), num_kv_heads=2)
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide"):
        dk.hvo_bias(lay["attn"], lay["w_o"], num_kv_heads=3)


def test_ov_circuits_bad_input(lay):
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        dk.ov_circuits(lay["w_v"], lay["w_o"], 0)
    with pytest.raises(ValueError, match=r"w_v must have shape"):
        dk.ov_circuits(lay["w_v"], lay["w_o"], 4)  # 4 kv heads expected by default


@pytest.mark.parametrize("device", ["CPU", "bogus", None, 1.5])
def test_available_backends_names_a_bad_device(device):
    # torch's raw "Expected one of cpu, cuda, ipu, ... device" RuntimeError, or its overload list for None
    with pytest.raises((ValueError, TypeError), match=r"device must be a torch\.device or a device name .*got"):
        dk.available_backends(device)
    assert dk.available_backends(torch.device("cpu")) == dk.available_backends("cpu")


def test_available_backends_of_cuda_without_a_gpu(monkeypatch):
    """Without a GPU no kernel runs on "cuda" tensors: triton was listed there whenever triton imported."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dk.available_backends("cuda") == ["reference"]
