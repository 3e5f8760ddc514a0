"""`duat corpus`: W' analyses of many texts and layers, on one process or a Dask cluster.

    rows = duat_kernels.corpus.analyse_text("minilm", 0, "t0", "Some text.", layers=None, grid=64)
    duat_kernels.corpus.run_corpus(texts, out_dir, settings, client)   # results.parquet + summary.md
"""

from duat_kernels.corpus.analysis import CorpusSettings, analyse_text, cached_model
from duat_kernels.corpus.runner import read_texts, run_corpus, summary_table

__all__ = ["CorpusSettings", "analyse_text", "cached_model", "read_texts", "run_corpus", "summary_table"]
