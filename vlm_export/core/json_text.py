"""Strict JSON text: never NaN or Infinity, and file names that are not UTF-8 made readable.

Python's ``json`` writes ``NaN`` (not JSON) and turns undecodable file-name bytes (the surrogate
escapes of ``os.fsdecode``) into ``\\udcXX`` escapes of lone surrogates, which strict readers
reject. Here non-finite numbers raise ValueError, and each undecodable byte is written as the
four characters ``\\xNN`` (``escape_text``); ``name_fields`` adds the raw bytes in hex.
"""

from __future__ import annotations

import json
import os
from typing import Any


def escape_text(value: str) -> str:
    """``value`` with undecodable bytes as ``\\xNN`` text (other lone surrogates as ``\\udNNN``)."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def name_fields(key: str, value: str) -> dict[str, str]:
    """``{key: escaped}``, plus ``{key}_hex``: the name's raw bytes, when it is not UTF-8."""
    escaped = escape_text(value)
    if escaped == value:
        return {key: value}
    try:
        raw = os.fsencode(value).hex()
    except UnicodeEncodeError:
        return {key: escaped}
    return {key: escaped, f"{key}_hex": raw}


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return escape_text(value)
    if isinstance(value, dict):
        return {_clean(k) if isinstance(k, str) else k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps`` that refuses NaN and infinities (ValueError) and escapes undecodable text."""
    return json.dumps(_clean(value), allow_nan=False, **options)
