"""A causal language model as a Markov chain on the T^K sequences of K symbols (Zekri et al., arXiv 2410.02724).

    chain = LanguageModelChain.from_model(model, list("0123456789"), 3, tokenizer=tok, temperatures=(0.5, 1, 2))
    op = chain.operator(1.0)                          # structured P: .matvec .rmatvec .to_csr
    pi = stationary_distribution(op).pi; spectral_gap(op).gap; mixing_time(op, pi)
    chain.save(DIR)                                   # DIR/transition_tau{τ}.npz
"""

from duat_kernels.markov.analysis import (SpectralGap, Stationary, constant_states, mixing_time, residual,
                                          spectral_gap, stationary_distribution, token_marginal, tv_curves,
                                          worst_tv_curve)
from duat_kernels.markov.chain import LanguageModelChain, transition_probabilities
from duat_kernels.markov.logits import context_logits, state_sequences, symbol_token_ids
from duat_kernels.markov.operator import TransitionOperator

__all__ = ["LanguageModelChain", "TransitionOperator", "transition_probabilities", "context_logits", "state_sequences",
           "symbol_token_ids", "stationary_distribution", "Stationary", "residual", "token_marginal", "spectral_gap",
           "SpectralGap", "constant_states", "tv_curves", "worst_tv_curve", "mixing_time"]
