"""Run `analyse_text` over a corpus, in-process or as one Dask task per text, and gather the rows.

Each text's rows are written as soon as they arrive, to DIR/parts/<index>-<sha256 of the text>.parquet
(written to a temporary name, then renamed), by the client: workers need no shared file system.
A rerun skips the texts whose part exists. A worker that dies mid-task loses nothing: the
scheduler runs the task again elsewhere (up to distributed.scheduler.allowed-failures times).
At the end the parts of the corpus are merged into DIR/results.parquet and summarised per layer
into DIR/summary.md.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from duat_kernels import strict_json
from duat_kernels._validation import nan_max
from duat_kernels.corpus.analysis import CorpusSettings, analyse_text, check_layers, text_sha256


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError("duat corpus needs pyarrow: pip install 'duat-kernels[dask]'") from exc
    return pyarrow


def schema():
    pa = _pyarrow()
    f64, i64, s = pa.float64(), pa.int64(), pa.string()
    return pa.schema([("text_index", i64), ("text_id", s), ("text_sha256", s), ("tokens", pa.list_(s)),
                      ("n_tokens", i64), ("layer", i64), ("heads", i64), ("kv_heads", i64), ("m_in", i64),
                      ("m_out", i64), ("rel_error", f64), ("frobenius", f64), ("spectral_norm", f64), ("grid", i64),
                      ("block_norms", pa.list_(f64)), ("contributions", pa.list_(f64)), ("self_contribution", f64),
                      ("mean_distance", f64)])


def read_texts(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(text_id, text) for each line of a JSON Lines file: {"text": ..., "id": ...} ("id"
    optional, default the line number) or a bare JSON string; blank lines are skipped. The file is UTF-8 (JSON's
    encoding), whatever the locale says."""
    data = Path(path).read_bytes()
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # was "'utf-8' codec can't decode byte 0xff in position 0", naming no file
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); JSON Lines files are UTF-8") \
            from None
    texts, seen = [], {}
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg}); expected {{\"text\": ...}} per line") from exc
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            text_id = item.get("id", number)
            if isinstance(text_id, bool) or not isinstance(text_id, (str, int)):  # null became the id "None"
                raise ValueError(f"{path}:{number}: \"id\" must be a string or an integer, got {json.dumps(text_id)}")
            texts.append((str(text_id), item["text"]))
        elif isinstance(item, str):
            texts.append((str(number), item))
        else:
            raise ValueError(f"{path}:{number}: expected {{\"text\": \"...\"}} or a JSON string, got {line[:60]!r}")
        if texts[-1][0] in seen:  # the results are keyed by id: two texts of one id cannot be told apart
            raise ValueError(f"{path}:{number}: id {texts[-1][0]!r} was already used on line {seen[texts[-1][0]]}")
        seen[texts[-1][0]] = number
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts


def _part_path(parts: Path, index: int, text: str) -> Path:
    return parts / f"{index:06d}-{text_sha256(text)[:16]}.parquet"


def _write_table(rows: list[dict], path: Path) -> None:
    pa = _pyarrow()
    tmp = path.with_name(path.name + ".tmp")
    pa.parquet.write_table(pa.Table.from_pylist(rows, schema=schema()), tmp)
    os.replace(tmp, path)


def _check_settings(out: Path, parts: Path, settings: CorpusSettings) -> None:
    """Refuse other settings than those of the results already in out; a run that finished no text (refused,
    interrupted) leaves nothing to protect, so its record (out/run.json, written by run_corpus) is replaced."""
    record = out / "run.json"
    if record.exists() and any(parts.glob("*.parquet")):
        previous = json.loads(record.read_text())
        if previous != settings.to_json():
            raise ValueError(f"{out} holds a run with other settings ({previous}); use another --out "
                             "or the same --model, --layer, --grid and --threads")


def _layer_check(settings: CorpusSettings) -> Exception | None:
    """check_layers' error, returned rather than raised: as a Dask task a raised error would also be logged
    with its traceback by the worker ("Compute Failed") before the client's one-line message."""
    try:
        check_layers(settings)
    except Exception as exc:
        return exc
    return None


def run_corpus(texts: list[tuple[str, str]], out: str | os.PathLike, settings: CorpusSettings, client=None,
               progress: bool = True) -> tuple[Path, list[str]]:
    """Analyse every text (skipping those already in out/parts), then merge into out/results.parquet.

    Args:
        texts: (text_id, text) pairs, e.g. from read_texts.
        out: output folder (created).
        settings: what to compute.
        client: a dask.distributed Client (one task per text), or None to run here, one by one.
        progress: tqdm progress bar over texts.

    Returns:
        (path of results.parquet, messages of the texts that failed: their parts are missing).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    parts = out / "parts"
    _check_settings(out, parts, settings)
    todo = [(i, tid, text) for i, (tid, text) in enumerate(texts) if not _part_path(parts, i, text).exists()]
    # the model (a path that does not exist) and the layers, checked once where the texts run (the model is loaded
    # there anyway), not once per text; before out is written to: a refused run leaves no folder behind
    if todo:
        error = _layer_check(settings) if client is None else client.submit(_layer_check, settings, pure=False).result()
        if error is not None:
            raise error
    parts.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(strict_json.dumps(settings.to_json()))
    failures = []
    with tqdm(total=len(texts), initial=len(texts) - len(todo), unit="text", desc="corpus",
              disable=not progress) as bar:
        if client is None:
            for i, tid, text in todo:
                try:
                    _write_table(analyse_text(settings, i, tid, text), _part_path(parts, i, text))
                except Exception as exc:  # as on a cluster: report and go on
                    failures.append(f"text {i} (id {tid}): {type(exc).__name__}: {exc}")
                bar.update(1)
        else:
            from distributed import as_completed

            futures = {client.submit(analyse_text, settings, i, tid, text, pure=False,
                                     key=f"duat-corpus-{i}-{text_sha256(text)[:16]}"): (i, tid, text)
                       for i, tid, text in todo}
            for future in as_completed(futures):
                i, tid, text = futures[future]
                try:
                    _write_table(future.result(), _part_path(parts, i, text))
                except Exception as exc:  # report and go on: the other texts still count
                    failures.append(f"text {i} (id {tid}): {type(exc).__name__}: {exc}")
                bar.update(1)
    pa = _pyarrow()
    done = [p for p in (_part_path(parts, i, text) for i, (_, text) in enumerate(texts)) if p.exists()]
    table = pa.concat_tables([pa.parquet.read_table(p, schema=schema()) for p in done]) if done \
        else schema().empty_table()
    table = table.sort_by([("text_index", "ascending"), ("layer", "ascending")])
    results = out / "results.parquet"
    tmp = out / "results.parquet.tmp"
    pa.parquet.write_table(table, tmp)
    os.replace(tmp, results)
    return results, failures


def max_rel_error(results: str | os.PathLike) -> float:
    """The worst exactness check in a results.parquet (0 when it has no rows)."""
    errors = _pyarrow().parquet.read_table(results, columns=["rel_error"]).column("rel_error").to_pylist()
    return nan_max(errors, default=0.0)


def summary_table(results: str | os.PathLike, title: str) -> str:
    """Markdown table per layer over the texts: counts, worst exactness, mean norms and locality."""
    table = _pyarrow().parquet.read_table(results, columns=[
        "layer", "n_tokens", "rel_error", "frobenius", "spectral_norm", "self_contribution", "mean_distance"])
    rows = table.to_pylist()
    lines = [f"## {title}", "",
             "| layer | texts | tokens (mean) | max rel. error | mean ‖W'‖_F | mean ‖W'‖_2 | mean ‖W'‖_2/‖W'‖_F "
             "| self share | mean distance |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layer in sorted({r["layer"] for r in rows}):
        group = [r for r in rows if r["layer"] == layer]
        mean = lambda key: statistics.fmean(r[key] for r in group)  # noqa: E731
        ratio = statistics.fmean(r["spectral_norm"] / r["frobenius"] if r["frobenius"] else math.nan for r in group)
        lines.append(f"| {layer} | {len(group)} | {mean('n_tokens'):.1f} | {nan_max(r['rel_error'] for r in group):.2e} "
                     f"| {mean('frobenius'):.3g} | {mean('spectral_norm'):.3g} | {ratio:.3f} "
                     f"| {mean('self_contribution'):.1%} | {mean('mean_distance'):.2f} |")
    lines += ["", "rel. error: ‖W' x' + b' − output‖ / ‖output‖ (matrix-free); self share: mean over output tokens "
              "n of ‖W'_nn x_n‖ / Σ_m ‖W'_nm x_m‖; mean distance: the same weights on |n − m| (tokens)."]
    return "\n".join(lines)
