"""The torch.library ops: opcheck, torch.compile(fullgraph=True), and gradients (gradcheck in
float64, and against autograd through the reference formula)."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import reference

from conftest import random_layer

KERNEL_BACKENDS = [b for b in ("cpp",) if b in dk.available_backends("cpu")]


def _inputs(dtype=torch.float32, batch=2):
    lay = random_layer(batch, 4, 2, tokens=4, head_dim=2, m_in=5, m_out=3, causal=True, dtype=dtype)
    ov = reference.ov_circuits(lay["w_v"], lay["w_o"], 4, 2)
    return lay, ov


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("layout", ["token", "feature"])
def test_opcheck(backend, layout):
    lay, ov = _inputs()
    attn = lay["attn"].requires_grad_()
    torch.library.opcheck(torch.ops.duat.hvo_matrix.default, (attn, ov.requires_grad_(), layout, backend, torch.float32))
    out = torch.empty(2, 12, 20)
    torch.library.opcheck(torch.ops.duat.hvo_matrix_out.default, (lay["attn"].detach(), ov.detach(), layout, backend, out))


@pytest.mark.parametrize("with_out", [False, True])
def test_torch_compile_fullgraph(with_out):
    lay, _ = _inputs()

    def f(attn, w_v, w_o, out):
        w = dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=2, out=out)
        return w.sum(-1) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out = torch.empty(2, 12, 20) if with_out else None
    got = compiled(lay["attn"], lay["w_v"], lay["w_o"], out)
    expected = f(lay["attn"], lay["w_v"], lay["w_o"], None)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("layout", ["token", "feature"])
def test_gradcheck_float64(backend, layout):
    lay, _ = _inputs(torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (lay["attn"], lay["w_v"], lay["w_o"]))
    assert torch.autograd.gradcheck(
        lambda a, wv, wo: dk.hvo_matrix(a, wv, wo, num_kv_heads=2, layout=layout, backend=backend), inputs)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("layout", ["token", "feature"])
def test_gradients_match_autograd_of_the_formula(backend, layout):
    lay, _ = _inputs(torch.float64, batch=3)
    weight = torch.randn(3, 12, 20, dtype=torch.float64)

    def loss(fn):
        a, wv, wo = (t.clone().requires_grad_() for t in (lay["attn"], lay["w_v"], lay["w_o"]))
        (fn(a, wv, wo) * weight).sum().backward()
        return a.grad, wv.grad, wo.grad

    ours = loss(lambda a, wv, wo: dk.hvo_matrix(a, wv, wo, num_kv_heads=2, layout=layout, backend=backend))
    formula = loss(lambda a, wv, wo: reference.hvo_matrix(a, reference.ov_circuits(wv, wo, 4, 2), layout))
    for g, want in zip(ours, formula):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


def test_torch_compile_fullgraph_with_symbolic_head_counts():
    # A second head count makes torch.compile trace h (and d, M) as symbolic sizes; the integer check
    # of num_heads called hasattr(h, "__index__"), which TorchDynamo cannot trace: "Unsupported hasattr
    # call" under fullgraph=True (a graph break without it), e.g. compiling one function over layers
    # of several models or over heads= subsets.
    compiled = torch.compile(lambda a, wv, wo: dk.hvo_matrix(a, wv, wo, num_kv_heads=1), fullgraph=True)
    for heads in (2, 4, 6):
        lay = random_layer(1, heads, 1, tokens=3, head_dim=2, m_in=3, m_out=2, seed=heads)
        torch.testing.assert_close(compiled(lay["attn"], lay["w_v"], lay["w_o"]),
                                   dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=1))


def test_direct_op_calls_check_their_arguments():
    # torch.ops.duat.* called directly (they are registered for anyone): a misspelt layout was read as
    # "feature" and an out= of a narrower shape got a tile of W', silently; others failed with a KeyError
    # (dtype), an unpacking error (3-D attn) or the C++ boundary's message
    attn, ov = torch.rand(1, 2, 3, 3), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="layout must be 'token' or 'feature', got 'Token'"):
        torch.ops.duat.hvo_matrix(attn, ov, "Token", "cpp", torch.float32)
    with pytest.raises(ValueError, match="out must have shape \\(1, 12, 15\\), got \\(1, 12, 14\\)"):
        torch.ops.duat.hvo_matrix_out(attn, ov, "token", "cpp", torch.empty(1, 12, 14))
    with pytest.raises(ValueError, match="backend must be one of 'reference', 'cpp', 'triton'"):
        torch.ops.duat.hvo_matrix(attn, ov, "token", "auto", torch.float32)
    with pytest.raises(ValueError, match="needs attn \\(B, h, N, N_k\\) and ov \\(h, M_out, M_in\\) with the same h"):
        torch.ops.duat.hvo_matrix(attn[0], ov, "token", "cpp", torch.float32)
    with pytest.raises(TypeError, match="dtype must be one of float32"):
        torch.ops.duat.hvo_matrix(attn, ov, "token", "cpp", torch.int32)
    want = reference.hvo_matrix(attn, ov, "feature")
    torch.testing.assert_close(torch.ops.duat.hvo_matrix(attn, ov, "feature", "cpp", torch.float32), want)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("layout", ["token", "feature"])
def test_torch_func_vmap(backend, layout):
    # under vmap the cpp backend's fused path handed a batched tensor (no storage) to the C++ kernel:
    # "Cannot access data pointer of Tensor that doesn't have storage"
    import warnings

    lay = random_layer(3, 2, tokens=3, m_in=2, m_out=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "no batching rule for duat::hvo_matrix" performance note
        got = torch.func.vmap(lambda a: dk.hvo_matrix(a, lay["w_v"], lay["w_o"], backend=backend, layout=layout))(
            lay["attn"])
        per_w_o = torch.func.vmap(lambda w: dk.hvo_matrix(lay["attn"][0], lay["w_v"], w, backend=backend))(
            torch.stack([lay["w_o"], 2 * lay["w_o"]]))
    torch.testing.assert_close(got, dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], layout=layout))
    torch.testing.assert_close(per_w_o[1], 2 * dk.hvo_matrix(lay["attn"][0], lay["w_v"], lay["w_o"]))


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_torch_func_gradient_transforms(layout):
    # torch.func.grad / jacrev / jvp failed: "In order to use an autograd.Function with functorch transforms
    # ... it must override the setup_context staticmethod" (the registered op's autograd formula)
    lay = random_layer(2, 4, 2, tokens=3, m_in=3, m_out=2, dtype=torch.float64)
    attn, w_v, w_o = lay["attn"], lay["w_v"], lay["w_o"]

    def w_prime(a, wv, wo):
        return dk.hvo_matrix(a, wv, wo, num_kv_heads=2, layout=layout)

    want = torch.autograd.functional.jacobian(w_prime, (attn, w_v, w_o))
    got = torch.func.jacrev(w_prime, argnums=(0, 1, 2))(attn, w_v, w_o)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    grad = torch.func.grad(lambda wo: w_prime(attn, w_v, wo).square().sum())(w_o)
    torch.testing.assert_close(grad, torch.einsum("bij,bijkl->kl", 2 * w_prime(attn, w_v, w_o), want[2]))
    tangent = torch.randn_like(w_o)
    _, jvp = torch.func.jvp(lambda wo: w_prime(attn, w_v, wo), (w_o,), (tangent,))
    torch.testing.assert_close(jvp, torch.einsum("bijkl,kl->bij", want[2], tangent))
    outer = torch.func.grad(lambda wo: torch.func.vmap(lambda a: w_prime(a, w_v, wo).sum())(attn).sum())(w_o)
    torch.testing.assert_close(outer, want[2].sum((0, 1, 2)))


@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_eager_calls_skip_the_op_dispatch_and_modes_still_see_the_op(backend, with_out):
    """Plain eager calls run the kernel without the registered op (its dispatch costs 20-40 µs a call);
    under a dispatch mode (a profiler's, FakeTensorMode, FlopCounterMode) the call is the op, as before."""
    from unittest import mock

    from torch.utils._python_dispatch import TorchDispatchMode

    from duat_kernels import ops

    lay = random_layer(heads=3, tokens=4, head_dim=2, m_in=5, m_out=6, batched=False, seed=2)
    args = (lay["attn"], lay["w_v"], lay["w_o"])
    want = reference.hvo_matrix(lay["attn"].unsqueeze(0), dk.ov_circuits(lay["w_v"], lay["w_o"], 3), "feature")[0]

    def call():
        out = torch.empty_like(want) if with_out else None
        return dk.hvo_matrix(*args, layout="feature", backend=backend, out=out)

    refuse = mock.Mock(side_effect=AssertionError("the registered op was called in plain eager mode"))
    with mock.patch.object(ops, "hvo_matrix", refuse), mock.patch.object(ops, "hvo_matrix_out", refuse):
        torch.testing.assert_close(call(), want)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        torch.testing.assert_close(call(), want)
    assert ("duat.hvo_matrix_out" if with_out else "duat.hvo_matrix") in seen.ops, seen.ops


@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_fake_tensor_mode_gives_shapes_without_running_a_kernel(backend, layout, with_out):
    """Under FakeTensorMode (shape propagation, memory planning) hvo_matrix, hvo_bias and ov_circuits give
    fake results of the right shape and dtype: the C++ kernels were handed fake tensors (".numpy() is not
    supported for tensor subclasses") and out= was refused as overlapping (fake tensors share address 0)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        attn, w_v, w_o = torch.rand(2, 4, 4).softmax(-1), torch.randn(6, 6), torch.randn(5, 6)
        out = torch.empty(20, 24, dtype=torch.bfloat16) if with_out else None
        w = dk.hvo_matrix(attn, w_v, w_o, backend=backend, layout=layout, out=out, dtype=torch.bfloat16)
        bias = dk.hvo_bias(attn, w_o, torch.randn(6), torch.randn(5))
        ov = dk.ov_circuits(w_v, w_o, 2)
    assert isinstance(w, FakeTensor) and (w.shape, w.dtype) == ((20, 24), torch.bfloat16)
    assert (bias.shape, ov.shape) == ((20,), (2, 5, 6))


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("layout", ["token", "feature"])
def test_torch_func_with_out(backend, layout):
    # out= under torch.func failed in the overlap check with "Cannot access data pointer of Tensor that
    # doesn't have storage" (vmap's and grad's wrappers have no addresses); under vmap, once past it, with
    # "Batching rule not implemented for duat::hvo_matrix_out"
    import warnings

    lay = random_layer(3, 4, 2, tokens=3, head_dim=2, m_in=3, m_out=2)
    attn, w_v, w_o = lay["attn"], lay["w_v"], lay["w_o"]
    want = reference.hvo_matrix(attn, reference.ov_circuits(w_v, w_o, 4, 2), layout)
    out = torch.full_like(want, float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "no batching rule for duat::hvo_matrix" performance note
        got = torch.func.vmap(lambda a, o: dk.hvo_matrix(a, w_v, w_o, num_kv_heads=2, layout=layout, backend=backend,
                                                         out=o))(attn, out)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(got, want)
    # under grad, a captured out= of W' built from constants is written; one that would need a gradient is refused
    captured = torch.empty_like(want[0])

    def loss(wo):
        dk.hvo_matrix(attn[0], w_v, w_o, num_kv_heads=2, layout=layout, backend=backend, out=captured)
        return (captured * wo).sum()

    torch.testing.assert_close(torch.func.grad(loss)(torch.ones(())), want[0].sum())
    with pytest.raises(RuntimeError, match="out= writes W' in place and records no gradient"):
        torch.func.grad(lambda wo: dk.hvo_matrix(attn[0], w_v, wo, num_kv_heads=2, backend=backend,
                                                 out=captured).sum())(w_o)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("layout", ["token", "feature"])
def test_forward_mode_ad(backend, layout):
    # torch.autograd.forward_ad: the cpp kernel ran on dual tensors (they require no grad) and W' came back
    # without a tangent, silently; the tangent is the directional derivative of the formula
    import torch.autograd.forward_ad as fwAD

    lay, _ = _inputs(torch.float64)
    g = torch.Generator().manual_seed(3)
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (lay["attn"], lay["w_v"], lay["w_o"])]

    def formula(a, wv, wo):
        return reference.hvo_matrix(a, reference.ov_circuits(wv, wo, 4, 2), layout)

    _, want = torch.autograd.functional.jvp(formula, (lay["attn"], lay["w_v"], lay["w_o"]), tuple(tangents))
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, d) for t, d in zip((lay["attn"], lay["w_v"], lay["w_o"]), tangents)]
        got = fwAD.unpack_dual(dk.hvo_matrix(*duals, num_kv_heads=2, layout=layout, backend=backend)).tangent
    assert got is not None
    torch.testing.assert_close(got, want)
