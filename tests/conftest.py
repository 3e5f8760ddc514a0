"""Shared helpers: random attention layers and the one "close to reference" assertion."""

from __future__ import annotations

import os

# The Triton kernels run in Triton's interpreter on the CPU; the variable must be set before triton
# is imported (duat_kernels imports it lazily, at the first backend="triton" call).
os.environ.setdefault("TRITON_INTERPRET", "1")

import tempfile

import pytest
import torch
from hypothesis import settings

from duat_kernels import reference

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=60, deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Working directory of the tests' child Pythons: outside the source tree, so that `python -c` and
# `python -m` import the installed duat_kernels (with its built extension), not the checkout's folder.
CHILD_CWD = tempfile.gettempdir()

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Unit roundoff of the accumulation dtype and one ulp (relative) of each output dtype.
_ACC_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
_OUT_ULP = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def random_layer(batch=1, heads=4, kv_heads=None, tokens=7, head_dim=3, m_in=11, m_out=9, *, causal=False,
                 batched=True, dtype=torch.float32, seed=0, keys=None) -> dict:
    """A random attention layer: softmax probabilities (causal if asked) and nn.Linear-style weights;
    keys=N_k gives a cross-attention A of `tokens` queries over N_k keys."""
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    scores = torch.randn(batch, heads, tokens, keys or tokens, generator=g, dtype=torch.float64)
    if causal:
        scores = scores.masked_fill(torch.ones(tokens, tokens, dtype=torch.bool).triu(1), float("-inf"))
    attn = scores.softmax(-1).to(dtype)
    w_v = (torch.randn(kv_heads * head_dim, m_in, generator=g, dtype=torch.float64) / m_in ** 0.5).to(dtype)
    w_o = (torch.randn(m_out, heads * head_dim, generator=g, dtype=torch.float64) / (heads * head_dim) ** 0.5).to(dtype)
    b_v = torch.randn(kv_heads * head_dim, generator=g, dtype=torch.float64).to(dtype)
    b_o = torch.randn(m_out, generator=g, dtype=torch.float64).to(dtype)
    return dict(attn=attn if batched else attn[0], w_v=w_v, w_o=w_o, b_v=b_v, b_o=b_o, num_kv_heads=kv_heads)


def qk_sources(batch: int, heads: int, kv_heads: int, tokens: int, head_dim: int, opts: dict,
               generator: torch.Generator):
    """QKAttention from random q (batch, heads, tokens, head_dim) and k (GQA) drawn from `generator`, in
    float32 and in float64 (the same numbers). opts: QKAttention's options, plus mask=True (left padding
    in batch 0, so rows without keys under a causal mask; right padding in the others) or mask="none"
    (batch 1 attends no key at all)."""
    from duat_kernels.qk_attention import QKAttention

    q = torch.randn(batch, heads, tokens, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, tokens, head_dim, generator=generator)
    opts = dict(opts)
    mask = opts.pop("mask", None)
    if mask is not None:
        keys = torch.ones(batch, tokens, dtype=torch.bool)
        if mask == "none":
            keys[1] = False
        else:
            keys[0, :7] = False
            keys[1:, tokens - 9:] = False
        opts["attention_mask"] = keys
    return QKAttention(q, k, **opts), QKAttention(q.double(), k.double(), **opts)


def assert_close_to_reference(got: torch.Tensor, attn: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
                              num_kv_heads: int | None, layout: str, operand_roundoff: float = 0.0) -> None:
    """got (any output dtype) against the reference computed in the same accumulation dtype.

    Both sides sum h products in the accumulation dtype (unit roundoff u), so they differ by at
    most 2·h·u·Σ_i|A_i|⊗|OV_i| (the forward error bound of a length-h dot product, twice). Each
    side also forms OV_i = Wo_i Wv_i itself (the C++ backend with its own kernel, the reference
    with torch.bmm), length-d dot products: 2·d·u·Σ_i|A_i|⊗(|Wo_i||Wv_i|) more. A 16-bit output
    adds one ulp of its own rounding. A kernel that rounds the operands of its products (TF32
    tensor-core dots: operand_roundoff = 2^-11) makes each product off by 2·operand_roundoff
    relative: 2·operand_roundoff·Σ_i|A_i|⊗|OV_i| more. Nothing looser.
    """
    acc = reference.compute_dtype(got.dtype)
    attn4 = attn if attn.dim() == 4 else attn.unsqueeze(0)
    heads = attn4.shape[1]
    ov = reference.ov_circuits(w_v.to(acc), w_o.to(acc), heads, num_kv_heads or heads)
    exact = reference.hvo_matrix(attn4.to(acc), ov, layout)
    magnitude = reference.hvo_matrix(attn4.to(acc).abs(), ov.abs(), layout)
    ov_magnitude = reference.ov_circuits(w_v.to(acc).abs(), w_o.to(acc).abs(), heads, num_kv_heads or heads)
    ov_error = reference.hvo_matrix(attn4.to(acc).abs(), ov_magnitude, layout)
    if attn.dim() == 3:
        exact, magnitude, ov_error = exact[0], magnitude[0], ov_error[0]
    got = got.cpu()
    assert got.shape == exact.shape, (got.shape, exact.shape)
    head_dim = w_o.shape[1] // heads
    bound = (2 * heads * _ACC_ROUNDOFF[acc] * magnitude.double() + 2 * head_dim * _ACC_ROUNDOFF[acc] * ov_error.double()
             + 2 * operand_roundoff * magnitude.double() + _OUT_ULP[got.dtype] * exact.double().abs())
    bound += torch.finfo(got.dtype).tiny  # subnormal outputs
    err = (got.double() - exact.double()).abs()
    bad = err > bound
    if bad.any():
        idx = tuple(i.item() for i in bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {got.numel()} entries off; first at {idx}: got {got[idx].item()!r}, "
                             f"reference {exact[idx].item()!r}, bound {bound[idx].item():.3g}")


@pytest.fixture
def layer():
    return random_layer


@pytest.fixture
def umask_022():
    """The process's umask set to 0o022 for one test (new files 0o644, new folders 0o755), restored after it."""
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


@pytest.fixture(scope="session")
def dask_client():
    """A Client of a LocalCluster with 2 worker processes (one thread each), shared by the test modules
    that use it: starting workers and importing torch in them costs seconds."""
    distributed = pytest.importorskip("distributed", reason="needs dask.distributed: pip install '.[dask]'")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield client
