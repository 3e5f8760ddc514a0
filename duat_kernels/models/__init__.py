"""Model adapters: every attention layer's W' from Hugging Face and PyTorch models.

    layers = duat_kernels.models.attention_layers(model, **inputs)   # one forward pass, hooks
    layers[0].hvo_matrix(), layers[0].operator().block_norms(), layers[0].relative_error()
"""

from duat_kernels.models.architectures import ARCHITECTURES, SHAPES, Architecture, register_architecture
from duat_kernels.models.capture import AttentionLayer, attention_layers
from duat_kernels.models.zoo import DEFAULT_TEXT, load

__all__ = ["attention_layers", "AttentionLayer", "Architecture", "ARCHITECTURES", "SHAPES", "register_architecture",
           "load", "DEFAULT_TEXT"]
