"""analyse_temperature on both sides of the dense limit, and the Markdown table."""

from __future__ import annotations

import numpy as np
import pytest

from duat_kernels.markov import LanguageModelChain, analysis, report

from .test_analysis import ABS_PI


def _chain() -> LanguageModelChain:
    logits = np.random.default_rng(0).standard_normal((3 ** 4, 3)) * 2  # T = 3, K = 4: 81 states
    return LanguageModelChain(logits, ("a", "b", "c"), 4, (0.5, 2.0))


def test_dense_analysis_is_over_all_states():
    r = report.analyse_temperature(_chain(), 0.5)
    assert r["mixing_time_over"] == "all states" and r["residual"] <= 1e-13 and r["row_sum_error"] <= 1e-15
    worst = r["tv_curve"]["max over states"]
    assert worst[r["mixing_time"]] <= 0.25 < worst[r["mixing_time"] - 1]
    assert r["slowest_state"] is not None and sum(r["pi"]) == pytest.approx(1.0, abs=1e-14)


def test_sparse_analysis_over_the_constant_starts(monkeypatch):
    """Above DENSE_MAX_STATES: ARPACK for π and λ₂, t_mix from the constant starting states only."""
    dense = report.analyse_temperature(_chain(), 0.5)
    monkeypatch.setattr(analysis, "DENSE_MAX_STATES", 10)
    monkeypatch.setattr(analysis, "EIGVALS_MAX_STATES", 10)
    sparse = report.analyse_temperature(_chain(), 0.5)
    assert sparse["mixing_time_over"] == "the constant starting states" and "max over states" not in sparse["tv_curve"]
    np.testing.assert_allclose(sparse["pi"], dense["pi"], rtol=1e-10, atol=ABS_PI)
    assert sparse["spectral_gap"] == pytest.approx(dense["spectral_gap"], abs=1e-10)
    starts_max = np.max(list(sparse["tv_curve"].values()), axis=0)
    assert starts_max[sparse["mixing_time"]] <= 0.25 < starts_max[sparse["mixing_time"] - 1]
    assert sparse["mixing_time"] <= dense["mixing_time"]  # a lower bound on t_mix over all states


def test_table_has_one_row_per_temperature():
    chain = _chain()
    table = report.format_table(report.analyse(chain, progress=False))
    lines = table.splitlines()
    assert len(lines) == 2 + len(chain.temperatures)
    assert lines[2].startswith("| 0.5 |") and lines[3].startswith("| 2 |")


def test_rewriting_a_report_folder_leaves_no_files_of_the_earlier_run(tmp_path):
    """A rerun into the same --out with fewer temperatures and --no-plot left transition_tau0.5.npz and the
    PNGs of the earlier run next to a markov.json that no longer has τ = 0.5."""
    chain = _chain()
    meta = dict(model="random", logits_seconds=0.0)
    first = report.write_report(chain, report.analyse(chain, progress=False), tmp_path, meta, plots=True)
    assert {p.name for p in first} <= {p.name for p in tmp_path.iterdir()}
    (tmp_path / "notes.txt").write_text("the user's own file")
    again = LanguageModelChain(chain.logits, chain.symbols, chain.context, (2.0,))
    second = report.write_report(again, report.analyse(again, progress=False), tmp_path, meta, plots=False)
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in second} | {"notes.txt", ".duat-outputs.json"}
    assert {p.name for p in second} == {"markov.json", "markov.md", "transition_tau2.npz"}


def test_table_tells_close_temperatures_apart():
    """τ = 0.5 and 0.5000001 have their own files and markov.json keys, but the table printed both rows as 0.5."""
    chain = LanguageModelChain(_chain().logits, ("a", "b", "c"), 4, (0.5, 0.5000001))
    rows = report.format_table(report.analyse(chain, progress=False)).splitlines()[2:]
    assert [r.split(" |")[0] for r in rows] == ["| 0.5", "| 0.5000001"]


def test_rewriting_a_report_folder_keeps_files_no_duat_run_wrote(tmp_path):
    """Every file named like an output (tv_vs_t.png, transition_tau*.npz) was deleted, the user's own too; only
    the files the earlier run recorded in .duat-outputs.json are."""
    chain = _chain()
    meta = dict(model="random", logits_seconds=0.0)
    own = {"tv_vs_t.png": b"the user's plot", "transition_tau9.npz": b"the user's chain"}
    for name, data in own.items():
        (tmp_path / name).write_bytes(data)
    first = report.write_report(chain, report.analyse(chain, progress=False), tmp_path, meta, plots=False)
    assert all((tmp_path / name).read_bytes() == data for name, data in own.items())
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in first} | set(own) | {".duat-outputs.json"}
