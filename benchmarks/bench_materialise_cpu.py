"""How fast does the C++ backend materialise W' on the CPU, against the hardware floors and what a
user would otherwise write?

Every case writes the same N·M x N·M matrix (token layout). Contestants:
  cpp         duat_kernels.hvo_matrix(backend="cpp", out=buf)        (reused buffer)
  cpp_fresh   the same without out=, called repeatedly: a freed output block is reused from the
              C++ backend's output cache (no page zeroing)
  cpp_first_touch  without out=, the output cache emptied before every call: a new mapping whose
              pages the kernel zeroes on first touch
  fill        buf.fill_(0) on the same buffer: the memory-write floor
  fill_stream the same buffer filled with the byte 0x3F (0.75, data rather than zeros) by the kernel's
              non-temporal stores (duat_kernels.cpp.stream_fill_): the write floor of the store path
              cpp takes for outputs above 16 MiB. (On the VM of the committed run, zeros are written
              about 2x faster than data with non-temporal stores and 1.1-1.3x with regular ones, so
              fill_(0) is the stricter floor there: bench_zero_writes.py.)
  einsum      torch.einsum("inm,ica->ncma", A, OV).reshape(...): the obvious PyTorch route
  kron_sum    Σ_i torch.kron(A_i, OV_i): the reference backend
  jacrev      torch.func.jacrev of the attention with A detached: the autograd route
  cpp@ISA     cpp forced to each ISA variant the CPU supports (baseline, avx2, avx512), as
              DUAT_CPU_CAPABILITY would: what the same wheel does on a lesser CPU
cpp and cpp@ISA also time fill_ of their buffer right before each of their rounds: on a VM a buffer's
write speed can change within a minute, and the memory floor of these rows is that interleaved fill_.
The FMA floor (2h flops per entry at the FMA peak of the variant, measured by
duat_kernels._C.fma_peak_gflops in the same run) is recorded with every cpp case, and so is the
looser sgemm floor (2h flops per entry at the rate torch.mm reaches on 2048 x 2048 float32
matrices in the same run: what a BLAS call would give; on CPUs where the BLAS does not use every
vector unit it lies well above the FMA floor). Sweeps: the
main configurations, h, N and M; bf16 output and causal attention for the main configurations.
The slow peers run where W' is at most 64 MiB (kron_sum also on the main configurations).
`python benchmarks/report.py run.json` turns a run into tables and plots.
"""

import contextlib
import functools
import time

import pytest
import torch

import duat_kernels as dk
from duat_kernels import cpp, reference

from conftest import QUICK

MAIN = [(4, 16, 2), (3, 24, 3)] if QUICK else [(32, 256, 8), (16, 768, 12), (32, 256, 32)]
SWEEP_H = [] if QUICK else [(32, 256, h) for h in (1, 2, 4, 16)]
SWEEP_N = [] if QUICK else [(n, 256, 8) for n in (8, 16, 48)]
SWEEP_M = [] if QUICK else [(16, m, 8) for m in (128, 384, 512)]
PEER_LIMIT_BYTES = 64 << 20


def _cases():
    # Per configuration: fill_ and the kernels first, on the buffer they share, and fill_ once more
    # after them (a new buffer can get faster while the VM collapses its pages into huge pages; the
    # floor is the faster of the two); then the peers; the first-touch case last, since mapping and
    # unmapping fresh memory sets the VM compacting pages.
    for cfg in MAIN + SWEEP_H + SWEEP_N + SWEEP_M:
        small = 4 * (cfg[0] * cfg[1]) ** 2 <= PEER_LIMIT_BYTES
        peers = (["kron_sum"] if small or cfg in MAIN else []) + (["jacrev"] if small else [])
        variants = [f"cpp@{isa}" for isa in cpp.supported_capabilities()] if cfg in MAIN else []
        for contestant in ["fill", "fill_stream", "cpp"] + variants + ["cpp_fresh", "fill_again", "einsum"] + peers:
            yield cfg, contestant, torch.float32, False
        if cfg in MAIN:
            for contestant in ["fill", "fill_stream", "cpp"] + variants + ["cpp_fresh", "fill_again"]:
                yield cfg, contestant, torch.bfloat16, False
            yield cfg, "cpp", torch.float32, True
            yield cfg, "cpp_first_touch", torch.float32, False
            yield cfg, "cpp_first_touch", torch.bfloat16, False


CASES = list(_cases())


@functools.lru_cache(maxsize=8)
def fma_peak_gflops(isa: str) -> float:
    """Float32 FMA throughput of an ISA variant with torch's thread count (its arithmetic floor)."""
    with cpp.using_capability(isa):
        return max(cpp._C.fma_peak_gflops(2_000_000 if QUICK else 20_000_000, torch.get_num_threads())
                   for _ in range(1 if QUICK else 7))  # the best of several: a descheduled thread only lowers it


