"""benchmarks/report.py: the tables it writes and the files it replaces."""

import importlib.util
import json
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(rows: list[tuple[str, float, float]]) -> dict:
    return {"datetime": "2026-11-26T10:00:00", "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2, "flags": ["avx2", "fma"]}},
            "benchmarks": [{"group": "bf16 against fp32 (interleaved rounds)", "name": name, "stats": {"min": bf16},
                            "extra_info": {"kind": "bf16_vs_fp32", "contestant": name, "fp32_interleaved_s": fp32}}
                           for name, fp32, bf16 in rows]}


def test_bf16_vs_fp32_table(report):
    lines = report.bf16_vs_fp32_table(report._rows_by_group(_run([("N=32 M=256 h=8 @avx2", 0.0080, 0.0060),
                                                                   ("N=32 M=256 h=32 @baseline", 0.0500, 0.0550)]))
                                      ["bf16 against fp32 (interleaved rounds)"])
    assert lines[2] == "| N=32 M=256 h=8 | avx2 | 8.0 ms | 6.0 ms | 0.75 |"
    assert lines[3] == "| N=32 M=256 h=32 | baseline | 50.0 ms | 55.0 ms | 1.10 |"


def test_micro_kernel_table(report):
    rows = {f"{isa}-{h}-{dt}": {"extra_info": {"kind": "micro_kernel", "isa": isa, "h": h, "dtype": dt, "gflops": g,
                                              "fma_peak_1thread_gflops": peak}}
            for isa, h, dt, g, peak in [("avx2", 8, "float32", 120.0, 130.0), ("avx2", 8, "bfloat16", 100.0, 130.0),
                                        ("avx2", 8, "float16", 115.0, 130.0), ("baseline", 32, "float32", 50.0, 60.0)]}
    lines = report.micro_kernel_table(rows)
    assert lines[2] == "| avx2 | 8 | 130 | 120 (92%) | 100 (77%) | 115 (88%) | 1.20 | 1.04 |"
    assert lines[3] == "| baseline | 32 | 60 | 50 (83%) | - | - | - | - |"  # a dtype not run is a dash


def test_named_report_keeps_other_reports(report, tmp_path):
    """A second report in a machine's folder replaces its own files only, not another report's plots."""
    folder = tmp_path / "machine"
    folder.mkdir()
    for kept in ("cpu.md", "cpu.json", "cpu_time_vs_bytes.png"):
        (folder / kept).write_text("earlier run")
    (folder / "bf16_vs_fp32_stale.png").write_text("stale plot of an older run of this report")
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_run([("N=4 M=16 h=2 @avx2", 0.002, 0.001)])))
    report.main([str(run), "--out", str(folder), "--name", "bf16_vs_fp32"])
    assert all((folder / kept).read_text() == "earlier run" for kept in ("cpu.md", "cpu.json", "cpu_time_vs_bytes.png"))
    assert not (folder / "bf16_vs_fp32_stale.png").exists()
    assert "| N=4 M=16 h=2 | avx2 | 2.0 ms | 1.0 ms | 0.50 |" in (folder / "bf16_vs_fp32.md").read_text()


def test_default_folder_is_the_machine_and_the_start_time(report):
    # it was benchmarks/results/<machine>: a new run on the machine of a committed one overwrote that report
    folder = report.default_folder(_run([]))
    assert folder.parent.name == "test-2c-avx2" and folder.name == "run-2026-11-26T100000"
    assert folder.parent.parent == REPORT.parent / "results"


def test_report_keeps_the_plots_of_a_report_whose_name_starts_with_its_own(report, tmp_path):
    # benchmarks/results/nvidia-h200 holds the reports gpu and gpu_norms: `--name gpu` removed gpu_*.png, so
    # gpu_norms_*.png too
    folder = tmp_path / "machine"
    folder.mkdir()
    for kept in ("gpu_norms.md", "gpu_norms_matrix_free.png"):
        (folder / kept).write_text("the gpu_norms report")
    (folder / "gpu_matrix_free.png").write_text("stale plot of the gpu report")
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_run([("N=4 M=16 h=2 @avx2", 0.002, 0.001)])))
    report.main([str(run), "--out", str(folder), "--name", "gpu"])
    assert (folder / "gpu_norms_matrix_free.png").read_text() == "the gpu_norms report"
    assert not (folder / "gpu_matrix_free.png").exists() and (folder / "gpu.md").exists()


def test_out_that_is_a_file_is_refused(report, tmp_path, capsys):
    # it gave a raw NotADirectoryError from mkdir
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_run([("N=4 M=16 h=2 @avx2", 0.002, 0.001)])))
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(run), "--out", str(run)])
    assert exit_info.value.code == 2 and "is a file; give a folder" in capsys.readouterr().err
