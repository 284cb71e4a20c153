"""``vlm-edge serve`` settings: defaults, then a TOML file (``--config``), then the flags.

The TOML file holds every option under its flag's name (``-`` or ``_``), the sources in a
``[sources]`` table (``name = "spec"``) and the HTTP limits in a ``[limits]`` table::

    bundle = "bundles/vitb16-tca"
    loop = false
    bind = "127.0.0.1"
    port = 8080
    state_dir = "/var/lib/vlm-edge"
    events = ["jsonl:/var/lib/vlm-edge/events.jsonl", "mqtt://127.0.0.1:1883/vlm-edge"]

    [sources]
    front = "0"
    yard = "rtsp://camera.local/stream"

    [sources.dock]  # its own reading options: stride, camera_size, camera_fps
    spec = "2"
    camera_size = "1280x720"

    [limits]
    max_upload_bytes = 10485760

A flag given on the command line overrides the file; ``--source`` flags replace the file's
sources as a whole.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_export.core.errors import UserError, shown, shown_path
from vlm_export.core.json_input import read_text
from vlm_export.runtime.io.preprocess import CROP_MODES, DEFAULT_MAX_PIXELS
from vlm_export.runtime.io.sources import SourceOptions, parse_size
from vlm_export.runtime.pipeline import check_min_score

SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_CONFIG_BYTES = 1 << 20  # a --config file: a few dozen lines in practice


@dataclass
class Limits:
    """What the HTTP API accepts (documented in docs/serve.md; all configurable)."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_upload_pixels: int = DEFAULT_MAX_PIXELS
    max_upload_side: int = 16384
    upload_timeout_s: float = 10.0
    max_classes: int = 1000
    max_class_name_chars: int = 200
    max_text_batch: int = 64


@dataclass
class ServeSettings:
    """Every option of ``vlm-edge serve`` (flags and ``--config FILE.toml`` fill it)."""

    bundle: str | None = None
    sources: list[tuple[str, str]] = field(default_factory=list)  # (name, spec) in order
    #: per source name, reading options that replace the common ones (a [sources.NAME] table)
    source_reading: dict[str, dict[str, Any]] = field(default_factory=dict)
    loop: bool = False
    bind: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    state_dir: str | None = None
    shared_state: str | None = None
    rail_state: str | None = None
    method: str | None = None
    topk: int = 5
    min_score: float | None = None  # a decision below it is "unknown" (as run --min-score)
    min_score_auto: bool = False  # --min-score auto: chosen from the taught examples
    teach_hidden_dim: int | None = None  # the teach learner's d_h (None: teaching's default)
    teach_max_examples: int = 5000  # examples kept at most (the learner's memory bound)
    fleet: str | None = None  # mqtt://HOST:PORT/PREFIX: share taught examples with other devices
    crop: str | None = None  # center | letterbox | squash (as run --crop); None: the bundle's
    stride: int = 1  # every Nth frame of a file or folder
    camera_size: str | None = None  # "WxH" asked of camera indexes
    camera_fps: float | None = None
    checkpoint_every: float = 60.0
    events: list[str] = field(default_factory=list)
    event_every: float = 30.0
    max_fps: float = 0.0  # per source; 0: as fast as the engine goes
    target_ms: float | None = None  # a ladder bundle's budget: the rung whose p90 meets it
    adapt_budget: bool = False  # switch rungs while running (as run --adapt-budget)
    measure: bool = False  # time the rungs at start when vlm-edge bench recorded none
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    health_max_age_s: float = 10.0
    fate_overlay: bool = False  # the page's fate toggle starts on
    cors_origins: list[str] = field(default_factory=list)
    # engine options, as the other vlm-edge commands take them
    backend: str = "auto"
    providers: str | None = None
    threads: int | None = None
    precision: str | None = None
    precision_fallback: bool = False
    allow_drift: bool = False  # run an engine that failed the reference check, with a warning
    no_verify: bool = False
    quiet: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    limits: Limits = field(default_factory=Limits)

    def check(self) -> None:
        """UserError (one line) for values out of range or sources named twice."""
        names = [name for name, _ in self.sources]
        for name in names:
            if not SOURCE_NAME.fullmatch(name):
                raise UserError(
                    f"source name {shown(name)!r}: use 1 to 64 letters, digits, '_', '-', '.' "
                    "(it names the state file)"
                )
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise UserError(f"source name {name!r} is given twice")
            seen.add(name)
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be 1 to 65535, got {self.port}")
        if self.topk < 1:
            raise UserError(f"--topk must be at least 1, got {self.topk}")
        for option in ("checkpoint_every", "event_every", "retry_initial_s", "health_max_age_s"):
            if not getattr(self, option) > 0:
                raise UserError(f"--{option.replace('_', '-')} must be more than 0")
        if self.max_fps < 0:
            raise UserError(f"--max-fps must be 0 (no limit) or more, got {self.max_fps}")
        if self.target_ms is not None and not 0 < self.target_ms < 1e7:
            raise UserError(f"--target-ms must be more than 0, got {self.target_ms:g}")
        if self.retry_max_s < self.retry_initial_s:
            raise UserError("retry_max_s must be at least retry_initial_s")
        if self.state_dir is not None and self.shared_state is not None:
            raise UserError("--state-dir and --shared-state exclude each other: give one")
        if self.token is not None and not self.token.strip():
            raise UserError("--token (or VLM_EDGE_TOKEN) is empty: give a token or none")
        check_min_score(self.min_score)
        if self.teach_max_examples < 1:
            raise UserError(
                f"--teach-max-examples must be at least 1, got {self.teach_max_examples}"
            )
        if self.fleet is not None and not self.fleet.startswith("mqtt://"):
            raise UserError(f"--fleet {shown(self.fleet)}: give mqtt://HOST:PORT/PREFIX")
        if self.crop is not None and self.crop not in CROP_MODES:
            raise UserError(
                f"crop must be one of {', '.join(CROP_MODES)}, got {shown(self.crop)!r}"
            )
        for name in [None, *names]:
            self.source_options(name)
        for name, value in dataclasses.asdict(self.limits).items():
            if not value > 0:
                raise UserError(f"limits.{name} must be more than 0, got {value}")

    def source_options(self, name: str | None = None) -> SourceOptions:
        """How source ``name`` is read (stride, camera size and rate), checked: the common
        options, replaced by the source's own from its ``[sources.NAME]`` table."""
        values = {"stride": self.stride, "camera_size": self.camera_size}
        values["camera_fps"] = self.camera_fps
        values.update(self.source_reading.get(name or "", {}))
        size = parse_size(values["camera_size"]) if values["camera_size"] else None
        return SourceOptions(values["stride"], size, values["camera_fps"])


