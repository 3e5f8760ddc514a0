"""A causal language model as a Markov chain on the T^K sequences of K symbols.

Zekri et al., "Large Language Models as Markov Chains" (arXiv 2410.02724). With symbols
V = (v_0, ..., v_{T-1}) (each one token) and context length K, the states are s = (x_1, ..., x_K),
index(s) = Σ_k x_k T^{K-k} (base T, x_1 most significant, symbols in the order given). The model
reads [BOS] x_1 ... x_K (BOS when the model has one; no chat template) and

    P(y | s) = softmax_{y ∈ V}(logits[V] / τ),        s -> (x_2, ..., x_K, y)

(the logits restricted to V and renormalised, at temperature τ).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse

from duat_kernels._validation import numeric_array
from duat_kernels.markov.logits import (BOS_AUTO, check_causal, check_context, context_logits, default_bos_id,
                                        symbol_token_ids)
from duat_kernels.markov.operator import TransitionOperator, state_count


def check_temperature(tau) -> float:
    # numbers.Real: Python and NumPy ints and floats (np.float32 is no float subclass)
    if isinstance(tau, (bool, np.bool_)) or not isinstance(tau, numbers.Real) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"temperature τ must be a finite number > 0, got {tau!r}")
    return float(tau)


def check_temperatures(temperatures) -> tuple[float, ...]:
    """One temperature or a sequence of them (not a string) -> a tuple of floats."""
    if isinstance(temperatures, numbers.Real):
        return (check_temperature(temperatures),)
    if isinstance(temperatures, (str, bytes)) or not hasattr(temperatures, "__iter__"):
        raise TypeError(f"temperatures must be a number or a sequence of numbers, got {temperatures!r}")
    return tuple(check_temperature(t) for t in temperatures)


def transition_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Q[s, y] = softmax_y(logits[s, :] / τ): (S, T) logits -> (S, T) float64, rows summing to one."""
    logits = numeric_array("logits", logits).astype(np.float64, copy=False)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (states, T), got shape {logits.shape}")
    tau = check_temperature(temperature)
    # the maximum is subtracted before dividing: logits / τ overflows for a tiny τ (inf - inf = NaN);
    # here an overflow is a difference of -inf, an exact 0 after exp
    with np.errstate(over="ignore"):
        q = np.exp((logits - logits.max(axis=1, keepdims=True)) / tau)
    return q / q.sum(axis=1, keepdims=True)


def temperature_label(temperature: float) -> str:
    """τ as a name (files, report keys): as :g writes it (0.5, 1, 2) when that is the number, else exactly
    (0.5000001: :g wrote 0.5, so the files and report entries of two temperatures replaced one another)."""
    short = f"{temperature:g}"
    return short if float(short) == temperature else repr(float(temperature))


def transition_filename(temperature: float) -> str:
    return f"transition_tau{temperature_label(temperature)}.npz"


