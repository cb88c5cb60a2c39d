"""Tokenisation (Moses rules, optionally sentencepiece subwords on top), detokenisation, and
vocabularies."""
from __future__ import annotations

import functools
import io
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from sacremoses import MosesDetokenizer, MosesTokenizer

from pipeline import storage

PAD, UNK, SOS, EOS = "<pad>", "<unk>", "<sos>", "<eos>"
SPECIALS = (PAD, UNK, SOS, EOS)
PAD_ID, UNK_ID, SOS_ID, EOS_ID = range(4)

# Typographic quotes become ASCII ones so that "God’s" splits like "God's" and detokenises back.
_QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "«": '"', "»": '"'})
SPACE = "\u2581"  # sentencepiece's word-start mark

# Chinese and Japanese are written without spaces between words: there each character of these
# scripts (Han, kana, CJK and fullwidth punctuation) is a token of its own, as sacrebleu's `zh`
# tokeniser scores them. A word segmenter would need a dictionary per language; characters need
# none, leave few words unknown, and sentencepiece can still join them (prepare.subwords).
CHARACTER_LANGUAGES = {"zh", "ja"}
# Fullwidth punctuation and halfwidth katakana, not fullwidth Latin letters and digits (ＡＢＣ１２).
_FULLWIDTH = "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff9f"
CJK_CHARACTERS = ("\u2e80-\u2fff\u3000-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\ufe30-\ufe4f"
                  + _FULLWIDTH)
# Chinese writes typographic quotes (“保存”), kept as they are there, with no space beside them either.
_CJK_PUNCTUATION = "\u3000-\u303f\u2018\u2019\u201c\u201d" + _FULLWIDTH
_ONE_CJK = re.compile(f"([{CJK_CHARACTERS}])")
# Detokenised, no space between two such characters, nor beside their punctuation; a Latin word
# among them keeps its spaces ("保存对 GNOME 的更改").
_NEEDLESS_SPACE = re.compile(f"(?<=[{CJK_CHARACTERS}]) (?=[{CJK_CHARACTERS}])|"
                             f" (?=[{_CJK_PUNCTUATION}])|(?<=[{_CJK_PUNCTUATION}]) ")


def base_language(lang: str) -> str:
    """zh_CN, zh-Hans and ZH are all zh."""
    return lang.lower().replace("-", "_").split("_")[0]


class _Moses(MosesTokenizer):
    """sacremoses' tokenizer with the same answers, about twice as fast: its character-class tests
    build a set of every lowercase (or alphabetic) Unicode character on each call, which takes half
    of all tokenising time; here the sets are built once, after the language's own additions (CJK
    scripts count as alphabetic for zh, ja and ko)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lower, self._alpha = frozenset(self.IsLower), frozenset(self.IsAlpha)

    def islower(self, text: str) -> bool:
        return self._lower.issuperset(text)

    def isanyalpha(self, text: str) -> bool:
        return not self._alpha.isdisjoint(text)


@dataclass(frozen=True)
class Tokenizer:
    """Moses word tokens, lowercased if `lowercase`; with `subwords` (a serialized sentencepiece
    model), those words are then cut into sentencepiece pieces, which are the model's tokens."""

    lang: str
    lowercase: bool
    subwords: bytes | None = field(default=None, repr=False)

    @functools.cached_property
    def _moses(self) -> MosesTokenizer:
        return _Moses(lang=base_language(self.lang))  # sacremoses knows zh, not zh_CN

    @functools.cached_property
    def _demoses(self) -> MosesDetokenizer:
        return MosesDetokenizer(lang=base_language(self.lang))

    @functools.cached_property
    def by_character(self) -> bool:
        return base_language(self.lang) in CHARACTER_LANGUAGES

    @functools.cached_property
    def _pieces(self):
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_proto=self.subwords)

    def tokenize(self, text: str) -> list[str]:
        """The model's tokens for a text."""
        return self.from_cased(self.words(text))[0]

    def tokenize_cased(self, text: str) -> list[str]:
        """The same tokens with their case kept, one for one: what unknown words are copied from."""
        return self.from_cased(self.words(text))[1]

    def words(self, text: str) -> list[str]:
        """The Moses word tokens, case kept: what the serving limits count. (Lowercasing comes after
        tokenising because Moses uses case to tell a sentence end from an abbreviation.)"""
        if not self.by_character:
            return self._moses.tokenize(text.translate(_QUOTES), escape=False, aggressive_dash_splits=True)
        words = self._moses.tokenize(text, escape=False, aggressive_dash_splits=True)
        return [part for word in words for part in _ONE_CJK.split(word) if part]

    def from_cased_all(self, sentences: Iterable[Sequence[str]]) -> tuple[list[list[str]], list[list[str]]]:
        """from_cased for many sentences of cased Moses words: (their tokens, their cased tokens)."""
        pairs = [self.from_cased(words) for words in sentences]
        return [tokens for tokens, _ in pairs], [cased for _, cased in pairs]

    def from_cased(self, words: Sequence[str]) -> tuple[list[str], list[str]]:
        """(the model's tokens, the same tokens with their case kept) for cased Moses words: without
        subwords, the words (lowercased if `lowercase`) and the words; with subwords, the pieces of
        the (lowercased) words and the cased text each piece covers."""
        lowered = [w.lower() for w in words] if self.lowercase else list(words)
        if self.subwords is None:
            return lowered, list(words)
        pieces = self.pieces(lowered)
        if not self.lowercase:
            return pieces, pieces
        # A piece is a substring of "▁" + "▁".join(lowered) (identity normalisation, no byte
        # fallback), so the cased text at the same offsets is its cased form. A word whose
        # lowercase has another length (rare: "İ") keeps its lowercase form there.
        cased = SPACE + SPACE.join(unmarked(w if len(w) == len(l) else l) for w, l in zip(words, lowered))
        if sum(map(len, pieces)) != len(cased):  # not expected; the lowercase pieces are still right
            return pieces, pieces
        originals, at = [], 0
        for piece in pieces:
            originals.append(cased[at : at + len(piece)])
            at += len(piece)
        return pieces, originals

    def pieces(self, words: Sequence[str]) -> list[str]:
        """Sentencepiece's pieces for Moses words (already case-handled); never across words."""
        return self._pieces.encode(" ".join(map(unmarked, words)), out_type=str) if words else []

    def detokenize(self, tokens: Sequence[str]) -> str:
        tokens = [t for t in tokens if t not in SPECIALS or t == UNK]
        if self.subwords is not None:
            tokens = join_pieces(tokens)
        text = self._demoses.detokenize(tokens).replace(" @-@ ", "-")
        return _NEEDLESS_SPACE.sub("", text) if self.by_character else text


