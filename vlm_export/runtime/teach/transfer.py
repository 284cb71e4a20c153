"""A labelled set of examples as one file, to move between devices and into ``vlm-edge learn``.

The file is a state file (``core.state_file``: ``.npz`` without pickle, written atomically) of
kind ``teach-examples``: arrays ``embeddings`` float32 [N, E], ``ids``, ``labels``, ``sources``,
``times`` and ``origins`` (unicode [N]), sorted by id, and a JSON header recording the image
engine's fingerprint (``bundle``), the embedding width and the ids' digest. No thumbnails: no
image leaves the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_export.core.errors import StateError, UserError
from vlm_export.core.state_file import load_state, read_meta, save_state
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.rail.dataset import DatasetError, LabelledEmbeddings, prompt_form
from vlm_export.runtime.teach.examples import (
    UNKNOWN,
    Example,
    check_id,
    check_label,
    check_stored_embedding,
)
from vlm_export.runtime.teach.store import ids_digest

KIND = "teach-examples"
SCHEMA_VERSION = 1
TEXT_ARRAYS = ("ids", "labels", "sources", "times", "origins")
ARRAYS = ("embeddings", *TEXT_ARRAYS)


@dataclass(frozen=True)
class ExampleSet:
    """The examples of an export file and the fingerprint and width they were made with."""

    fingerprint: str
    dim: int
    examples: list[Example]


def write_examples(
    path: str | Path, examples: Sequence[Example], fingerprint: str, dim: int
) -> None:
    """Write ``examples`` (sorted by id, thumbnails left out) to ``path`` atomically."""
    items = sorted(examples, key=lambda example: example.id)
    count = len(items)
    embeddings = np.zeros((count, dim), np.float32)
    for row, example in enumerate(items):
        embeddings[row] = example.embedding
    arrays = {"embeddings": embeddings}
    for name, field in zip(
        TEXT_ARRAYS, ("id", "label", "source", "time_utc", "origin"), strict=True
    ):
        arrays[name] = np.array([getattr(e, field) for e in items], dtype=str).reshape(count)
    meta = {"dim": dim, "count": count, "digest": ids_digest([e.id for e in items])}
    save_state(path, KIND, SCHEMA_VERSION, fingerprint, arrays, meta)


def export_header(path: str | Path) -> dict:
    """The header of an export file (StateError if it is not one)."""
    meta = read_meta(path)
    if meta.get("kind") != KIND:
        raise StateError(f"{path} is not an examples export (it holds a {meta.get('kind')!r} file)")
    return meta


def read_examples(path: str | Path, fingerprint: str | None = None) -> ExampleSet:
    """The examples of an export file, each checked (id, label, embedding as stored); StateError
    (one line) for a file of another engine (``fingerprint`` given), or a corrupt one."""
    meta = export_header(path)
    dim, count = meta.get("dim"), meta.get("count")
    if type(dim) is not int or type(count) is not int or dim < 1 or count < 0:
        raise StateError(f"{path} has a corrupt header (dim, count)")

    def shapes(_: dict) -> dict[str, tuple[int, ...]]:
        return {"embeddings": (count, dim), **{name: (count,) for name in TEXT_ARRAYS}}

    if fingerprint is not None and meta.get("bundle") != fingerprint:
        raise StateError(
            f"{path} holds examples of another image engine (fingerprint {meta.get('bundle')}, "
            f"this one is {fingerprint}): they cannot be learned here"
        )
    arrays, meta = load_state(path, KIND, SCHEMA_VERSION, None, expected_shapes=shapes)
    if arrays["embeddings"].dtype != np.float32 or any(
        arrays[name].dtype.kind != "U" for name in TEXT_ARRAYS if count
    ):
        raise StateError(f"{path} has arrays of the wrong type (corrupt export)")
    examples = []
    try:
        for row in range(count):
            ids, labels, sources, times, origins = (str(arrays[n][row]) for n in TEXT_ARRAYS)
            examples.append(
                Example(
                    check_id(ids),
                    _same(check_label(labels), labels),
                    sources,
                    times,
                    check_stored_embedding(arrays["embeddings"][row], dim),
                    origins,
                )
            )
    except UserError as exc:
        raise StateError(f"{path}: example {row + 1} of {count} is refused: {exc}") from None
    if len({e.id for e in examples}) != count:
        raise StateError(f"{path} holds an example id twice (corrupt export)")
    if meta.get("digest") != ids_digest([e.id for e in examples]):
        raise StateError(f"{path}: its ids do not match the digest of its header (corrupt export)")
    return ExampleSet(str(meta.get("bundle")), dim, examples)


def _same(checked: str, given: str) -> str:
    if checked != given:
        raise UserError(f"label {given!r} has spaces around it")
    return checked


def training_examples(
    bundle: Bundle,
    path: Path,
    domain: str,
    shots: int,
    note: Callable[[str], None] = lambda message: None,
) -> LabelledEmbeddings:
    """The examples of a ``vlm-edge examples export`` file as training data of ``domain``:
    each label is the class of that name in the domain (exactly, else in its prompt form);
    ``unknown`` examples keep -1; other labels are left out (said through ``note``). The first
    ``shots`` examples (0: all) of each label by id. StateError for a file of another engine."""
    try:
        export_header(path)
    except StateError as exc:
        raise DatasetError(
            f"{path} is neither a data folder nor a file written by vlm-edge examples export "
            f"({exc})"
        ) from None
    exported = read_examples(path, bundle.engine_fingerprint)
    indices = [int(i) for i in bundle.domain_class_indices(domain)]
    exact = {bundle.classes[i]: i for i in indices}
    prompt = {prompt_form(bundle.classes[i]): i for i in indices}
    taken: dict[str, int] = {}
    rows, labels, left_out, cut = [], [], set(), set()
    for row, example in enumerate(exported.examples):  # sorted by id
        label = example.label
        index = -1 if label == UNKNOWN else exact.get(label, prompt.get(prompt_form(label)))
        if index is None:
            left_out.add(label)
            continue
        if shots and taken.get(label, 0) >= shots:
            cut.add(label)
            continue
        taken[label] = taken.get(label, 0) + 1
        rows.append(row)
        labels.append(index)
    if left_out:
        names = ", ".join(sorted(left_out)[:10]) + (", ..." if len(left_out) > 10 else "")
        note(f"note: labels that are no class of {domain} left out: {names}")
    if cut:
        note(f"note: {len(cut)} label(s) have more than --shots {shots} examples: the first "
             f"{shots} by id taken (--shots 0: all)")  # fmt: skip
    embeddings = np.array([e.embedding for e in exported.examples], np.float32)
    embeddings = embeddings.reshape(len(exported.examples), exported.dim)
    if not any(label >= 0 for label in labels):
        raise DatasetError(f"{path} holds no example of a class of domain {domain!r}")
    return LabelledEmbeddings(embeddings[rows], np.array(labels, dtype=np.int64))
