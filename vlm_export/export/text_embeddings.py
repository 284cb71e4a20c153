"""Zero-shot classifier weights: one L2-normalised text embedding per class (tca.md section 4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from vlm_export.core.errors import UserError
from vlm_export.runtime.text.class_lists import prompt_name
from vlm_export.runtime.text.templates import check_templates, fill_template

Progress = Callable[[int, int], None]


class TextEmbeddingError(UserError):
    """Text embeddings that cannot be computed: no classes, a bad batch size, broken weights."""


def build_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: every template filled with each class's prompt name."""
    return [fill_template(t, prompt_name(name)) for name in classnames for t in templates]


def encode_class_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    progress: Progress | None = None,
) -> np.ndarray:
    """Encode each class as the normalised mean of its normalised prompt embeddings.

    Per class: fill every template with ``prompt_name(class)``, encode the prompts with
    ``model.encode_text`` (batches of ``batch_size`` prompts, under ``torch.no_grad``),
    L2-normalise each prompt embedding, average over templates, L2-normalise again.
    Accumulation is in float64 in prompt order, so the result does not depend on the batch size
    beyond the text tower's own float32 noise. ``progress(done, total)`` is called after every
    batch with counts of prompts. Returns float32 [C, E].
    """
    if isinstance(classnames, str) or not classnames:
        raise TextEmbeddingError("no class names to encode")
    templates = check_templates(templates)
    if batch_size < 1:
        raise TextEmbeddingError(f"batch size must be at least 1, got {batch_size}")
    prompts = build_prompts(classnames, templates)
    owner = np.repeat(np.arange(len(classnames)), len(templates))
    device = next(model.parameters()).device
    sums: np.ndarray | None = None
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            features = model.encode_text(tokenizer(batch).to(device)).float()
            features = features / features.norm(dim=-1, keepdim=True)
            features_np = features.cpu().numpy().astype(np.float64)
            if sums is None:
                sums = np.zeros((len(classnames), features_np.shape[1]), dtype=np.float64)
            np.add.at(sums, owner[start : start + len(batch)], features_np)
            if progress is not None:
                progress(start + len(batch), len(prompts))
    assert sums is not None
    means = sums / len(templates)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = means / np.linalg.norm(means, axis=1, keepdims=True)
    bad = ~np.isfinite(weights).all(axis=1)
    if bad.any():
        name = classnames[int(np.argmax(bad))]
        raise TextEmbeddingError(
            f"the text tower gave a non-finite or zero embedding for class {name!r} "
            f"(broken weights?)"
        )
    return weights.astype(np.float32)
