"""The record of one taught example, and the checks every way in (page, API, fleet, import) uses."""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlm_export.core.errors import UserError, shown
from vlm_export.core.labels import hidden_text_problem
from vlm_export.runtime.text.class_lists import same_prompt

#: an example's id: uuid4().hex, made where it was taught; anything else is refused
EXAMPLE_ID = re.compile(r"^[0-9a-f]{32}$")
#: the reserved label of "nothing of interest" (examples the service learns to reject)
UNKNOWN = "unknown"
#: the domain of the classes that exist because they were taught (a label that was no class)
TAUGHT_DOMAIN = "taught"
MAX_LABEL_CHARS = 100
THUMBNAIL_SIDE = 96
NORM_TOLERANCE = 1e-3  # an L2-normalised float32 vector's norm is 1 within ~1e-7


@dataclass(frozen=True)
class Example:
    """One labelled image embedding, as the store keeps it and the fleet shares it."""

    id: str
    label: str
    source: str
    time_utc: str
    embedding: np.ndarray
    origin: str = ""
    thumbnail: bytes | None = None


def new_id() -> str:
    """A fresh example id (32 lowercase hex digits)."""
    return uuid.uuid4().hex


def check_id(example_id: object) -> str:
    """``example_id`` if it is 32 lowercase hex digits; UserError (one line) otherwise."""
    if not isinstance(example_id, str) or not EXAMPLE_ID.fullmatch(example_id):
        raise UserError(f"not an example id (32 lowercase hex digits): {shown(example_id)!r}")
    return example_id


def check_label(label: object) -> str:
    """The label stripped; UserError if not a string, empty, too long, with control or
    invisible characters (the emoji joiner aside), undecodable bytes, or nothing visible."""
    if not isinstance(label, str):
        raise UserError(f"a label must be a string, got {type(label).__name__}")
    text = label.strip()
    if not text:
        raise UserError("a label must not be empty")
    if len(text) > MAX_LABEL_CHARS:
        raise UserError(f"a label has at most {MAX_LABEL_CHARS} characters, got {len(text):,}")
    problem = hidden_text_problem(text)
    if problem:
        raise UserError(f"a label {problem}: {shown(text)!r}")
    return text


def same_label(label: str, names: Iterable[str]) -> str:
    """``label`` as the class it names, by the prompt CLIP reads (case, ``_`` for a space,
    repeated spaces and Unicode composition aside: ``Cat`` is the class ``cat``, ``red_fox`` the
    class ``red fox``, ``UNKNOWN`` the reserved ``unknown``), or ``label`` itself when no class
    does: two such names would embed alike."""
    if same_prompt(label, UNKNOWN):
        return UNKNOWN
    return next((name for name in names if same_prompt(name, label)), label)


def check_embedding(vector: object, dim: int) -> np.ndarray:
    """``vector`` as a float32 [dim] L2-normalised copy; UserError for a wrong shape or dim,
    a non-finite entry or a zero norm."""
    try:
        array = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError("an embedding must be a vector of numbers") from None
    if array.shape != (dim,):
        raise UserError(f"an embedding must have shape [{dim}], got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise UserError("an embedding holds NaN or infinite values")
    norm = float(np.linalg.norm(array))
    if not norm > 0 or not np.isfinite(norm):
        raise UserError("an embedding has zero norm")
    return (array / norm).astype(np.float32)


def check_stored_embedding(vector: object, dim: int) -> np.ndarray:
    """An embedding made elsewhere (import, fleet), kept bit for bit: float32 [dim], finite,
    of norm 1 within NORM_TOLERANCE; UserError otherwise. Not renormalised, so that every
    device learns from the same bytes."""
    array = np.asarray(vector)
    if array.dtype != np.float32 or array.shape != (dim,):
        raise UserError(
            f"an embedding must be float32 [{dim}], got {array.dtype} {list(array.shape)}"
        )
    if not np.isfinite(array).all():
        raise UserError("an embedding holds NaN or infinite values")
    norm = float(np.linalg.norm(array.astype(np.float64)))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise UserError(f"an embedding must have norm 1, got {norm:.6g}")
    return array


def thumbnail_jpeg(image: Image.Image, side: int = THUMBNAIL_SIDE) -> bytes:
    """``image`` shrunk to at most ``side`` pixels on its longest side, as JPEG bytes."""
    small = image.convert("RGB")
    small.thumbnail((side, side))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()
