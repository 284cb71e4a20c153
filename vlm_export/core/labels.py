"""Label spaces as adaptation state files record them, and rows that follow their labels.

A label is the pair (domain, class name): names may repeat across the domains of a union label
space (RAIL's X-TAIL), never within one. State files record their labels and the fingerprint of
the image engine they were made with (``engine_fingerprint``); when a bundle's classes change, a
state of the same engine keeps each row with its label (``label_sources``): kept labels keep their
rows, new labels start empty, dropped labels are dropped. A row is never moved to another label.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm_export.core.errors import StateError

Label = tuple[str, str]
#: the longest class or domain name a class list, and a bundle's classes.json, may hold: the
#: bundle loader refuses longer ones, so the writers check it before anything is written
MAX_NAME_CHARS = 1000
#: control and format characters (invisible ones, bidirectional overrides), lone surrogates,
#: private-use and unassigned code points, line and paragraph separators
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_ZERO_WIDTH_JOINER = "\u200d"  # a format character that emoji sequences need
_REPLACEMENT = "\ufffd"  # what undecodable bytes became on the way in


def hidden_text_problem(text: str) -> str | None:
    """Why ``text`` cannot name a class or label (control or invisible characters, bytes that
    were not UTF-8, nothing visible), or None."""
    if any(
        unicodedata.category(char) in _HIDDEN_CATEGORIES and char != _ZERO_WIDTH_JOINER
        for char in text
    ):
        return "holds control or invisible characters"
    if _REPLACEMENT in text:
        return "holds U+FFFD, the mark of bytes that were not UTF-8"
    if not any(unicodedata.category(char)[0] in "LNPS" for char in text):
        return "has no visible character"
    return None


def labels_meta(engine_fingerprint: str, labels: Sequence[Label]) -> dict[str, Any]:
    """The header fields that let a state follow its labels: engine fingerprint and labels."""
    return {"engine": engine_fingerprint, "labels": [[domain, name] for domain, name in labels]}


def saved_labels(meta: dict[str, Any], path: str | Path) -> list[Label] | None:
    """The labels a state header records (None for states saved before labels were recorded)."""
    if "labels" not in meta:
        return None
    raw = meta["labels"]
    if not isinstance(raw, list) or not all(
        isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)
        for item in raw
    ):
        raise StateError(f"{path} has a corrupt header (field 'labels')")
    labels = [(domain, name) for domain, name in raw]
    if len(set(labels)) != len(labels):
        raise StateError(f"{path} records a label twice (corrupt header)")
    return labels


def label_sources(old: Sequence[Label], new: Sequence[Label]) -> list[int | None]:
    """For each new label, the row of the same label in ``old``, or None for a new label."""
    rows = {label: row for row, label in enumerate(old)}
    return [rows.get(label) for label in new]


def describe_change(old: Sequence[Label], new: Sequence[Label]) -> str:
    """'3 classes kept, 2 new, 1 dropped' for a change of label space."""
    kept = len(set(old) & set(new))
    return f"{kept} classes kept, {len(set(new)) - kept} new, {len(set(old)) - kept} dropped"
