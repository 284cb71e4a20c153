"""How a message names an option: ``--min-score`` on the command line, ``min_score`` in Python.

Checks shared by the command-line tools and the Python API name the value the user gave through
``option("min_score")``. The Python API runs inside ``python_names()``, so that its errors name
the parameter the caller passed rather than a flag they never typed.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_PYTHON = contextvars.ContextVar("vlm_export_python_names", default=False)


def option(name: str, metavar: str = "") -> str:
    """``name`` (a Python parameter name) as the caller knows it: ``--min-score`` (followed by
    ``metavar`` when given: ``--target-ms MS``) or ``min_score``."""
    if _PYTHON.get():
        return name
    flag = "--" + name.replace("_", "-")
    return f"{flag} {metavar}" if metavar else flag


def option_value(name: str, value: str) -> str:
    """An option given a value, as the caller would write it: ``--backend onnxruntime`` or
    ``backend="onnxruntime"``."""
    return f'{name}="{value}"' if _PYTHON.get() else f"{option(name)} {value}"


@contextlib.contextmanager
def python_names() -> Iterator[None]:
    """While active (this thread or task), ``option`` gives Python parameter names."""
    token = _PYTHON.set(True)
    try:
        yield
    finally:
        _PYTHON.reset(token)
