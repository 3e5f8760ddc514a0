"""TransformerLens 4.x bridges: W' x' + b' from hook_pattern, W_V, W_O, b_V, b_O reproduces every
layer's hook_attn_out, with raw weights and in compatibility mode (folded layer norms)."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install '.[models]'")
pytest.importorskip("transformer_lens", reason="needs TransformerLens 4.x: pip install '.[lens]'")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402  (a dependency of transformers)
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

TOLERANCE = 1e-5
VOCAB = 64


def _tokenizer():
    """A word-level tokenizer built in memory (no files, no hub): w0 ... w59 and special tokens."""
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", *(f"w{i}" for i in range(VOCAB - 4))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                                eos_token="[EOS]", unk_token="[UNK]")


CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                            bos_token_id=1, eos_token_id=2),
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                              attention_bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def bridge(request, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param](), attn_implementation="eager").eval()
    with torch.no_grad():  # random-init biases and norm weights are trivial: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln" in name:
                p.normal_(std=0.5)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)  # TransformerLens reloads the tokenizer from its folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return TransformerBridge.boot_transformers(str(folder), hf_model=model, tokenizer=tokenizer)


def _check(layers, count):
    assert len(layers) == count
    for layer in layers:
        assert layer.relative_error() <= TOLERANCE, layer.name
        assert layer.relative_error(layer.hvo_matrix(dtype=torch.float64)) <= TOLERANCE, layer.name


@pytest.mark.parametrize("compatibility", [False, True])
def test_bridge_layers_reproduce_hook_attn_out(bridge, compatibility):
    if compatibility:
        bridge.enable_compatibility_mode(disable_warnings=True)
    tokens = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    layers = dk.models.attention_layers(bridge, tokens)
    _check(layers, 2)
    assert layers[0].attn.shape == (2, 4, 7, 7)
    _check(dk.models.attention_layers(bridge, "w1 w2 w3 w4", layers=[-1]), 1)


def test_bridge_bad_arguments(bridge):
    with pytest.raises(IndexError, match="layer 2 is out of range: the model has 2 attention layers"):
        dk.models.attention_layers(bridge, torch.tensor([[5, 6]]), layers=[2])
    with pytest.raises(TypeError, match="tokens must be a"):
        dk.models.attention_layers(bridge, torch.randn(2, 3))


def test_bridge_refuses_what_it_cannot_honour(bridge):
    tokens = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    # capture='qk' was ignored: A of every layer was captured and stored, the memory the caller meant to save
    with pytest.raises(ValueError, match=r"capture='qk' is not available for a TransformerLens bridge"):
        dk.models.attention_layers(bridge, tokens, capture="qk")
    # a mask of another length was applied by the model and then failed after the forward pass in
    # relative_error's indexing ('The shape of the mask [2, 5] at index 1 does not match ...'), an IndexError
    for mask in (torch.ones(2, 5, dtype=torch.long), torch.ones(7, dtype=torch.long), [[1] * 7] * 2):
        with pytest.raises(ValueError, match=r"attention_mask must be a \(B, N\) = \(2, 7\) tensor"):
            dk.models.attention_layers(bridge, tokens, attention_mask=mask)