def _toml_module() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:
        raise UserError('--config needs tomli on Python 3.10: pip install ".[serve]"') from None
    return tomli


def read_config(path: str | Path) -> dict[str, Any]:
    """The TOML file as a dict (UserError, one line, for a missing, malformed or too deeply
    nested file, one that is not UTF-8, larger than MAX_CONFIG_BYTES or not a regular file)."""
    toml = _toml_module()
    what = f"--config {shown_path(path)}"
    text = read_text(path, MAX_CONFIG_BYTES, UserError, what)
    try:
        return toml.loads(text)
    except toml.TOMLDecodeError as exc:
        raise UserError(f"{what} is not valid TOML: {exc}") from None
    except RecursionError:  # the parser recurses once per level of [[[...]]]
        raise UserError(f"{what} is nested too deeply: not a configuration") from None


_FIELDS = {item.name: item for item in dataclasses.fields(ServeSettings)}
_LIMIT_FIELDS = {item.name for item in dataclasses.fields(Limits)}
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "str | None": (str,),
    "int": (int,),
    "int | None": (int,),
    "float": (int, float),
    "float | None": (int, float),
    "bool": (bool,),
    "list[str]": (list,),
}


def _checked(key: str, value: Any, kind: str) -> Any:
    allowed = _TYPES.get(kind, (object,))
    wrong = isinstance(value, bool) and bool not in allowed
    if wrong or not isinstance(value, allowed):
        raise UserError(f"--config: {key} has the wrong type ({type(value).__name__})")
    if kind == "list[str]" and not all(isinstance(item, str) for item in value):
        raise UserError(f"--config: {key} must be a list of strings")
    return float(value) if kind.startswith("float") else value


def apply_config(settings: ServeSettings, data: dict[str, Any]) -> None:
    """Fill ``settings`` from a parsed TOML file (UserError for unknown keys or wrong types)."""
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key == "sources":
            if not isinstance(value, dict):
                raise UserError('--config: [sources] holds name = "spec" lines')
            settings.sources, settings.source_reading = _sources(value)
        elif key == "limits":
            if not isinstance(value, dict):
                raise UserError("--config: limits must be a table ([limits])")
            for raw_limit, limit in value.items():
                name = raw_limit.replace("-", "_")
                if name not in _LIMIT_FIELDS:
                    raise UserError(f"--config: unknown limit {shown(raw_limit)!r}")
                kind = "float" if name == "upload_timeout_s" else "int"
                setattr(settings.limits, name, _checked(f"limits.{name}", limit, kind))
        elif key == "min_score" and value == "auto":
            settings.min_score, settings.min_score_auto = None, True
        elif key in _FIELDS:
            setattr(settings, key, _checked(key, value, str(_FIELDS[key].type)))
        else:
            raise UserError(f"--config: unknown option {shown(raw_key)!r}")


READING_KINDS = {"stride": "int", "camera_size": "str | None", "camera_fps": "float | None"}


def _sources(table: dict[str, Any]) -> tuple[list[tuple[str, str]], dict[str, dict[str, Any]]]:
    """``[sources]``: ``name = "spec"``, or a ``[sources.NAME]`` table with ``spec`` and the
    source's own ``stride``, ``camera_size``, ``camera_fps``."""
    sources, reading = [], {}
    for name, value in table.items():
        if isinstance(value, str):
            sources.append((str(name), value))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("spec"), str):
            raise UserError(f'--config: source {shown(name)!r} needs spec = "..."')
        own = {}
        for raw_key, item in value.items():
            key = raw_key.replace("-", "_")
            if key == "spec":
                continue
            if key not in READING_KINDS:
                raise UserError(f"--config: [sources.{shown(name)}] has unknown {shown(raw_key)!r}")
            own[key] = _checked(f"sources.{name}.{key}", item, READING_KINDS[key])
        sources.append((str(name), value["spec"]))
        reading[str(name)] = own
    return sources, reading


def parse_source(text: str) -> tuple[str, str]:
    """``NAME=SPEC`` -> (name, spec); UserError without a name or a spec."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip() or not spec.strip():
        raise UserError(f"--source {shown(text)!r}: write NAME=SPEC (e.g. front=0)")
    return name.strip(), spec
