"""``vlm-edge serve BUNDLE --source NAME=SPEC ...``: the long-running service (extra ``[serve]``).

One engine serves every source (docs/serve.md): a web page and an HTTP API under ``/v1``,
events to a JSONL file or an MQTT broker, Prometheus metrics at ``/metrics``, each source's
TCA state checkpointed atomically. SIGTERM and SIGINT stop it cleanly: the sources stop, every
state is saved, exit status 0. Mistakes are found before any work, one line each: a source
name given twice, a state dir that is a file, a port in use, a non-loopback bind without a
token. A source that cannot be opened at start is one line and is retried; the others start.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm_export.core.atomic import check_can_create
from vlm_export.core.errors import UserError, shown, shown_path
from vlm_export.core.paths import PathArg, check_paths, source_reads, tree_reads
from vlm_export.core.special_files import (
    check_regular,
    clear_stop_request,
    request_stop,
)
from vlm_export.runtime.commands import (
    BUNDLE,
    INTO,
    READ,
    STATE,
    add_budget_arguments,
    add_crop_argument,
    add_engine_arguments,
    add_source_arguments,
    is_media_file,
    status,
)
from vlm_export.runtime.engines.factory import capped_threads
from vlm_export.runtime.pipeline import METHODS
from vlm_export.runtime.serve.config import (
    ServeSettings,
    apply_config,
    parse_source,
    read_config,
)

TOKEN_ENV = "VLM_EDGE_TOKEN"
#: how long a stopping server waits for open requests before it cancels them (live streams end
#: within a second on their own; docker stop allows 10 s before SIGKILL)
SHUTDOWN_GRACE_S = 5.0
#: what the flags name for the write guard (paths from --config are checked with the settings)
SOURCE_ARG = PathArg("source", keep=is_media_file, path_of=lambda value: value.partition("=")[2])
EVENTS_ARG = PathArg(  # any sink but MQTT is taken for a file, as the guard must assume
    "out", path_of=lambda value: "" if "://" in value else value.removeprefix("jsonl:")
)
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client", "paho")
#: flags whose value goes to the settings field of the same name when given
FLAG_FIELDS = (
    "loop",
    "bind",
    "port",
    "token",
    "state_dir",
    "shared_state",
    "rail_state",
    "method",
    "topk",
    "min_score",
    "teach_hidden_dim",
    "teach_max_examples",
    "fleet",
    "crop",
    "stride",
    "camera_size",
    "camera_fps",
    "checkpoint_every",
    "event_every",
    "max_fps",
    "target_ms",
    "adapt_budget",
    "measure",
    "health_max_age_s",
    "backend",
    "providers",
    "threads",
    "precision",
    "precision_fallback",
    "allow_drift",
    "no_verify",
    "quiet",
    "max_pixels",
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="run as a service: several sources on one engine, web page, HTTP API, events",
        description="Serve BUNDLE to several sources at once (needs pip install '.[serve]'): "
        "one engine classifies the newest frame of each source in turn, each source adapts "
        "with its own TCA state (or one shared state); a web page and an HTTP API under /v1, "
        "events to JSONL or MQTT, Prometheus metrics at /metrics. States are checkpointed "
        "atomically; SIGTERM or Ctrl-C saves them and exits 0.",
    )
    parser.add_argument(
        "bundle", nargs="?", type=BUNDLE, help="bundle folder (or bundle = ... in --config)"
    )
    parser.add_argument(
        "--source",
        action="append",
        type=SOURCE_ARG,
        metavar="NAME=SPEC",
        help="a source, repeatable: NAME (letters, digits, _ - .) = anything `vlm-edge run` "
        "takes (camera index, video file, folder, rtsp:// URL, GStreamer pipeline)",
    )
    parser.add_argument("--config", type=READ, metavar="FILE.toml", help="options from a TOML file")
    parser.add_argument(
        "--loop", action="store_true", default=None, help="replay files and folders at their end"
    )
    parser.add_argument("--bind", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8080)")
    parser.add_argument(
        "--token",
        help=f"bearer token for the API and page (or ${TOKEN_ENV}); needed to bind anything "
        "but loopback",
    )
    state = parser.add_mutually_exclusive_group()
    state.add_argument(
        "--state-dir",
        type=INTO,
        metavar="DIR",
        help="one TCA state file per source: DIR/NAME.npz",
    )
    state.add_argument(
        "--shared-state",
        type=STATE,
        metavar="FILE",
        help="one TCA state for all sources (one scene)",
    )
    parser.add_argument(
        "--rail-state",
        type=READ,
        metavar="FILE",
        help="RAIL state for fusion (methods rail, tca+rail)",
    )
    parser.add_argument("--method", choices=METHODS, help="default: the bundle's (as run)")
    parser.add_argument("--topk", type=int, help="classes per decision record (default 5)")
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        metavar="S",
        help="save every state every S seconds (default 60) and at stop",
    )
    parser.add_argument(
        "--events",
        action="append",
        type=EVENTS_ARG,
        metavar="SINK",
        help="jsonl:FILE or mqtt://HOST:PORT/TOPIC (repeatable): an event when a source's "
        "decision changes, and heartbeats",
    )
    parser.add_argument(
        "--event-every", type=float, metavar="S", help="heartbeat period (default 30 s)"
    )
    parser.add_argument(
        "--max-fps", type=float, help="at most this many frames per second per source (0: no limit)"
    )
    parser.add_argument(
        "--health-max-age-s",
        type=float,
        metavar="S",
        help="/healthz fails for a source without a frame in S seconds (default 10)",
    )
    parser.add_argument(
        "--min-score",
        type=min_score_arg,
        metavar="S",
        help="a decision scoring below S (0 to 1) is reported as unknown (label -1), as in run; "
        "'auto': chosen from the taught examples (it rejects 90%% of the 'unknown' ones, "
        "leave-one-out) and kept current as examples arrive",
    )
    teach = parser.add_argument_group("teaching by example (POST /v1/examples, the page)")
    teach.add_argument(
        "--teach-hidden-dim",
        type=int,
        metavar="D",
        help="width of RAIL's random layer for taught examples (default 4096: about 1.3 GB at "
        "5000 examples, for an 8 GB device; 0: ridge on the embeddings)",
    )
    teach.add_argument(
        "--teach-max-examples",
        type=int,
        metavar="N",
        help="keep at most N taught examples (default 5000)",
    )
    teach.add_argument(
        "--fleet",
        metavar="mqtt://HOST:PORT/PREFIX",
        help="share taught examples (embeddings and labels, never images) with every device "
        "serving this bundle on the broker; each learns what any of them is taught",
    )
    add_crop_argument(parser)
    add_source_arguments(parser)
    add_engine_arguments(parser)
    add_budget_arguments(parser)
    parser.set_defaults(
        stride=None,
        backend=None,
        max_pixels=None,
        no_verify=None,
        quiet=None,
        precision_fallback=None,
        allow_drift=None,
    )
    return parser


def min_score_arg(text: str) -> float | str:
    """``--min-score``: a number, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"give a number from 0 to 1 or 'auto', not {text!r}"
        ) from None


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServeSettings:
    """Defaults, then --config, then the flags given; the token from the environment if unset."""
    environ = os.environ if environ is None else environ
    settings = ServeSettings()
    if args.config:
        apply_config(settings, read_config(args.config))
    if args.bundle is not None:
        settings.bundle = args.bundle
    if args.source:  # the file's sources (and their own reading options) give way
        settings.sources = [parse_source(text) for text in args.source]
        settings.source_reading = {}
    if args.events:
        settings.events = list(args.events)
    for name in FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(settings, name, value)
    if settings.min_score == "auto":
        settings.min_score, settings.min_score_auto = None, True
    if settings.token is None and TOKEN_ENV in environ:
        settings.token = environ[TOKEN_ENV]
    settings.check()
    return settings


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (UserError, one line, when that port is taken)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror:
        raise UserError(f"--bind {shown(host)}: not an address of this machine") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {shown(host)}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def check_settings(settings: ServeSettings) -> None:
    """The mistakes found before any work (bundle, engine, sources untouched)."""
    if settings.bundle is None:
        raise UserError("give a BUNDLE (argument or bundle = ... in --config)")
    if not settings.sources:
        raise UserError("give at least one --source NAME=SPEC")
    if not is_loopback(settings.bind) and settings.token is None:
        raise UserError(
            f"--bind {shown(settings.bind)} is reachable from other machines: give --token TOKEN "
            f"(or ${TOKEN_ENV}), or bind 127.0.0.1"
        )
    if settings.state_dir is not None:
        folder = Path(settings.state_dir)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--state-dir {shown_path(folder)} is a file; give a folder")
        check_can_create(folder, folder=True)
    if settings.shared_state is not None:
        check_can_create(settings.shared_state)
    from vlm_export.runtime.serve.outputs.events import jsonl_path
    from vlm_export.runtime.serve.service import state_file

    states = [
        ("--state-dir", state_file(settings.state_dir, name) if settings.state_dir else None)
        for name, _ in settings.sources
    ] + [("--shared-state", settings.shared_state)]
    for role, path in states:
        if path is not None:
            check_regular(role, path)
    reads: list[tuple[str, Any]] = [*tree_reads("BUNDLE", settings.bundle)]
    for _, spec in settings.sources:
        reads += source_reads("--source", spec, is_media_file)
    reads += [("--rail-state", settings.rail_state), *states]
    events = [("--events", jsonl_path(spec)) for spec in settings.events]
    check_paths(reads, [*states, *events])


