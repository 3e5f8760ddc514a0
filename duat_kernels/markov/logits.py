"""Next-token logits of every context [BOS] x_1 ... x_K, in batches, cached on disk.

The cache holds, per (model, symbols' token ids, K, BOS), the (T^K, T) logits at the symbols'
token ids (float32, as the model computes them): other temperatures cost nothing, and an
interrupted evaluation resumes from the batches already written (one file per batch, each
written to a temporary name and renamed, so a file present is a file complete).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from duat_kernels import strict_json
from duat_kernels._validation import positive_int
from duat_kernels.forward_signature import forward_takes
from duat_kernels.markov.operator import state_count

BOS_AUTO = "auto"


def check_context(context) -> int:
    """The context length K as an int (a Python or NumPy integer >= 1, as TransitionOperator takes)."""
    k = positive_int(context)
    if k is None:
        raise ValueError(f"context K must be an int >= 1, got {context!r}")
    return k


def state_sequences(num_symbols: int, context: int) -> np.ndarray:
    """(T^K, K) int64: row s is the symbol indices (x_1, ..., x_K) of state s (base T, x_1 most significant)."""
    context = check_context(context)
    powers = num_symbols ** np.arange(context - 1, -1, -1, dtype=np.int64)
    return (np.arange(num_symbols ** context, dtype=np.int64)[:, None] // powers) % num_symbols


def symbol_token_ids(tokenizer, symbols: Sequence[str]) -> list[int]:
    """The token id of each symbol; ValueError unless each is exactly one known token, all distinct."""
    ids = []
    unknown = getattr(tokenizer, "unk_token_id", None)
    for sym in symbols:
        if not isinstance(sym, str) or not sym:
            raise ValueError(f"symbols must be non-empty strings, got {sym!r}")
        enc = tokenizer.encode(sym, add_special_tokens=False)
        if len(enc) != 1 or (unknown is not None and enc[0] == unknown):
            pieces = tokenizer.convert_ids_to_tokens(enc)
            raise ValueError(f"symbol {sym!r} must be a single token of the tokenizer, but it encodes to "
                             f"{len(enc)} token(s) {pieces} (ids {enc}); choose symbols that are one token each")
        ids.append(int(enc[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"symbols {list(symbols)} must map to distinct tokens, got ids {ids}")
    return ids


def default_bos_id(model, tokenizer=None) -> int | None:
    """The tokenizer's BOS id, else the model config's, else None (no BOS)."""
    for owner in (tokenizer, getattr(model, "config", None)):
        bos = getattr(owner, "bos_token_id", None)
        if bos is not None:
            return int(bos)
    return None


def next_token_function(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """input_ids (B, L) int64 -> next-token logits (B, vocab) for a Hugging Face causal LM or any callable
    that returns (B, vocab) logits, (B, L, vocab) logits or an object with a `.logits` of either shape."""
    if not callable(model):
        raise TypeError("model must be a causal LM or a callable returning next-token logits, "
                        f"got {type(model).__name__}")
    kwargs = {}
    if isinstance(model, torch.nn.Module) and getattr(model, "forward", None) is not None:
        kwargs = {k: v for k, v in (("use_cache", False), ("logits_to_keep", 1)) if forward_takes(model, k)}

    def call(input_ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=input_ids, **kwargs) if kwargs else model(input_ids)
        logits = getattr(out, "logits", out)
        if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3) or logits.shape[0] != input_ids.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"model must return next-token logits (B, vocab) or (B, L, vocab) for input_ids "
                             f"{tuple(input_ids.shape)}, got {got}")
        return logits[:, -1] if logits.dim() == 3 else logits

    return call


def check_causal(model, token_ids: Sequence[int], bos_id: int | None = None) -> None:
    """ValueError unless a torch module's logits at each position ignore the tokens after it: two contexts that
    differ only in their last token must give the same logits before it. A masked LM (BERT, loaded as a
    causal LM with its head) reads x_K itself, so its "next-token" logits would make a chain of no meaning.
    Plain callables and models returning only the last position's logits (B, vocab) are not checked."""
    if not isinstance(model, torch.nn.Module) or len(token_ids) < 2:
        return
    first, second = int(token_ids[0]), int(token_ids[1])
    rows = torch.tensor([[first, second, first], [first, second, second]], dtype=torch.int64)
    if bos_id is not None:
        rows = torch.cat([torch.full((2, 1), int(bos_id), dtype=torch.int64), rows], dim=1)
    kwargs = {"use_cache": False} if forward_takes(model, "use_cache") else {}
    with torch.inference_mode():
        logits = getattr(model(input_ids=rows, **kwargs), "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] != rows.shape[1]:
        return
    before = logits[:, :-1].double()
    change = (before[0] - before[1]).abs().max().item()
    if not change <= 1e-4 * max(before.abs().max().item(), 1.0):
        name = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise ValueError(f"the model ({name}) is not a causal language model: its logits at a position change by "
                         f"{change:.2g} when a later token changes, so they are no next-token distribution; "
                         "use a decoder-only model such as smollm2")


def shared_prefix_function(model, group: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Like next_token_function, for a Hugging Face causal LM with a KV cache, for input_ids (B, L) whose
    rows come in groups of `group` consecutive rows sharing input_ids[:, :-1] (the T contexts that differ
    only in x_K): each prefix runs once, then the B last tokens read its cached keys and values, so
    B/group·(L−1) + B tokens go through the model instead of B·L. None if the model has no such cache;
    other input_ids take the full forward."""
    if not isinstance(model, torch.nn.Module) or getattr(model, "forward", None) is None:
        return None
    cache_arg = "cache" if forward_takes(model, "cache") else "past_key_values"  # the name before transformers 5.x
    if not all(forward_takes(model, name) for name in (cache_arg, "use_cache", "logits_to_keep")):
        return None
    full = next_token_function(model)

    def call(input_ids: torch.Tensor) -> torch.Tensor:
        b, length = input_ids.shape
        grouped = input_ids.view(b // group, group, length) if length > 1 and b % group == 0 else None
        if grouped is None or not (grouped[:, :, :-1] == grouped[:, :1, :-1]).all():
            return full(input_ids)
        cache = getattr(model(input_ids=grouped[:, 0, :-1], use_cache=True, logits_to_keep=1), cache_arg, None)
        if not hasattr(cache, "batch_repeat_interleave"):
            return full(input_ids)
        cache.batch_repeat_interleave(group)  # prefix g -> rows g·group .. g·group + group − 1
        out = model(input_ids=input_ids[:, -1:], use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        return out.logits[:, -1]

    return call


def model_fingerprint(model) -> str:
    """A digest of a torch module's class, config and parameters (names, shapes, sums): the cache key."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            pd = p.detach().double()
            h.update(f"{name}{tuple(p.shape)}{pd.sum().item():.17g}{pd.square().sum().item():.17g}".encode())
    return h.hexdigest()


def _cache_folder(cache_dir: Path, meta: dict) -> Path:
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"logits_{key}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(strict_json.dumps(meta, indent=1, sort_keys=True))
    return folder


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def context_logits(model, token_ids: Sequence[int], context: int, *, bos_id: int | None = None,
                   batch_size: int = 64, cache_dir: str | os.PathLike | None = None, model_id: str | None = None,
                   share_prefix: bool = True, progress: bool = True) -> np.ndarray:
    """The logits at token_ids (T,) after each of the T^K contexts [bos_id] x_1 ... x_K.

    Returns (T^K, T) float32, row = state index. Batches hold whole groups of the T contexts that
    differ only in x_K (batch_size is rounded to a multiple of T); with share_prefix and a model
    with a KV cache, each group's prefix is computed once (`shared_prefix_function`). With cache_dir the result and each finished batch
    are stored under cache_dir/logits_<key>, key = hash(model_id or the module's fingerprint,
    token_ids, K, bos_id); a complete table is loaded without calling the model, a partial one is
    completed. A plain callable needs model_id to be cached (there is nothing else to identify it).
    """
    context = check_context(context)
    if positive_int(batch_size) is None:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    batch_size = positive_int(batch_size)
    ids = torch.tensor([int(i) for i in token_ids], dtype=torch.int64)
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 symbols (token ids), got {list(token_ids)}")
    num_states = state_count(ids.numel(), context)
    table = np.full((num_states, ids.numel()), np.nan, dtype=np.float32)
    done = np.zeros(num_states, dtype=bool)

    folder = None
    if cache_dir is not None:
        if model_id is None and not isinstance(model, torch.nn.Module):
            raise ValueError("caching the logits of a plain callable needs model_id= (a name that identifies "
                             "its weights); pass model_id or cache_dir=None")
        meta = dict(model=model_id or model_fingerprint(model), token_ids=ids.tolist(), context=context, bos_id=bos_id)
        folder = _cache_folder(Path(cache_dir), meta)
        complete = folder / "logits.npy"
        if complete.exists():
            return np.load(complete)
        for part in sorted(folder.glob("rows_*.npy")):
            start, stop = (int(x) for x in part.stem.split("_")[1:])
            table[start:stop], done[start:stop] = np.load(part), True

    todo = np.flatnonzero(~done)
    if todo.size:
        t = ids.numel()
        next_logits = (shared_prefix_function(model, t) if share_prefix else None) or next_token_function(model)
        batch = max(t, batch_size // t * t)
        _evaluate(next_logits, ids, context, bos_id, todo, batch, table, folder, progress)
    if folder is not None:
        _save_atomic(folder / "logits.npy", table)
        for part in folder.glob("rows_*.npy"):
            part.unlink()
    return table


def _evaluate(next_logits, ids: torch.Tensor, context: int, bos_id: int | None, todo: np.ndarray, batch_size: int,
              table: np.ndarray, folder: Path | None, progress: bool) -> None:
    """Fill table[todo] batch by batch (consecutive runs of todo, so each batch is one row range; runs
    start and end at multiples of T when every batch written before was a whole number of groups)."""
    from tqdm.auto import tqdm

    sequences = torch.from_numpy(state_sequences(ids.numel(), context))
    runs = np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1)
    batches = [(int(run[i]), int(run[min(i + batch_size, run.size) - 1]) + 1)
               for run in runs for i in range(0, run.size, batch_size)]
    with torch.inference_mode(), tqdm(total=table.shape[0], initial=table.shape[0] - todo.size, unit="context",
                                      desc=f"logits of {table.shape[0]} contexts", disable=not progress) as bar:
        for start, stop in batches:
            input_ids = ids[sequences[start:stop]]
            if bos_id is not None:
                input_ids = torch.cat([torch.full((stop - start, 1), bos_id, dtype=torch.int64), input_ids], dim=1)
            logits = next_logits(input_ids)
            if ids.max() >= logits.shape[-1]:
                raise ValueError(f"token id {int(ids.max())} is outside the model's vocabulary of {logits.shape[-1]}")
            rows = logits[:, ids].float().cpu().numpy()
            table[start:stop] = rows
            if folder is not None:
                _save_atomic(folder / f"rows_{start:09d}_{stop:09d}.npy", rows)
            bar.update(stop - start)
