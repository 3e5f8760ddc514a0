"""LanguageModelChain on a tiny random-init Llama: P row by row from the model, π, plain callables,
save, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch

from duat_kernels.markov import LanguageModelChain, analysis, transition_probabilities

from .conftest import SYMBOLS

TAUS = (0.5, 1.0, 2.0)
# P from batched float32 forwards against one-sequence forwards: the logits differ by float32 rounding
# in differently blocked matmuls (~1e-6), which moves probabilities by at most about that / τ.
PROB_ATOL = 1e-5


def _row_from_model(model, tokenizer, chain, state: str, tau: float, bos: bool) -> np.ndarray:
    """P(· | state) straight from one full forward pass: softmax over the symbols of logits[-1] / τ."""
    ids = [tokenizer.convert_tokens_to_ids(x) for x in state]
    ids = ([tokenizer.bos_token_id] if bos else []) + ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    sym_ids = [tokenizer.convert_tokens_to_ids(s) for s in SYMBOLS]
    return torch.softmax(logits[sym_ids] / tau, dim=0).numpy()


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_rows_recomputed_from_the_model(tiny_lm, bos):
    model, tokenizer = tiny_lm
    chain = LanguageModelChain.from_model(model, SYMBOLS, 3, tokenizer=tokenizer, temperatures=TAUS,
                                          bos_id="auto" if bos else None, batch_size=5, progress=False)
    assert chain.bos_id == (tokenizer.bos_token_id if bos else None) and chain.num_states == 27
    for tau in TAUS:
        csr = chain.csr(tau)
        np.testing.assert_allclose(np.asarray(csr.sum(axis=1)).ravel(), 1.0, rtol=0, atol=1e-14)
        for state in ("abc", "ccc", "bab", "aaa", "cba"):
            row = csr.getrow(chain.state_index(state)).toarray().ravel()
            expected = _row_from_model(model, tokenizer, chain, state, tau, bos)
            successors = [chain.state_index(state[1:] + y) for y in SYMBOLS]
            np.testing.assert_allclose(row[successors], expected, rtol=0, atol=PROB_ATOL)
            assert sorted(np.flatnonzero(row)) == sorted(successors)  # nothing outside the shift
        st = analysis.stationary_distribution(chain.operator(tau))
        assert st.residual <= 1e-8
        assert np.abs(csr.T @ st.pi - st.pi).sum() <= 1e-8  # ||πP − π||₁ from the CSR matrix
    # the rows differ between contexts (a check that would catch a context mixed up with another)
    assert np.ptp(chain.probabilities(1.0)[:, 0]) > 0.1


def test_plain_callables_match_the_model(tiny_lm):
    model, tokenizer = tiny_lm
    reference = LanguageModelChain.from_model(model, SYMBOLS, 2, tokenizer=tokenizer, progress=False)
    ids = list(reference.token_ids)
    # (B, L, vocab) logits from a function, symbols given as token ids, BOS given explicitly
    seq_fn = LanguageModelChain.from_model(lambda x: model(x).logits, ids, 2, bos_id=0, progress=False)
    # (B, vocab) next-token logits
    next_fn = LanguageModelChain.from_model(lambda x: model(x).logits[:, -1], ids, 2, bos_id=0, progress=False)
    np.testing.assert_allclose(seq_fn.logits, reference.logits, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(next_fn.logits, seq_fn.logits)


def test_save_writes_one_npz_per_temperature(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    chain = LanguageModelChain.from_model(model, SYMBOLS, 2, tokenizer=tokenizer, temperatures=TAUS, progress=False)
    paths = chain.save(tmp_path)
    assert [p.name for p in paths] == ["transition_tau0.5.npz", "transition_tau1.npz", "transition_tau2.npz"]
    for tau, path in zip(TAUS, paths):
        np.testing.assert_array_equal(scipy.sparse.load_npz(path).toarray(), chain.csr(tau).toarray())


@pytest.mark.parametrize("symbols,match", [(["a", "a b"], r"'a b' must be a single token.*2 token"),
                                          (["a", "zz"], r"'zz' must be a single token"),
                                          (["a", "a"], "distinct tokens")], ids=["two-tokens", "unknown", "repeated"])
def test_symbol_errors(tiny_lm, symbols, match):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match=match):
        LanguageModelChain.from_model(model, symbols, 2, tokenizer=tokenizer, progress=False)


def test_numpy_integers_for_context_and_batch_size(tiny_lm):
    # as TransitionOperator and the rest of the API take them (e.g. a context from np.arange)
    model, tokenizer = tiny_lm
    chain = LanguageModelChain.from_model(model, SYMBOLS, np.int64(2), tokenizer=tokenizer, batch_size=np.int32(3),
                                          progress=False)
    expected = LanguageModelChain.from_model(model, SYMBOLS, 2, tokenizer=tokenizer, batch_size=3, progress=False)
    assert type(chain.context) is int and chain.context == 2
    np.testing.assert_array_equal(chain.logits, expected.logits)


@pytest.mark.parametrize("context", [0, -1, 1.5, np.int64(0), True], ids=str)
def test_context_errors(tiny_lm, context):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="context K must be an int >= 1"):
        LanguageModelChain.from_model(model, SYMBOLS, context, tokenizer=tokenizer, progress=False)


@pytest.mark.parametrize("tau", [0, -1.0, float("inf"), float("nan")], ids=str)
def test_temperature_errors(tiny_lm, tau):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="temperature τ must be a finite number > 0"):
        LanguageModelChain.from_model(model, SYMBOLS, 2, tokenizer=tokenizer, temperatures=(1.0, tau), progress=False)
    chain = LanguageModelChain(np.zeros((4, 2)), ("a", "b"), 2)
    with pytest.raises(ValueError, match="temperature τ must be a finite number > 0"):
        chain.operator(tau)


def test_tiny_and_huge_temperatures_give_probabilities_not_nan():
    """logits / τ overflowed for a tiny τ (inf - inf = NaN in every row); the limit is the argmax."""
    logits = np.array([[1.0, 3.0, 2.0], [-1e308, 1e308, 0.0]])
    for tau in (1e-310, 1e-300, 1e-3):
        np.testing.assert_array_equal(transition_probabilities(logits, tau), [[0, 1, 0], [0, 1, 0]])
    np.testing.assert_allclose(transition_probabilities(logits[:1], 1e300), np.full((1, 3), 1 / 3), rtol=1e-15)
    np.testing.assert_allclose(transition_probabilities(logits[:1], 1.0), np.exp(logits[:1]) / np.exp(logits[:1]).sum())


def test_numpy_temperatures_are_numbers():
    chain = LanguageModelChain(np.zeros((4, 2)), ("a", "b"), 2, temperatures=(np.float32(0.5), np.int64(2)))
    assert chain.temperatures == (0.5, 2.0) and all(type(t) is float for t in chain.temperatures)
    np.testing.assert_array_equal(chain.probabilities(np.float32(0.5)), np.full((4, 2), 0.5))
    with pytest.raises(ValueError, match="temperature τ must be a finite number > 0"):
        chain.operator(np.bool_(True))
    assert LanguageModelChain(np.zeros((4, 2)), ("a", "b"), 2, temperatures=0.5).temperatures == (0.5,)
    with pytest.raises(TypeError, match="temperatures must be a number or a sequence of numbers, got '0.5'"):
        LanguageModelChain(np.zeros((4, 2)), ("a", "b"), 2, temperatures="0.5")


def test_logits_must_be_real_numbers_in_two_dimensions():
    # complex logits were read as their real part (a ComplexWarning), strings failed in np.isfinite,
    # 1-D logits in transition_probabilities with NumPy's AxisError
    with pytest.raises(TypeError, match="logits must hold real numbers, got an array of dtype complex128"):
        LanguageModelChain(np.ones((4, 2)) * 1j, ("a", "b"), 2)
    with pytest.raises(TypeError, match="logits must hold real numbers, got an array of dtype <U1"):
        LanguageModelChain(np.full((4, 2), "1"), ("a", "b"), 2)
    with pytest.raises(ValueError, match=r"logits must be 2-D \(states, T\), got shape \(2,\)"):
        transition_probabilities(np.array([1.0, 2.0]), 1.0)
    with pytest.raises(TypeError, match="logits must hold real numbers"):
        transition_probabilities(np.array([[1j, 2.0]]), 1.0)


def test_temperatures_equal_to_six_digits_keep_their_own_files(tmp_path):
    """transition_tau{τ:g}.npz named 0.5 and 0.5000001 alike: the second file replaced the first, save()
    returned one path twice, and the report's JSON kept one of the two temperatures. A temperature is
    named as :g gives it when that is the number, else exactly (repr)."""
    import json

    from duat_kernels.markov import report

    taus = (0.5, 0.5000001, 2.0)
    chain = LanguageModelChain(np.random.default_rng(0).standard_normal((4, 2)) * 3, ("a", "b"), 2, taus)
    paths = report.write_report(chain, report.analyse(chain, progress=False), tmp_path, {"model": "m", "logits_seconds": 0.0},
                                plots=False)
    names = [p.name for p in paths if p.suffix == ".npz"]
    assert names == ["transition_tau0.5.npz", "transition_tau0.5000001.npz", "transition_tau2.npz"]
    for tau, name in zip(taus, names):
        np.testing.assert_array_equal(scipy.sparse.load_npz(tmp_path / name).toarray(), chain.csr(tau).toarray())
    saved = json.loads((tmp_path / "markov.json").read_text())["temperatures"]
    assert {key: r["temperature"] for key, r in saved.items()} == {"0.5": 0.5, "0.5000001": 0.5000001, "2": 2.0}


@pytest.mark.parametrize("is_decoder", [False, True])
def test_a_model_that_reads_later_tokens_is_refused(is_decoder):
    """`duat markov --model minilm` ran: BERT (bidirectional, and all-MiniLM-L6-v2 has no trained LM head)
    loaded as a "causal LM", and its logits at x_K, which read x_K itself, made a chain of no meaning."""
    transformers = pytest.importorskip("transformers", reason="the tiny BERT needs transformers: "
                                                              "pip install '.[models]'")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=9, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, is_decoder=is_decoder)
    model = transformers.BertLMHeadModel(config).eval()
    if is_decoder:  # with causal self-attention it is a language model
        chain = LanguageModelChain.from_model(model, [2, 3, 4], 2, bos_id=None, progress=False)
        assert chain.num_states == 9
    else:
        with pytest.raises(ValueError, match="not a causal language model"):
            LanguageModelChain.from_model(model, [2, 3, 4], 2, bos_id=None, progress=False)