@dataclass(eq=False)
class LanguageModelChain:
    """The chain of a model on symbols with context K: logits (T^K, T) at the symbols, one row per state.

    `.operator(τ)` is the structured P (`TransitionOperator`), `.csr(τ)` the scipy matrix,
    `.save(DIR)` writes DIR/transition_tau{τ}.npz for each of `.temperatures`.
    """

    logits: np.ndarray
    symbols: tuple[str, ...]
    context: int
    temperatures: tuple[float, ...] = (1.0,)
    token_ids: tuple[int, ...] | None = None
    bos_id: int | None = None
    _operators: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.symbols = tuple(str(s) for s in self.symbols)
        self.context = check_context(self.context)
        self.temperatures = check_temperatures(self.temperatures)
        t = len(self.symbols)
        if t < 2:
            raise ValueError(f"need at least 2 symbols, got {list(self.symbols)}")
        if len(set(self.symbols)) != t:  # state_index would be ambiguous
            raise ValueError(f"symbols must be distinct, got {list(self.symbols)}")
        self.logits = numeric_array("logits", self.logits)
        if self.logits.shape != (state_count(t, self.context), t):
            raise ValueError(f"logits must have shape (T^K, T) = ({t ** self.context}, {t}) for T={t}, "
                             f"K={self.context}, got {self.logits.shape}")
        if not np.isfinite(self.logits).all():
            raise ValueError("logits must be finite (the model returned NaN or inf at some context)")

    @classmethod
    def from_model(cls, model, symbols: Sequence, context: int, *, tokenizer=None, temperatures=(1.0,),
                   bos_id: int | None | str = BOS_AUTO, batch_size: int = 64,
                   cache_dir: str | os.PathLike | None = None, model_id: str | None = None,
                   share_prefix: bool = True, progress: bool = True) -> LanguageModelChain:
        """Evaluate model (a Hugging Face causal LM or a callable input_ids (B, L) -> next-token logits)
        on all T^K contexts. With a tokenizer, symbols are strings, each a single token; without one,
        symbols are token ids. bos_id "auto": the tokenizer's or the model config's BOS id, if any;
        None: no BOS. A torch module whose logits read later tokens (a masked LM) is refused (`check_causal`).
        batch_size, cache_dir, model_id, share_prefix: see `context_logits`."""
        context = check_context(context)
        taus = check_temperatures(temperatures)
        if tokenizer is not None:
            ids = symbol_token_ids(tokenizer, symbols)
        else:
            if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in symbols):
                raise TypeError(f"without a tokenizer, symbols must be token ids (ints >= 0), got {list(symbols)}")
            ids = [int(s) for s in symbols]
            if len(set(ids)) != len(ids):
                raise ValueError(f"symbols must be distinct token ids, got {ids}")
        if bos_id == BOS_AUTO:
            bos_id = default_bos_id(model, tokenizer)
        check_causal(model, ids, bos_id)
        logits = context_logits(model, ids, context, bos_id=bos_id, batch_size=batch_size, cache_dir=cache_dir,
                                model_id=model_id, share_prefix=share_prefix, progress=progress)
        return cls(logits, tuple(str(s) for s in symbols), context, taus, tuple(ids), bos_id)

    @property
    def num_symbols(self) -> int:
        return len(self.symbols)

    @property
    def num_states(self) -> int:
        return self.logits.shape[0]

    def state_index(self, sequence: Sequence[str]) -> int:
        """index of (x_1, ..., x_K) given as K symbols (or a string of K one-character symbols)."""
        seq = list(sequence)
        if len(seq) != self.context or any(x not in self.symbols for x in seq):
            raise ValueError(f"a state is {self.context} symbols from {list(self.symbols)}, got {sequence!r}")
        index = 0
        for x in seq:
            index = index * self.num_symbols + self.symbols.index(x)
        return index

    def state_label(self, index: int) -> str:
        """The K symbols of state `index`, joined (with spaces unless every symbol is one character)."""
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < self.num_states:
            raise ValueError(f"index must be a state index in [0, {self.num_states}), got {index!r}")
        digits, t = [], self.num_symbols
        for _ in range(self.context):
            index, d = divmod(index, t)
            digits.append(self.symbols[d])
        sep = "" if all(len(s) == 1 for s in self.symbols) else " "
        return sep.join(reversed(digits))

    def probabilities(self, temperature: float) -> np.ndarray:
        """(T^K, T): Q[s, y] = P(y | s) at temperature τ."""
        return transition_probabilities(self.logits, temperature)

    def operator(self, temperature: float) -> TransitionOperator:
        """The structured transition operator P at temperature τ (cached per τ)."""
        tau = check_temperature(temperature)
        if tau not in self._operators:
            self._operators[tau] = TransitionOperator(self.probabilities(tau), self.num_symbols, self.context)
        return self._operators[tau]

    def csr(self, temperature: float) -> scipy.sparse.csr_matrix:
        """P at temperature τ as a (T^K, T^K) scipy CSR matrix."""
        return self.operator(temperature).to_csr()

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write directory/transition_tau{τ}.npz (scipy.sparse.save_npz of P) for each temperature."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for tau in self.temperatures:
            path = folder / transition_filename(tau)
            scipy.sparse.save_npz(path, self.csr(tau))
            paths.append(path)
        return paths
