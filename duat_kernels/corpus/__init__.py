"""`duat corpus`: W' analyses of many texts and layers, on one process or a Dask cluster.

    settings = duat_kernels.corpus.CorpusSettings(model="minilm", layers=(0, 5))
    rows = duat_kernels.corpus.analyse_text(settings, 0, "t0", "Some text.")      # one row per layer
    duat_kernels.corpus.run_corpus(read_texts("texts.jsonl"), "out", settings, client)  # client None: here
"""

from duat_kernels.corpus.analysis import CorpusSettings, analyse_text, cached_model
from duat_kernels.corpus.runner import read_texts, run_corpus, summary_table

__all__ = ["CorpusSettings", "analyse_text", "cached_model", "read_texts", "run_corpus", "summary_table"]
