"""`duat corpus` end to end on a tiny random-init BERT saved to a folder: a LocalCluster of 2 worker
processes gives the --sync results bit for bit, each worker loads the model once, a killed worker
loses no result, an interrupted run resumes, and the rows match an independent computation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import duat_kernels as dk
from duat_kernels.cli import main
from duat_kernels.corpus import CorpusSettings, analysis, read_texts, run_corpus, runner

from conftest import CHILD_CWD

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install '.[models]'")
pq = pytest.importorskip("pyarrow.parquet", reason="needs pyarrow: pip install '.[dask]'")
distributed = pytest.importorskip("distributed", reason="needs dask.distributed: pip install '.[dask]'")

WORDS = "the a cat dog sat on mat attention is all you need quick brown fox jumps over lazy and of".split()
TEXTS = ["the cat sat on the mat", "the quick brown fox jumps over the lazy dog", "attention is all you need",
         "a dog and a cat sat on a mat of the fox"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer, 32-wide BERT with random weights and non-zero biases, and a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                                     vocab_size=len(vocab), max_position_embeddings=32)
    model = transformers.BertModel(config)
    with torch.no_grad():  # random-init biases are zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "texts.jsonl"
    lines = [json.dumps({"text": TEXTS[0], "id": "mat"}), json.dumps({"text": TEXTS[1]}), json.dumps(TEXTS[2]), "",
             json.dumps({"text": TEXTS[3], "id": 7})]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sync_results(model_dir, texts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sync")
    assert main(["corpus", "--model", model_dir, "--texts", texts_file, "--out", str(out), "--sync", "--no-progress"]) == 0
    return out


def _table(out):
    return pq.read_table(out / "results.parquet")


def test_sync_rows_match_an_independent_computation(model_dir, sync_results):
    table = _table(sync_results)
    assert table.num_rows == len(TEXTS) * 2
    assert table.column("text_id").to_pylist() == ["mat", "mat", "2", "2", "3", "3", "7", "7"]
    summary = (sync_results / "summary.md").read_text()
    assert [line.split(" | ")[:2] for line in summary.splitlines() if line[:3] in ("| 0", "| 1")] == \
        [["| 0", "4"], ["| 1", "4"]]  # one line per layer, 4 texts each
    model, tok = dk.models.load(model_dir)
    row = table.slice(3, 1).to_pylist()[0]  # text 1, layer 1
    layer = dk.models.attention_layers(model, layers=[1], **tok([TEXTS[1]], return_tensors="pt"))[0]
    n = layer.attn.shape[-1]
    w = layer.hvo_matrix(dtype=torch.float64)[0]
    x = layer.x[0].double().reshape(-1)
    blocks = w.reshape(n, w.shape[0] // n, n, w.shape[1] // n).transpose(1, 2)  # (n, m, M_out, M_in)
    expected_contrib = torch.einsum("nmca,ma->nmc", blocks, x.reshape(n, -1)).norm(dim=-1)
    assert row["n_tokens"] == n == 11 and row["layer"] == 1 and row["heads"] == 4
    assert row["rel_error"] <= 1e-5
    torch.testing.assert_close(torch.tensor(row["block_norms"], dtype=torch.float64).reshape(n, n), blocks.norm(dim=(-1, -2)),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(row["contributions"], dtype=torch.float64).reshape(n, n), expected_contrib, rtol=1e-5, atol=1e-7)
    assert row["spectral_norm"] == pytest.approx(torch.linalg.matrix_norm(w, 2).item(), rel=1e-5)
    assert row["frobenius"] == pytest.approx(w.norm().item(), rel=1e-6)
    share = expected_contrib / expected_contrib.sum(1, keepdim=True)
    assert row["self_contribution"] == pytest.approx(share.diagonal().mean().item(), rel=1e-5)


def test_cluster_equals_sync_bit_for_bit_and_loads_each_model_once(model_dir, texts_file, sync_results, dask_client,
                                                                   tmp_path, capsys):
    out = tmp_path / "cluster"
    args = ["corpus", "--model", model_dir, "--texts", texts_file, "--out", str(out), "--no-progress"]
    assert main([*args, "--scheduler", dask_client.cluster.scheduler_address]) == 0
    assert _table(out).equals(_table(sync_results))
    assert "| 1 | 4 |" in capsys.readouterr().out
    loads = dask_client.run(lambda: dict(analysis.MODEL_LOADS))
    assert sum(w.get(model_dir, 0) for w in loads.values()) >= 1
    assert all(w.get(model_dir, 0) <= 1 for w in loads.values()), loads


class KillOnFirstCorpusTask(distributed.WorkerPlugin):
    """SIGKILLs its worker process when the first corpus task starts executing (once per cluster)."""

    def __init__(self, marker: str):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith("duat-corpus-"):
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)


def test_killed_worker_loses_no_result(model_dir, texts_file, sync_results, dask_client, tmp_path):
    marker = tmp_path / "killed"
    dask_client.register_plugin(KillOnFirstCorpusTask(str(marker)), name="kill-once")
    try:
        settings = CorpusSettings(model=model_dir)
        results, failures = run_corpus(read_texts(texts_file), tmp_path / "out", settings, dask_client, progress=False)
    finally:
        dask_client.unregister_worker_plugin("kill-once")
    assert marker.exists() and failures == []
    assert pq.read_table(results).equals(_table(sync_results))


def test_interrupted_run_resumes_without_redoing_texts(model_dir, texts_file, sync_results, tmp_path, monkeypatch,
                                                      capsys):
    calls, real = [], runner.analyse_text

    def stop_at_third(settings, index, text_id, text):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(index)
        return real(settings, index, text_id, text)

    monkeypatch.setattr(runner, "analyse_text", stop_at_third)
    args = ["corpus", "--model", model_dir, "--texts", texts_file, "--out", str(tmp_path), "--sync", "--no-progress"]
    assert main(args) == 130  # Ctrl-C: one line and the shell's exit status for SIGINT, no traceback
    assert capsys.readouterr().err.strip() == "duat corpus: interrupted"
    assert calls == [0, 1] and len(list((tmp_path / "parts").glob("*.parquet"))) == 2
    calls.clear()
    monkeypatch.setattr(runner, "analyse_text", lambda *a: calls.append(a[1]) or real(*a))
    assert main(args) == 0
    assert calls == [2, 3]
    assert _table(tmp_path).equals(_table(sync_results))
    calls.clear()
    assert main(args) == 0 and calls == []  # everything done: nothing recomputed


@pytest.mark.parametrize("extra, message", [
    (["--texts", "/nonexistent.jsonl"], "no such file"),
    (["--layer", "0"], "holds a run with other settings"),
    (["--grid", "0"], "must be positive"),
])
def test_user_errors_say_what_to_do(model_dir, texts_file, sync_results, extra, message, capsys):
    args = ["corpus", "--model", model_dir, "--texts", texts_file, "--out", str(sync_results), "--sync", *extra]
    assert main(args) == 2  # a user error's exit status, as in every command (SystemExit(message) gave 1)
    err = capsys.readouterr().err
    assert err.startswith("duat corpus: ") and message in err and len(err.splitlines()) == 1


def test_an_output_path_that_is_a_file_is_refused_before_the_cluster(model_dir, texts_file, tmp_path, monkeypatch,
                                                                     capsys):
    from duat_kernels.corpus import cli as corpus_cli

    monkeypatch.setattr(corpus_cli, "dask_client", lambda args: pytest.fail("the cluster was started"))
    target = tmp_path / "a_file"
    target.write_text("")
    assert main(["corpus", "--model", model_dir, "--texts", texts_file, "--out", str(target / "run")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        read_texts(path)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    # "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte", naming no file or line
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "fine"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        read_texts(path)
    path.write_bytes('{"text": "caf\u00e9"}\n'.encode("utf-8"))
    assert read_texts(path) == [("1", "caf\u00e9")]


@pytest.mark.parametrize("lines,match", [
    (['{"text": "a", "id": null}'], r'ids.jsonl:1: "id" must be a string or an integer, got null'),
    (['{"text": "a", "id": 1.5}'], r'ids.jsonl:1: "id" must be a string or an integer, got 1.5'),
    (['{"text": "a", "id": ["x"]}'], r'ids.jsonl:1: "id" must be a string or an integer'),
    (['{"text": "a", "id": "x"}', '', '{"text": "b", "id": "x"}'], r"ids.jsonl:3: id 'x' was already used on line 1"),
    (['{"text": "a", "id": 2}', '"b"'], r"ids.jsonl:2: id '2' was already used on line 1"),
])
def test_text_ids_are_strings_or_integers_and_unique(tmp_path, lines, match):
    # {"id": null} became the id "None", and two texts of one id were both accepted
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        read_texts(path)


def test_text_ids_default_to_line_numbers(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "a", "id": 7}\n\n"b"\n{"text": "c"}\n')
    assert read_texts(path) == [("7", "a"), ("3", "b"), ("4", "c")]


def test_long_texts_get_grid_block_norms_and_contributions(model_dir):
    full, = analysis.analyse_text(CorpusSettings(model=model_dir, layers=(0,)), 0, "t", TEXTS[3])
    coarse, = analysis.analyse_text(CorpusSettings(model=model_dir, layers=(0,), grid=4), 0, "t", TEXTS[3])
    n = full["n_tokens"]
    assert full["grid"] == n == 14 and coarse["grid"] == 4
    bins = torch.arange(n) * 4 // n  # 3 or 4 tokens per super-block
    onehot = torch.nn.functional.one_hot(bins, 4).double()  # (N, 4)
    norms = torch.tensor(full["block_norms"], dtype=torch.float64).reshape(n, n)
    contrib = torch.tensor(full["contributions"], dtype=torch.float64).reshape(n, n)
    torch.testing.assert_close(torch.tensor(coarse["block_norms"], dtype=torch.float64).reshape(4, 4),
                               (onehot.T @ norms.square() @ onehot).sqrt(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(coarse["contributions"], dtype=torch.float64).reshape(4, 4),
                               onehot.T @ contrib @ onehot, rtol=1e-12, atol=0)
    for key in ("rel_error", "frobenius", "spectral_norm", "self_contribution", "mean_distance"):
        assert coarse[key] == full[key], key


@pytest.mark.parametrize("cluster", [False, True])
def test_a_layer_out_of_range_is_one_error_before_any_text(model_dir, texts_file, tmp_path, cluster, dask_client,
                                                          monkeypatch, capsys):
    # it failed every text in turn ("FAILED: text 0 ... layer 99 is out of range"), exit status 1
    from duat_kernels.corpus import runner

    def analyse_text(*args):
        raise AssertionError("a text was analysed")  # not pytest.fail: a BaseException hangs a Dask worker

    monkeypatch.setattr(runner, "analyse_text", analyse_text)
    where = ["--scheduler", dask_client.cluster.scheduler_address] if cluster else ["--sync"]
    args = ["corpus", "--model", model_dir, "--texts", texts_file, "--out", str(tmp_path / "run"), "--layer", "99",
            "--no-progress", *where]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "duat corpus: layer 99 is out of range: the model has" in err and "FAILED" not in err
    assert not (tmp_path / "run").exists()  # was left with an empty parts/ and a run.json


def test_a_refused_run_does_not_lock_its_folder(model_dir, texts_file, tmp_path, capsys):
    # a --layer typo left run.json behind, and the corrected rerun into the same folder was refused
    # ("holds a run with other settings") although no text had been analysed
    out = tmp_path / "run"
    args = ["corpus", "--model", model_dir, "--texts", texts_file, "--out", str(out), "--sync", "--no-progress"]
    assert main([*args, "--layer", "99"]) == 2
    assert main([*args, "--layer", "0"]) == 0
    assert "other settings" not in capsys.readouterr().err
    assert set(_table(out).column("layer").to_pylist()) == {0} and _table(out).num_rows == len(TEXTS)
    assert main([*args, "--layer", "1"]) == 2  # once texts are done, other settings are still refused
    assert "holds a run with other settings" in capsys.readouterr().err


def test_the_layer_check_does_not_fail_on_a_worker(model_dir, texts_file, tmp_path, dask_client, monkeypatch):
    # the check raised on the worker, which logged "Compute Failed" and its traceback before our one-line error
    from duat_kernels.corpus import runner

    tasks = []
    submit = dask_client.submit

    def recording_submit(*args, **kwargs):
        tasks.append(submit(*args, **kwargs))
        return tasks[-1]

    monkeypatch.setattr(dask_client, "submit", recording_submit)
    settings = runner.CorpusSettings(model=model_dir, layers=(99,))
    with pytest.raises(IndexError, match="layer 99 is out of range"):
        runner.run_corpus([("a", "some text")], tmp_path / "run", settings, client=dask_client, progress=False)
    assert len(tasks) == 1 and tasks[0].status == "finished"


@pytest.mark.parametrize("cluster", [False, True])
def test_a_model_that_does_not_exist_is_one_error_before_any_text(texts_file, tmp_path, cluster, dask_client,
                                                                  monkeypatch, capsys):
    # without --layer nothing loaded the model before the texts: each text failed in turn ("FAILED: text 0 (id
    # ...): FileNotFoundError: model '/nonexistent' does not exist"), exit status 1
    from duat_kernels.corpus import runner

    def analyse_text(*args):
        raise AssertionError("a text was analysed")  # not pytest.fail: a BaseException hangs a Dask worker

    monkeypatch.setattr(runner, "analyse_text", analyse_text)
    where = ["--scheduler", dask_client.cluster.scheduler_address] if cluster else ["--sync"]
    missing = str(tmp_path / "no-such-model")
    args = ["corpus", "--model", missing, "--texts", texts_file, "--out", str(tmp_path / "run"), "--no-progress", *where]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"duat corpus: model '{missing}' does not exist" in err and "FAILED" not in err
    assert not (tmp_path / "run").exists()


def test_no_progress_hides_the_bars_of_transformers_too(model_dir, texts_file, tmp_path, monkeypatch, capsys):
    # --no-progress hid duat's bar, not transformers' "Loading weights" bar of the model loaded in this process
    from transformers.utils import logging

    args = ["corpus", "--model", model_dir, "--texts", texts_file, "--sync"]
    for out, extra, shown in (("a", [], True), ("b", ["--no-progress"], False)):
        monkeypatch.setattr(analysis, "_MODELS", {})  # loaded again by this run
        assert main([*args, "--out", str(tmp_path / out), *extra]) == 0
        err = capsys.readouterr().err
        assert ("Loading weights" in err) == shown and ("corpus: " in err) == shown, err
        assert logging.is_progress_bar_enabled()  # as before the run


def test_no_progress_reaches_the_workers_of_a_local_cluster(model_dir, texts_file, tmp_path, monkeypatch, capsys):
    # each worker of --workers printed its own "Loading weights" bar: they get huggingface_hub's setting, which
    # transformers reads when it is imported there (a fresh process here)
    envs = []

    def local_cluster(**kwargs):
        envs.append(kwargs["env"])
        raise RuntimeError("no cluster started in this test")

    monkeypatch.setattr(distributed, "LocalCluster", local_cluster)
    args = ["corpus", "--model", model_dir, "--texts", texts_file, "--out", str(tmp_path / "run"), "--workers", "1"]
    assert main(args) == 2 and main([*args, "--no-progress"]) == 2
    capsys.readouterr()
    assert envs[0] == {} and envs[1] == {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-c", "from transformers.utils import logging; "
                           "print(logging.is_progress_bar_enabled())"], env={**os.environ, **envs[1]},
                          capture_output=True, text=True, cwd=CHILD_CWD, timeout=120)
    assert done.stdout == "False\n", done.stderr
