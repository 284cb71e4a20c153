"""Text as a terminal shows it: names from files and bundles made safe to print, and its width.

A class name or file name may hold a line break, a tab, a terminal escape sequence or bidi
controls, and a file name bytes that are not UTF-8 (Python keeps them as lone surrogates);
printed raw, they break a line in two, move the cursor or recolour the terminal.
"""

from __future__ import annotations

import unicodedata


def printable(text: str) -> str:
    """``text`` with each unprintable character as an escape: ``\\n``, ``\\x1b``, ``\\xff``."""
    if text.isprintable():
        return text
    shown = []
    for char in text:
        if char.isprintable():
            shown.append(char)
        elif 0xDC80 <= ord(char) <= 0xDCFF:  # an undecodable byte of a file name
            shown.append(f"\\x{ord(char) - 0xDC00:02x}")
        else:
            shown.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(shown)


def width(text: str) -> int:
    """Columns ``text`` takes on a terminal: wide (East Asian, emoji) characters take two."""
    return sum(
        0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
        for char in text
    )
