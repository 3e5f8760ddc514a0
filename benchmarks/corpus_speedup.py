"""How much faster is `duat corpus` with K Dask worker processes than with one?

For each K: start a LocalCluster of K single-threaded worker processes, load the model once in
every worker (timed: "start"), then time run_corpus over the texts into a fresh folder
("analysis"); last, --sync in this process. Prints a Markdown table.

    python benchmarks/corpus_speedup.py --model minilm --texts benchmarks/corpus_texts.jsonl --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--texts", default=os.path.join(os.path.dirname(__file__), "corpus_texts.jsonl"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from duat_kernels.corpus import CorpusSettings, cached_model, read_texts, run_corpus

    load_before = os.getloadavg()
    texts = read_texts(args.texts)
    settings = CorpusSettings(model=args.model)
    rows = []
    cached_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.workers:
            start = time.perf_counter()
            with LocalCluster(n_workers=k, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                client.run(lambda: cached_model(args.model) and None)  # every worker loads the model once
                ready = time.perf_counter()
                run_corpus(texts, os.path.join(tmp, f"k{k}"), settings, client, progress=False)
                rows.append((f"--workers {k}", ready - start, time.perf_counter() - ready))
        start = time.perf_counter()
        run_corpus(texts, os.path.join(tmp, "sync"), settings, None, progress=False)
        rows.append(("--sync (this process, model loaded before)", float("nan"), time.perf_counter() - start))
    base = next((r[2] for r in rows if r[0] == "--workers 1"), rows[0][2])
    print(f"{len(texts)} texts, model {args.model}, all layers; load average before: "
          f"{' '.join(f'{x:.1f}' for x in load_before)}; {os.cpu_count()} CPUs\n")
    print("| run | start + model load (s) | analysis (s) | speed-up vs 1 worker |\n|---|---:|---:|---:|")
    for name, ready, analysis in rows:
        print(f"| {name} | {ready:.1f} | {analysis:.1f} | {base / analysis:.2f} |")


if __name__ == "__main__":
    main()
