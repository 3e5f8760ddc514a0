"""Turn a pytest-benchmark JSON run into a Markdown report with ratios and PNG plots.

    pytest benchmarks/ --benchmark-json=run.json && python benchmarks/report.py run.json

Writes into its own folder, by default benchmarks/results/<machine>/run-<date>T<hhmmss> (e.g.
amd-epyc-2c-avx512/run-2026-11-26T102705: named after the CPU that ran it and the time of the run,
so a new run never overwrites another or the committed reports in benchmarks/results/<machine>/; in a
folder given with --out an older report of the same name and its plots are removed first, other reports
are kept): <name>.md (the machine, its CPU and SIMD flags, one table per
group: best time, GB/s written, ratios to the memory-write floor `fill` (for cpp rows, fill_ timed
interleaved with their own rounds), to the FMA floor and to each
peer; then one table per ISA variant of the C++ kernels), the run's JSON and, when the run has them,
<name>_time_vs_bytes.png, <name>_speedup_vs_h.png and <name>_matrix_free.png.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

# The CPU flags that decide which kernels can run and how fast.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
              "avx512_fp16", "amx_tile", "neon", "asimd", "sve")


def _simd(flags: set[str]) -> str:
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "baseline SIMD"


def machine_description(run: dict) -> str:
    mi = run.get("machine_info", {})
    cpu = mi.get("cpu", {})
    flags = set(cpu.get("flags", []))
    present = " ".join(f for f in SIMD_FLAGS if f in flags) or "none listed"
    return (f"{cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores, {_simd(flags)} (flags: {present}); "
            f"{mi.get('system', '?')} {mi.get('release', '')}; Python {mi.get('python_version', '?')}; "
            f"run {run.get('datetime', '?')[:19]}")


def run_gpu(run: dict) -> str | None:
    """The GPU a run's GPU benchmarks ran on (their extra_info), or None for a CPU-only run."""
    return next((b["extra_info"]["gpu"] for b in run["benchmarks"] if b["extra_info"].get("gpu")), None)


def machine_slug(run: dict) -> str:
    """A folder name for the machine: the GPU for a GPU run (e.g. nvidia-h200), else CPU brand, core
    count and best SIMD, e.g. amd-epyc-2c-avx512."""
    gpu = run_gpu(run)
    if gpu:
        return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    cpu = run.get("machine_info", {}).get("cpu", {})
    brand = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$|\d+-core", "", cpu.get("brand_raw", "cpu").lower())
    brand = re.sub(r"[^a-z0-9]+", "-", brand).strip("-") or "cpu"
    simd = {"AVX-512": "avx512", "AVX2": "avx2"}.get(_simd(set(cpu.get("flags", []))), "baseline")
    return f"{brand}-{cpu.get('count', 0)}c-{simd}"


def default_folder(run: dict) -> Path:
    """benchmarks/results/<machine>/run-<date>T<hhmmss>: named after the machine and the time of the run (its
    JSON's datetime, written when it ended), so that a new run never overwrites another, the committed reports
    in benchmarks/results/<machine>/ included."""
    stamp = re.sub(r"[^0-9T-]", "", run.get("datetime", "")[:19]) or "undated"
    return Path(__file__).parent / "results" / machine_slug(run) / f"run-{stamp}"


def _rows_by_group(run: dict) -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in run["benchmarks"]:
        info = b["extra_info"]
        name = info.get("contestant") or (b.get("params") or {}).get("operation") or b["name"]
        groups[b["group"]][name] = b
    return groups


