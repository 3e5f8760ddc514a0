"""corpus.runner's summaries of a results.parquet."""

from __future__ import annotations

import math

import pytest

from duat_kernels.corpus import runner

pa = pytest.importorskip("pyarrow", reason="needs pyarrow: pip install '.[dask]'")
pq = pytest.importorskip("pyarrow.parquet", reason="needs pyarrow: pip install '.[dask]'")


@pytest.mark.parametrize("errors", [[1e-7, float("nan")], [float("nan"), 1e-7]])
def test_max_rel_error_keeps_a_nan(tmp_path, errors):
    # Python's max skipped a NaN after a finite error: `duat corpus` reported a NaN layer as exact
    path = tmp_path / "results.parquet"
    pq.write_table(pa.table({"rel_error": errors}), path)
    assert math.isnan(runner.max_rel_error(path))


def test_max_rel_error_of_no_rows_is_zero(tmp_path):
    path = tmp_path / "results.parquet"
    pq.write_table(pa.table({"rel_error": pa.array([], type=pa.float64())}), path)
    assert runner.max_rel_error(path) == 0.0
