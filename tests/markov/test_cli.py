"""`duat markov` end to end on the tiny Llama saved as a local folder, and its error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse

from duat_kernels.cli import main

KEYS = {"pi", "token_marginal", "spectral_gap", "tv_curve", "mixing_time", "residual"}


def test_markov_end_to_end(tiny_lm_folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["markov", "--model", str(tiny_lm_folder), "--tokens", "abc", "--context", "2",
            "--temperature", "0.5", "1", "4", "--out", str(out), "--batch-size", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| τ | spectral gap |" in printed and "files written to" in printed
    names = {p.name for p in out.iterdir()}
    assert {"markov.json", "markov.md", "tv_vs_t.png", "mixing_time_vs_tau.png", "cache",
            "transition_tau0.5.npz", "transition_tau1.npz", "transition_tau4.npz"} <= names
    report = json.loads((out / "markov.json").read_text())
    assert report["meta"]["symbols"] == ["a", "b", "c"] and report["meta"]["num_states"] == 9
    assert list(report["temperatures"]) == ["0.5", "1", "4"]
    for tau, r in report["temperatures"].items():
        assert KEYS <= set(r)
        p = scipy.sparse.load_npz(out / f"transition_tau{tau}.npz")
        pi = np.array(r["pi"])
        assert r["residual"] <= 1e-8 and np.abs(p.T @ pi - pi).sum() <= 1e-8
        assert sum(r["token_marginal"].values()) == pytest.approx(1.0, abs=1e-12)
        assert isinstance(r["mixing_time"], int) and r["mixing_time"] >= 1
        assert len(r["slowest_state"]) == 2 and set(r["slowest_state"]) <= set("abc")
        worst = r["tv_curve"]["max over states"]
        assert worst[r["mixing_time"]] <= 0.25 < worst[r["mixing_time"] - 1]
    # a higher temperature flattens P: the chain mixes at least as fast
    assert report["temperatures"]["4"]["spectral_gap"] > report["temperatures"]["0.5"]["spectral_gap"]
    assert (out / "tv_vs_t.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 0.5 |" in (out / "markov.md").read_text()
    # rerun with other temperatures and symbols given one per argument: the same cache entry is reused
    assert main(["markov", "--model", str(tiny_lm_folder), "--tokens", "a", "b", "c", "--context", "2",
                 "--temperature", "2", "--out", str(out), "--no-plot"]) == 0
    assert "logits of 9 contexts" not in capsys.readouterr().err
    assert len(list((out / "cache").glob("logits_*"))) == 1


@pytest.mark.parametrize("args,message", [
    (["--tokens", "a", "zz"], "'zz' must be a single token"),
    (["--tokens", "a", "a b"], "'a b' must be a single token"),
    (["--context", "0"], "context K must be an int >= 1"),
    (["--temperature", "1", "0"], "temperature τ must be a finite number > 0"),
    (["--temperature", "-2"], "temperature τ must be a finite number > 0"),
    (["--tokens", "aa"], "at least 2 distinct symbols"),
    (["--temperature", "1", "0.5", "1.0"], "--temperature lists a temperature twice: 1 0.5 1"),
], ids=["unknown-symbol", "two-token-symbol", "K0", "tau0", "tau-negative", "repeated", "tau-twice"])
def test_markov_errors_are_one_line(tiny_lm_folder, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["markov", "--model", str(tiny_lm_folder), "--out", str(out), "--tokens", "abc", *args]) == 2
    err = capsys.readouterr().err
    last = err.strip().split("\n")[-1]  # after transformers' own progress bars
    assert last.startswith("duat markov: ") and message in last and "Traceback" not in err
    assert not out.exists()  # a refused run leaves no folder behind


def test_markov_missing_model(tmp_path, monkeypatch, capsys):
    # the default --out (./markov) was created before the model was refused, and left behind, empty (run from the
    # repository root, the test left it there)
    monkeypatch.chdir(tmp_path)
    assert main(["markov", "--model", "/nonexistent/model"]) == 2
    assert "there is no model hub here" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("option", ["--out", "--cache"])
def test_markov_output_folder_that_is_a_file_is_refused_before_loading(tmp_path, capsys, monkeypatch, option):
    import duat_kernels.models

    monkeypatch.setattr(duat_kernels.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["markov", "--model", "any", "--tokens", "ab", "--context", "1", "--out", str(tmp_path / "out")]
    assert main([*argv, option, str(blocker / "sub")]) == 2  # was "[Errno 20] Not a directory" after loading
    assert capsys.readouterr().err == f"duat markov: {option} {blocker / 'sub'}: {blocker} is a file, not a folder\n"


@pytest.mark.parametrize("option", ["--out", "--cache"])
def test_markov_empty_output_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch, option):
    # --cache '' was taken as OUT/cache (--out '' was refused)
    import duat_kernels.models

    monkeypatch.setattr(duat_kernels.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["markov", "--model", "any", "--tokens", "ab", "--context", "1", "--out", str(tmp_path / "out")]
    assert main([*argv, option, ""]) == 2
    assert capsys.readouterr().err == f"duat markov: {option} is empty; give a folder\n"


@pytest.mark.parametrize("context,message", [
    ("99999", "has T^K = 2^99999 (about 10^30103) states, more than any memory holds"),
    ("45", r"the table of (35,184,372,088,832, 2) transition probabilities (T=2, K=45) needs"),
], ids=["beyond-int64", "beyond-memory"])
def test_markov_context_too_long_is_refused_before_loading(tmp_path, capsys, monkeypatch, context, message):
    # K = 99999 loaded the model and then failed with NumPy's "Maximum allowed dimension exceeded"
    import duat_kernels.models

    monkeypatch.setattr(duat_kernels.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["markov", "--model", "any", "--tokens", "ab", "--context", context, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("duat markov: ") and message in err and err.count("\n") == 1


def test_markov_no_progress_hides_the_bars(tiny_lm_folder, tmp_path, capsys):
    # duat markov had no --no-progress (duat corpus has): its two bars always went to stderr
    argv = ["markov", "--model", str(tiny_lm_folder), "--tokens", "ab", "--context", "1", "--out", str(tmp_path / "o"),
            "--no-plot"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "temperatures" in err and "Loading weights" in err
    assert main([*argv, "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "temperatures" not in err and "contexts" not in err
    assert "Loading weights" not in err  # transformers' bar too
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()  # as before the run


def test_markov_minilm_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    # it loaded MiniLM with a newly initialised LM head (transformers' load report on stderr) and then refused it
    import duat_kernels.models

    monkeypatch.setattr(duat_kernels.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["markov", "--model", "minilm", "--tokens", "ab", "--context", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("duat markov: --model minilm is an encoder") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
