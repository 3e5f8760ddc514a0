"""A tiny random-init Llama causal LM with a tiny word-level tokenizer, saved once as a local folder."""

from __future__ import annotations

import pytest
import torch

VOCAB = ["<s>", "<unk>", "a", "b", "c", "d", "ab", "x", "y"]
NEEDS_TRANSFORMERS = "the tiny model needs transformers: pip install '.[models]'"
SYMBOLS = ["a", "b", "c"]  # single tokens; "a b" is two tokens, "zz" is unknown


def tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers", reason=NEEDS_TRANSFORMERS)
    transformers = pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")


def tiny_causal_lm(seed: int = 0):
    """Llama, 2 layers, GQA 4/2, vocab 9; weights at std 0.5 so that next-token distributions differ per context."""
    transformers = pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1, initializer_range=0.5,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' forwards take microseconds; with several threads on a loaded machine the
    thread pool's synchronisation costs ~0.3 s per call instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_lm():
    return tiny_causal_lm(), tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory, tiny_lm):
    model, tokenizer = tiny_lm
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
