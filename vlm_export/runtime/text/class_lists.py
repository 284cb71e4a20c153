"""Class-list files, `--domain NAME=FILE` arguments, and the union label space over domains.

A class list is a text file with one class name per line (surrounding whitespace stripped; blank
lines and lines starting with '#' skipped) or a ``.json`` file holding a list of strings. Its size
is checked before it is read (``MAX_CLASS_LIST_BYTES``, ``MAX_CLASSES``): memory stays bounded
whatever file is given.

Union label space (RAIL's X-TAIL setting): domains are laid out one after another in the order
given, each domain's classes in file order, and every label carries its domain. The same class
name may appear in two domains (e.g. "airplane" in two datasets); it then stays two separate labels,
and ``shared_class_names`` tells the caller which names are shared so that it can say so.
"""

from __future__ import annotations

import io
import re
import stat
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlm_export.core.errors import UserError, shown
from vlm_export.core.json_input import parse_json
from vlm_export.core.labels import MAX_NAME_CHARS, hidden_text_problem

_DOMAIN_NAME = re.compile(r"[\w.-]+")
#: the largest class-list file read (ImageNet-21k's 21,841 names take about 1 MB)
MAX_CLASS_LIST_BYTES = 8 * 1024 * 1024
#: the most class names a list may hold
MAX_CLASSES = 100_000


class ClassListError(UserError):
    """A class list or --domain argument that is missing, malformed, empty or has duplicates."""


@dataclass(frozen=True)
class DomainLabel:
    """One label of the union label space: a class name and the domain it belongs to."""

    domain: str
    name: str


def prompt_name(classname: str) -> str:
    """The class name as it goes into a prompt: '_' replaced by ' '."""
    return classname.replace("_", " ")


def prompt_key(classname: str) -> str:
    """What CLIP's tokenizer sees: prompt name, Unicode composed (NFC: ``e`` + combining accent
    is ``é``), whitespace collapsed, lower-cased."""
    return " ".join(unicodedata.normalize("NFC", prompt_name(classname)).split()).casefold()


def _too_many(path: Path) -> ClassListError:
    return ClassListError(f"class list {path} holds more than {MAX_CLASSES:,} class names")


def _read_json_list(path: Path, text: str) -> list[str]:
    data = parse_json(text, f"class list {path}", ClassListError)
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise ClassListError(f"class list {path} must be a JSON list of strings")
    if len(data) > MAX_CLASSES:
        raise _too_many(path)
    names = [item.strip() for item in data]
    if any(not name for name in names):
        raise ClassListError(f"class list {path} holds an empty class name")
    return names


def _read_text_lines(path: Path, text: str) -> list[str]:
    names: list[str] = []
    for raw in io.StringIO(text, newline=None):  # one line at a time: blank lines cost nothing
        line = raw.strip()
        if line and not line.startswith("#"):
            if len(names) == MAX_CLASSES:
                raise _too_many(path)
            names.append(line)
    return names


def _file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a class list, checked without opening it, or None."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "is a dangling symbolic link" if path.is_symlink() else "not found"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISDIR(info.st_mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        return f"is {kind}, not a regular file (never opened)"
    if info.st_size > MAX_CLASS_LIST_BYTES:
        return (
            f"is {info.st_size / 2**20:.0f} MiB, more than a class list's "
            f"{MAX_CLASS_LIST_BYTES // 2**20} MiB"
        )
    return None


def _check_duplicates(names: list[str], path: Path) -> None:
    seen: dict[str, list[str]] = {}
    for name in names:
        seen.setdefault(prompt_key(name), []).append(name)
    repeated = [" / ".join(map(shown, group[:3])) for group in seen.values() if len(group) > 1]
    if repeated:
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise ClassListError(
            f"class list {path} names a class more than once (same prompt after '_' -> ' ' "
            f"and lower-casing): {'; '.join(repeated[:5])}{more}"
        )


def check_name_lengths(names: Sequence[str], where: str) -> None:
    """ClassListError (one line, the name cut) for a name longer than MAX_NAME_CHARS."""
    for number, name in enumerate(names, 1):
        if len(name) > MAX_NAME_CHARS:
            raise ClassListError(
                f"{where}: class name {number} is {len(name):,} characters, more than the "
                f"{MAX_NAME_CHARS:,} a bundle holds: {shown(name)!r}"
            )


