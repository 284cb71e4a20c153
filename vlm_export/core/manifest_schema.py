"""The bundle manifest's JSON Schema (``manifest.schema.json``) and its errors as one line.

The schema documents the bundle format field by field; ``jsonschema`` checks a manifest against it
and the most relevant error becomes "text.embeddings: expected a file name (string), got a list".

Adding a manifest section: describe it under the schema's top-level ``properties`` (type,
``description`` on every field, ``required`` for what readers cannot do without). Unknown sections
and unknown fields inside sections are allowed, so older runtimes read newer bundles of the same
schema version; add a section to the top-level ``required`` list only with a schema_version bump.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from vlm_export.core.errors import BundleError

SCHEMA_FILE = "manifest.schema.json"
_TYPE_WORDS = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


@lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The schema, read from the package (installed as package data)."""
    text = resources.files("vlm_export.core").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def _validator() -> Any:
    try:
        import jsonschema
    except ImportError:
        raise BundleError(
            "the Python package jsonschema is missing (pip install jsonschema): it checks "
            "bundle manifests"
        ) from None
    return jsonschema.Draft202012Validator(manifest_schema())


def describe_value(value: Any) -> str:
    """A value as an error message shows it: "a list", "an object", "null", "'red'", "3"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    return repr(value)


def _field_path(parts: Any) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _expected_type(schema: dict[str, Any], types: Any) -> str:
    names = [types] if isinstance(types, str) else list(types)
    words = " or ".join(_TYPE_WORDS.get(name, name) for name in names)
    title = schema.get("title")
    if title and len(names) == 1:
        article = "an" if title[0] in "aeiou" else "a"
        return f"{article} {title} ({names[0]})"
    return words


def _what_is_wrong(error: Any) -> str:
    """The part of the line after the field path, for one jsonschema ValidationError."""
    kind, expected, value = error.validator, error.validator_value, error.instance
    got = describe_value(value)
    if kind == "type":
        return f"expected {_expected_type(error.schema, expected)}, got {got}"
    if kind == "required":
        missing = [name for name in expected if name not in value]
        return f"missing field {missing[0]!r}" if missing else error.message
    if kind == "enum":
        return f"expected one of {', '.join(repr(v) for v in expected)}, got {got}"
    if kind == "const":
        return f"expected {expected!r}, got {got}"
    bounds = {
        "minimum": ">=",
        "maximum": "<=",
        "exclusiveMinimum": ">",
        "exclusiveMaximum": "<",
    }
    if kind in bounds:
        return f"expected a number {bounds[kind]} {expected}, got {got}"
    if kind in ("minItems", "maxItems"):
        limits = (error.schema.get("minItems"), error.schema.get("maxItems"))
        count = (
            f"exactly {limits[0]}"
            if limits[0] == limits[1]
            else (f"at least {limits[0]}" if kind == "minItems" else f"at most {limits[1]}")
        )
        return f"expected a list of {count} items, got {len(value)}"
    if kind == "minLength":
        return f"expected a non-empty string, got {got}"
    if kind == "pattern":
        description = str(error.schema.get("description", "the expected form")).rstrip(".")
        return f"expected {description[0].lower()}{description[1:]}, got {got}"
    return error.message


def schema_problem(manifest: Any) -> str | None:
    """The most relevant schema error as "field.path: what is wrong", or None if it conforms."""
    validator = _validator()
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(manifest))
    if error is None:
        return None
    return f"{_field_path(error.absolute_path)}: {_what_is_wrong(error)}"