@functools.lru_cache(maxsize=1)
def sgemm_gflops() -> float:
    """The float32 rate of torch.mm with torch's thread count: the looser 'sgemm' arithmetic floor."""
    n = 256 if QUICK else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


@functools.lru_cache(maxsize=4)
def _layer(n: int, m: int, h: int, causal: bool):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(h, n, n, generator=g)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    w_v = torch.randn(m, m, generator=g) / m ** 0.5
    w_o = torch.randn(m, m, generator=g) / m ** 0.5
    return scores.softmax(-1), w_v, w_o


@functools.lru_cache(maxsize=1)
def _buffer(side: int, dtype: torch.dtype) -> torch.Tensor:
    """The output buffer of a configuration, shared by its contestants (cases of one configuration run
    one after another), so that fill_ and the kernels write the very same pages: on a VM two buffers
    of one size can differ by 2x in write speed. A 2 MiB-aligned, huge-page-advised block, what the
    C++ backend allocates."""
    return cpp.empty_output((side, side), dtype) if cpp.is_available() else torch.empty(side, side, dtype=dtype)


def _jacrev(attn, w_v, w_o, n, m):
    def layer(xp):  # x' -> h' with the probabilities held fixed
        return reference.attention_output(attn.detach()[None], xp.reshape(1, n, m), w_v, w_o).reshape(-1)
    return torch.func.jacrev(layer)(torch.zeros(n * m))


@pytest.mark.parametrize("case", CASES, ids=[f"N{c[0][0]}-M{c[0][1]}-h{c[0][2]}-{c[1]}-{str(c[2])[6:]}"
                                            f"{'-causal' if c[3] else ''}" for c in CASES])
def test_materialise(benchmark, case):
    (n, m, h), contestant, dtype, causal = case
    if (contestant.startswith("cpp") or contestant == "fill_stream") and "cpp" not in dk.available_backends():
        pytest.skip("the C++ extension is not built")
    isa = contestant.partition("@")[2] or cpp.cpu_capability()
    attn, w_v, w_o = _layer(n, m, h, causal)
    out = _buffer(n * m, dtype)
    ov = dk.ov_circuits(w_v, w_o, h)
    fns = {
        "cpp": lambda: dk.hvo_matrix(attn, w_v, w_o, backend="cpp", out=out),
        f"cpp@{isa}": lambda: dk.hvo_matrix(attn, w_v, w_o, backend="cpp", out=out),
        "cpp_fresh": lambda: dk.hvo_matrix(attn, w_v, w_o, backend="cpp", dtype=dtype),
        "cpp_first_touch": lambda: dk.hvo_matrix(attn, w_v, w_o, backend="cpp", dtype=dtype),
        "fill": lambda: out.fill_(0),
        "fill_stream": lambda: cpp.stream_fill_(out),
        "fill_again": lambda: out.fill_(0),
        "einsum": lambda: torch.einsum("inm,ica->ncma", attn, ov).reshape(n * m, n * m),
        "kron_sum": lambda: reference.hvo_matrix(attn[None], ov)[0],
        "jacrev": lambda: _jacrev(attn, w_v, w_o, n, m),
    }
    benchmark.group = f"materialise {str(dtype)[6:]}{' causal' if causal else ''} N={n} M={m} h={h}"
    benchmark.extra_info.update(kind="materialise", contestant=contestant, n=n, m=m, h=h, dtype=str(dtype)[6:],
                                causal=causal, entries=(n * m) ** 2, bytes=(n * m) ** 2 * out.element_size())
    if contestant.startswith("cpp"):
        benchmark.extra_info.update(isa=isa, fma_peak_gflops=fma_peak_gflops(isa),
                                    fma_floor_s=2 * h * (n * m) ** 2 / (fma_peak_gflops(isa) * 1e9),
                                    sgemm_gflops=sgemm_gflops(),
                                    sgemm_floor_s=2 * h * (n * m) ** 2 / (sgemm_gflops() * 1e9))
    slow = contestant in ("kron_sum", "jacrev")
    fills = []

    def timed_fill():  # fill_ of the same buffer right before each round of a kernel writing it
        start = time.perf_counter()
        out.fill_(0)
        fills.append(time.perf_counter() - start)

    interleaved = contestant == "cpp" or contestant.startswith("cpp@")
    with cpp.using_capability(isa) if contestant.startswith("cpp") else contextlib.nullcontext():
        setup = cpp.empty_output_cache if contestant == "cpp_first_touch" else (timed_fill if interleaved else None)
        result = benchmark.pedantic(fns[contestant], setup=setup, rounds=1 if QUICK else (3 if slow else 10),
                                    warmup_rounds=1)
    if fills:  # the memory floor of this contestant, measured interleaved with its own rounds
        benchmark.extra_info["fill_interleaved_s"] = min(fills)
    if contestant in ("einsum", "kron_sum", "jacrev"):  # the same numbers as ours, so the race is fair
        torch.testing.assert_close(result, dk.hvo_matrix(attn, w_v, w_o), rtol=1e-5, atol=1e-5)
