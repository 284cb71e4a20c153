"""Step-by-step progress on stderr: numbered steps with timings, and a bar for long loops."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from vlm_export.core import live_line


class Progress:
    """Prints ``[i/n] title ... done (1.2 s)``; ``bar`` redraws one line on a terminal and prints
    quarter marks elsewhere (logs, CI)."""

    def __init__(self, total_steps: int, stream: TextIO | None = None, quiet: bool = False):
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self._index = 0
        self._started = 0.0
        self._last_quarter = -1
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def _write(self, text: str) -> None:
        if not self.quiet:
            if self.stream is sys.stderr:
                live_line.end()  # a bar left unfinished: this line starts a line of its own
            self.stream.write(text)
            self.stream.flush()

    def step(self, title: str) -> None:
        """Start the next numbered step."""
        self._index += 1
        self._started = time.perf_counter()
        self._last_quarter = -1
        self._write(f"[{self._index}/{self.total_steps}] {title} ...\n")

    def done(self, detail: str = "") -> None:
        """End the current step, with its time and an optional detail."""
        seconds = time.perf_counter() - self._started
        suffix = f": {detail}" if detail else ""
        self._write(f"      done in {seconds:.1f} s{suffix}\n")

    def bar(self, done: int, total: int) -> None:
        """Report ``done`` of ``total`` units of the current step."""
        if total <= 0:
            return
        if self._tty:
            width = 30
            filled = int(width * done / total)
            bar = f"      [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
            if self.quiet:
                return
            if self.stream is not sys.stderr:
                self._write(f"\r{bar}" + ("\n" if done >= total else ""))
                return
            live_line.draw(bar)  # any other line on stderr erases it first
            if done >= total:
                live_line.finish()
            return
        quarter = int(4 * done / total)
        if quarter > self._last_quarter:
            self._last_quarter = quarter
            self._write(f"      {done}/{total}\n")
