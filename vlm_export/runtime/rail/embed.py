"""Image embeddings for RAIL from the bundle's engine: one pass per image, progress on stderr."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlm_export.core import live_line
from vlm_export.runtime.pipeline import Pipeline

PROGRESS_INTERVAL_S = 0.25


def embed_images(
    pipeline: Pipeline, paths: Sequence[Path], what: str, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Run every image through ``pipeline``: embeddings [N, E] and final logits [N, C], float32.

    A ``zeroshot`` pipeline gives the plain tower's features (a condensing engine runs with all
    anchors invalid). ``progress`` shows ``what: i/N images`` on stderr. An unreadable image
    raises ImageError naming the file.
    """
    bundle = pipeline.bundle
    embeddings = np.empty((len(paths), bundle.text_embeddings.shape[1]), np.float32)
    logits = np.empty((len(paths), bundle.num_classes), np.float32)
    shown = 0.0
    for index, path in enumerate(paths):
        result = pipeline.process(path, index, str(path))
        embeddings[index], logits[index] = result.embedding, result.logits
        now = time.perf_counter()
        if progress and (now - shown >= PROGRESS_INTERVAL_S or index + 1 == len(paths)):
            shown = now
            live_line.draw(f"{what}: {index + 1}/{len(paths)} images")
    live_line.finish()
    return embeddings, logits
