"""Which tokenizer for the device: Hugging Face ``tokenizers`` (CLIP's tokenizer.json) or ours.

Both are compared with open_clip's SimpleTokenizer (the reference: it made the bundle's text
embeddings) on the golden corpus of tests/test_tokenizer_golden.py (10,000 seeded strings).
The Hugging Face tokenizer is built with the ``tokenizers`` API exactly as the pipeline of
``openai/clip-vit-base-patch32``'s tokenizer.json (no network here to download the file):
NFC + whitespace runs -> " " + lowercase; the CLIP regex split; byte-level; BPE with "</w>"
word ends over open_clip's own vocabulary; <|startoftext|>/<|endoftext|> around; truncation to
77 keeping the end token. Reports mismatching rows (by kind of string, with examples) and the
time per string of each tokenizer.

    pip install tokenizers && python benchmarks/bench_tokenizers.py

Prints and writes benchmarks/results/tokenizers.json.
"""

from __future__ import annotations

import json
import sys
import time

import common
import numpy as np

from vlm_export.models.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

from open_clip.tokenizer import SimpleTokenizer, default_bpe  # noqa: E402
from tokenizers import (  # noqa: E402
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from vlm_export.runtime.text.tokenizer import ClipTokenizer, read_merges  # noqa: E402

sys.path.insert(0, str(common.ROOT / "tests"))
from test_tokenizer_golden import golden_corpus  # noqa: E402

RESULTS = common.RESULTS / "tokenizers.json"
CONTEXT = 77
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def hf_clip_tokenizer(ours: ClipTokenizer) -> Tokenizer:
    """The pipeline of CLIP's tokenizer.json, over open_clip's vocabulary and merges."""
    vocab = dict(ours.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [tuple(m) for m in read_merges(default_bpe())]
    tokenizer = Tokenizer(
        models.BPE(
            vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
            unk_token="<|endoftext|>",
        )
    )  # fmt: skip
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.post_processor = processors.RobertaProcessing(
        ("<|endoftext|>", 49407), ("<|startoftext|>", 49406),
        add_prefix_space=False, trim_offsets=False,
    )  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.enable_truncation(CONTEXT)
    tokenizer.enable_padding(length=CONTEXT, pad_id=0)
    return tokenizer


def _kind(text: str) -> str:
    if "&" in text and ";" in text:
        return "html_entity"
    if any(c in text for c in "\u00a0\u200b\u2003\u3000\u200d\ufeff\u2028\x0b\x0c\u202f\t\n\r"):
        return "odd_whitespace"
    if any(0xC0 <= ord(c) <= 0xFF for c in text) and any(c in text for c in "€â"):
        return "mojibake"
    if any(ord(c) > 0x2000 for c in text):
        return "cjk_emoji_symbols"
    if any(ord(c) > 0x7F for c in text):
        return "accents"
    return "ascii"


def main() -> None:
    corpus = golden_corpus()
    reference_tokenizer = SimpleTokenizer()
    ours = ClipTokenizer.from_file(default_bpe())
    hf = hf_clip_tokenizer(ours)
    timings, outputs = {}, {}
    for name, run in (
        ("open_clip", lambda: reference_tokenizer(corpus, context_length=CONTEXT).numpy()),
        ("ours", lambda: ours(corpus, CONTEXT)),
        ("hf_tokenizers", lambda: np.array([e.ids for e in hf.encode_batch(corpus)])),
    ):
        start = time.perf_counter()
        outputs[name] = run()
        timings[name] = (time.perf_counter() - start) / len(corpus) * 1e6
    report: dict = {
        "benchmark": "tokenizer ids vs open_clip SimpleTokenizer on the golden corpus",
        "strings": len(corpus),
        "context_length": CONTEXT,
        "microseconds_per_string": timings,
        "hf_pipeline": "CLIP tokenizer.json pipeline rebuilt with the tokenizers API "
        "(openai/clip-vit-base-patch32), over open_clip's vocabulary",
    }
    for name in ("ours", "hf_tokenizers"):
        rows = np.flatnonzero((outputs[name] != outputs["open_clip"]).any(axis=1))
        kinds: dict[str, int] = {}
        for row in rows:
            kinds[_kind(corpus[row])] = kinds.get(_kind(corpus[row]), 0) + 1
        report[name] = {
            "mismatching_strings": int(len(rows)),
            "by_kind": kinds,
            "examples": [corpus[row] for row in rows[:8]],
        }
    report["machine"] = common.machine()
    print(json.dumps(report, indent=2, ensure_ascii=False))
    common.write_json(RESULTS, report, ensure_ascii=False)


if __name__ == "__main__":
    main()
