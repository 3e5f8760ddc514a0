"""Batches expanded along the batch dimension (stride 0: one element repeated, no memory behind the copies).

Every entry point computes element 0 once and copies it over the batch. Looped over in Python instead, each element
took 25-50 µs: 2^21 elements ran for about a minute per call, 10^9 for hours. Each test runs under a deadline, so that
a regression fails instead of hanging; the results are compared with the operator of the one element itself.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch

import duat_kernels as dk
from duat_kernels import _progress
from duat_kernels._validation import all_finite

BATCH = 1 << 21
DEADLINE_S = 5
INDICES = (0, 1, BATCH // 2, BATCH - 1)
HEADS, KV_HEADS, TOKENS, HEAD_DIM, M_IN, M_OUT = 2, 1, 2, 2, 1, 1


@pytest.fixture(autouse=True)
def deadline():
    """Fail a call that loops over the expanded batch (SIGALRM interrupts the Python loop) instead of hanging."""
    def expired(signum, frame):
        raise TimeoutError(f"over {DEADLINE_S} s: a loop over the {BATCH:,} expanded batch elements?")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def factors(dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(attn=torch.rand(HEADS, TOKENS, TOKENS, generator=g).softmax(-1).to(dtype),
                q=torch.randn(HEADS, TOKENS, HEAD_DIM, generator=g).to(dtype),
                k=torch.randn(KV_HEADS, TOKENS, HEAD_DIM, generator=g).to(dtype),
                w_v=torch.randn(KV_HEADS * HEAD_DIM, M_IN, generator=g),
                w_o=torch.randn(M_OUT, HEADS * HEAD_DIM, generator=g),
                b_v=torch.randn(KV_HEADS * HEAD_DIM, generator=g), b_o=torch.randn(M_OUT, generator=g),
                x=torch.randn(TOKENS * M_IN, generator=g), y=torch.randn(TOKENS * M_OUT, generator=g))


def operator(f: dict, source: str, batch: int, layout: str = "token") -> dk.HVOOperator:
    """The operator of `batch` copies of one layer: expanded (stride 0) for batch > 1, stored (1, ...) tensors for 1."""
    def batched(t):
        return t[None].expand(batch, *t.shape) if batch > 1 else t[None].clone()

    common = dict(num_kv_heads=KV_HEADS, b_v=f["b_v"], b_o=f["b_o"], layout=layout)
    if source == "attn":
        return dk.HVOOperator(batched(f["attn"]), f["w_v"], f["w_o"], **common)
    mask = {"qk": None, "qk_mask": torch.tensor([False, True]),
            "qk_batch_mask": batched(torch.tensor([True, False]))}[source]
    return dk.HVOOperator.from_qk(batched(f["q"]), batched(f["k"]), f["w_v"], f["w_o"], causal=True,
                                  attention_mask=mask, **common)


def repeated_operand(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t[None].expand(batch, *t.shape) if batch > 1 else t[None].clone()


METHODS = {
    "to_dense": lambda op, f, b: op.to_dense(),
    "to_dense_float64": lambda op, f, b: op.to_dense(dtype=torch.float64),
    "tile": lambda op, f, b: op.tile(slice(0, 1), slice(1, 2)),
    "tile_float64": lambda op, f, b: op.tile(slice(1, 2), slice(0, 2), dtype=torch.float64),
    "block": lambda op, f, b: op.block(1, 0),
    "block_norms": lambda op, f, b: op.block_norms(),
    "block_norms_grid": lambda op, f, b: op.block_norms(grid=(1, 2)),
    "frobenius_norm": lambda op, f, b: op.frobenius_norm(),
    "trace": lambda op, f, b: op.trace(),
    "bias": lambda op, f, b: op.bias(),
    "matvec": lambda op, f, b: op.matvec(repeated_operand(f["x"], b)),
    "rmatvec": lambda op, f, b: op.rmatvec(y=repeated_operand(f["y"], b)),
    "matmat": lambda op, f, b: op.matmat(repeated_operand(torch.stack([f["x"], -f["x"]], 1), b)),
    "contributions": lambda op, f, b: op.contributions(repeated_operand(f["x"], b)),
    "contributions_per_head": lambda op, f, b: op.contributions(repeated_operand(f["x"], b), per_head=True),
}


def assert_repeats(got: torch.Tensor, one: torch.Tensor) -> None:
    """got (BATCH, ...) holds `one` (1, ...) at every sampled index, in memory of its own (callers may write there)."""
    assert got.shape == (BATCH, *one.shape[1:]) and got.dtype == one.dtype
    assert 0 not in got.stride()  # its own memory, one copy per element
    for b in INDICES:
        torch.testing.assert_close(got[b], one[0], rtol=0, atol=0)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("source", ["attn", "qk", "qk_mask", "qk_batch_mask"])
def test_operator_methods_compute_one_element_of_an_expanded_batch(source, method):
    f = factors()
    call = METHODS[method]
    got = call(operator(f, source, BATCH), f, BATCH)
    assert_repeats(got, call(operator(f, source, 1), f, 1))


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_hvo_matrix_and_bias_of_an_expanded_batch(layout, backend):
    f = factors()
    attn, one = f["attn"][None].expand(BATCH, -1, -1, -1), f["attn"][None].clone()
    kwargs = dict(num_kv_heads=KV_HEADS, layout=layout)
    want = dk.hvo_matrix(one, f["w_v"], f["w_o"], backend=backend, **kwargs)
    assert_repeats(dk.hvo_matrix(attn, f["w_v"], f["w_o"], backend=backend, **kwargs), want)
    out = torch.empty(BATCH, *want.shape[1:])
    assert dk.hvo_matrix(attn, f["w_v"], f["w_o"], backend=backend, out=out, **kwargs) is out
    assert_repeats(out, want)
    assert_repeats(dk.hvo_matrix(attn, f["w_v"], f["w_o"], backend=backend, heads=[1], **kwargs),
                   dk.hvo_matrix(one, f["w_v"], f["w_o"], backend=backend, heads=[1], **kwargs))
    assert_repeats(dk.hvo_bias(attn, f["w_o"], f["b_v"], f["b_o"], **kwargs),
                   dk.hvo_bias(one, f["w_o"], f["b_v"], f["b_o"], **kwargs))


def test_half_precision_q_and_k_stay_expanded():
    # q.to(float32) of an expanded batch allocated every copy (10^9 of them failed to allocate)
    f = factors(torch.float16)
    def expanded(t, batch):
        return t[None].expand(batch, *t.shape)

    huge = dk.HVOOperator.from_qk(expanded(f["q"], 10 ** 12), expanded(f["k"], 10 ** 12), f["w_v"], f["w_o"])
    assert huge.source.q.dtype == torch.float32 and huge.source.q.stride(0) == 0
    op = dk.HVOOperator.from_qk(expanded(f["q"], BATCH), expanded(f["k"], BATCH), f["w_v"], f["w_o"])
    assert_repeats(op.block(1, 0), dk.HVOOperator.from_qk(f["q"][None], f["k"][None], f["w_v"], f["w_o"]).block(1, 0))


@pytest.mark.parametrize("method", ["tile", "to_dense", "block_norms", "matvec", "bias"])
def test_results_that_cannot_fit_are_refused(method):
    batch = 10 ** 13
    f = factors()
    with pytest.raises(dk.DenseTooLargeError, match=r"needs .* but only .* available"):
        METHODS[method](operator(f, "attn", batch), f, batch)


@pytest.mark.parametrize("method", ["tile", "block", "block_norms", "matvec", "contributions", "trace"])
def test_batches_whose_elements_differ_are_not_repeated(method):
    # only a batch whose every input (A, q and k, the key mask, x) is expanded repeats element 0
    f, batch = factors(), 3
    g = torch.Generator().manual_seed(1)
    attn = f["attn"][None].expand(batch, -1, -1, -1)
    distinct = torch.rand(batch, HEADS, TOKENS, TOKENS, generator=g).softmax(-1)
    cases = [(attn, torch.randn(batch, TOKENS * M_IN, generator=g)),  # x differs
             (distinct, f["x"][None].expand(batch, -1))]  # A differs
    for a, xs in cases:
        op = dk.HVOOperator(a, f["w_v"], f["w_o"], num_kv_heads=KV_HEADS)
        call = {"matvec": lambda o, x_: o.matvec(x_), "contributions": lambda o, x_: o.contributions(x_)}.get(
            method, lambda o, x_: METHODS[method](o, f, 1))
        got = call(op, xs)
        for b in range(batch):
            one = dk.HVOOperator(a[b:b + 1].clone(), f["w_v"], f["w_o"], num_kv_heads=KV_HEADS)
            want = call(one, xs[b:b + 1].clone())
            torch.testing.assert_close(got[b], want[0])


def test_mask_that_differs_per_element_is_not_repeated():
    f, batch = factors(), 2
    q, k = f["q"][None].expand(batch, -1, -1, -1), f["k"][None].expand(batch, -1, -1, -1)
    mask = torch.tensor([[True, True], [True, False]])
    got = dk.HVOOperator.from_qk(q, k, f["w_v"], f["w_o"], attention_mask=mask).block_norms()
    for b in range(batch):
        one = dk.HVOOperator.from_qk(q[b:b + 1], k[b:b + 1], f["w_v"], f["w_o"], attention_mask=mask[b:b + 1])
        torch.testing.assert_close(got[b], one.block_norms()[0])


def test_gradients_through_an_expanded_batch():
    f = factors(torch.float64)
    w_v, w_o = f["w_v"].double().requires_grad_(), f["w_o"].double()
    leaf = f["attn"].clone().requires_grad_()

    def tile_sum(attn):
        return dk.HVOOperator(attn, w_v, w_o, num_kv_heads=KV_HEADS).tile(slice(0, 2), slice(0, 2)).sum()

    def grads(*tensors):  # taken, and reset for the next backward
        taken = [t.grad for t in tensors]
        for t in tensors:
            t.grad = None
        return taken

    tile_sum(leaf[None]).backward()
    one_w_v, one_leaf = grads(w_v, leaf)
    # weights that require grad (not batched) with A expanded: element 0 once, the gradient summed over the batch
    tile_sum(f["attn"][None].expand(BATCH, -1, -1, -1)).backward()
    torch.testing.assert_close(w_v.grad, BATCH * one_w_v)
    # a leaf A behind the expansion: autograd records through the expanded tensor (every element is computed)
    tile_sum(leaf[None].expand(3, -1, -1, -1)).backward()
    torch.testing.assert_close(leaf.grad, 3 * one_leaf)
    # the expanded tensor itself as the variable: one gradient per element, not their sum in element 0
    expanded = f["attn"][None].expand(3, -1, -1, -1).requires_grad_()
    tile_sum(expanded).backward()
    for b in range(3):
        torch.testing.assert_close(expanded.grad[b], one_leaf)


def test_all_finite_reads_each_value_of_an_expanded_tensor_once():
    # one torch sum, which the deadline cannot interrupt: summing 10^9 copies took seconds
    t = torch.ones(3)[None].expand(10 ** 9, 3)
    start = time.perf_counter()
    assert all_finite(t)
    assert time.perf_counter() - start < 1
    bad = torch.tensor([1.0, float("nan")])[None].expand(10 ** 9, 2)
    assert not all_finite(bad)


def test_loops_over_differing_elements_show_progress(monkeypatch, capsys):
    monkeypatch.setattr(_progress, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(_progress, "PROGRESS_FROM_ELEMENTS", 3)
    f, batch = factors(), 3
    attn = torch.rand(batch, HEADS, TOKENS, TOKENS, generator=torch.Generator().manual_seed(2)).softmax(-1)
    op = dk.HVOOperator(attn, f["w_v"], f["w_o"], num_kv_heads=KV_HEADS)
    got = op.tile(slice(0, 1), slice(0, 2))
    assert "tiles" in capsys.readouterr().err
    torch.testing.assert_close(got[batch - 1], op.to_dense()[batch - 1, 0:1, 0:2])
