"""Reading JSON someone else wrote: size and nesting capped before parsing, strict numbers.

Python's parser recurses once per nesting level, so a 100,000-deep ``[[[[...`` file ends in a
RecursionError; the depth is therefore measured first with a linear scan of the brackets outside
strings. ``NaN`` and ``Infinity`` (which Python's parser accepts, but JSON does not) are refused,
as are numbers beyond a float (``1e400``, which Python reads as infinity) or subnormal ones,
and so are strings holding a lone surrogate (``"\ud800"``: valid JSON, but not Unicode text that
can be printed or written as UTF-8).
"""

from __future__ import annotations

import json
import math
import re
import stat
import sys
from pathlib import Path
from typing import Any

from vlm_export.core.errors import UserError

MAX_DEPTH = 64
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
#: a JSON string, or a bracket
_TOKEN_BYTES = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _has_lone_surrogate(value: Any) -> bool:
    """True when a string anywhere in ``value`` (keys too) holds a lone surrogate (no recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def nesting_depth(text: str) -> int:
    """Deepest nesting of ``[]``/``{}`` outside JSON strings (a linear scan, no recursion)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_normal_float(text: str) -> float:
    """A JSON number that fits a float: ``1e400`` (infinite) and subnormal ones such as
    ``1e-310`` (which lose precision, and slow every computation they enter) are refused."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a float")
    if value != 0.0 and abs(value) < sys.float_info.min:
        raise ValueError(f"the number {text[:40]} is subnormal (too close to 0 for a float)")
    return value


def parse_json(
    text: str, what: str, error: type[UserError] = UserError, max_depth: int = MAX_DEPTH
) -> Any:
    """Parse ``text``; raise ``error`` (one line naming ``what``) if too deep or not strict JSON."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise error(f"{what}: JSON nested {depth} levels deep, more than the {max_depth} allowed")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_normal_float)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON ({exc})") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise error(
            f"{what} holds a string with a lone surrogate escape (\\ud800-\\udfff): not text"
        )
    return value


def read_json(
    path: str | Path,
    max_bytes: int,
    error: type[UserError] = UserError,
    max_depth: int = MAX_DEPTH,
    what: str | None = None,
    max_containers: int | None = None,
) -> Any:
    """Read and parse a UTF-8 JSON file of at most ``max_bytes``; ``error`` names what is wrong.

    With ``max_containers``, a file holding more JSON objects and lists than that is refused
    before it is decoded or parsed (a list of a million entries is never built to be refused).
    """
    what = what or str(path)
    data = _read_bytes(path, max_bytes, error, what)
    if max_containers is not None:
        found, depth = count_containers(data, max_containers)
        if depth > max_depth:  # said as parse_json says it
            raise error(
                f"{what}: JSON nested {depth} levels deep, more than the {max_depth} allowed"
            )
        if found > max_containers:
            raise error(
                f"{what} holds {found:,} JSON objects and lists, more than the "
                f"{max_containers:,} it may hold"
            )
    return parse_json(_decoded(data, error, what), what, error, max_depth)


def count_containers(data: bytes, most: int) -> tuple[int, int]:
    """(objects and lists, deepest nesting) of JSON ``data``, brackets in strings skipped, when
    there may be more than ``most`` containers (a scan without copies of the text); else
    (a bound at most ``most``, 0): the brackets in the bytes, strings included, are no more."""
    bound = data.count(b"{") + data.count(b"[")
    if bound <= most:
        return bound, 0
    found = depth = deepest = 0
    for match in _TOKEN_BYTES.finditer(data):
        char = match.group()
        if char in (b"{", b"["):
            found += 1
            depth += 1
            deepest = max(deepest, depth)
        elif char in (b"}", b"]"):
            depth -= 1
    return found, deepest


def read_text(
    path: str | Path, max_bytes: int, error: type[UserError] = UserError, what: str | None = None
) -> str:
    """A UTF-8 text file of at most ``max_bytes`` (a leading byte order mark dropped), read
    without holding more than that; ``error`` (one line) for a FIFO, a device, a larger file or
    one that is not UTF-8."""
    what = what or str(path)
    return _decoded(_read_bytes(path, max_bytes, error, what), error, what)


def _read_bytes(path: str | Path, max_bytes: int, error: type[UserError], what: str) -> bytes:
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or device would block or never end
            raise error(f"{what} is not a regular file")
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(f"{what} is larger than {max_bytes} bytes: not a file this tool wrote")
    return data


def _decoded(data: bytes, error: type[UserError], what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
