"""Zero-shot classifier weights: one L2-normalised text embedding per class (tca.md section 4).

Fast path: prompts sorted by token length, each batch's context cut to its longest prompt and run
through ``TextTower`` (the module the text engine is traced from). Exact under open_clip's causal
mask and EOT pooling; models whose text tower is not open_clip's CLIP transformer fall back to
``model.encode_text`` at the full context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from vlm_export.models.text_tower import TextTower, text_tower_problem
from vlm_export.runtime.text.prompts import (
    Progress,
    TextEmbeddingError,
    build_prompts,
    check_classes,
    class_embeddings,
    embed_prompts,
    warn_truncated,
)
from vlm_export.runtime.text.templates import check_templates

__all__ = ["TextEmbeddingError", "build_prompts", "encode_class_texts"]


def _too_long(tokenizer: Callable, prompts: list[str], tokens: np.ndarray) -> np.ndarray:
    """Mask of prompts cut by the tokenizer (longer than the context), SOT and EOT counted."""
    full = tokens[:, -1] != 0  # only a prompt that fills the context can have been cut
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return full
    too_long = np.zeros(len(prompts), dtype=bool)
    for row in np.flatnonzero(full):
        too_long[row] = len(encode(prompts[row])) + 2 > tokens.shape[1]
    return too_long


def _encoder(model: torch.nn.Module) -> tuple[Callable[[np.ndarray], np.ndarray], bool]:
    """(tokens [b, t] -> embeddings [b, E], whether batches may be cut to their longest prompt)."""
    device = next(model.parameters()).device
    if text_tower_problem(model) is None:
        tower = TextTower(model).eval()
        return lambda tokens: tower(torch.from_numpy(tokens).to(device)).cpu().numpy(), True

    def full_context(tokens: np.ndarray) -> np.ndarray:
        return model.encode_text(torch.from_numpy(tokens).to(device)).float().cpu().numpy()

    return full_context, False


def encode_class_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    progress: Progress | None = None,
) -> np.ndarray:
    """Encode each class as the normalised mean of its normalised prompt embeddings.

    Per class: fill every template with ``prompt_name(class)``, encode the prompts (batches of
    ``batch_size``, shortest prompts first, under ``torch.no_grad``), L2-normalise each prompt
    embedding, average over templates in float64 in prompt order, L2-normalise again. A prompt
    longer than the context is cut as open_clip cuts it, with a PromptTruncatedWarning naming its
    class. ``progress(done, total)`` is called after every batch with counts of prompts.
    Returns float32 [C, E].
    """
    check_classes(classnames)
    templates = check_templates(templates)
    if batch_size < 1:
        raise TextEmbeddingError(f"batch size must be at least 1, got {batch_size}")
    prompts = build_prompts(classnames, templates)
    tokens = tokenizer(prompts).numpy().astype(np.int64)
    warn_truncated(
        classnames, len(templates), _too_long(tokenizer, prompts, tokens), tokens.shape[1]
    )
    encode, cut = _encoder(model)
    with torch.no_grad():
        if cut:
            embeddings = embed_prompts(tokens, encode, batch_size, progress)
        else:
            embeddings = _in_order(tokens, encode, batch_size, progress)
    return class_embeddings(embeddings, classnames, len(templates))


def _in_order(
    tokens: np.ndarray, encode: Callable, batch_size: int, progress: Progress | None
) -> np.ndarray:
    parts = []
    for start in range(0, len(tokens), batch_size):
        parts.append(encode(tokens[start : start + batch_size]))
        if progress is not None:
            progress(start + len(parts[-1]), len(tokens))
    return np.concatenate(parts)
