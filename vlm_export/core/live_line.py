"""The progress line: one line on standard error that redraws in place while work goes on.

Any other line written to standard error while it shows would land inside it ("19/20 frames
... vlm-edge: state saved"), so whatever prints a line there calls ``end()`` first: it erases
the progress line, and the next ``draw()`` draws it again below. ``finish()`` keeps the last
one on the screen when the work is done.
"""

from __future__ import annotations

import sys

_shown = False


def draw(text: str) -> None:
    """Show ``text`` as the progress line, over the previous one."""
    global _shown
    sys.stderr.write(f"\r{text}\x1b[K")
    sys.stderr.flush()
    _shown = True


def end() -> None:
    """Erase the progress line if one shows, so that the next line starts on a clean line."""
    global _shown
    if _shown:
        _shown = False
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


def finish() -> None:
    """Leave the progress line on the screen as it stands and start a new line after it."""
    global _shown
    if _shown:
        _shown = False
        sys.stderr.write("\n")
        sys.stderr.flush()


def shown() -> bool:
    """True while a progress line shows."""
    return _shown