def check_class_names(names: object, where: str) -> list[str]:
    """``names`` as a list of class names, each stripped; ClassListError (one line) for a string
    or non-list, an empty list, a name that is not a string, empty, too long, or holds control
    or invisible characters."""
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
        raise ClassListError(f"{where}: give a list of class names, got {type(names).__name__}")
    if not names:
        raise ClassListError(f"{where}: the list of class names is empty")
    checked = []
    for number, name in enumerate(names, 1):
        if not isinstance(name, str) or not name.strip():
            raise ClassListError(f"{where}: class name {number} is not a non-empty string")
        checked.append(name.strip())
    check_name_lengths(checked, where)
    for number, name in enumerate(checked, 1):
        problem = hidden_text_problem(name)
        if problem:
            raise ClassListError(f"{where}: class name {number} {problem}: {shown(name)!r}")
    return checked


def is_domain_name(name: object) -> bool:
    """True for a domain name: letters, digits, '_', '-' and '.', at most MAX_NAME_CHARS."""
    return (
        isinstance(name, str)
        and bool(_DOMAIN_NAME.fullmatch(name))
        and (len(name) <= MAX_NAME_CHARS)
    )


def same_prompt(a: str, b: str) -> bool:
    """True when two class names give the same prompt (``Cat`` and ``cat``, ``red_fox`` and
    ``red fox``): CLIP's tokenizer cannot tell them apart."""
    return prompt_key(a) == prompt_key(b)


def read_class_list(path: str | Path) -> list[str]:
    """Read class names from a text file (one per line) or a .json list, in file order.

    Raise ClassListError (one line) for a missing or unreadable file, an empty list, a name with
    control or invisible characters, or names that give the same prompt (after '_' -> ' ',
    whitespace collapsing and lower-casing).
    """
    path = Path(path).expanduser()
    problem = _file_problem(path)
    if problem == "not found":
        raise ClassListError(f"class list not found: {path}")
    if problem:
        raise ClassListError(f"class list {path} {problem}")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CLASS_LIST_BYTES + 1)  # it may have grown since stat
        if len(data) > MAX_CLASS_LIST_BYTES:
            raise ClassListError(f"class list {path} is larger than {MAX_CLASS_LIST_BYTES} bytes")
        text = data.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassListError(f"cannot read class list {path}: {exc}") from None
    if path.suffix.lower() == ".json":
        names = _read_json_list(path, text)
    else:
        names = _read_text_lines(path, text)
    if not names:
        raise ClassListError(f"class list {path} holds no class names")
    names = check_class_names(names, f"class list {path}")
    _check_duplicates(names, path)
    return names


def parse_domain_args(args: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Parse ``--domain NAME=FILE`` values into (domain name, class names), in the order given.

    Raise ClassListError for a value without '=', an empty or ill-formed name (letters, digits,
    '_', '-', '.'), a domain given twice, or a bad class list. The same class name in two domains
    is allowed (see ``shared_class_names``).
    """
    domains: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for arg in args:
        name, sep, file = arg.partition("=")
        name, file = name.strip(), file.strip()
        if not sep or not name or not file:
            raise ClassListError(f"--domain expects NAME=FILE, got {shown(arg)!r}")
        if not is_domain_name(name):
            raise ClassListError(
                f"--domain name {shown(name)!r} may hold only letters, digits, '_', '-' and '.' "
                f"(at most {MAX_NAME_CHARS:,})"
            )
        if name in seen:
            raise ClassListError(f"--domain {shown(name)!r} is given more than once")
        seen.add(name)
        domains.append((name, read_class_list(file)))
    return domains


def union_labels(domains: Sequence[tuple[str, Sequence[str]]]) -> list[DomainLabel]:
    """The union label space: domain by domain in the given order, classes in file order."""
    return [DomainLabel(domain, name) for domain, names in domains for name in names]


def shared_class_names(domains: Sequence[tuple[str, Sequence[str]]]) -> dict[str, list[str]]:
    """Class names that occur in more than one domain -> the domains they occur in, in order.

    Names are compared as prompts (after '_' -> ' ' and lower-casing); the key is the spelling in
    the first domain that has it.
    """
    first_spelling: dict[str, str] = {}
    where: dict[str, list[str]] = {}
    for domain, names in domains:
        for name in names:
            key = prompt_key(name)
            first_spelling.setdefault(key, name)
            where.setdefault(key, []).append(domain)
    return {first_spelling[key]: found for key, found in where.items() if len(found) > 1}
