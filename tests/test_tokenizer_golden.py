"""The torch-free ClipTokenizer gives exactly open_clip's token ids on a large generated corpus."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from vlm_export.runtime.text.class_lists import prompt_name
from vlm_export.runtime.text.templates import BUILTIN_TEMPLATES, fill_template
from vlm_export.runtime.text.tokenizer import VOCAB_FILE, ClipTokenizer

pytest.importorskip("torch")
from vlm_export.models.torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()
open_clip = pytest.importorskip("open_clip")
from open_clip.tokenizer import SimpleTokenizer, default_bpe  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORDS = [
    "café", "naïve", "Ångström", "über", "señor", "façade", "Crème Brûlée", "Ørsted", "Łódź",
    "東京", "猫", "自転車", "고양이", "кошка", "γάτα", "قطة", "बिल्ली", "แมว", "🐱", "🚗💨",
    "👩‍👩‍👧", "🇫🇷", "golden_retriever", "Pomeranian", "tree frog", "T-shirt", "Rock 'n' roll",
    "it's", "we'll", "they'd", "O'Neil", "3.14", "1,000,000", "24/7", "C++", "e-mail", "U.S.A.",
    "mobile_home", "ping-pong ball", "jack-o'-lantern", "Wi-Fi", "H₂O", "x²", "½", "ﬁsh",
    "Ｆｕｌｌ", "naïve", "â€™", "Ã©", "mojibake â€œquotedâ€\x9d",
]  # fmt: skip
ENTITIES = [
    "&amp;", "&lt;", "&gt;", "&#39;", "&quot;", "&amp;amp;", "&amp;lt;", "&amp;#39;", "&nbsp;",
    "&eacute;", "&#x1F600;", "&copy;", "&amp;amp;amp;", "&bogus;", "&#0;", "&",
]  # fmt: skip
SPACES = [
    " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u200b", "\u2003", "\u3000", "\u200d", "\ufeff",
    "\u2028", "\x0b", "\x0c", "\u202f",
]  # fmt: skip
BLOCKS = [
    (0x20, 0x7F), (0xA0, 0x250), (0x370, 0x500), (0x590, 0x700), (0x900, 0x980),
    (0x3040, 0x3100), (0x4E00, 0x4F00), (0xAC00, 0xAD00), (0x1F300, 0x1F700), (0x2000, 0x2070),
    (0xFF00, 0xFFF0), (0x0, 0x20), (0xE000, 0xE010), (0x10000, 0x10100),
]  # fmt: skip


def _random_unicode(rng: random.Random) -> str:
    chars = []
    for _ in range(rng.randint(1, 24)):
        low, high = rng.choice(BLOCKS)
        chars.append(chr(rng.randrange(low, high)))
    return "".join(chars)


def _mixed_case(rng: random.Random, text: str) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c for c in text)


def _shipped_prompts() -> list[str]:
    templates = sorted({t for ts in BUILTIN_TEMPLATES.values() for t in ts})
    classes = [
        line.strip() for f in sorted(EXAMPLES.glob("*.txt")) for line in f.read_text().splitlines()
    ]
    classes = [c for c in classes if c and not c.startswith("#")]
    prompts = list(templates) + classes
    prompts += [fill_template(t, prompt_name(c)) for t in templates for c in classes]
    return prompts


def golden_corpus(count: int = 10_000, seed: int = 0) -> list[str]:
    """Every shipped template and class, then seeded mixtures of the hard cases up to ``count``."""
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 60))) for _ in range(200)]
    corpus += ["", " ", "\n", "&amp;", "a " * 200, "word " * 80, "🐱" * 100, *_shipped_prompts()]
    makers = [
        lambda: rng.choice(WORDS),
        lambda: rng.choice(ENTITIES),
        lambda: rng.choice(SPACES),
        lambda: _random_unicode(rng),
        lambda: _mixed_case(rng, rng.choice(WORDS)),
        lambda: str(rng.randint(0, 10**9)),
        lambda: rng.choice(["a photo of a", "the", "Of", "!!", "...", "'s", "'LL", "--", "{}"]),
    ]
    while len(corpus) < count:
        parts = [rng.choice(makers)() for _ in range(rng.randint(1, 6))]
        joiners = [rng.choice([" ", "", rng.choice(SPACES)]) for _ in parts]
        text = "".join(p + j for p, j in zip(parts, joiners, strict=True))
        if rng.random() < 0.2:
            template = rng.choice(BUILTIN_TEMPLATES["imagenet80"])
            text = fill_template(template, text)
        corpus.append(text)
    return corpus


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return golden_corpus()


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return ClipTokenizer.from_file(default_bpe())


def _assert_same(expected: np.ndarray, actual: np.ndarray, texts: list[str]) -> None:
    assert actual.dtype == np.int64 and actual.shape == expected.shape
    rows = np.flatnonzero((expected != actual).any(axis=1))
    assert rows.size == 0, f"{rows.size} mismatches, first {texts[rows[0]]!r}"


def test_corpus_covers_the_hard_cases(corpus: list[str], ours: ClipTokenizer) -> None:
    assert len(corpus) >= 10_000 and "" in corpus
    assert (ours.lengths(corpus[:200]) > 77).sum() > 150  # many longer than the context
    for probe in ("&amp;", "\u00a0", "\u200b", "\t", "東", "🐱", "é"):
        assert any(probe in text for text in corpus), probe


def test_ids_equal_open_clip_for_the_bundle_models(corpus: list[str], ours) -> None:
    reference = open_clip.get_tokenizer("ViT-B-16")
    assert isinstance(reference, SimpleTokenizer)
    expected = reference(corpus, context_length=77).numpy()
    _assert_same(expected, ours(corpus, 77), corpus)


@pytest.mark.parametrize("context_length", [5, 16, 32])
def test_truncation_keeps_eot_like_open_clip(corpus, ours, context_length: int) -> None:
    sample = corpus[::20]
    expected = SimpleTokenizer()(sample, context_length=context_length).numpy()
    actual = ours(sample, context_length)
    _assert_same(expected, actual, sample)
    full = actual[:, -1] != 0
    assert full.any() and (actual[full, -1] == ours.eot_token_id).all()


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_other_clean_functions(corpus: list[str], clean: str) -> None:
    sample = corpus[::20]
    expected = SimpleTokenizer(clean=clean)(sample, context_length=77).numpy()
    ours = ClipTokenizer.from_file(default_bpe(), clean=clean)
    _assert_same(expected, ours(sample, 77), sample)


def test_vocab_file_is_open_clips(ours: ClipTokenizer) -> None:
    assert Path(default_bpe()).name == VOCAB_FILE
    assert ours.encoder == SimpleTokenizer().encoder
