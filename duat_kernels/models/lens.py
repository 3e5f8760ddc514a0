"""TransformerLens 4.x (`TransformerBridge`): every attention layer's W' from `hook_pattern`, W_V, W_O, b_V, b_O.

    bridge = TransformerBridge.boot_transformers(folder, hf_model=model, tokenizer=tok)
    layers = duat_kernels.models.attention_layers(bridge, tokens)   # tokens (B, N) ids or text

Works with raw weights and after `bridge.enable_compatibility_mode()` (folded layer norms, centred
weights, value biases folded into b_O): x is what the value projection reads (`attn.v.hook_in`),
and each layer's W' x' + b' reproduces its `hook_attn_out`.
"""

from __future__ import annotations

import torch

from duat_kernels.models.capture import AttentionLayer, select_layers

LENS_EXTRA = "pip install 'duat-kernels[lens]'"


def is_bridge(model) -> bool:
    """True for a TransformerLens TransformerBridge (checked without importing transformer_lens)."""
    return any(cls.__name__ == "TransformerBridge" and cls.__module__.startswith("transformer_lens")
               for cls in type(model).__mro__)


def _tokens(bridge, tokens) -> torch.Tensor:
    if isinstance(tokens, (str, list)) and tokens and all(isinstance(t, str) for t in
                                                          ([tokens] if isinstance(tokens, str) else tokens)):
        return bridge.to_tokens(tokens)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() not in (1, 2) or tokens.dtype.is_floating_point:
        raise TypeError(f"tokens must be a (B, N) or (N,) tensor of token ids, a str or a list of str, got {tokens!r}")
    return tokens if tokens.dim() == 2 else tokens.unsqueeze(0)


def _weights(attn_bridge) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """W_V (h_kv, M_in, d), W_O (h, d, M_out), b_V (h_kv, d), b_O (M_out,) -> nn.Linear convention:
    w_v (h_kv·d, M_in), w_o (M_out, h·d), b_v (h_kv·d,), b_o (M_out,)."""
    w_v3, w_o3 = attn_bridge.W_V.detach(), attn_bridge.W_O.detach()
    w_v = w_v3.transpose(1, 2).reshape(-1, w_v3.shape[1])
    w_o = w_o3.reshape(-1, w_o3.shape[-1]).T
    b_v, b_o = attn_bridge.b_V, attn_bridge.b_O
    return w_v, w_o, None if b_v is None else b_v.detach().reshape(-1), None if b_o is None else b_o.detach()


def bridge_attention_layers(bridge, tokens, layers: list[int] | None = None,
                            attention_mask: torch.Tensor | None = None) -> list[AttentionLayer]:
    """The selected attention layers of a TransformerBridge on tokens, in order.

    Args:
        bridge: transformer_lens.model_bridge.TransformerBridge (raw or in compatibility mode).
        tokens: (B, N) or (N,) token ids, or text (passed through bridge.to_tokens).
        layers: layer indices (negative counts from the end); default all.
        attention_mask: optional (B, N) mask given to the model; its zeros are left out of errors.

    Returns:
        AttentionLayer per layer: attn (B, h, N, N) from hook_pattern, x (B, N, M) from attn.v.hook_in,
        output (B, N, M) from hook_attn_out.
    """
    selected = select_layers(layers, len(bridge.blocks))
    ids = _tokens(bridge, tokens)
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor)
                                           and tuple(attention_mask.shape) == tuple(ids.shape)):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a (B, N) = {tuple(ids.shape)} tensor, the shape of the tokens, "
                         f"got {got}")
    hooks = ("attn.hook_pattern", "attn.v.hook_in", "hook_attn_out")
    wanted = {f"blocks.{i}.{hook}" for i in selected for hook in hooks}
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name in wanted, **kwargs)
    token_mask = None if attention_mask is None else attention_mask.bool()
    result = []
    for i in selected:
        w_v, w_o, b_v, b_o = _weights(bridge.blocks[i].attn)
        attn = cache[f"blocks.{i}.attn.hook_pattern"].detach()
        d = w_o.shape[1] // attn.shape[1]
        result.append(AttentionLayer(index=i, name=f"blocks.{i}.attn", attn=attn, w_v=w_v, w_o=w_o, b_v=b_v, b_o=b_o,
                                     num_heads=attn.shape[1], num_kv_heads=w_v.shape[0] // d, x=cache[f"blocks.{i}.attn.v.hook_in"].detach(),
                                     output=cache[f"blocks.{i}.hook_attn_out"].detach(), token_mask=token_mask))
    return result
