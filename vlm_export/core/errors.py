"""Errors that the command-line tools print as one line (no traceback) and exit non-zero on."""


class UserError(Exception):
    """A mistake in what the user asked for or handed in: bad path, bad option, bad bundle."""


class BundleError(UserError):
    """A bundle that is missing, truncated, tampered with or of an unknown schema."""


class StateError(UserError):
    """A state file that is corrupt, of another schema, or from another bundle."""


#: how much of a user's string a message shows (a longer one is cut, with "...")
SHOWN_CHARS = 80


def shown(text: object, limit: int = SHOWN_CHARS) -> str:
    """``text`` for a message: cut to ``limit`` characters (ending in "...") when longer."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: how much of a path a message shows: a longer one keeps its start and its end (the file name)
SHOWN_PATH_CHARS = 160


#: characters of a long path's start a message keeps (where the path is)
SHOWN_PATH_HEAD = 20


def shown_path(path: object, limit: int = SHOWN_PATH_CHARS) -> str:
    """``path`` for a message: whole up to ``limit`` characters, else its start and its end
    around "...". The end keeps the whole file name (what tells a user which file) and the
    folders before it as room allows; a name too long for that keeps its own end (its suffix).
    """
    text = str(path)
    if len(text) <= limit:
        return text
    name = len(text) - max(text.rfind("/"), text.rfind("\\"))  # the name and its separator
    tail = min(max((limit - 3) * 2 // 3, name), limit - 3 - SHOWN_PATH_HEAD)
    return text[: limit - 3 - tail] + "..." + text[-tail:]


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError no command caught: the file and the reason, no traceback."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    name = exc.filename if exc.filename is not None else None
    return f"{name}: {reason}" if name is not None else reason


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a library's error, cut to ``limit`` characters (its type if empty)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