def unmarked(word: str) -> str:
    """The word (or line) with sentencepiece's word-start mark "▁" as "_": sentencepiece reads a
    literal one as a space, which would drop it (and split a word). Training sentencepiece, prepare
    and the tokenisers all go through here, so they agree."""
    return word.replace(SPACE, "_")


def join_pieces(pieces: Sequence[str]) -> list[str]:
    """The Moses words that sentencepiece pieces spell: sentencepiece's own decoding, which with
    identity normalisation is concatenation with "▁" as a space. Done here rather than by the
    processor because a piece copied from the source (unknown-word replacement, maybe cased) is not
    in the target model, and the processor would keep its "▁". An <unk> stays a word of its own."""
    text = "".join(f" {p} " if p == UNK else p for p in pieces)
    return text.replace(SPACE, " ").split()


def train_subwords(sentences: Iterable[str], model_type: str, vocab_size: int, threads: int = 1) -> bytes:
    """A serialized sentencepiece model trained on space-separated Moses words, the same bytes
    for the same sentences and `threads` on every run: every sentence read in order, a fixed seed.

    Identity normalisation keeps pieces substrings of the words (no NFKC), so pieces decode back to
    exactly the words; character_coverage 1.0 keeps every training character. No byte fallback:
    the pieces vamos' vocabulary keeps are those seen in training, which byte pieces never are
    (every training character is a piece), so they would only cost 256 slots; an unseen character
    stays a piece of its own, unknown to the vocabulary, and decodes back to itself. Sentencepiece's
    <s> and </s> are off (vamos adds its own <sos>, <eos>); its <unk> only exists in its model."""
    import sentencepiece as spm

    spm.set_random_generator_seed(1234)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([unmarked(line) for line in sentences]), model_writer=model, model_type=model_type,
        vocab_size=vocab_size, hard_vocab_limit=False,  # a small corpus gets fewer pieces, not an error
        character_coverage=1.0, byte_fallback=False, normalization_rule_name="identity",
        split_by_whitespace=True, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1,
        num_threads=threads, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    return model.getvalue()


SUBWORD_FILE = "spm.{side}.model"


def word_tokenizers(params) -> tuple[Tokenizer, Tokenizer]:
    """The (source, target) Moses tokenisers of `params.prepare`, without subwords."""
    cfg = params.prepare
    return Tokenizer(cfg.src_lang, cfg.lowercase_src), Tokenizer(cfg.tgt_lang, cfg.lowercase_tgt)


def tokenizers(params, prepared: str | Path = storage.PREPARED) -> tuple[Tokenizer, Tokenizer]:
    """The (source, target) tokenisers of `params.prepare`: what prepare tokenised the data with,
    so training and translation tokenise alike. With `prepare.subwords`, they carry the
    sentencepiece models that prepare trained (read from `prepared`)."""
    cfg = params.prepare
    src, tgt = word_tokenizers(params)
    models = {side: Path(prepared) / SUBWORD_FILE.format(side=side) for side in ("src", "tgt")}
    if cfg.subwords.model == "none":
        stale = [str(p) for p in models.values() if p.exists()]
        if stale:  # the data are pieces: word tokenisers would feed the model unknowns
            raise FileNotFoundError(f"prepare.subwords is 'none' but {Path(prepared)} was prepared with subwords "
                                    f"({', '.join(stale)}): run `vamos prepare`")
        return src, tgt
    missing = [str(p) for p in models.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"prepare.subwords is {cfg.subwords.model!r} but {', '.join(missing)} "
                                "is missing: run `vamos prepare`")
    return replace(src, subwords=models["src"].read_bytes()), replace(tgt, subwords=models["tgt"].read_bytes())


class Vocab:
    """Token <-> id, with the four specials first so their ids are fixed."""

    def __init__(self, tokens: Iterable[str]):
        self.itos: list[str] = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_freq: int, max_size: int) -> "Vocab":
        return cls.from_counts(Counter(t for s in sentences for t in s), min_freq, max_size)

    @classmethod
    def from_counts(cls, counts: Counter, min_freq: int, max_size: int) -> "Vocab":
        """The most frequent tokens seen at least `min_freq` times, ties in token order."""
        ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        return cls(ranked[: max_size - len(SPECIALS)])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi.get(t, UNK_ID) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i not in (PAD_ID, SOS_ID):
                out.append(self.itos[i])
        return out

    def save(self, path: str | Path) -> None:
        storage.write_json(path, self.itos)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        return cls(storage.read_json(path))