def check_installed() -> None:
    """One line naming the extra when the [serve] packages are missing."""
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f'vlm-edge serve needs {", ".join(missing)}: pip install ".[serve]" (or '
            "'vlm-export[serve]')"
        )


class _Stop:
    """SIGTERM / SIGINT: ask the server to exit (once more: at once)."""

    def __init__(self) -> None:
        self.server: Any = None
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum
        request_stop()  # a wait for a FIFO's reader (--events jsonl:FIFO) ends too
        if self.server is not None:
            if self.server.should_exit:
                self.server.force_exit = True
            self.server.should_exit = True


@contextlib.contextmanager
def _signals(stop: _Stop) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear_stop_request()


def handle(args: argparse.Namespace) -> int:
    """Check everything, start the service and the HTTP server; stop cleanly on a signal."""
    check_installed()  # first: the checks below import the service's own modules
    settings = settings_from(args)
    settings.threads = capped_threads(settings.threads)
    check_settings(settings)
    stop = _Stop()  # from here on a stop signal is an orderly stop, even while starting
    with _signals(stop):
        return _serve(settings, stop)


def _serve(settings: ServeSettings, stop: _Stop) -> int:
    sock = listen(settings.bind, settings.port)  # a port in use: said before any work
    import uvicorn

    from vlm_export.runtime.serve.http.app import create_app
    from vlm_export.runtime.serve.http.protocol import http_protocol
    from vlm_export.runtime.serve.service import Service

    class Server(uvicorn.Server):
        """uvicorn without its own signal handling: ours stops it (and never re-raises). Its
        shutdown first tells live streams to end, since it waits for every open response."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def shutdown(self, sockets: Any = None) -> None:
            self.config.app.state.closing = True
            await super().shutdown(sockets)

    with contextlib.ExitStack() as stack:
        stack.callback(sock.close)
        service = Service.open(settings)
        stack.callback(_stopped, service)
        for note in service.notes:
            status(note)
        status(service.describe())
        if service.budget is not None:
            status(f"budget: {service.budget.reason}")
        app = create_app(service, settings)
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http=http_protocol(settings.limits.upload_timeout_s),
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
        server = Server(config)
        stop.server = server
        service.start()
        if stop.signal is None:
            where = f"[{settings.bind}]" if ":" in settings.bind else settings.bind
            status(f"serving on http://{where}:{settings.port}/ (stop: Ctrl-C or SIGTERM)")
            server.run(sockets=[sock])
    if stop.signal is not None:
        status(f"stopped ({signal.Signals(stop.signal).name}); states saved")
    return 0


def _stopped(service: Any) -> None:
    service.stop()
    saved = [str(path) for path in service.checkpoint_paths()]
    if saved:
        status(f"{len(saved)} state file(s) saved")
