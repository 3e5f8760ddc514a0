"""One text through one model: every selected layer's exactness check, block norms, norms and
contributions, as plain rows (one per layer) that Dask can ship back and pyarrow can store.

The same function runs in-process (--sync) and in Dask workers; each process loads a model once
(`cached_model`), and every analysis runs with a fixed number of torch threads, so that a text
gives the same bits wherever it runs.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from duat_kernels._validation import check_threads, integer, positive_int
from duat_kernels.linalg.norms import _bins

# How many times this process has loaded each model (read by the tests through Client.run).
MODEL_LOADS: dict[str, int] = {}
_MODELS: dict[str, tuple] = {}


@dataclass(frozen=True)
class CorpusSettings:
    """What a corpus run computes; a rerun into the same folder must use the same settings.

    model: "minilm", "smollm2" or a local folder; layers: indices (None: all); grid: block norms
    of an N x N grid for N <= grid tokens, else of a grid x grid grid of super-blocks; threads:
    torch threads per analysis (fixed, so that results do not depend on where a text runs).
    """

    model: str
    layers: tuple[int, ...] | None = None
    grid: int = 64
    threads: int = 1

    def __post_init__(self):
        """Checked here, once, not per text (where each text would fail alike); sizes as Python ints."""
        if not isinstance(self.model, str) or not self.model:
            raise TypeError(f"model must be a name or a folder (a non-empty str), got {self.model!r}")
        if positive_int(self.grid) is None:
            raise ValueError(f"grid must be a positive int, got {self.grid!r}")
        object.__setattr__(self, "grid", positive_int(self.grid))
        object.__setattr__(self, "threads", check_threads("threads", self.threads))
        if self.layers is not None:
            iterable = not isinstance(self.layers, (str, bytes)) and hasattr(self.layers, "__iter__")
            layers = [integer(i, tensors=False) for i in self.layers] if iterable else [None]
            if None in layers:
                raise TypeError(f"layers must be None or a sequence of layer indices (ints), got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(layers))

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


def cached_model(name: str):
    """(model, tokenizer), loaded once per process (per Dask worker) and kept."""
    if name not in _MODELS:
        from duat_kernels.models import load

        _MODELS[name] = load(name)
        MODEL_LOADS[name] = MODEL_LOADS.get(name, 0) + 1
    return _MODELS[name]


def check_layers(settings: CorpusSettings) -> list[int]:
    """The selected layer indices of settings.model, checked once before any text: an index out of range
    is one IndexError naming the model's layer count, not one failure per text."""
    from duat_kernels.models.capture import attention_layer_count, select_layers

    model, _ = cached_model(settings.model)
    return select_layers(None if settings.layers is None else list(settings.layers), attention_layer_count(model))


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _grid_sum(matrix: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, N) -> (grid, grid): sums over the same near-equal token ranges as block_norms(grid=...)."""
    n = matrix.shape[0]
    if grid == n:
        return matrix
    bins = _bins(n, grid, matrix.device)
    rows = torch.zeros(n, grid, dtype=matrix.dtype).index_add_(1, bins, matrix)
    return torch.zeros(grid, grid, dtype=matrix.dtype).index_add_(0, bins, rows)


@contextmanager
def torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def analyse_text(settings: CorpusSettings, index: int, text_id: str, text: str) -> list[dict]:
    """Rows (one per selected layer) for one text; matrices are flattened row-major.

    Each row: text_index, text_id, text_sha256, tokens (those the layer reads: an encoder-decoder's decoder reads
    the text shifted right), n_tokens, layer, heads, kv_heads, m_in,
    m_out, rel_error (||W' x' + b' - output|| / ||output||, matrix-free), frobenius (||W'||_F),
    spectral_norm (||W'||_2), grid (R: block_norms and contributions are R x R; R = N up to
    settings.grid tokens), block_norms (Frobenius norms of the blocks or super-blocks),
    contributions (||W'_nm x_m||, summed over the token ranges of a super-block), self_contribution (mean over n of c_nn / Σ_m c_nm), mean_distance (mean over
    n of Σ_m |n - m| c_nm / Σ_m c_nm).
    """
    from duat_kernels.hvo_operator import HVOOperator
    from duat_kernels.models import attention_layers
    from duat_kernels.models.capture import _in_decoder
    from duat_kernels.models.encoder_decoder import decoder_tokens
    from duat_kernels.models.token_labels import input_tokens

    model, tokenizer = cached_model(settings.model)
    rows = []
    with torch_threads(settings.threads), torch.no_grad():
        inputs = tokenizer([text], return_tensors="pt", truncation=True)
        tokens = input_tokens(tokenizer, inputs["input_ids"][0])  # FSMT: its source vocabulary
        shifted = decoder_tokens(model, tokenizer, inputs["input_ids"])  # what an encoder-decoder's decoder reads
        layers = None if settings.layers is None else list(settings.layers)
        for layer in attention_layers(model, layers=layers, **dict(inputs)):
            n = layer.attn.shape[-1]
            op = HVOOperator(layer.attn[0], layer.w_v, layer.w_o, num_kv_heads=layer.num_kv_heads)
            grid = n if n <= settings.grid else settings.grid
            contrib = op.contributions(layer.x[0]).double()
            share = contrib / contrib.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            steps = torch.arange(n, dtype=torch.float64)
            rows.append(dict(
                text_index=index, text_id=text_id, text_sha256=text_sha256(text),
                tokens=list(shifted if shifted is not None and _in_decoder(model, layer.name) else tokens), n_tokens=n,
                layer=layer.index, heads=layer.attn.shape[1], kv_heads=layer.num_kv_heads,
                m_in=layer.w_v.shape[1], m_out=layer.w_o.shape[0], rel_error=layer.relative_error(),
                frobenius=op.frobenius_norm().item(), spectral_norm=op.spectral_norm(), grid=grid,
                block_norms=op.block_norms(None if grid == n else (grid, grid)).double().reshape(-1).tolist(),
                contributions=_grid_sum(contrib, grid).reshape(-1).tolist(),
                self_contribution=share.diagonal().mean().item(),
                mean_distance=(share * (steps[:, None] - steps[None, :]).abs()).sum(1).mean().item()))
    return rows
