"""Ratios from a pytest-benchmark JSON: `python benchmarks/report.py run.json` prints, per group,
each contestant's best time, write bandwidth and ratio to the floor (`fill`) and to `cpp`."""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        run = json.load(f)
    groups = defaultdict(dict)
    for b in run["benchmarks"]:
        params = b["params"]
        groups[b["group"]][params.get("contestant") or params.get("operation")] = b
    cpu = run["machine_info"].get("cpu", {}).get("brand_raw", "?")
    print(f"machine: {cpu}, {run['machine_info'].get('cpu', {}).get('count', '?')} cores; best of the rounds\n")
    for group, rows in groups.items():
        print(f"### {group}\n")
        if "peak_bytes" in next(iter(rows.values()))["extra_info"]:
            print("| operation | best time | peak memory above inputs |")
            print("|---|---:|---:|")
            for name, b in rows.items():
                print(f"| {name} | {b['stats']['min']:.3f} s | {b['extra_info']['peak_bytes'] / 2**20:.0f} MiB |")
            print()
            continue
        print("| contestant | best time | GB/s written | vs fill_ | vs cpp |")
        print("|---|---:|---:|---:|---:|")
        floor = rows.get("fill", {}).get("stats", {}).get("min")
        ours = rows.get("cpp", {}).get("stats", {}).get("min")
        for name, b in rows.items():
            t = b["stats"]["min"]
            gbs = b["extra_info"]["bytes"] / t / 1e9
            vs_floor = f"{t / floor:.2f}x" if floor else "-"
            vs_ours = f"{t / ours:.2f}x" if ours else "-"
            print(f"| {name} | {t * 1e3:.1f} ms | {gbs:.1f} | {vs_floor} | {vs_ours} |")
        fma = rows.get("cpp", {}).get("extra_info", {}).get("fma_floor_s")
        if fma:
            print(f"\nFMA floor (2h flops per entry at the measured FMA peak): {fma * 1e3:.1f} ms; "
                  f"memory floor (fill_): {floor * 1e3:.1f} ms. cpp / max(floors) = {ours / max(fma, floor):.2f}x")
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run.json")
