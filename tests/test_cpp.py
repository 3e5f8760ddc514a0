"""The C++ backend against the reference: randomised shapes, both layouts, GQA, batches, dtypes,
out= buffers, non-contiguous inputs, causal zero blocks, tiles and the streaming-store path, in
every ISA variant the CPU can run (a lower variant runs on a higher CPU)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import duat_kernels as dk
from duat_kernels import backends, cpp, reference

from conftest import CHILD_CWD, DTYPES, assert_close_to_reference, random_layer

pytestmark = pytest.mark.skipif(not cpp.is_available(), reason=f"C++ extension not built: {cpp.IMPORT_ERROR}")

CAPABILITIES = cpp.supported_capabilities()


@pytest.fixture(params=CAPABILITIES)
def capability(request):
    """Run the test with each ISA variant of the kernels this CPU supports, then restore the default."""
    with cpp.using_capability(request.param):
        yield request.param


def _cpp(lay, layout="token", dtype=None, **kw):
    return dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=lay["num_kv_heads"], layout=layout,
                         backend="cpp", dtype=dtype, **kw)


@pytest.mark.parametrize("isa", CAPABILITIES)
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 8), group=st.sampled_from([1, 2, 3, 4]),
    tokens=st.integers(1, 19), head_dim=st.integers(1, 5), m_in=st.integers(1, 70), m_out=st.integers(1, 40),
    layout=st.sampled_from(["token", "feature"]), dtype=st.sampled_from(DTYPES), causal=st.booleans(),
    batched=st.booleans(), seed=st.integers(0, 2 ** 16),
)
def test_random_shapes_match_reference(isa, batch, kv_heads, group, tokens, head_dim, m_in, m_out, layout, dtype,
                                       causal, batched, seed):
    with cpp.using_capability(isa):
        _check_random_shape(batch, kv_heads, group, tokens, head_dim, m_in, m_out, layout, dtype, causal, batched, seed)


def _check_random_shape(batch, kv_heads, group, tokens, head_dim, m_in, m_out, layout, dtype, causal, batched, seed):
    lay = random_layer(batch, kv_heads * group, kv_heads, tokens, head_dim, m_in, m_out, causal=causal,
                       batched=batched, seed=seed)
    got = _cpp(lay, layout, dtype)
    assert got.dtype == dtype
    assert_close_to_reference(got, lay["attn"], lay["w_v"], lay["w_o"], lay["num_kv_heads"], layout)


# Shapes aimed at each code path: head counts with an unrolled loop (4, 8, 12, 16) and without
# (1, 5, 32), segments of 4 vectors + 2 + 1 + a scalar tail (m_in = 117), short feature segments.
@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (4, 2), (5, 5), (8, 8), (12, 4), (16, 16), (32, 8)])
@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_code_paths(heads, kv_heads, layout, dtype, capability):
    lay = random_layer(2, heads, kv_heads, tokens=13, head_dim=2, m_in=117, m_out=6, seed=heads)
    assert_close_to_reference(_cpp(lay, layout, dtype), lay["attn"], lay["w_v"], lay["w_o"], kv_heads, layout)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_store_path(layout, dtype, capability):
    # 2080 x 2080 float32 = 17.3 MB into a buffer whose pages are resident: above the 16 MiB
    # threshold for non-temporal stores.
    lay = random_layer(1, 8, 2, tokens=16, head_dim=8, m_in=130, m_out=130, causal=True, batched=False, seed=3)
    out = torch.full((2080, 2080), float("nan"), dtype=dtype)
    _cpp(lay, layout, out=out)
    assert out.numel() * 4 > 16 * 2 ** 20
    assert_close_to_reference(out, lay["attn"], lay["w_v"], lay["w_o"], 2, layout)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_and_cached_outputs_equal_a_reused_buffer(layout, dtype, capability):
    # A new mapping (pages never touched: rows in memory order, regular stores) and a block back from
    # the output cache (stale contents) hold W' bit for bit as a buffer written before.
    lay = random_layer(1, 8, 2, tokens=16, head_dim=8, m_in=130, m_out=130, causal=True, batched=False, seed=4)
    reused = torch.zeros(2080, 2080, dtype=dtype)
    _cpp(lay, layout, out=reused)
    cpp.empty_output_cache()
    fresh = _cpp(lay, layout, dtype)
    assert torch.equal(fresh.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       reused.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    ptr = fresh.data_ptr()
    fresh.fill_(float("nan"))
    del fresh
    again = _cpp(lay, layout, dtype)
    assert again.data_ptr() == ptr and cpp.output_cache_info()["hits"] >= 1
    assert torch.equal(again, reused)


def test_output_cache_limit_and_release():
    lay = random_layer(1, 2, tokens=16, head_dim=2, m_in=130, m_out=130, batched=False, seed=5)
    limit = cpp.output_cache_info()["limit_bytes"]
    try:
        cpp.empty_output_cache()
        w = _cpp(lay)
        nbytes = w.numel() * 4
        del w
        info = cpp.output_cache_info()
        assert info["cached_blocks"] == 1 and info["cached_bytes"] >= nbytes
        cpp.empty_output_cache()
        assert cpp.output_cache_info()["cached_bytes"] == 0
        cpp.set_output_cache_limit(0)  # off: a freed output is unmapped at once
        w = _cpp(lay)
        del w
        assert cpp.output_cache_info()["cached_bytes"] == 0
        with pytest.raises(ValueError, match="non-negative"):
            cpp._C.set_output_cache_limit(-1)
    finally:
        cpp.set_output_cache_limit(limit)


def test_factors_are_read_through_their_strides(capability):
    # The kernel reads L (h, P, S) and R (h, Q, T) in place: transposed and sliced views give the
    # same tile bit for bit as contiguous copies (strides that are multiples of 4 KiB included).
    g = torch.Generator().manual_seed(0)
    left = torch.randn(5, 9, 1024, generator=g)[:, :, ::128].transpose(1, 2)  # (5, 8, 9)
    right = torch.randn(1024, 5, 40, generator=g)[:7].permute(1, 0, 2)[..., 3:36]  # (5, 7, 33)
    assert not left.is_contiguous() and not right.is_contiguous()
    got = cpp.kron_sum_tile_(left, right, torch.empty(8 * 7, 9 * 33))
    want = cpp.kron_sum_tile_(left.contiguous(), right.contiguous(), torch.empty(8 * 7, 9 * 33))
    assert torch.equal(got, want)
    torch.testing.assert_close(got, sum(reference.kron(left[i], right[i]) for i in range(5)))


def test_bfloat16_from_finite_factors_rounds_overflow_like_torch(capability):
    # Finite factors whose products overflow: the bf16 output (finite path, no NaN test) equals the
    # float32 output of the same variant rounded by torch, Inf and NaN included (multiply-then-add
    # variants meet +Inf - Inf = NaN; fused multiply-adds keep +Inf).
    left = torch.tensor([[[3e38, 1.0, 0.0]], [[-3e38, 1.0, 2.0]]])  # (h=2, P=1, S=3)
    right = torch.full((2, 1, 37), 10.0)
    wide = cpp.kron_sum_tile_(left, right, torch.empty(1, 3 * 37))
    got = cpp.kron_sum_tile_(left, right, torch.empty(1, 3 * 37, dtype=torch.bfloat16))
    assert not wide[0, :37].isfinite().any() and wide[0, 37:].isfinite().all()
    assert torch.equal(got.isnan(), wide.isnan())
    assert torch.equal(got[~got.isnan()], wide.to(torch.bfloat16)[~got.isnan()])


@pytest.mark.parametrize("scale", [2.0 ** -64, 2.0 ** -40, 1.0])
def test_bfloat16_keeps_subnormal_sums_of_normal_products(scale, capability):
    # Normal factors whose products or cancelling sums are subnormal: AVX512_BF16's conversion
    # instruction flushes subnormals to zero, so it may only run where the factors' exponents rule
    # them out (2^-40 and 1: they cannot occur; 2^-64: they do, and must survive as torch keeps them).
    g = torch.Generator().manual_seed(1)
    left = (torch.randn(3, 2, 5, generator=g) * scale).float()
    right = (torch.randn(3, 4, 48, generator=g) * scale).float()
    right[1] = -right[0] * (left[0, 0, 0] / left[1, 0, 0])  # segment (0, 0): heads 0 and 1 nearly cancel
    wide = cpp.kron_sum_tile_(left, right, torch.empty(8, 5 * 48))
    got = cpp.kron_sum_tile_(left, right, torch.empty(8, 5 * 48, dtype=torch.bfloat16))
    assert torch.equal(got.view(torch.int16), wide.to(torch.bfloat16).view(torch.int16))
    if scale == 2.0 ** -64:  # the case is exercised: subnormal results that bfloat16 keeps nonzero
        assert (got.float().abs() < torch.finfo(torch.float32).tiny).logical_and(got != 0).sum() > 100
    # and the kernel-computed OV of token layout, whose bound is that of w_o and w_v
    attn = torch.rand(2, 3, 3, generator=g)
    w_v, w_o = (torch.randn(64, 64, generator=g) * scale).float(), (torch.randn(64, 64, generator=g) * scale).float()
    wide = cpp.kron_sum_factored_(attn, w_v, w_o, 2, torch.empty(192, 192))
    got = cpp.kron_sum_factored_(attn, w_v, w_o, 2, torch.empty(192, 192, dtype=torch.bfloat16))
    assert torch.equal(got.view(torch.int16), wide.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_causal_blocks_are_exact_zeros(layout, capability):
    lay = random_layer(1, 3, tokens=9, m_in=10, m_out=4, causal=True, batched=False)
    w = _cpp(lay, layout)
    blocks = w.reshape(9, 4, 9, 10) if layout == "token" else w.reshape(4, 9, 10, 9).permute(1, 0, 3, 2)
    upper = torch.ones(9, 9, dtype=torch.bool).triu(1)
    assert (blocks.permute(0, 2, 1, 3)[upper] == 0).all()
    assert (blocks.permute(0, 2, 1, 3)[~upper].abs().sum((-1, -2)) > 0).all()


def test_causal_rows_when_the_coefficients_overflow_their_cache(capability):
    # 8 x 200 x 200 coefficients (1.28 MB) exceed the workspace's 1 MiB cache: each thread packs one
    # row p at a time, and whether the row has all-zero segments is decided anew for each p.
    lay = random_layer(1, 8, tokens=200, head_dim=1, m_in=3, m_out=2, causal=True, batched=False)
    w = _cpp(lay)
    assert_close_to_reference(w, lay["attn"], lay["w_v"], lay["w_o"], 8, "token")
    blocks = w.reshape(200, 2, 200, 3).permute(0, 2, 1, 3)
    upper = torch.ones(200, 200, dtype=torch.bool).triu(1)
    assert (blocks[upper] == 0).all() and (blocks[~upper].abs().sum((-1, -2)) > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched", [True, False])
def test_out_buffer_is_written_in_place(dtype, batched):
    lay = random_layer(2, 4, 2, tokens=5, m_in=7, m_out=3, batched=batched)
    shape = ((2,) if batched else ()) + (15, 35)
    out = torch.full(shape, float("nan"), dtype=dtype)
    ptr = out.data_ptr()
    res = _cpp(lay, out=out)
    assert res is out and out.data_ptr() == ptr
    assert not out.isnan().any()
    assert_close_to_reference(out, lay["attn"], lay["w_v"], lay["w_o"], 2, "token")


def test_non_contiguous_inputs():
    lay = random_layer(2, 4, 2, tokens=6, head_dim=3, m_in=8, m_out=5)
    attn = lay["attn"].transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, column-major
    w_v = lay["w_v"].t().contiguous().t()
    w_o = lay["w_o"].repeat_interleave(2, dim=1)[:, ::2]  # a strided view of the same values
    assert not attn.is_contiguous() and not w_v.is_contiguous() and not w_o.is_contiguous()
    got = dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=2, backend="cpp")
    ref = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, backend="cpp")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiles_are_slices_of_the_matrix(layout, dtype, capability):
    lay = random_layer(1, 6, 3, tokens=7, head_dim=2, m_in=37, m_out=5, causal=True, batched=False, seed=7)
    ct = reference.compute_dtype(dtype)
    ov = cpp.ov_circuits(lay["w_v"].to(ct), lay["w_o"].to(ct), 6, 3)
    left, right = backends.kron_factors(lay["attn"].to(ct), ov, layout)
    full = cpp.kron_sum_tile_(left, right, torch.empty(7 * 5, 7 * 37, dtype=dtype))
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        r0, c0 = (int(torch.randint(0, n, (1,), generator=g)) for n in full.shape)
        rows = int(torch.randint(1, full.shape[0] - r0 + 1, (1,), generator=g))
        cols = int(torch.randint(1, full.shape[1] - c0 + 1, (1,), generator=g))
        tile = cpp.kron_sum_tile_(left, right, torch.empty(rows, cols, dtype=dtype), r0, c0)
        assert torch.equal(tile, full[r0:r0 + rows, c0:c0 + cols]), (r0, c0, rows, cols)
        if layout == "token":  # OV's slabs computed by the kernel for the tile's part of the weights only
            tile = cpp.kron_sum_factored_(lay["attn"].to(ct), lay["w_v"].to(ct), lay["w_o"].to(ct), 3,
                                          torch.empty(rows, cols, dtype=dtype), r0, c0)
            assert torch.equal(tile, full[r0:r0 + rows, c0:c0 + cols]), (r0, c0, rows, cols)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversion_rounds_like_torch(dtype, capability):
    # With h = 1 each entry is one product, computed exactly as torch computes it in float32, so the
    # 16-bit conversion (vector and scalar paths) must agree with torch bit for bit: ties, subnormals,
    # overflow to inf.
    g = torch.Generator().manual_seed(0)
    exps = torch.randint(-30, 20, (1, 1, 70), generator=g).double()
    right = (torch.randn(1, 1, 70, generator=g, dtype=torch.float64) * 2.0 ** exps).float()
    right[0, 0, :6] = torch.tensor([65520.0, 65519.0, 1e5, 2.0 ** -25, 2.0 ** -24 * 1.5, 1.0 + 2.0 ** -11])
    # bfloat16 ties in even and odd columns (AVX2 rounds even and odd columns in separate lanes),
    # either side of a tie, and overflow to inf
    right[0, 0, 6:16] = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8), -(1.0 + 3 * 2.0 ** -8),
                                      1.0 + 2.0 ** -8 + 2.0 ** -20, 1.0 + 2.0 ** -8 - 2.0 ** -20, 3.3961e38, -3.3961e38,
                                      255.5, 256.5 * 2.0 ** -100])
    # float32 denormals (bf16 keeps them; avx512_bf16's conversion instruction would flush them)
    right[0, 0, 40:46] = torch.tensor([1e-39, -3e-40, 1.4e-45, 1.1754942e-38, 2.0 ** -127 * 1.00390625, -7e-41])
    right[0, 0, 50:54] = torch.tensor([float("nan"), float("inf"), -float("inf"), -float("nan")])  # in a vector
    right[0, 0, 69] = float("nan")  # in the scalar tail
    left = torch.tensor([[[1.0, -1.0, 0.5, 3.0]]]).float()  # (h=1, P=1, S=4)
    tile = cpp.kron_sum_tile_(left, right, torch.empty(1, 4 * 70, dtype=dtype))
    expected = torch.kron(left[0], right[0]).to(dtype)
    if dtype == torch.bfloat16:  # NaN is 0x7FC0 here, as c10's scalar conversion writes it; torch's vector one writes 0xFFFF
        assert torch.equal(tile.isnan(), expected.isnan())
        tile, expected = tile[~tile.isnan()], expected[~expected.isnan()]
    assert torch.equal(tile.view(torch.int16), expected.view(torch.int16))


def test_boundary_rejects_bad_buffers():
    import numpy as np

    from duat_kernels import _C
    lt = np.zeros((4, 2, 3), np.float32)
    rt = np.zeros((4, 5, 6), np.float32)
    out = np.zeros((10, 18), np.float32)
    _C.kron_sum(lt, rt, out, "float32")
    cases = [
        ((lt[0], rt, out, "float32"), "lt must be 3-D"),
        ((lt, rt.astype(np.float64), out, "float32"), "same dtype"),
        ((lt, np.zeros((3, 5, 6), np.float32), out, "float32"), "heads"),
        ((lt, np.zeros((4, 5, 12), np.float32)[..., ::2], out, "float32"), "contiguous along its last axis"),
        ((lt[:, ::-1], rt, out, "float32"), "non-negative"),
        ((lt, rt, out, "float64"), "itemsize"),
        ((lt, rt, out, "int8"), "out_dtype must be one of"),
        ((lt, rt, out[:, ::2], "float32"), "C-contiguous"),
        ((lt.astype(np.int32), rt, out, "float32"), "float32 or float64"),
        ((lt, rt, out, "float32", 1, 0), "exceeds W"),
        ((lt, rt, out, "float32", 0, -1), "exceeds W"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            _C.kron_sum(*args)
    with pytest.raises(ValueError, match="read-only|writable"):
        ro = out.copy()
        ro.flags.writeable = False
        _C.kron_sum(lt, rt, ro, "float32")


# --- ISA variants and their dispatch ------------------------------------------------------------

def test_capabilities():
    compiled = list(cpp._C.compiled_capabilities())
    assert compiled[0] == "baseline" and cpp.supported_capabilities()[0] == "baseline"
    if platform.machine() in ("x86_64", "AMD64"):
        assert {"avx2", "avx512"} <= set(compiled)
    forced = os.environ.get(cpp.CAPABILITY_ENV)
    assert cpp.cpu_capability() == (forced if forced in CAPABILITIES else CAPABILITIES[-1])
    assert dk.cpu_capability() == cpp.cpu_capability()
    with pytest.raises(ValueError, match="CPU capability must be one of baseline"):
        cpp.set_cpu_capability("sse9")
    unsupported = [c for c in compiled if c not in CAPABILITIES]
    if unsupported:
        with pytest.raises(ValueError, match="this CPU cannot run"):
            cpp.set_cpu_capability(unsupported[0])


@pytest.mark.parametrize("value,expected,warns", [("baseline", "baseline", False), ("avx9", None, True)])
def test_environment_variable_forces_a_variant(value, expected, warns):
    code = "import warnings; warnings.simplefilter('always'); import duat_kernels as dk; print(dk.cpu_capability())"
    env = {**os.environ, cpp.CAPABILITY_ENV: value}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True,
                         cwd=CHILD_CWD)
    assert run.stdout.strip() == (expected or CAPABILITIES[-1])
    assert ("DUAT_CPU_CAPABILITY='avx9' ignored" in run.stderr) == warns


def test_output_cache_environment_variable_is_parsed_or_refused():
    # strtoull took "-5" as 2**64 - 5 (a cache without limit), "1e9" as 1 byte and "garbage" as 0 (off),
    # all silently; each value in its own process (the variable is read at import), all at once
    code = ("import warnings; warnings.simplefilter('always'); from duat_kernels import cpp; "
            "print(cpp.output_cache_info()['limit_bytes'])")
    default = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8
    cases = {"-5": default, "garbage": default, "1e9": 10 ** 9, " 4096 ": 4096}
    procs = {value: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "DUAT_OUTPUT_CACHE_BYTES": value}, cwd=CHILD_CWD)
             for value in cases}
    for value, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert int(out) == cases[value], (value, out, err)
        assert (f"DUAT_OUTPUT_CACHE_BYTES={value.strip()!r} ignored" in err) == (cases[value] == default), err
    for bad in (1.5, -1, "1", True):
        with pytest.raises(ValueError, match="nbytes must be an int >= 0"):
            cpp.set_output_cache_limit(bad)


def _sgemm_gflops(size: int = 768, rounds: int = 5) -> float:
    """torch's float32 matrix product on one thread, in CPU time (robust to other processes)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(rounds):
            start = time.thread_time()
            torch.mm(a, b)
            best = min(best, time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * size ** 3 / best / 1e9


@pytest.mark.parametrize("isa", [c for c in CAPABILITIES if c != "baseline"])
def test_fma_probe_is_not_below_half_of_sgemm(isa):
    # The probe is the arithmetic floor of the benchmarks: it must not under-report the machine.
    # (The baseline variant has no FMA and narrower vectors than torch's sgemm: its floor is its own.)
    with cpp.using_capability(isa):
        probe = max(cpp._C.fma_peak_gflops(2_000_000, 1) for _ in range(3))
    sgemm = _sgemm_gflops()
    assert probe >= 0.5 * sgemm, f"{isa}: FMA probe {probe:.0f} GFLOP/s < half of torch sgemm {sgemm:.0f} GFLOP/s"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversion_of_random_bit_patterns(dtype, capability):
    # Every class of float32 at once (random bits: all exponents, subnormals, Inf, NaN payloads), each
    # entry times 1.0, so W' holds the inputs themselves and its 16-bit conversion must be torch's.
    g = torch.Generator().manual_seed(2)
    right = torch.randint(-2 ** 31, 2 ** 31, (1, 1, 1 << 18), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    tile = cpp.kron_sum_tile_(torch.ones(1, 1, 1), right, torch.empty(1, 1 << 18, dtype=dtype))
    expected = right[0].to(dtype)
    assert torch.equal(tile.isnan(), expected.isnan())
    if dtype == torch.float16:  # NaN bits too: quieted, sign and top payload bits kept, as F16C (and torch) writes them
        assert torch.equal(tile.view(torch.int16), expected.view(torch.int16))
    else:
        assert torch.equal(tile[~tile.isnan()].view(torch.int16), expected[~expected.isnan()].view(torch.int16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_micro_kernel_rate(dtype, capability):
    # The micro-kernel benchmark's entry point (benchmarks/bench_micro_kernel.py): a rate for every
    # variant and dtype, and its arguments checked at the boundary.
    assert cpp._C.micro_kernel_gflops(dtype, 5, 64, 7, 3) > 0


@pytest.mark.parametrize("args,message", [
    (("float64", 8), "out_dtype must be float32, float16 or bfloat16"), (("int8", 8), "out_dtype must be one of"),
    (("float32", 0), r"h must be in \[1, 256\], got 0"), (("float32", 8, 100), "cols must be a multiple of 64"),
    (("float32", 8, 128, 0), r"segments must be in \[1, 48\]"), (("float32", 8, 128, 12, 0), "reps must be positive"),
])
def test_micro_kernel_rate_refuses_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        cpp._C.micro_kernel_gflops(*args)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("byte", [0, 0x3F])
@pytest.mark.parametrize("dtype,offset,numel", [(torch.uint8, 3, 4_900_003), (torch.bfloat16, 1, 77),
                                                (torch.float32, 5, (2 << 20) + 9), (torch.float64, 0, 0)])
def test_stream_fill_writes_exactly_its_tensor(dtype, offset, numel, byte, threads, capability):
    # the benchmarks' floor of the non-temporal store path: an unaligned start, chunks split over threads
    full = torch.full((offset + numel + 70,), 5, dtype=dtype)
    part = full[offset:offset + numel]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpp.stream_fill_(part, byte)
    finally:
        torch.set_num_threads(before)
    assert (part.view(torch.uint8) == byte).all()
    assert (full[:offset] == 5).all() and (full[offset + numel:] == 5).all()
    with pytest.raises(ValueError, match="stream_fill_ needs a contiguous CPU tensor"):
        cpp.stream_fill_(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="byte must be an int in"):
        cpp.stream_fill_(part, 256)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_propagate_through_zero_blocks(layout, bad, capability):
    # A zero attention weight times a non-finite OV entry is NaN (IEEE), so the shortcut that writes
    # zero blocks as zeros must not be taken; likewise zero columns of A against a non-finite OV.
    attn = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
    w_v, w_o = torch.ones(1, 2), torch.tensor([[bad], [1.0]])
    got = dk.hvo_matrix(attn, w_v, w_o, layout=layout, backend="cpp")
    want = dk.hvo_matrix(attn, w_v, w_o, layout=layout, backend="reference")
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
    torch.testing.assert_close(got, want, equal_nan=True)
    nan_attn = attn.clone()
    nan_attn[0, 0, 0] = bad
    got = dk.hvo_matrix(nan_attn, torch.ones(1, 2), torch.ones(2, 1), layout=layout, backend="cpp")
    want = dk.hvo_matrix(nan_attn, torch.ones(1, 2), torch.ones(2, 1), layout=layout, backend="reference")
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads,kv_heads,head_dim,m_in,m_out", [(6, 3, 4, 70, 33), (12, 12, 64, 97, 50),
                                                                 (1, 1, 1, 1, 1), (8, 2, 13, 200, 131)])
def test_ov_kernel_matches_the_per_head_products(dtype, heads, kv_heads, head_dim, m_in, m_out, capability):
    # The C++ OV (M_out, h, M_in) viewed as (h, M_out, M_in), GQA included: close to torch's bmm in
    # float64, and the same bits on one thread as on all (one chain of d multiply-adds per entry).
    g = torch.Generator().manual_seed(heads * 1000 + m_in)
    w_v = torch.randn(kv_heads * head_dim, m_in, generator=g, dtype=dtype)
    w_o = torch.randn(m_out, heads * head_dim, generator=g, dtype=dtype)
    ov = cpp.ov_circuits(w_v, w_o, heads, kv_heads)
    assert ov.shape == (heads, m_out, m_in) and ov.stride() == (m_in, heads * m_in, 1)
    want = reference.ov_circuits(w_v.double(), w_o.double(), heads, kv_heads)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ov.double(), want, rtol=tol, atol=tol * head_dim ** 0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(cpp.ov_circuits(w_v, w_o, heads, kv_heads), ov)
    finally:
        torch.set_num_threads(threads)


def test_ov_kernel_propagates_non_finite_values(capability):
    w_v, w_o = torch.ones(2, 3), torch.ones(4, 2)
    w_v[0, 1], w_o[2, 1] = float("inf"), float("nan")
    ov = cpp.ov_circuits(w_v, w_o, 2, 2)
    torch.testing.assert_close(ov, reference.ov_circuits(w_v, w_o, 2, 2), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ov_in_slab_layout_gives_the_same_matrix(dtype, capability):
    # The C++ backend takes OV from its own kernel, as (M_out, h, M_in) read in place; W' is bit for
    # bit what a contiguous copy of that OV gives, and with gradients OV comes from torch (differentiable).
    lay = random_layer(1, 6, 3, tokens=9, head_dim=4, m_in=70, m_out=33, causal=True, batched=False, seed=11)
    ov = backends.ov_circuits("cpp", lay["w_v"], lay["w_o"], 6, 3)
    assert ov.stride() == (70, 6 * 70, 1)
    torch.testing.assert_close(ov, reference.ov_circuits(lay["w_v"], lay["w_o"], 6, 3), rtol=1e-6, atol=1e-6)
    contiguous = cpp.kron_sum_tile_(lay["attn"], ov.contiguous(), torch.empty(9 * 33, 9 * 70, dtype=dtype))
    assert torch.equal(_cpp(lay, dtype=dtype), contiguous)
    w_v = lay["w_v"].clone().requires_grad_()
    assert backends.ov_circuits("cpp", w_v, lay["w_o"], 6, 3).requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,tokens,m_in,m_out", [(6, 3, 9, 70, 33), (12, 12, 5, 131, 13), (1, 1, 2, 17, 7)])
def test_ov_computed_in_the_kernel_gives_the_same_matrix(dtype, heads, kv_heads, tokens, m_in, m_out, capability):
    # One token-layout W' without autograd: the kernel computes OV's slabs itself, a few q at a time
    # (m_out not a multiple of that block), and writes the same bits as from the OV of ov_circuits.
    lay = random_layer(1, heads, kv_heads, tokens=tokens, head_dim=5, m_in=m_in, m_out=m_out, causal=True,
                       batched=False, seed=heads + m_in)
    assert backends.fuses_ov("cpp", "token", 1, lay["attn"][None], lay["w_v"], lay["w_o"])
    ct = reference.compute_dtype(dtype)
    ov = cpp.ov_circuits(lay["w_v"].to(ct), lay["w_o"].to(ct), heads, kv_heads)
    want = cpp.kron_sum_tile_(lay["attn"].to(ct), ov, torch.empty(tokens * m_out, tokens * m_in, dtype=dtype))
    got = _cpp(lay, dtype=dtype)
    assert torch.equal(got, want)
    assert_close_to_reference(got, lay["attn"], lay["w_v"], lay["w_o"], kv_heads, "token")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the rows of every q block in order, no OpenMP
    try:
        assert torch.equal(_cpp(lay, dtype=dtype), want)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["w_o", "w_v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_in_the_kernel_computed_ov(dtype, where, bad, capability):
    # A non-finite weight makes some slabs non-finite (a row of w_o: one q; an entry of w_v: every q
    # of its head): there zero attention weights must give NaN (0 * inf), not the zero-block shortcut,
    # and bfloat16 rows must take the NaN-testing stores; finite slabs keep both shortcuts.
    lay = random_layer(1, 4, 2, tokens=5, head_dim=3, m_in=40, m_out=13, causal=True, batched=False, seed=8)
    lay[where] = lay[where].clone()
    lay[where][3, 2] = bad
    got = _cpp(lay, dtype=dtype)
    ov = reference.ov_circuits(lay["w_v"].double(), lay["w_o"].double(), 4, 2)
    want = reference.hvo_matrix(lay["attn"][None].double(), ov)[0]
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any() and (~want.isnan()).any()
    assert torch.equal(got.isinf(), want.isinf())
    wide = _cpp(lay, dtype=torch.float32)
    assert torch.equal(got.isnan(), wide.isnan())
    if dtype == torch.bfloat16:
        assert torch.equal(got[~got.isnan()], wide.to(dtype)[~got.isnan()])


def test_factored_boundary_rejects_bad_buffers():
    import numpy as np

    from duat_kernels import _C
    lt, wo, wv = np.zeros((4, 3, 3), np.float32), np.zeros((5, 8), np.float32), np.zeros((4, 7), np.float32)
    out = np.zeros((15, 21), np.float32)
    _C.kron_sum_factored(lt, wo, wv, out, "float32", 2)
    cases = [
        ((lt[0], wo, wv, out, "float32", 2), "lt must be 3-D"),
        ((lt[:, :2], wo, wv, out, "float32", 2), "exceeds W"),
        ((lt, wo[0], wv, out, "float32", 2), "wo must be 2-D"),
        ((lt, wo[:, ::2], wv, out, "float32", 2), "C-contiguous"),
        ((lt, wo, wv.astype(np.float64), out, "float32", 2), "one dtype"),
        ((lt, wo, wv, out, "float32", 3), "multiple of kv_heads"),
        ((lt, wo[:, :6].copy(), wv, out, "float32", 2), "not a multiple of h"),
        ((lt, wo, wv[:3].copy(), out, "float32", 2), "expected kv_heads"),
        ((lt, wo, wv, out[:14], "float32", 2, 2, 0), "exceeds W"),
        ((lt, wo, wv, out, "float32", 2, 0, -1), "exceeds W"),
        ((lt, wo, wv, out, "float64", 2), "itemsize"),
        ((lt, wo[:, :0].copy(), wv[:0].copy(), out, "float32", 2), "head size d = 0"),  # not SIGFPE
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            _C.kron_sum_factored(*args)


def test_ov_boundary_rejects_bad_buffers():
    import numpy as np

    from duat_kernels import _C
    wo, wv, out = np.zeros((5, 12), np.float32), np.zeros((6, 7), np.float32), np.zeros((5, 4, 7), np.float32)
    _C.ov_slabs(wo, wv, out, 4, 2)
    zero_d = np.full((5, 4, 7), np.nan, np.float32)
    _C.ov_slabs(wo[:, :0].copy(), wv[:0].copy(), zero_d, 4, 2)  # head size 0: OV = 0 (this was SIGFPE)
    assert not zero_d.any()
    cases = [
        ((wo[0], wv, out, 4, 2), "wo must be 2-D"),
        ((wo, wv, out[0], 4, 2), "out must be 3-D"),
        ((wo[:, ::2], wv[:3], out, 4, 2), "C-contiguous"),
        ((wo, wv.astype(np.float64), out, 4, 2), "one dtype"),
        ((wo, wv, out, 4, 3), "multiple of kv_heads"),
        ((wo, wv, out, 0, 1), "positive multiple"),
        ((wo, wv, out, 5, 5), "not a multiple of heads"),
        ((wo, wv[:4], out, 4, 2), "expected kv_heads"),
        ((wo, wv, np.zeros((5, 3, 7), np.float32), 4, 2), "out has shape"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            _C.ov_slabs(*args)

_THREAD_CALLS = {  # every kernel entry point with a num_threads argument, on tiny valid buffers
    "kron_sum": "_C.kron_sum(np.ones((1, 2, 2)), np.ones((1, 2, 2)), np.zeros((4, 4)), 'float64', 0, 0, T)",
    "kron_sum_factored": "_C.kron_sum_factored(np.ones((2, 2, 2)), np.ones((3, 4)), np.ones((4, 5)), np.zeros((6, 10)),"
                         " 'float64', 2, 0, 0, T)",
    "ov_slabs": "_C.ov_slabs(np.ones((3, 4)), np.ones((4, 5)), np.zeros((3, 2, 5)), 2, 2, T)",
    "fma_peak_gflops": "_C.fma_peak_gflops(10, T)",
    "stream_fill": "_C.stream_fill(np.zeros(1000), 1, T)",
    "gram_squared_norms": "_C.gram_squared_norms(np.ones((2, 3, 3), np.float32), np.ones((2, 2), np.float32),"
                          " np.zeros((3, 3), np.float32), T)",
    "qk_mix": "q = np.ones((1, 1, 3, 2), np.float32); _C.qk_mix(q, q, None, np.ones((1, 1, 3, 4), np.float32),"
              " np.zeros((1, 1, 3, 4), np.float32), 1.0, num_threads=T)",
}


@pytest.mark.parametrize("threads", [0, -3, 100_000])
def test_boundary_refuses_thread_counts_out_of_range(threads):
    """num_threads = 100000 made kron_sum and fma_peak_gflops segfault in libgomp (exit -11), and 0 or a
    negative count was taken as 1 silently (stream_fill alone refused it); every entry point now raises
    ValueError naming num_threads. Each call runs in a child process, so that a crash shows as its exit status."""
    script = "import numpy as np\nfrom duat_kernels import _C\nT = %d\nfor call in %r:\n" % (threads, list(_THREAD_CALLS.values()))
    script += ("    try:\n        exec(call)\n    except ValueError as exc:\n        assert 'num_threads' in str(exc), exc\n"
               "    else:\n        raise SystemExit('accepted: ' + call)\n")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=CHILD_CWD, timeout=120,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 0, (child.returncode, child.stdout, child.stderr[-2000:])


@pytest.mark.parametrize("row0, col0, message", [
    (-4, 0, "row0 lies outside"),  # was a slice from the end: W[0:2] written silently
    (-1, 0, "row0 lies outside"),
    (3, 0, r"\[3, 5\) along row0 lies outside W's 4 rows"),  # was 'rows [1, 3) ... W of shape (2, 4)'
    (0, -2, "col0 lies outside"),
    (0, 1, r"\[1, 5\) along col0"),
    (1.0, 0, "row0 must be an int"),
])
def test_kron_sum_tile_refuses_tiles_outside_w(row0, col0, message):
    left, right = torch.arange(1.0, 5.0).reshape(1, 2, 2), torch.arange(4.0).reshape(1, 2, 2)
    out = torch.full((2, 4), 7.0)
    with pytest.raises((ValueError, TypeError), match=message):
        cpp.kron_sum_tile_(left, right, out, row0, col0)
    assert (out == 7).all()
    w_v, w_o = torch.ones(2, 2), torch.ones(2, 2)  # one head, d = 2: OV (2, 2), W' (4, 4)
    with pytest.raises((ValueError, TypeError), match=message):
        cpp.kron_sum_factored_(left, w_v, w_o, 1, out, row0, col0)
    cpp.kron_sum_tile_(left, right, out, 2, 0)  # a tile inside W still works: rows 2..3 of kron(left, right)
    assert torch.equal(out, reference.kron(left[0], right[0])[2:4])


@pytest.mark.parametrize("out, message", [(torch.zeros(16), "out must be a 2-D"), (None, "out must be a 2-D"),
                                          (torch.zeros(4, 4, dtype=torch.int32), "out must be float32")])
def test_kron_sum_tile_names_a_bad_out(out, message):
    """A 1-D out raised IndexError ('tuple index out of range'), an int32 one KeyError: torch.int32."""
    with pytest.raises((ValueError, TypeError), match=message):
        cpp.kron_sum_tile_(torch.ones(1, 2, 2), torch.ones(1, 2, 2), out)


@pytest.mark.parametrize("make, error, message", [
    (lambda t: t._neg_view(), ValueError, "negative or conjugate bit"),  # was a silent no-op: a copy was filled
    (lambda t: t.to(torch.complex64).conj(), ValueError, "negative or conjugate bit"),  # was numpy()'s RuntimeError
    (lambda t: t.numpy(), TypeError, "out must be a torch.Tensor"),  # was AttributeError: 'str' ... 'type'
    (lambda t: None, TypeError, "out must be a torch.Tensor"),
])
def test_stream_fill_refuses_views_it_cannot_write(make, error, message):
    base = torch.zeros(8)
    with pytest.raises(error, match=message):
        cpp.stream_fill_(make(base))
    assert not base.any()


@pytest.mark.parametrize("inside", ["left", "right"])
@pytest.mark.parametrize("factored", [False, True], ids=["tile", "factored"])
def test_kron_sum_tile_refuses_an_out_that_overlaps_a_factor(inside, factored):
    """out sharing memory with left or right (or attn, w_v, w_o) was written while the kernel read it: W' came
    back wrong by O(1) without a word; hvo_matrix refuses such an out, and so do the kernels' own wrappers."""
    torch.manual_seed(0)
    left, right = torch.softmax(torch.randn(2, 3, 3), -1), torch.randn(2, 6, 5)
    w_v, w_o = torch.randn(2, 5), torch.randn(6, 2)  # one head of d = 1 per A_i: OV_i (6, 5)
    buffer = torch.zeros(400)
    factor = left if inside == "left" else (w_o if factored else right)
    shared = buffer[:factor.numel()].view(factor.shape).copy_(factor)
    out = buffer[5:5 + 18 * 15].view(18, 15)
    with pytest.raises(ValueError, match="out overlaps the memory of"):
        if factored:
            cpp.kron_sum_factored_(shared if inside == "left" else left, w_v, shared if inside == "right" else w_o, 2, out)
        else:
            cpp.kron_sum_tile_(shared if inside == "left" else left, shared if inside == "right" else right, out)


@pytest.mark.parametrize("left, right, message", [
    (torch.ones(2, 2), torch.ones(1, 2, 2), r"left must be a 3-D \(h, P, S\) tensor, got shape \(2, 2\)"),
    (torch.ones(1, 2, 2), torch.ones(2, 2), r"right must be a 3-D \(h, Q, T\) tensor, got shape \(2, 2\)"),
    ([[[1.0]]], torch.ones(1, 2, 2), "left must be a 3-D .* tensor, got list"),
    (torch.ones(1, 2, 2, device="meta"), torch.ones(1, 2, 2), "left must be on the CPU, got meta"),
    (torch.ones(1, 2, 2, dtype=torch.float16), torch.ones(1, 2, 2),  # was "lt must hold float32 or float64, got format 'e'"
     r"left must be torch.float32 \(the compute dtype of a torch.float32 out\), got torch.float16"),
    (torch.ones(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.float64),  # was "lt and rt must have the same dtype"
     r"right must be torch.float32 \(the compute dtype of a torch.float32 out\), got torch.float64"),
])
def test_kron_sum_tile_names_a_bad_factor(left, right, message):
    """A 2-D left raised IndexError ('tuple index out of range'), a list AttributeError, a meta tensor NumPy's
    'can't convert meta device type tensor to numpy'."""
    out = torch.full((4, 4), 7.0)
    with pytest.raises((ValueError, TypeError), match=message):
        cpp.kron_sum_tile_(left, right, out)
    assert (out == 7).all()


@pytest.mark.parametrize("call,message", [
    (lambda: cpp.ov_circuits(torch.randn(8), torch.randn(8, 8), 2, 2), "w_v must be a 2-D float32 or float64 CPU"),
    (lambda: cpp.ov_circuits(torch.randn(8, 8), torch.randn(8, 8).half(), 2, 2), "w_o must be a 2-D float32"),
    (lambda: cpp.empty_output((-1, 4), torch.float32), r"shape must be ints >= 0"),
    (lambda: cpp.empty_output((2 ** 40, 2 ** 40), torch.float32), "more than any address space holds"),
    (lambda: cpp.empty_output((2,), "float32"), "empty_output: dtype must be one of"),  # "'str' ... 'itemsize'"
])
def test_internal_helpers_name_bad_arguments(call, message):
    # An IndexError (1-D w_v), a message about an `out` ov_circuits has not, torch's negative-dimension error and
    # pybind's "incompatible function arguments" before.
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_internal_helpers_take_numpy_integers():
    # empty_output((np.int64(2),)) and stream_fill_(out, np.int64(3)) were refused as "must be ints"
    import numpy as np

    out = cpp.empty_output((np.int64(2), 3), torch.float32)
    assert out.shape == (2, 3)
    cpp.stream_fill_(out, np.uint8(0x3F))
    assert (out.view(torch.uint8) == 0x3F).all()


_BOOL_ARGUMENTS = {  # pybind11 took True as the int 1, the float 1.0 and 2 as the bool True: each ran silently
    "micro_kernel_gflops: h": "_C.micro_kernel_gflops('float32', True, 64, 1, 1)",
    "micro_kernel_gflops: reps": "_C.micro_kernel_gflops('float32', 1, 64, 1, True)",
    "fma_peak_gflops: iterations": "_C.fma_peak_gflops(True, 1)",
    "fma_peak_gflops: num_threads": "_C.fma_peak_gflops(10, True)",
    "alloc_output: nbytes": "_C.alloc_output(True)",
    "set_output_cache_limit: bytes": "_C.set_output_cache_limit(False)",
    "stream_fill: value": "_C.stream_fill(np.zeros(4, np.uint8), True, 1)",
    "kron_sum: row0": "_C.kron_sum(np.ones((1, 2, 2), F), np.ones((1, 2, 2), F), np.zeros((2, 4), F), 'float32', True)",
    "kron_sum_factored: kv_heads": "_C.kron_sum_factored(np.ones((1, 2, 2), F), np.ones((2, 1), F), np.ones((1, 2), F),"
                                   " np.zeros((4, 4), F), 'float32', True)",
    "ov_slabs: heads": "_C.ov_slabs(np.ones((2, 1), F), np.ones((1, 2), F), np.zeros((2, 1, 2), F), True, 1)",
    "gram_squared_norms: root": "_C.gram_squared_norms(np.ones((1, 2, 2), F), np.ones((1, 1), F), np.zeros((2, 2), F), 1, 2)",
    "gram_squared_norms: num_threads": "_C.gram_squared_norms(np.ones((1, 2, 2), F), np.ones((1, 1), F),"
                                       " np.zeros((2, 2), F), True)",
    "qk_gram_squared_norms: scale": "_C.qk_gram_squared_norms(Q, Q, None, np.ones((1, 1), F), np.zeros((1, 2, 2), F), True)",
    "qk_gram_squared_norms: causal": "_C.qk_gram_squared_norms(Q, Q, None, np.ones((1, 1), F), np.zeros((1, 2, 2), F),"
                                     " 1.0, causal=2)",
    "qk_mix: window": "_C.qk_mix(Q, Q, None, np.ones((1, 1, 2, 3), F), np.zeros((1, 1, 2, 3), F), 1.0, window=True)",
    "qk_mix_transposed: softcap": "_C.qk_mix_transposed(Q, Q, None, np.ones((1, 1, 2, 3), F), np.zeros((1, 1, 2, 3), F),"
                                  " 1.0, softcap=False)",
}


@pytest.mark.parametrize("name", sorted(_BOOL_ARGUMENTS))
def test_boundary_refuses_bools_for_numbers_and_numbers_for_flags(name):
    import numpy as np

    from duat_kernels import _C

    scope = {"np": np, "_C": _C, "F": np.float32, "Q": np.ones((1, 1, 2, 1), np.float32)}
    before = _C.output_cache_info()["limit_bytes"]
    try:
        with pytest.raises(TypeError, match=f"duat_kernels._C: {name} must be (an int|True or False|a real number), got"):
            exec(_BOOL_ARGUMENTS[name], scope)
    finally:
        _C.set_output_cache_limit(before)
    good = _BOOL_ARGUMENTS[name].replace("True", "1").replace("False", "0")
    for bad_flag, flag in (("causal=2", "causal=True"), ("(2, 2), F), 1, 2)", "(2, 2), F), 1, True)")):
        good = good.replace(bad_flag, flag)
    exec(good, scope)  # the same call with an int (a bool) runs


@pytest.mark.parametrize("call, message", [
    # NumPy's "buffer source array is read-only" named no argument
    ("_C.kron_sum(np.ones((1, 2, 2), F), np.ones((1, 2, 2), F), RO((4, 4)), 'float32')", "out must be a writable array"),
    ("_C.gram_squared_norms(np.ones((1, 2, 2), F), np.ones((1, 1), F), RO((2, 2)), 1)", "out must be a writable array"),
    ("_C.vector_exp(np.ones(3, F), RO((3,)))", "y must be a writable array"),
    # pybind11's "Object of type 'list' is not an instance of 'buffer'"
    ("_C.qk_mix(Q, Q, [[1, 1]], np.ones((1, 1, 2, 3), F), np.zeros((1, 1, 2, 3), F), 1.0)",
     r"key_mask must be None or a \(B, N_k\) bool or uint8 array, got list"),
    # "lt must hold float32 or float64, got format '=f'" for a float32 view at an odd byte offset
    ("_C.kron_sum(np.zeros(17, np.uint8)[1:].view(F).reshape(1, 2, 2), np.ones((1, 2, 2), F), np.zeros((4, 4), F),"
     " 'float32')", "not aligned to its item size"),
    # pybind11's "incompatible function arguments" list for a bool or None out_dtype
    ("_C.micro_kernel_gflops(True, 1)", "micro_kernel_gflops: out_dtype must be a str .*, got bool True"),
    ("_C.kron_sum(np.ones((1, 2, 2), F), np.ones((1, 2, 2), F), np.zeros((4, 4), F), None)",
     "kron_sum: out_dtype must be a str .*, got NoneType None"),
    # a big-endian float32 array: "got format '>f'" (it held float32)
    ("_C.kron_sum(np.ones((1, 2, 2), '>f4'), np.ones((1, 2, 2), F), np.zeros((4, 4), F), 'float32')",
     "in a byte order that is not this machine's"),
])
def test_boundary_names_read_only_and_odd_buffers(call, message):
    import numpy as np

    from duat_kernels import _C

    scope = {"np": np, "_C": _C, "F": np.float32, "Q": np.ones((1, 1, 2, 1), np.float32),
             "RO": lambda shape: np.broadcast_to(np.zeros(shape, np.float32), shape)}
    with pytest.raises((ValueError, TypeError), match=message):
        exec(call, scope)


@pytest.mark.parametrize("call, message", [
    # one head of d = 4 from two heads' weights: OV of shape (1, 6, 5), silently
    (lambda w_v, w_o: cpp.ov_circuits(w_v, w_o, True, True), "ov_circuits: num_heads must be a positive int, got True"),
    # torch.empty's "failed to unpack the object at pos 2"
    (lambda w_v, w_o: cpp.ov_circuits(w_v, w_o, 2.0, 2), "ov_circuits: num_heads must be a positive int, got 2.0"),
    # the kernel's "heads (2) must be a positive multiple of kv_heads (3)"
    (lambda w_v, w_o: cpp.ov_circuits(w_v, w_o, 2, 3), "ov_circuits: num_kv_heads=3 must divide"),
    (lambda w_v, w_o: cpp.kron_sum_factored_(torch.rand(2, 3, 3), w_v, w_o, 3, torch.empty(18, 15)),
     "kron_sum_factored_: num_kv_heads=3 must divide"),
    # the kernel's "wv has 4 rows, expected kv_heads * d = 2"
    (lambda w_v, w_o: cpp.kron_sum_factored_(torch.rand(2, 3, 3), w_v, w_o, True, torch.empty(18, 15)),
     "kron_sum_factored_: num_kv_heads must be a positive int"),
    # the kernel's "lt has 2 heads but rt has 3"
    (lambda w_v, w_o: cpp.kron_sum_tile_(torch.rand(2, 3, 3), torch.rand(3, 4, 5), torch.empty(12, 15)),
     r"kron_sum_tile_: left \(2, 3, 3\) and right \(3, 4, 5\) must have the same number of heads"),
    # a bool tensor row0 was row 1
    (lambda w_v, w_o: cpp.kron_sum_tile_(torch.rand(1, 2, 2), torch.rand(1, 2, 2), torch.empty(2, 2), torch.tensor(True)),
     r"kron_sum_tile_: row0 must be an int, got tensor\(True\)"),
])
def test_kernel_wrappers_name_bad_head_counts(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(torch.randn(4, 5), torch.randn(6, 4))


def test_alloc_output_names_the_size_it_cannot_map():
    # MemoryError 'std::bad_alloc', naming no size
    from duat_kernels import _C

    with pytest.raises(MemoryError, match="alloc_output: cannot map 4611686018427387904 bytes"):
        _C.alloc_output(1 << 62)
