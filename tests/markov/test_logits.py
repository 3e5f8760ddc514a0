"""The logits of all contexts: state order, plain callables, the on-disk cache (reuse across
temperatures and settings, resume after an interruption) and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from duat_kernels.markov import LanguageModelChain, context_logits, state_sequences

from .conftest import SYMBOLS, tiny_causal_lm


class CountingModel:
    """A plain callable input_ids (B, L) -> (B, L, vocab) that counts its calls and can fail at a given call."""

    def __init__(self, model, fail_at: int | None = None):
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def __call__(self, input_ids):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise KeyboardInterrupt("interrupted")
        return self.model(input_ids=input_ids).logits


def test_state_order_is_base_t():
    seqs = state_sequences(3, 3)
    assert seqs.shape == (27, 3)
    np.testing.assert_array_equal(np.ravel_multi_index(tuple(seqs.T), (3, 3, 3)), np.arange(27))
    np.testing.assert_array_equal(seqs[5], [0, 1, 2])  # 5 = 0·9 + 1·3 + 2


def test_cache_reused_across_temperatures(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    first = CountingModel(model)
    chain = LanguageModelChain.from_model(first, SYMBOLS, 3, tokenizer=tokenizer, temperatures=(1.0,), batch_size=6,
                                          cache_dir=tmp_path, model_id="tiny", progress=False)
    assert first.calls == math.ceil(27 / 6)
    again = CountingModel(model)
    other = LanguageModelChain.from_model(again, SYMBOLS, 3, tokenizer=tokenizer, temperatures=(0.25, 3.0),
                                          batch_size=6, cache_dir=tmp_path, model_id="tiny", progress=False)
    assert again.calls == 0
    np.testing.assert_array_equal(other.logits, chain.logits)
    # another K, another cache entry; a module is keyed by its weights, so another model does not hit it
    LanguageModelChain.from_model(again, SYMBOLS, 2, tokenizer=tokenizer, cache_dir=tmp_path, model_id="tiny",
                                  progress=False)
    assert again.calls == 1
    other_model = tiny_causal_lm(seed=1)
    a = context_logits(model, [2, 3], 2, bos_id=0, cache_dir=tmp_path, progress=False)
    b = context_logits(other_model, [2, 3], 2, bos_id=0, cache_dir=tmp_path, progress=False)
    assert not np.allclose(a, b)
    assert len(list(tmp_path.glob("logits_*"))) == 4


def test_interrupted_run_resumes(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    uninterrupted = LanguageModelChain.from_model(CountingModel(model), SYMBOLS, 3, tokenizer=tokenizer, batch_size=6,
                                                  progress=False)
    with pytest.raises(KeyboardInterrupt):
        LanguageModelChain.from_model(CountingModel(model, fail_at=3), SYMBOLS, 3, tokenizer=tokenizer, batch_size=6,
                                      cache_dir=tmp_path, model_id="tiny", progress=False)
    (folder,) = tmp_path.glob("logits_*")
    assert len(list(folder.glob("rows_*.npy"))) == 2 and not (folder / "logits.npy").exists()
    resumed = CountingModel(model)
    chain = LanguageModelChain.from_model(resumed, SYMBOLS, 3, tokenizer=tokenizer, batch_size=6, cache_dir=tmp_path,
                                          model_id="tiny", progress=False)
    assert resumed.calls == math.ceil((27 - 2 * 6) / 6)
    np.testing.assert_array_equal(chain.logits, uninterrupted.logits)
    assert (folder / "logits.npy").exists() and not list(folder.glob("rows_*.npy"))


def test_callable_errors(tmp_path):
    with pytest.raises(ValueError, match="needs model_id="):
        context_logits(lambda x: torch.zeros(x.shape[0], 5), [1, 2], 2, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"next-token logits \(B, vocab\) or \(B, L, vocab\)"):
        context_logits(lambda x: torch.zeros(5), [1, 2], 2, progress=False)
    with pytest.raises(TypeError, match="without a tokenizer, symbols must be token ids"):
        LanguageModelChain.from_model(lambda x: torch.zeros(x.shape[0], 5), ["a", "b"], 2, progress=False)


class TokenCounter:
    """Counts the tokens that enter the model's embedding (a forward pre-hook)."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.tokens += args[0].numel()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bos_id", [0, None], ids=["bos", "no-bos"])
def test_shared_prefix_matches_full_forward(tiny_lm, arch, bos_id):
    """Each group of T contexts differing in x_K runs its prefix once and the T last tokens on its KV cache:
    the same logits (float32 rounding) from B/T·(L−1) + B tokens instead of B·L."""
    transformers = pytest.importorskip("transformers")
    if arch == "llama":
        model = tiny_lm[0]
    else:
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=9, n_embd=16, n_layer=2, n_head=2, n_positions=16, initializer_range=0.5, bos_token_id=0,
            eos_token_id=1)).eval()
    counter = TokenCounter(model)
    full = context_logits(model, [2, 3, 4], 3, bos_id=bos_id, batch_size=9, share_prefix=False, progress=False)
    full_tokens, counter.tokens = counter.tokens, 0
    shared = context_logits(model, [2, 3, 4], 3, bos_id=bos_id, batch_size=9, progress=False)
    counter.handle.remove()
    length = 3 + (bos_id is not None)
    assert full_tokens == 27 * length and counter.tokens == 9 * (length - 1) + 27
    np.testing.assert_allclose(shared, full, rtol=0, atol=1e-5)


def test_batches_are_whole_groups(tiny_lm):
    """batch_size is rounded down to a multiple of T (at least T): 4 -> 3 contexts per call for T = 3."""
    model, _ = tiny_lm
    counting = CountingModel(model)
    context_logits(counting, [2, 3, 4], 3, bos_id=0, batch_size=4, progress=False)
    assert counting.calls == 9
