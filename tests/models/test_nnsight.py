"""An nnsight-wrapped model gives the same layers as the model itself."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install '.[models]'")
nnsight = pytest.importorskip("nnsight", reason="needs nnsight: pip install '.[nnsight]'")


def test_nnsight_wrapped_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=100, attention_bias=True)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    wrapped = dk.models.attention_layers(nnsight.NNsight(model), input_ids=ids)
    direct = dk.models.attention_layers(model, input_ids=ids)
    assert len(wrapped) == 2
    for a, b in zip(wrapped, direct):
        assert a.relative_error(a.hvo_matrix(dtype=torch.float64)) <= 1e-5
        torch.testing.assert_close(a.attn, b.attn)
        torch.testing.assert_close(a.output, b.output)