def _ms(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _time(t: float) -> str:
    return f"{t * 1e6:.0f} µs" if t < 1e-3 else _ms(t)


def fill_floor(rows: dict[str, dict]) -> float | None:
    """The memory-write floor of a configuration: the faster of its fill_ runs on the shared buffer."""
    times = [rows[k]["stats"]["min"] for k in ("fill", "fill_again") if k in rows]
    return min(times) if times else None


def stream_floor(rows: dict[str, dict]) -> float | None:
    """The write floor of the non-temporal store path (fill_stream), where the run has it."""
    return rows["fill_stream"]["stats"]["min"] if "fill_stream" in rows else None


def memory_floor(rows: dict[str, dict], name: str) -> float | None:
    """The memory floor of one contestant: fill_ timed interleaved with its own rounds where the run
    has it (the buffer's speed can drift within a configuration), else the configuration's."""
    return rows[name]["extra_info"].get("fill_interleaved_s") or fill_floor(rows)


def materialise_table(rows: dict[str, dict]) -> list[str]:
    best = {k: b["stats"]["min"] for k, b in rows.items()}
    floor, ours = fill_floor(rows), best.get("cpp")
    fma = rows.get("cpp", {}).get("extra_info", {}).get("fma_floor_s")
    out = ["| contestant | best time | GB/s written | vs fill_ | vs FMA floor | time / cpp |", "|---|---:|---:|---:|---:|---:|"]
    for name, b in rows.items():
        t = best[name]
        own_fma = b["extra_info"].get("fma_floor_s", fma)  # each ISA variant against its own FMA rate
        own_fill = memory_floor(rows, name)
        cells = [name, _ms(t), f"{b['extra_info']['bytes'] / t / 1e9:.1f}",
                 f"{t / own_fill:.2f}x" if own_fill else "-", f"{t / own_fma:.2f}x" if own_fma else "-",
                 f"{t / ours:.1f}x" if ours else "-"]
        out.append("| " + " | ".join(cells) + " |")
    if "cpp" in rows:
        floor = memory_floor(rows, "cpp")
    if fma and floor and ours:
        bound = "FMA" if fma > floor else "memory"
        out += ["", f"Floors: memory (fill_, interleaved with cpp's rounds) {_ms(floor)}, FMA {_ms(fma)} ({bound}-bound); "
                    f"cpp is {ours / max(fma, floor):.2f}x the larger floor."]
        info = rows["cpp"]["extra_info"]
        if "sgemm_floor_s" in info:
            sgemm = info["sgemm_floor_s"]
            out[-1] += (f" Looser sgemm floor (torch.mm at {info['sgemm_gflops']:.0f} GFLOP/s) {_ms(sgemm)}: "
                        f"cpp is {ours / max(sgemm, floor):.2f}x max(fill_, sgemm floor).")
        stream = stream_floor(rows)
        if stream:
            out[-1] += (f" Non-temporal stores (cpp's store path above 16 MiB) write the buffer in {_ms(stream)}: "
                        f"cpp is {ours / max(fma, stream):.2f}x max(that, FMA).")
    return out


def isa_tables(groups: dict[str, dict[str, dict]]) -> list[str]:
    """One table per ISA variant (cpp@ISA contestants): each configuration against fill_ on the same
    buffer and the variant's own FMA floor, and the ratio to the larger of the two."""
    by_isa: dict[str, list[tuple[str, dict, float]]] = defaultdict(list)
    for group, rows in groups.items():
        for name, b in rows.items():
            if name.startswith("cpp@") and fill_floor(rows):
                by_isa[name[4:]].append((group.removeprefix("materialise "), b, memory_floor(rows, name),
                                         stream_floor(rows)))
    out = []
    for isa, entries in by_isa.items():
        out += [f"### ISA variant {isa} (DUAT_CPU_CAPABILITY={isa})", "",
                "| configuration | best time | fill_ | FMA floor | FMA GFLOP/s | vs max(fill_, FMA) "
                "| vs max(fill_, sgemm floor) | non-temporal fill | vs max(non-temporal fill, FMA) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for group, b, fill, stream in entries:
            t, info = b["stats"]["min"], b["extra_info"]
            fma = info["fma_floor_s"]
            sgemm = f"{t / max(fill, info['sgemm_floor_s']):.2f}x" if "sgemm_floor_s" in info else "-"
            nt = f"{_ms(stream)} | {t / max(stream, fma):.2f}x" if stream else "- | -"
            out.append(f"| {group} | {_ms(t)} | {_ms(fill)} | {_ms(fma)} | {info['fma_peak_gflops']:.0f} | "
                       f"{t / max(fill, fma):.2f}x | {sgemm} | {nt} |")
        out.append("")
    return out


def gpu_table(rows: dict[str, dict]) -> list[str]:
    """GPU rows: triton.testing.do_bench's best and median (L2 flushed before each call)."""
    best = {k: b["extra_info"]["best_ms"] / 1e3 for k, b in rows.items()}
    floor, ours = best.get("fill"), best.get("triton")
    out = ["| contestant | best | median | GB/s written | vs fill_ (HBM write floor) | time / triton | max error (relative to Σ_i \\|A_i\\| \\|OV_i\\|) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, b in sorted(rows.items(), key=lambda kv: best[kv[0]]):
        info = b["extra_info"]
        err = info.get("max_rel_err")
        out.append(f"| {name} | {_time(best[name])} | {_time(info['median_ms'] / 1e3)} | {info['bytes'] / best[name] / 1e9:.0f} | "
                   f"{'-' if floor is None else f'{best[name] / floor:.2f}x'} | "
                   f"{'-' if ours is None else f'{best[name] / ours:.2f}x'} | {'-' if err is None else f'{err:.1e}'} |")
    return out


def gpu_norms_table(rows: dict[str, dict]) -> list[str]:
    """GPU block norms from q/k: best time, against sdpa (one attention forward) and the torch route."""
    best = {k: b["stats"]["min"] for k, b in rows.items()}
    sdpa, torch_route = best.get("sdpa"), best.get("torch")
    out = ["| contestant | best | vs sdpa forward | vs plain torch | max error of two grid rows (relative) | "
           "peak GPU memory above inputs | tile config |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, b in sorted(rows.items(), key=lambda kv: best[kv[0]]):
        info = b["extra_info"]
        err = info.get("max_rel_err")
        out.append(f"| {name} | {_ms(best[name])} | {'-' if sdpa is None else f'{best[name] / sdpa:.2f}x'} | "
                   f"{'-' if torch_route is None else f'{best[name] / torch_route:.2f}x'} | "
                   f"{'-' if err is None else f'{err:.1e}'} | {info['peak_bytes'] / 2**20:.0f} MiB | "
                   f"{info.get('config', '-')} |")
    return out


def bf16_vs_fp32_table(rows: dict[str, dict]) -> list[str]:
    """bf16 against fp32 output per configuration and ISA variant, from interleaved rounds."""
    out = ["| configuration | ISA variant | fp32 best | bf16 best | bf16 / fp32 |", "|---|---|---:|---:|---:|"]
    for name, b in rows.items():
        fp32, bf16 = b["extra_info"]["fp32_interleaved_s"], b["stats"]["min"]
        config, _, isa = name.partition(" @")
        out.append(f"| {config} | {isa} | {_time(fp32)} | {_time(bf16)} | {bf16 / fp32:.2f} |")
    return out


def micro_kernel_table(rows: dict[str, dict]) -> list[str]:
    """The micro-kernels' GFLOP/s in L1 per ISA variant and h, each dtype with its share of the variant's
    one-thread FMA probe, and the time of bf16 and fp16 relative to fp32."""
    by_case: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for b in rows.values():
        info = b["extra_info"]
        by_case[info["isa"], info["h"]][info["dtype"]] = info
    dtypes = ["float32", "bfloat16", "float16"]
    out = ["| ISA variant | h | FMA probe, 1 thread | " + " | ".join(dtypes) + " | bf16 / fp32 time | fp16 / fp32 time |",
           "|---|---:|---:|" + "---:|" * (len(dtypes) + 2)]
    for (isa, h), cases in by_case.items():
        peak = next(iter(cases.values()))["fma_peak_1thread_gflops"]
        cells = [f"{cases[d]['gflops']:.0f} ({cases[d]['gflops'] / peak:.0%})" if d in cases else "-" for d in dtypes]
        fp32 = cases.get("float32", {}).get("gflops")
        slower = ["-" if fp32 is None or d not in cases else f"{fp32 / cases[d]['gflops']:.2f}" for d in dtypes[1:]]
        out.append(f"| {isa} | {h} | {peak:.0f} | " + " | ".join(cells + slower) + " |")
    return out


def generic_table(rows: dict[str, dict]) -> list[str]:
    out = ["| case | best time | peak memory above inputs |", "|---|---:|---:|"]
    for name, b in rows.items():
        peak = b["extra_info"].get("peak_bytes")
        memory = "-" if peak is None else f"{peak / 2**20:.0f} MiB"
        out.append(f"| {name} | {_ms(b['stats']['min'])} | {memory} |")
    return out


def matrix_free_table(rows: dict[str, dict]) -> list[str]:
    by_n: dict[int, dict[str, float]] = defaultdict(dict)
    for b in rows.values():
        by_n[b["extra_info"]["n"]][b["extra_info"]["route"]] = b["stats"]["min"]
    out = ["| N | dense W' | matrix-free | dense route | dense / matrix-free |", "|---:|---:|---:|---:|---:|"]
    for n, t in sorted(by_n.items()):
        size = next(b["extra_info"]["bytes"] for b in rows.values() if b["extra_info"]["n"] == n)
        free, dense = t["free"], t.get("dense")
        ratio = "-" if dense is None else f"{dense / free:.1f}x"
        out.append(f"| {n} | {size / 2**20:.1f} MiB | {_ms(free)} | {'-' if dense is None else _ms(dense)} | {ratio} |")
    return out


def plots(groups: dict[str, dict[str, dict]], out: Path, name: str) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    mat = [rows for g, rows in groups.items() if g.startswith("materialise float32 N=")]
    if mat:  # time against output bytes, per contestant
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = defaultdict(list)
        for rows in mat:
            for c, b in rows.items():
                series[c].append((b["extra_info"]["bytes"], b["stats"]["min"]))
        for c, pts in sorted(series.items()):
            ax.loglog(*zip(*sorted(pts)), marker="o", linestyle="", label=c)
        ax.set_xlabel("bytes of W' written")
        ax.set_ylabel("best time [s]")
        ax.set_title("Materialising W' (fp32, CPU)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        written.append(_save(fig, out / f"{name}_time_vs_bytes.png", plt))
        # speed-up against h at N = 32, M = 256
        pts = sorted((rows["cpp"]["extra_info"]["h"], rows) for rows in mat
                     if "cpp" in rows and rows["cpp"]["extra_info"]["n"] == 32 and rows["cpp"]["extra_info"]["m"] == 256)
        if len(pts) > 1:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            hs = [h for h, _ in pts]
            for peer in ("einsum", "kron_sum", "jacrev"):
                ys = [(h, rows[peer]["stats"]["min"] / rows["cpp"]["stats"]["min"]) for h, rows in pts if peer in rows]
                if ys:
                    ax.semilogy(*zip(*ys), marker="o", label=f"{peer} time / cpp time")
            ax.semilogy(hs, [rows["cpp"]["stats"]["min"] / memory_floor(rows, "cpp") for _, rows in pts],
                        marker="s", label="cpp time / fill_ time (memory floor)")
            ax.semilogy(hs, [rows["cpp"]["stats"]["min"] / rows["cpp"]["extra_info"]["fma_floor_s"] for _, rows in pts],
                        marker="^", label="cpp time / FMA floor")
            ax.axhline(1, color="gray", lw=0.8)
            ax.set_xlabel("heads h")
            ax.set_ylabel("ratio")
            ax.set_title("W' materialisation, N=32, M=256, fp32: speed-up and distance to the floors")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            written.append(_save(fig, out / f"{name}_speedup_vs_h.png", plt))
    free = {g: rows for g, rows in groups.items() if g.startswith("matrix-free")}
    if free:
        fig, axes = plt.subplots(1, len(free), figsize=(4.2 * len(free), 4), squeeze=False)
        for ax, (g, rows) in zip(axes[0], sorted(free.items())):
            for route in ("free", "dense"):
                pts = sorted((b["extra_info"]["n"], b["stats"]["min"]) for b in rows.values()
                             if b["extra_info"]["route"] == route)
                if pts:
                    ax.loglog(*zip(*pts), marker="o", label="matrix-free" if route == "free" else "dense route")
            ax.set_title(g.split(": ")[1].split(" ")[0])
            ax.set_xlabel("N")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("best time [s]")
        written.append(_save(fig, out / f"{name}_matrix_free.png", plt))
    return written


def _save(fig, path: Path, plt) -> str:
    from matplotlib.ticker import NullFormatter

    for ax in fig.axes:  # minor tick labels of log axes overlap the major ones
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def report(run: dict, out: Path, name: str) -> str:
    groups = _rows_by_group(run)
    gpu = run_gpu(run)
    lines = [f"# Benchmark report: {name}", "", (f"GPU: {gpu}; host " if gpu else "Machine: ") +
             f"{machine_description(run)}. Times are the best of the rounds.", ""]
    for group, rows in groups.items():
        kind = next(iter(rows.values()))["extra_info"].get("kind")
        lines += [f"### {group}", ""]
        table = {"materialise": materialise_table, "matrix_free": matrix_free_table, "gpu": gpu_table,
                 "gpu_norms": gpu_norms_table, "bf16_vs_fp32": bf16_vs_fp32_table,
                 "micro_kernel": micro_kernel_table}.get(kind, generic_table)
        lines += table(rows) + [""]
    lines += isa_tables(groups)
    for png in plots(groups, out, name):
        lines += [f"![{png}]({png})", ""]
    return "\n".join(lines)


def own_plots(folder: Path, name: str) -> list[Path]:
    """The plots <name>_*.png in the folder that belong to report `name`: not those of another report whose
    name starts with it (gpu_norms_*.png beside the gpu report), which is the longest report name <X>.md a
    plot's name starts with (<X>_)."""
    reports = [md.stem for md in folder.glob("*.md")] + [name]
    return [png for png in folder.glob(f"{name}_*.png")
            if max((r for r in reports if png.name.startswith(f"{r}_")), key=len) == name]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: benchmarks/results/<machine>/run-<time of the run>; an older report of the same name "
                             "and its plots are removed first)")
    parser.add_argument("--name", default="cpu", help="report name (default: cpu)")
    args = parser.parse_args(argv)
    with open(args.run) as f:
        run = json.load(f)
    out = Path(args.out) if args.out else default_folder(run)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; give a folder")
    if out.exists():  # a report is the files of one run: no stale plots beside new tables
        for old in [*own_plots(out, args.name), out / f"{args.name}.md", out / f"{args.name}.json"]:
            if old.resolve() != Path(args.run).resolve():  # never the run being reported
                old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name
    if Path(args.run).resolve() != (out / f"{name}.json").resolve():
        shutil.copyfile(args.run, out / f"{name}.json")
    text = report(run, out, name)
    (out / f"{name}.md").write_text(text)
    print(text)
    print(f"\nwritten: {out / (name + '.md')}")


if __name__ == "__main__":
    main()
