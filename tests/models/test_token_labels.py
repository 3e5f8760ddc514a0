"""Token labels of a translation tokenizer with two vocabularies (FSMT): the input ids are named from the source
vocabulary, which encoded them, in duat inspect (table, --json, --save metadata) and duat corpus."""

from __future__ import annotations

import json

import pytest
import torch

import duat_kernels as dk
from duat_kernels.cli import main
from duat_kernels.models.token_labels import input_tokens, source_vocabulary

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install '.[models]'")
pytest.importorskip("sacremoses", reason="FSMTTokenizer needs sacremoses: pip install '.[models]'")

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # fairseq's ids 0 ... 3, alike in both vocabularies
SOURCE_WORDS = ["the", "fox", "runs", "home"]
TARGET_WORDS = ["der", "Fuchs", "läuft", "heim", "nach"]  # same ids, other words (and one more)
TEXT = "the fox runs home"


def _merges(words: list[str]) -> list[str]:
    """BPE merges that join each word's characters, left to right, into the one token 'word</w>'."""
    merges = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
    return merges


@pytest.fixture(scope="module")
def fsmt_folder(tmp_path_factory):
    """A 1+1-layer random-init FSMT model (en -> de) and an FSMTTokenizer whose source and target vocabularies name
    the same ids with different words, saved offline."""
    path = tmp_path_factory.mktemp("tiny_fsmt")
    vocabularies = {}
    for side, words in (("src", SOURCE_WORDS), ("tgt", TARGET_WORDS)):
        vocabularies[side] = {token: i for i, token in enumerate([*SPECIAL, *(w + "</w>" for w in words)])}
        (path / f"vocab-{side}.json").write_text(json.dumps(vocabularies[side]))
    (path / "merges.txt").write_text("\n".join(_merges(SOURCE_WORDS)) + "\n")
    tokenizer = transformers.FSMTTokenizer(langs=["en", "de"], src_vocab_file=str(path / "vocab-src.json"),
                                           tgt_vocab_file=str(path / "vocab-tgt.json"),
                                           merges_file=str(path / "merges.txt"))
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.FSMTConfig(langs=["en", "de"], src_vocab_size=len(vocabularies["src"]),
                                     tgt_vocab_size=len(vocabularies["tgt"]), d_model=16, encoder_layers=1,
                                     decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                                     encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    transformers.FSMTModel(config).save_pretrained(path)
    return path


def _expected():
    """The text's source tokens and the decoder's (FSMT's shift: the last token, </s>, first), by hand."""
    tokens = [w + "</w>" for w in SOURCE_WORDS] + ["</s>"]
    return tokens, [tokens[-1], *tokens[:-1]]


def test_input_tokens_come_from_the_source_vocabulary(fsmt_folder):
    # FSMTTokenizer.convert_ids_to_tokens reads the target vocabulary: 'the fox runs home' came back German
    _, tok = dk.models.load(str(fsmt_folder))
    ids = tok([TEXT])["input_ids"][0]
    assert tok.convert_ids_to_tokens(ids)[0] == "der</w>"  # the tokenizer's own answer: why this module exists
    assert input_tokens(tok, ids) == _expected()[0]
    assert input_tokens(tok, [8]) == ["nach</w>"]  # an id only the target has: the tokenizer's own answer
    assert source_vocabulary(_OneVocabulary()) is None
    assert input_tokens(_OneVocabulary(), [4, 2]) == ["t4", "t2"]


def marian_tokenizer(path):
    """A MarianTokenizer (en -> de) with separate word-level source and target vocabularies that name the same ids
    with different words, its files written to path."""
    spm = pytest.importorskip("sentencepiece", reason="MarianTokenizer needs sentencepiece")
    import io

    for side, words, vocab_file in (("source", SOURCE_WORDS, "vocab.json"),
                                    ("target", TARGET_WORDS, "target_vocab.json")):
        model = io.BytesIO()  # a word-level SentencePiece model of the side's words
        spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(words)] * 5), model_writer=model,
                                       vocab_size=len(words) + 3, model_type="word", minloglevel=2)
        (path / f"{side}.spm").write_bytes(model.getvalue())
        vocabulary = {t: i for i, t in enumerate(["</s>", "<unk>", "<pad>", *("\u2581" + w for w in words)])}
        (path / vocab_file).write_text(json.dumps(vocabulary))
    return transformers.MarianTokenizer(
        source_spm=str(path / "source.spm"), target_spm=str(path / "target.spm"),
        vocab=str(path / "vocab.json"), target_vocab_file=str(path / "target_vocab.json"),
        separate_vocabs=True, source_lang="en", target_lang="de")


def test_marian_with_separate_vocabularies_is_named_from_its_source_vocabulary(tmp_path):
    # MarianTokenizer(separate_vocabs=True) reads its target vocabulary in convert_ids_to_tokens, as FSMT's does
    tok = marian_tokenizer(tmp_path)
    ids = tok([TEXT])["input_ids"][0]
    assert tok.convert_ids_to_tokens(ids)[0] == "\u2581der"
    assert input_tokens(tok, ids) == [*("\u2581" + w for w in SOURCE_WORDS), "</s>"]


class _OneVocabulary:
    """A stand-in tokenizer with one vocabulary: token id i is called 't<i>'."""

    @staticmethod
    def convert_ids_to_tokens(ids):
        return [f"t{int(i)}" for i in ids]


def test_duat_inspect_labels_encoder_and_decoder_with_the_source_tokens(fsmt_folder, tmp_path, capsys):
    # the table, --json and --save named the encoder's input tokens (and the decoder's, the text shifted right) with
    # the target words of the same ids; the note now says that FSMT's decoder reads these ids in its target embedding
    out, saved = tmp_path / "r.json", tmp_path / "w.safetensors"
    assert main(["inspect", "--model", str(fsmt_folder), "--text", TEXT, "--json", str(out), "--save", str(saved)]) == 0
    printed = capsys.readouterr().out
    tokens, shifted = _expected()
    assert f"5 tokens: {' '.join(tokens)}" in printed
    assert ("decoder token 0 is '</s>', the text's last token" in printed
            and "FSMTModel's decoder looks these source-vocabulary ids up in its target-vocabulary embedding, which "
                "names 4 of the 5 otherwise (decoder token 1, the text's 'the</w>', is the target's 'der</w>')"
            in printed)
    result = json.loads(out.read_text())
    assert result["tokens"] == tokens and result["decoder_tokens"] == shifted and result["passed"]
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
    assert meta["tokens"].split("\t") == tokens and meta["decoder_tokens"].split("\t") == shifted


def test_duat_corpus_rows_name_the_source_tokens(fsmt_folder):
    from duat_kernels.corpus import analysis

    rows = analysis.analyse_text(analysis.CorpusSettings(model=str(fsmt_folder)), 0, "t0", TEXT)
    tokens, shifted = _expected()
    assert [row["tokens"] for row in rows] == [tokens, shifted]  # encoder layer, decoder layer
