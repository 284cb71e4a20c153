"""Zero-shot classifier weights: one L2-normalised text embedding per class (tca.md section 4).

Fast path, exact under open_clip's causal mask and EOT pooling: every template's token prefix
shared by all classes ("SOT a photo of a") is run once and its keys and values cached
(``SharedPrefixEncoder``); then only each prompt's own tokens run, in batches sorted by their
length and cut to the longest. Models whose text tower is not open_clip's CLIP transformer fall
back to ``model.encode_text`` at the full context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from vlm_export.models.text_prefix import SharedPrefixEncoder
from vlm_export.models.text_tower import TextTower, text_tower_problem
from vlm_export.runtime.text.prompts import (
    Progress,
    TextEmbeddingError,
    build_prompts,
    check_classes,
    class_embeddings,
    length_sorted_batches,
    token_lengths,
    warn_truncated,
)
from vlm_export.runtime.text.templates import check_templates

__all__ = [
    "TextEmbeddingError",
    "build_prompts",
    "embed_with_shared_prefixes",
    "encode_class_texts",
]


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


def shared_prefix_lengths(tokens: np.ndarray, group: np.ndarray, groups: int) -> np.ndarray:
    """Per group of rows: the length of the token prefix all its rows share, at least 1 and short
    of every row's EOT (each row keeps >= 1 own token). ``tokens`` [N, T] CLIP ids, ``group``
    [N] in [0, groups), every group non-empty."""
    lengths = token_lengths(tokens)
    result = np.ones(groups, dtype=np.int64)
    for g in range(groups):
        rows = tokens[group == g]
        limit = int(lengths[group == g].min()) - 1
        differs = (rows[:, :limit] != rows[:1, :limit]).any(axis=0)
        result[g] = max(1, int(np.argmax(differs)) if differs.any() else limit)
    return result


def embed_with_shared_prefixes(
    tower: TextTower,
    tokens: np.ndarray,
    group: np.ndarray,
    groups: int,
    batch_size: int,
    progress: Progress | None = None,
) -> np.ndarray:
    """Prompt embeddings [N, E] float32, each group's shared token prefix computed once.

    ``tokens`` [N, T] int64, ``group`` [N] in [0, groups), every group non-empty (prompts of one
    template form a group). Groups are taken ``batch_size`` at a time (their prefixes run as one
    batch); their rows run in batches of ``batch_size`` sorted by their own length (after the
    prefix), each cut to its longest. ``progress(done, total)`` after every batch.
    """
    device = next(tower.parameters()).device
    encoder = SharedPrefixEncoder(tower)
    prefix = shared_prefix_lengths(tokens, group, groups)
    own_lengths = token_lengths(tokens) - prefix[group]
    first_row = np.unique(group, return_index=True)[1]  # [groups]: where each group's prefix is
    result = np.empty((len(tokens), tower.embed_dim), dtype=np.float32)
    done = 0
    for first in range(0, groups, batch_size):
        chosen = np.arange(first, min(first + batch_size, groups))
        prefixes = np.ascontiguousarray(tokens[first_row[chosen], : int(prefix[chosen].max())])
        states = encoder.prefix_states(torch.from_numpy(prefixes).to(device))
        prefix_lengths = torch.from_numpy(prefix[chosen]).to(device)
        members = np.flatnonzero((group >= chosen[0]) & (group <= chosen[-1]))
        for batch, longest in length_sorted_batches(own_lengths[members], batch_size):
            rows = members[batch]
            steps = np.arange(longest)
            start = prefix[group[rows], None]
            columns = np.minimum(start + steps, tokens.shape[1] - 1)
            own = np.where(steps < own_lengths[rows, None], tokens[rows[:, None], columns], 0)
            out = encoder.embed(
                torch.from_numpy(own).to(device),
                torch.from_numpy(group[rows] - chosen[0]).to(device),
                prefix_lengths,
                states,
            )
            result[rows] = out.cpu().numpy()
            done += len(rows)
            if progress is not None:
                progress(done, len(tokens))
    return result


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
    longer than the context is cut as open_clip cuts it, with a logged warning naming its
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
    with torch.inference_mode():
        if text_tower_problem(model) is None:
            tower = TextTower(model).eval()
            group = np.arange(len(prompts)) % len(templates)
            embeddings = embed_with_shared_prefixes(
                tower, tokens, group, len(templates), batch_size, progress
            )
        else:
            embeddings = _full_context(model, tokens, batch_size, progress)
    return class_embeddings(embeddings, classnames, len(templates))


def _full_context(
    model: torch.nn.Module, tokens: np.ndarray, batch_size: int, progress: Progress | None
) -> np.ndarray:
    """``model.encode_text`` over the full context, in prompt order."""
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(tokens[start : start + batch_size]).to(device)
        parts.append(model.encode_text(batch).float().cpu().numpy())
        if progress is not None:
            progress(start + len(parts[-1]), len(tokens))
    return np.concatenate(parts)
