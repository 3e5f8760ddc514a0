"""forward_takes: what a model's forward takes (use_cache=False is passed only where it is a parameter)."""

from __future__ import annotations

import pytest
import torch

from duat_kernels.forward_signature import forward_takes
from duat_kernels.markov.logits import check_causal
from duat_kernels.models.encoder_decoder import without_cache


class _Cached(torch.nn.Module):
    def forward(self, input_ids, use_cache=None):
        return input_ids


class _Plain(torch.nn.Module):
    def forward(self, input_ids):
        return input_ids


class _Catchall(torch.nn.Module):
    def forward(self, input_ids, **kwargs):
        return input_ids


class _Builtin(torch.nn.Module):
    forward = print  # no signature to read (ValueError in inspect.signature)


@pytest.mark.parametrize("model,takes", [(_Cached(), True), (_Plain(), False), (_Catchall(), False),
                                         (_Builtin(), False)])
def test_forward_takes_reads_the_signature(model, takes):
    assert forward_takes(model, "use_cache") is takes
    assert forward_takes(model, "input_ids") is (not isinstance(model, _Builtin))


@pytest.mark.parametrize("model_class", [_Cached, _Plain])
def test_check_causal_and_the_capture_pass_use_cache_only_where_it_is_taken(model_class):
    # both asked the forward's signature the same question, each in its own code; now both ask forward_takes
    calls = []

    class Recording(model_class):
        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            return None  # no logits: check_causal has nothing to check

    model = Recording()
    check_causal(model, [1, 2])
    taken = model_class is _Cached
    assert calls == [{"input_ids": calls[0]["input_ids"], **({"use_cache": False} if taken else {})}]
    assert without_cache(model, {}, {}) == ({"use_cache": False} if taken else {})
    assert without_cache(model, {"use_cache": True}, {}) == {}  # given: left as given
