"""An nnsight-wrapped model gives the same layers as the model itself. Run in a subprocess: importing
nnsight gives every Python object a `.save` attribute, which must not leak into the other tests."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import CHILD_CWD

SCRIPT = """
import nnsight, torch, transformers
import duat_kernels as dk

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
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("nnsight") is None or importlib.util.find_spec("transformers") is None,
                    reason="needs nnsight and transformers: pip install '.[nnsight,models]'")
def test_nnsight_wrapped_model():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=CHILD_CWD)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
