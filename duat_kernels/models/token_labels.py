"""The strings that label a model's tokens (duat inspect's table, JSON, --save metadata, heatmaps; duat corpus).

A translation tokenizer with a source and a target vocabulary (FSMTTokenizer; MarianTokenizer with
separate_vocabs) encodes text with the source one, but its convert_ids_to_tokens reads the target one (what
decoding generated ids needs): the input ids of an English text came back as the German tokens of the same ids.
A target text (tokenizer(text_target=...), what a decoder reads under teacher forcing) is encoded with the target
vocabulary by a tokenizer that switches vocabularies for targets (MarianTokenizer), with the source one by others
(FSMTTokenizer): target_tokens names its ids from the vocabulary that encoded them.
"""

from __future__ import annotations

from collections.abc import Sequence


def source_vocabulary(tokenizer) -> dict[int, str] | None:
    """id -> token of the vocabulary the tokenizer encodes text with, for a tokenizer with a source vocabulary of
    its own (get_src_vocab: FSMTTokenizer, MarianTokenizer); None for others, whose convert_ids_to_tokens reads the
    one vocabulary they have."""
    get = getattr(tokenizer, "get_src_vocab", None)
    if not callable(get):
        return None
    return {int(i): token for token, i in get().items()}


def input_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """The token strings of ids (N,) as the tokenizer encoded them: from its source vocabulary where it has one
    (an id missing from it: the tokenizer's own convert_ids_to_tokens), else convert_ids_to_tokens."""
    ids = [int(i) for i in ids]
    own = tokenizer.convert_ids_to_tokens(ids)
    source = source_vocabulary(tokenizer)
    return own if source is None else [source.get(i, token) for i, token in zip(ids, own)]


def encodes_targets_apart(tokenizer) -> bool:
    """Whether the tokenizer encodes text_target with a vocabulary of its own, which its convert_ids_to_tokens
    reads (MarianTokenizer with separate_vocabs): a tokenizer with a source vocabulary (source_vocabulary) that
    switches modes for targets (_switch_to_target_mode, which transformers calls for text_target); False for
    FSMTTokenizer, which has none: it encodes targets with its source vocabulary."""
    return source_vocabulary(tokenizer) is not None and callable(getattr(tokenizer, "_switch_to_target_mode", None))


def target_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """The token strings of ids (N,) encoded from a target text (tokenizer(text_target=...)), from the vocabulary
    that encoded them: the target one where the tokenizer encodes targets apart (encodes_targets_apart), else as
    input_tokens."""
    if encodes_targets_apart(tokenizer):
        return tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    return input_tokens(tokenizer, ids)


def target_reading_note(model_name: str, tokenizer, decoder_ids: Sequence[int]) -> str | None:
    """For a decoder fed source-vocabulary ids (the text shifted right) through its target-vocabulary embedding
    (FSMT, Marian with two vocabularies): a sentence saying so, and how many of decoder_ids (N_dec,) the target
    vocabulary names otherwise, with the first such token; None when the tokenizer has one vocabulary or both name
    every id alike."""
    if source_vocabulary(tokenizer) is None:
        return None
    ids = [int(i) for i in decoder_ids]
    source, target = input_tokens(tokenizer, ids), tokenizer.convert_ids_to_tokens(ids)
    differ = [n for n, (s, t) in enumerate(zip(source, target)) if s != t]
    if not differ:
        return None
    n = differ[0]
    return (f"{model_name}'s decoder looks these source-vocabulary ids up in its target-vocabulary embedding, which "
            f"names {len(differ)} of the {len(source)} otherwise (decoder token {n}, the text's {source[n]!r}, is the "
            f"target's {target[n]!r}): the decoder layers are labelled with the source tokens the ids came from.")
