"""CLIP's byte-level BPE tokenizer without torch: the same token ids as open_clip's SimpleTokenizer.

A line-by-line reproduction of ``open_clip.tokenizer.SimpleTokenizer`` (itself OpenAI's CLIP
tokenizer): text cleaning (ftfy ``fix_text``, ``html.unescape`` twice, strip, then the model's
clean function: ``lower`` = whitespace collapsed and lower-cased, ``whitespace`` = collapsed only,
``canonicalize`` = punctuation removed, lower-cased), the same pre-tokenising regex, byte-to-unicode
table and merge loop, ``<start_of_text>`` / ``<end_of_text>`` around every text, zero padding, and
open_clip's truncation (cut to the context, last token replaced by ``<end_of_text>``).
``tests/test_tokenizer_golden.py`` compares the ids with open_clip's on over 10,000 strings.

The vocabulary is open_clip's merge list ``bpe_simple_vocab_16e6.txt.gz``; a bundle carries it
with its sha256 (manifest section ``tokenizer``). Dependencies: numpy, ``regex`` and ``ftfy``
(pure Python or with wheels for ARM).
"""

from __future__ import annotations

import gzip
import html
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core import manifest as mf
from vlm_export.core.errors import UserError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
KIND = "clip_bpe"
CLEAN_FUNCTIONS = ("lower", "whitespace", "canonicalize")
SOT = "<start_of_text>"
EOT = "<end_of_text>"
_NUM_MERGES = 49152 - 256 - 2  # open_clip reads merges[1 : 49152 - 256 - 2 + 1]
#: CLIP's vocabulary file is 1.36 MB gzip'd, 3.2 MB unpacked: larger ones are refused, checked
#: before reading (compressed) and while unpacking (never more than the limit is held)
MAX_VOCABULARY_GZ_BYTES = 8 * 1024 * 1024
MAX_VOCABULARY_BYTES = 16 * 1024 * 1024
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class TokenizerError(UserError):
    """A vocabulary that is missing, corrupt, fails its sha256, or a tokenizer of another kind."""


