"""Benchmarks run with pytest-benchmark: `pytest benchmarks/ --benchmark-json=run.json`.

DUAT_BENCH_QUICK=1 shrinks every size to a smoke test (CI runs it so the benchmarks cannot rot;
it asserts no time).
"""

import os

QUICK = os.environ.get("DUAT_BENCH_QUICK", "") not in ("", "0")
