"""How ``vlm-edge run`` writes its frames: JSON lines, or readable lines and a closing table.

``--format auto`` gives text on a terminal without ``--out`` and JSON lines otherwise (piped,
redirected, or written to a file).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from vlm_export.core import special_files
from vlm_export.core.atomic import PublishedLog
from vlm_export.core.errors import UserError
from vlm_export.core.json_text import dumps
from vlm_export.runtime.io.sources import is_gstreamer
from vlm_export.runtime.result import FrameResult
from vlm_export.runtime.terminal import printable, width

FORMATS = ("auto", "text", "jsonl")
MAX_NAME = 32


def choose_format(wanted: str, out_path: str | None, stdout: IO[str]) -> str:
    """``text`` or ``jsonl``: auto is text only for a terminal on standard output."""
    if wanted != "auto":
        return wanted
    return "text" if out_path is None and stdout.isatty() else "jsonl"


def same_terminal(a: IO[str], b: IO[str]) -> bool:
    """True when both streams are the same terminal (a line on one lands inside the other's)."""
    try:
        if not (a.isatty() and b.isatty()):
            return False
        first, second = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (first.st_dev, first.st_ino, first.st_rdev) == (
        second.st_dev,
        second.st_ino,
        second.st_rdev,
    )


def decided(out: IO[str]) -> None:
    """A frame was decided: an output file waiting for one takes its path (``PublishedLog``)."""
    publish = getattr(out, "publish", None)
    if callable(publish):
        publish()


class JsonLines:
    """One JSON record per line, written whole and flushed."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, record: dict[str, Any], result: FrameResult | None) -> None:
        """Write one frame's record."""
        self.out.write(dumps(record) + "\n")
        self.out.flush()
        if result is not None:
            decided(self.out)

    def finish(self) -> None:
        """Nothing closes a JSON lines stream."""


def short_name(source: str) -> str:
    """A source as a text line shows it: the file name, ``camera:0``, or ``gstreamer``."""
    if is_gstreamer(source):
        return "gstreamer"
    return Path(source).name or source


def _cell(text: str, columns: int) -> str:
    """``text`` printable, cut to its last ``columns - 1`` columns after "…" if longer, padded."""
    text = printable(text)
    if width(text) > columns:
        tail, used = len(text), 1
        while used + width(text[tail - 1]) <= columns:
            tail, used = tail - 1, used + width(text[tail - 1])
        text = "…" + text[tail:]
    return text + " " * (columns - width(text))


class TextLines:
    """``index  source  class  score  ms`` per frame, then a table per class and per stage."""

    def __init__(self, out: IO[str], names: list[str], classes: list[str]) -> None:
        self.out = out
        self.name_width = min(max([width(printable(n)) for n in names] + [6]), MAX_NAME)
        self.class_width = min(max([width(printable(c)) for c in classes] + [5]), MAX_NAME)
        self.per_class: dict[str, list[float]] = {}
        self.stage_ms: dict[str, list[float]] = {}
        self.errors = 0
        self._header: str | None = (
            f"{'frame':>6}  {'source':<{self.name_width}}  "
            f"{'class':<{self.class_width}}  {'score':>6}  {'ms':>8}"
        )

    def _line(self, text: str) -> None:
        if self._header is not None:  # above the first line, after the run's status lines
            text, self._header = f"{self._header}\n{text}", None
        self.out.write(text.rstrip() + "\n")
        self.out.flush()

    def write(self, record: dict[str, Any], result: FrameResult | None) -> None:
        """Write one frame as a line."""
        name = short_name(record["source"])
        if "timestamp_ms" in record:
            name = f"{name}@{record['timestamp_ms'] / 1000:.3f}s"
        head = f"{record['index']:>6}  {_cell(name, self.name_width)}"
        if result is None:
            self.errors += 1
            self._line(f"{head}  error: {printable(record.get('error', ''))}")
            return
        self.per_class.setdefault(result.class_name, []).append(result.score)
        for stage, ms in result.timings.items():
            self.stage_ms.setdefault(stage, []).append(ms)
        self._line(
            f"{head}  {_cell(result.class_name, self.class_width)}  "
            f"{result.score:>6.3f}  {result.timings.get('total', 0.0):>8.1f}"
        )
        decided(self.out)

    def finish(self) -> None:
        """The closing table: frames and mean score per class, then times per stage."""
        done = sum(len(s) for s in self.per_class.values())
        if not done and not self.errors:
            return
        columns = max(self.class_width, len("(unreadable)"))
        rows = [f"\n{'class':<{columns}}  {'frames':>6}  {'share':>6}  {'mean score':>10}"]
        for name, scores in sorted(self.per_class.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            share = 100.0 * len(scores) / (done + self.errors)
            rows.append(
                f"{_cell(name, columns)}  {len(scores):>6}  {share:>5.1f}%  "
                f"{np.mean(scores):>10.3f}"
            )
        if self.errors:
            share = 100.0 * self.errors / (done + self.errors)
            rows.append(f"{'(unreadable)':<{columns}}  {self.errors:>6}  {share:>5.1f}%")
        rows.append(f"\n{'stage':<{columns}}  {'mean ms':>8}  {'p50':>8}  {'p95':>8}  {'max':>8}")
        for stage, values in self.stage_ms.items():  # the pipeline's order
            ms = np.asarray(values)
            rows.append(
                f"{stage:<{columns}}  {ms.mean():>8.2f}  {np.percentile(ms, 50):>8.2f}  "
                f"{np.percentile(ms, 95):>8.2f}  {ms.max():>8.2f}"
            )
        for row in rows:
            self._line(row)


def open_writer(
    fmt: str, out: IO[str], names: list[str], classes: list[str]
) -> JsonLines | TextLines:
    """The writer of a format (``text`` or ``jsonl``)."""
    return TextLines(out, names, classes) if fmt == "text" else JsonLines(out)


Writer = JsonLines | TextLines


@contextlib.contextmanager
def open_output(path: str | None) -> Iterator[IO[str]]:
    """The file ``path`` (line-buffered), else standard output; UserError when it cannot be
    opened. A file (new or existing) is replaced only once a frame was decided (``published``
    by the writers): a run that decides none leaves it as it was; a device or FIFO is written
    through."""
    if path is None:
        yield sys.stdout
        return
    try:
        if special_files.is_stream(path):
            handle = special_files.open_output(path, "w", encoding="utf-8", buffering=1)
        else:
            handle = PublishedLog(path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    try:
        yield handle
    finally:
        with contextlib.suppress(OSError):  # a write error is already reported
            handle.close()


def stdout_lost() -> None:
    """Standard output cannot be written (a full disk): drop what it holds, so that the exit
    does not fail again on it (the error is reported once)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        sys.stdout.flush()