def _text_libraries() -> tuple[Any, Any]:
    try:
        import ftfy
        import regex
    except ImportError as exc:
        raise TokenizerError(
            f"the text tokenizer needs the packages 'regex' and 'ftfy' ({exc.name} is missing): "
            "pip install regex ftfy"
        ) from None
    return ftfy, regex


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode character table (256 entries)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word, word[1:], strict=False))


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """The BPE merge list of a gzip'd CLIP vocabulary file; TokenizerError if unreadable."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_VOCABULARY_GZ_BYTES:
            raise TokenizerError(
                f"the tokenizer vocabulary {path} is larger than {MAX_VOCABULARY_GZ_BYTES} bytes "
                "(CLIP's is 1.4 MB)"
            )
        with gzip.open(path) as handle:
            data = handle.read(MAX_VOCABULARY_BYTES + 1)
        if len(data) > MAX_VOCABULARY_BYTES:
            raise TokenizerError(
                f"the tokenizer vocabulary {path} unpacks to more than {MAX_VOCABULARY_BYTES} "
                "bytes (CLIP's is 3.2 MB)"
            )
        lines = data.decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise TokenizerError(f"cannot read the tokenizer vocabulary {path}: {exc}") from None
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(merge) != 2 for merge in merges):
        raise TokenizerError(f"{path} is not a CLIP BPE vocabulary ({len(merges)} merges)")
    return merges  # type: ignore[return-value]


class ClipTokenizer:
    """Text -> CLIP token ids, exactly as open_clip's SimpleTokenizer (no extra special tokens)."""

    def __init__(self, merges: Sequence[tuple[str, str]], clean: str = "lower") -> None:
        if clean not in CLEAN_FUNCTIONS:
            raise TokenizerError(
                f"unknown tokenizer clean function {clean!r} (known: {', '.join(CLEAN_FUNCTIONS)})"
            )
        self._ftfy, regex = _text_libraries()
        self.clean = clean
        self.byte_encoder = bytes_to_unicode()
        self._byte_table = dict(self.byte_encoder)  # latin-1 code point -> CLIP's character
        base = list(self.byte_encoder.values())
        vocab = base + [symbol + "</w>" for symbol in base] + ["".join(m) for m in merges]
        vocab += [SOT, EOT]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.bpe_ranks = {tuple(merge): rank for rank, merge in enumerate(merges)}
        self.cache: dict[str, str] = {SOT: SOT, EOT: EOT}
        self.pattern = regex.compile(
            rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.vocab_size = len(self.encoder)

    @classmethod
    def from_file(cls, path: str | Path, clean: str = "lower") -> ClipTokenizer:
        """A tokenizer from a gzip'd CLIP vocabulary file (open_clip's bpe_simple_vocab_16e6)."""
        return cls(read_merges(path), clean)

    @classmethod
    def from_bundle(cls, bundle: Any) -> ClipTokenizer:
        """The tokenizer of a bundle (a ``Bundle`` or its folder), its vocabulary sha256-checked.

        TokenizerError (one line) when the manifest has no ``tokenizer`` section, the kind is not
        CLIP's BPE, or the vocabulary file is missing or does not match its sha256.
        """
        folder, manifest = _bundle_parts(bundle)
        record = manifest.get("tokenizer")
        if not isinstance(record, dict):
            raise TokenizerError(
                f"bundle {folder} has no tokenizer (exported without a text engine, or by an older "
                "vlm-export): re-export it to change classes on the device"
            )
        if record.get("kind") != KIND:
            raise TokenizerError(
                f"bundle {folder} uses tokenizer kind {record.get('kind')!r}; this runtime "
                f"reproduces only {KIND!r}"
            )
        name = record.get("vocab")
        if not mf.is_plain_name(name):
            raise TokenizerError(f"bundle {folder}: tokenizer vocab {name!r} is not a file name")
        path = folder / name
        if not path.is_file():
            raise TokenizerError(f"bundle {folder}: tokenizer vocabulary {name} is missing")
        if mf.sha256_file(path) != record.get("sha256"):
            raise TokenizerError(
                f"bundle {folder}: tokenizer vocabulary {name} does not match its sha256 "
                "(modified or corrupt)"
            )
        return cls.from_file(path, str(record.get("clean", "lower")))

    def clean_text(self, text: str) -> str:
        """open_clip's cleaning: ftfy, HTML unescaped twice, then the clean function."""
        text = html.unescape(html.unescape(self._ftfy.fix_text(text))).strip()
        if self.clean == "canonicalize":
            text = text.replace("_", " ").translate(_PUNCTUATION).lower()
        text = " ".join(text.split()).strip()
        return text.lower() if self.clean == "lower" else text

    def bpe(self, token: str) -> str:
        """Space-separated BPE symbols of one pre-token (byte-encoded), cached."""
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = (*token[:-1], token[-1] + "</w>")
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without <start_of_text>/<end_of_text> and without truncation."""
        ids: list[int] = []
        for token in self.pattern.findall(self.clean_text(text)):
            encoded = token.encode("utf-8").decode("latin-1").translate(self._byte_table)
            ids.extend(self.encoder[symbol] for symbol in self.bpe(encoded).split(" "))
        return ids

    def __call__(self, texts: Sequence[str], context_length: int) -> np.ndarray:
        """Token ids int64 [N, context_length]: SOT, text, EOT, zeros; too long: cut, last = EOT."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise TokenizerError(f"context length must be at least 2, got {context_length}")
        result = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            result[row, : len(ids)] = ids
        return result

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Untruncated token counts int64 [N], SOT and EOT included (over the context = cut)."""
        return np.array([len(self.encode(text)) + 2 for text in texts], dtype=np.int64)


def _bundle_parts(bundle: Any) -> tuple[Path, dict[str, Any]]:
    if isinstance(bundle, (str, Path)):
        return Path(bundle), mf.read_manifest(bundle)
    return Path(bundle.path), bundle.manifest
