"""Class names x templates -> prompts -> length-sorted batches -> one embedding per class.

Shared by the exporter (PyTorch text tower) and the device (``TextEncoder``, the bundle's text
engine), so both fill, batch and average prompts the same way and differ only in the tower.

Batches are cut to their longest prompt: open_clip pools at the end-of-text token under a causal
mask, so the padding after it never reaches the output, and prompts sorted by length waste almost
no positions on padding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.runtime.text.class_lists import prompt_name
from vlm_export.runtime.text.templates import IMAGENET80, fill_template

Progress = Callable[[int, int], None]
#: class names of the text engine's parity checks: short, accented, HTML, CJK, emoji, one that
#: overflows the context
PARITY_CLASSES = ("cat", "golden_retriever", "Crème brûlée &amp; 東京 🐱", "x " * 100)


class TextEmbeddingError(UserError):
    """Text embeddings that cannot be computed: no classes, a bad batch size, broken weights."""


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than the text context: it is cut, keeping the end-of-text token."""


def build_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: every template filled with each class's prompt name."""
    return [fill_template(t, prompt_name(name)) for name in classnames for t in templates]


def parity_prompts() -> list[str]:
    """The prompts of the text engine's parity checks (export and TensorRT build): 32 prompts."""
    return build_prompts(PARITY_CLASSES, IMAGENET80[::10])


def token_lengths(tokens: np.ndarray) -> np.ndarray:
    """Positions used per row of CLIP token ids [N, T]: up to and including the EOT (the max id)."""
    return tokens.argmax(axis=1) + 1


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(row indices, longest length) per batch of at most ``batch_size`` rows, shortest first."""
    if batch_size < 1:
        raise TextEmbeddingError(f"batch size must be at least 1, got {batch_size}")
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield rows, int(lengths[rows].max())


def warn_truncated(
    classnames: Sequence[str], num_templates: int, too_long: np.ndarray, context: int
) -> None:
    """One PromptTruncatedWarning per class with prompts over ``context`` tokens (mask [P])."""
    counts = too_long.reshape(len(classnames), num_templates).sum(axis=1)
    for name, count in zip(classnames, counts, strict=True):
        if count:
            warnings.warn(
                PromptTruncatedWarning(
                    f"class {name!r}: {count} of its {num_templates} prompts are longer than the "
                    f"{context}-token text context and are cut (as open_clip does)"
                ),
                stacklevel=3,
            )


def class_embeddings(
    prompt_embeddings: np.ndarray, classnames: Sequence[str], num_templates: int
) -> np.ndarray:
    """Per class: the L2-normalised mean of its L2-normalised prompt embeddings, float32 [C, E].

    ``prompt_embeddings`` [C * num_templates, E], class-major (as ``build_prompts``). Each row is
    normalised and summed in float64 in prompt order. TextEmbeddingError names the first class
    whose embedding is not finite or zero (broken weights).
    """
    rows = prompt_embeddings.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        means = rows.reshape(len(classnames), num_templates, -1).sum(axis=1) / num_templates
        weights = means / np.linalg.norm(means, axis=1, keepdims=True)
    bad = ~np.isfinite(weights).all(axis=1)
    if bad.any():
        name = classnames[int(np.argmax(bad))]
        raise TextEmbeddingError(
            f"the text tower gave a non-finite or zero embedding for class {name!r} "
            f"(broken weights?)"
        )
    return weights.astype(np.float32)


def embed_prompts(
    tokens: np.ndarray,
    encode: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
    progress: Progress | None = None,
) -> np.ndarray:
    """Run ``encode`` on length-sorted batches cut to their longest prompt; rows in input order.

    ``tokens`` [P, T] int64 CLIP ids; ``encode(tokens [b, t]) -> [b, E]``. ``progress(done,
    total)`` after every batch.
    """
    lengths = token_lengths(tokens)
    result: np.ndarray | None = None
    done = 0
    for rows, length in length_sorted_batches(lengths, batch_size):
        out = np.asarray(encode(np.ascontiguousarray(tokens[rows, :length])))
        if result is None:
            result = np.empty((len(tokens), out.shape[1]), dtype=np.float32)
        result[rows] = out
        done += len(rows)
        if progress is not None:
            progress(done, len(tokens))
    assert result is not None
    return result


def check_classes(classnames: Sequence[str]) -> None:
    """TextEmbeddingError for no class names (or one string instead of a list)."""
    if isinstance(classnames, str) or not classnames:
        raise TextEmbeddingError("no class names to encode")
