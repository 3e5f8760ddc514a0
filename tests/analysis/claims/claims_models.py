"""Fixtures and helpers of the claims tests: tiny random-init BERT (post-LN, GELU, biases) and Llama (pre-RMSNorm, GQA, SwiGLU) models with a
word-level tokenizer, so that every claim's identity is checked against the real module code."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the claims tests need transformers: pip install '.[models]'")

WORDS = "the quick brown fox jumps over lazy dog because attention is all it needs summarize translate into french".split()


def tiny_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", "?", ".", *WORDS]))
    return transformers.BertTokenizer(str(vocab))


def tiny_model(family: str, dtype: torch.dtype = torch.float64, seed: int = 0, vocab: int = 40):
    """A 3-layer model of the family with every parameter (biases and norm weights included) random."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=24, num_hidden_layers=3, intermediate_size=40,
                  max_position_embeddings=64, attn_implementation="eager")
    if family == "bert":
        model = transformers.BertModel(transformers.BertConfig(num_attention_heads=4, **common), add_pooling_layer=False)
    else:
        model = transformers.LlamaModel(transformers.LlamaConfig(num_attention_heads=6, num_key_value_heads=2, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("LayerNorm" in name or "norm" in name):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory)


@pytest.fixture(scope="session", params=["bert", "llama"])
def family(request):
    return request.param


def encode(tokenizer, text: str = "the quick brown fox jumps over the lazy dog") -> dict:
    return dict(tokenizer([text], return_tensors="pt"))
