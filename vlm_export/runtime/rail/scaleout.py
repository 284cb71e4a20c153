"""RAIL statistics of a labelled image set on a Ray cluster (``vlm-edge learn --ray``).

G = sum phi^T phi and B = sum phi^T Y are sums over samples, so shards add up exactly. Each
worker is a Ray actor that holds the bundle's engine (ONNX Runtime, or TensorRT where it asks for
a GPU) and a primal learner on the driver's W_r; the driver reads the image files and sends them
in batches, the actors decode, preprocess, embed and accumulate G and B in float64. A pairwise
tree reduction then folds the actors' matrices into one, block by block (actor to actor: never
more than a block of each matrix in the object store, never every matrix in one place), and the
driver adds the result into its own learner block by block. The driver's learner then solves and
is saved like a single-machine ``learn``'s, so the state merges with device states.

Ray is imported only here and only when used (the ``[ray]`` extra); the device never needs it.
The bundle travels through the object store when a worker does not have it at the driver's path
(same fingerprint). Any worker failure ends the run with one line before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlm_export.core.errors import UserError
from vlm_export.runtime.io.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_pixels,
    check_sides,
    open_uncapped,
)
from vlm_export.runtime.rail.primal import PrimalAdapter

BATCH_IMAGES = 32  # images per task sent to an actor
BATCH_ROWS = 4096  # computed embeddings per task sent to an actor
IN_FLIGHT_PER_WORKER = 2  # batches queued per actor (bounds the object store's use)
BLOCK_BYTES = 64 * 2**20  # bytes of one block of G moved between actors
LOCAL_OBJECT_STORE = 1 << 30  # object store of a local instance
CONNECT_TIMEOUT_S = 3.0  # for the name lookup and the connection together
GCS_PORT, CLIENT_PORT = 6379, 10001  # Ray's defaults: a cluster's GCS, the Ray Client server


class RayError(UserError):
    """Ray missing, a cluster that cannot be reached, or a worker that failed."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayError(
            '--ray needs Ray on this machine and the workers: pip install ".[ray]"'
        ) from None
    return ray


def ray_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) that a ``--ray`` address connects to (Ray's default ports where none is
    given: 6379 for a cluster's GCS, 10001 for ``ray://``); None for ``auto``."""
    if address == "auto":
        return None
    client = address.startswith("ray://")
    target = address.removeprefix("ray://").rstrip("/")
    if target.startswith("["):  # an IPv6 address, [::1]:6379
        host, _, rest = target[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, colon, port_text = target.rpartition(":")
        host, port_text = (host, port_text) if colon else (target, "")
    if not host:
        raise RayError(f"--ray address {address[:80]!r} names no host")
    if not port_text:
        return host, CLIENT_PORT if client else GCS_PORT
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise RayError(f"--ray address {address[:80]!r}: the port must be a number 1-65535")
    return host, int(port_text)


class _LookupTimeout(TimeoutError):
    """The name lookup of a Ray address took too long."""


def _resolve(host: str, port: int, seconds: float) -> list[Any]:
    """getaddrinfo within ``seconds`` (a name server that drops packets is not waited for)."""
    found: list[Any] = []
    failed: list[OSError] = []

    def lookup() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=lookup, name="ray-address-lookup", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise _LookupTimeout(f"its name did not resolve within {seconds:g} s")
    if failed:
        raise failed[0]
    return found


def _check_reachable(address: str, seconds: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse within ``seconds`` in all (name lookup and every address it gives) a Ray address
    that does not answer, rather than letting Ray wait for it."""
    endpoint = ray_endpoint(address)
    if endpoint is None:
        return
    deadline = time.monotonic() + seconds
    try:
        last: OSError = ConnectionRefusedError(errno.ECONNREFUSED, "connection refused")
        for family, kind, proto, _, where in _resolve(*endpoint, seconds):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            with socket.socket(family, kind, proto) as probe:
                probe.settimeout(left)
                try:
                    probe.connect(where)
                    return
                except OSError as exc:
                    last = exc
        raise last
    except OSError as exc:
        if isinstance(exc, _LookupTimeout):
            reason = str(exc)
        elif isinstance(exc, TimeoutError):
            reason = f"no answer within {seconds:g} s"
        else:
            reason = exc.strerror or str(exc)
        raise RayError(
            f"cannot reach the Ray cluster at {address[:80]} ({reason}): start it with "
            "`ray start --head` and give its address, or leave the address out for a local "
            "instance"
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def bundle_files(folder: Path) -> dict[str, bytes]:
    """Every file of a bundle folder by relative path (what a worker without it receives)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def decode(name: str, data: bytes) -> Image.Image:
    """A fully decoded image from its file's bytes; ImageError naming the file otherwise."""
    if not data:
        raise ImageError(f"cannot read image {name}: file is empty")
    try:
        with open_uncapped(io.BytesIO(data)) as image:
            check_sides(image.width, image.height, f"image {name}")
            check_pixels(image.width, image.height, DEFAULT_MAX_PIXELS, f"image {name}", image.mode)
            image.load()
        return image
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {name}: not an image PIL can decode") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read image {name}: {exc}") from None


class StatisticsWorker:
    """A Ray actor's state: the bundle's engine and a learner that only accumulates G and B.
    ``engine`` None: no engine (the embeddings come computed, ``learn_embeddings``)."""

    def __init__(
        self,
        bundle_path: str,
        fingerprint: str,
        files: Any,
        setup: dict[str, Any],
        projection: np.ndarray | None,
        engine: dict[str, Any] | None,
    ) -> None:
        self.learner = PrimalAdapter(**setup, projection=projection)
        self.backend = None
        self._folder: tempfile.TemporaryDirectory | None = None
        if engine is not None:
            self._open_engine(bundle_path, fingerprint, files, engine)

    def _open_engine(
        self, bundle_path: str, fingerprint: str, files: Any, engine: dict[str, Any]
    ) -> None:
        from vlm_export.runtime.bundle import Bundle
        from vlm_export.runtime.engines.factory import open_backend
        from vlm_export.runtime.pipeline import Pipeline

        bundle = None
        with contextlib.suppress(UserError, OSError):
            bundle = Bundle.open(bundle_path, verify=False)
        if bundle is None or bundle.fingerprint != fingerprint:  # not here: shipped copy
            self._folder = tempfile.TemporaryDirectory(prefix="vlm-bundle-")
            for name, data in _ray().get(files).items():
                target = Path(self._folder.name) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            bundle = Bundle.open(self._folder.name, verify=True)
        self.backend = open_backend(
            bundle, engine["backend"], engine["providers"], engine["threads"]
        )
        self.pipeline = Pipeline(bundle, self.backend, "zeroshot")

    def describe(self) -> str:
        """The engine this worker runs (if any) and its host."""
        what = "computed embeddings" if self.backend is None else self.backend.description
        return f"{what} on {socket.gethostname()}"

    def learn(self, names: Sequence[str], blobs: Sequence[bytes], labels: np.ndarray) -> int:
        """Decode, preprocess and embed a batch, then add it to G and B; returns its size."""
        features = np.stack(
            [
                self.pipeline.process(decode(name, blob), 0, name).embedding
                for name, blob in zip(names, blobs, strict=True)
            ]
        )
        self.learner.accumulate(features, labels)
        return len(labels)

    def learn_embeddings(self, features: np.ndarray, labels: np.ndarray) -> int:
        """Add computed embeddings to G and B; a label of -1 (a taught ``unknown`` example)
        adds to G only (targets 0 on every class). Returns the batch's size."""
        known = labels >= 0
        if known.any():
            self.learner.accumulate(features[known], labels[known])
        if not known.all():
            self.learner.accumulate_unlabelled(features[~known])
        return len(labels)

    def rows(self, start: int, count: int) -> np.ndarray:
        """Rows start .. start + count of G (whole, symmetric)."""
        return np.ascontiguousarray(self.learner.gram[start : start + count])

    def side(self) -> tuple[np.ndarray, np.ndarray, int]:
        """B, the learned mask and the sample count."""
        learner = self.learner
        return learner.cross, learner.learned_mask, learner.num_samples

    def absorb(self, other: Any, rows: int) -> int:
        """Add another worker's statistics to this one's, one block of G at a time."""
        ray = _ray()
        size = self.learner.feature_dim
        blocks = (
            (start, ray.get(other.rows.remote(start, rows))) for start in range(0, size, rows)
        )
        self.learner.add_statistics(blocks, *ray.get(other.side.remote()))
        ray.get(other.release.remote())
        return self.learner.num_samples

    def release(self) -> None:
        """Drop the matrices (after another worker absorbed them)."""
        self.learner = None

    def peak_rss_bytes(self) -> int:
        """This worker's peak resident memory (VmHWM), 0 where /proc does not say."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0


class RayStatistics:
    """Workers on a Ray cluster (or a local instance) that learn a primal learner's statistics.

    Use as a context manager: connects (or starts Ray) and starts the actors; ``accumulate``
    embeds and accumulates labelled images; ``reduce_into`` adds the statistics to a learner.
    """

    def __init__(
        self,
        bundle: Any,
        learner: PrimalAdapter,
        address: str | None,
        workers: int | None,
        engine: dict[str, Any] | None,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        """``engine`` None starts workers without an engine, for ``accumulate_embeddings``."""
        if learner.route != "cholesky":
            raise RayError("--ray learns the cholesky route's statistics G and B (not woodbury)")
        if workers is not None and workers < 1:
            raise RayError(f"--workers must be at least 1, got {workers}")
        self.ray = _ray()
        self.log = log
        self._started = False
        self._connect(address, workers)
        try:
            self.workers = self._start_workers(bundle, learner, workers, engine)
        except BaseException:
            self.close()
            raise
        self.worker_peaks: list[int] = []

    def _connect(self, address: str | None, workers: int | None) -> None:
        ray = self.ray
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
        }
        if address:
            _check_reachable(address)
            options["address"] = address
        else:
            options.update(
                num_cpus=workers or os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE
            )
        try:
            ray.init(**options)
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError from Ray
            raise RayError(
                f"cannot start Ray at {address or 'this machine'}: {_one_line(exc)}"
            ) from None
        self._started = True

    def _start_workers(
        self, bundle: Any, learner: PrimalAdapter, workers: int | None, engine: dict[str, Any]
    ) -> list[Any]:
        ray = self.ray
        resources = ray.cluster_resources()
        gpu = engine is not None and (
            engine["backend"] == "tensorrt"
            or any(name in ("cuda", "tensorrt") for name in engine["providers"] or ())
            or (engine["backend"] == "auto" and resources.get("GPU", 0) >= 1)
        )
        available = int(resources.get("GPU" if gpu else "CPU", 1)) or 1
        count = workers or available
        if gpu and count > available:
            raise RayError(
                f"--workers {count} asks for more GPUs than the cluster has ({available})"
            )
        setup = {
            "in_dim": learner.in_dim,
            "num_classes": learner.num_classes,
            "hidden_dim": learner.hidden_dim,
            "ridge": learner.ridge,
            "seed": learner.seed,
        }
        files = None if engine is None else ray.put(bundle_files(bundle.path))
        projection = ray.put(learner.projection)
        actor = ray.remote(StatisticsWorker).options(
            num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0, max_task_retries=0
        )
        handles = [
            actor.remote(
                str(Path(bundle.path).resolve()),
                bundle.fingerprint,
                files,
                setup,
                projection,
                engine,
            )
            for _ in range(count)
        ]
        descriptions = self._get([handle.describe.remote() for handle in handles])
        for index, text in enumerate(descriptions):
            self.log(f"Ray worker {index}: {text}")
        return handles

    def _get(self, refs: Any) -> Any:
        """ray.get, with every Ray failure as one line (a UserError inside a worker as itself)."""
        ray = self.ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, UserError):
                raise type(cause)(str(cause)) from None
            raise RayError(f"a Ray worker failed: {_one_line(cause or exc)}") from None
        except ray.exceptions.RayError as exc:
            raise RayError(
                f"a Ray worker died ({type(exc).__name__}: {_one_line(exc).split('. ')[0]}); "
                "nothing was written"
            ) from None

    def accumulate(self, paths: Sequence[Path], labels: np.ndarray) -> int:
        """Send the images in batches to the workers; they embed and accumulate them."""
        return self._spread(_batches(paths, labels), "learn")

    def accumulate_embeddings(self, features: np.ndarray, labels: np.ndarray) -> int:
        """Send computed embeddings [N, E] (labels -1: no class) in batches to the workers."""
        return self._spread(embedding_batches(features, labels), "learn_embeddings")

    def _spread(self, batches: Iterator[tuple[Any, ...]], method: str) -> int:
        """Hand ``batches`` to the workers' ``method``, a few in flight per worker."""
        ray = self.ray
        pending: dict[Any, int] = {}
        done = 0
        idle = list(range(len(self.workers))) * IN_FLIGHT_PER_WORKER
        while True:
            while idle:
                batch = next(batches, None)
                if batch is None:
                    break
                worker = idle.pop()
                pending[getattr(self.workers[worker], method).remote(*batch)] = worker
            if not pending:
                return done
            ready, _ = ray.wait(list(pending), num_returns=1)
            done += self._get(ready[0])
            idle.append(pending.pop(ready[0]))

    def reduce_into(self, learner: PrimalAdapter) -> None:
        """Tree-reduce the workers' statistics pairwise, then add them to ``learner``."""
        rows = max(1, BLOCK_BYTES // (8 * learner.feature_dim))
        alive = list(self.workers)
        while len(alive) > 1:
            pairs = list(zip(alive[::2], alive[1::2], strict=False))
            self._get([keep.absorb.remote(other, rows) for keep, other in pairs])
            alive = [keep for keep, _ in pairs] + (alive[-1:] if len(alive) % 2 else [])
        self.worker_peaks = self._get([worker.peak_rss_bytes.remote() for worker in self.workers])
        root = alive[0]
        learner.add_statistics(
            self._blocks(root, learner.feature_dim, rows), *self._get(root.side.remote())
        )

    def _blocks(self, root: Any, size: int, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        starts = range(0, size, rows)
        pending = [root.rows.remote(start, rows) for start in starts[:2]]
        for index, start in enumerate(starts):
            block = self._get(pending.pop(0))
            if index + 2 < len(starts):
                pending.append(root.rows.remote(starts[index + 2], rows))
            yield start, block

    def close(self) -> None:
        """Stop the workers and leave (or stop) Ray."""
        if self._started:
            self.ray.shutdown()
            self._started = False

    def __enter__(self) -> RayStatistics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def embedding_batches(
    features: np.ndarray, labels: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of BATCH_ROWS rows at a time, in order."""
    for start in range(0, len(labels), BATCH_ROWS):
        yield features[start : start + BATCH_ROWS], labels[start : start + BATCH_ROWS]


def _batches(
    paths: Sequence[Path], labels: np.ndarray
) -> Iterator[tuple[list[str], list[bytes], np.ndarray]]:
    for start in range(0, len(paths), BATCH_IMAGES):
        chunk = paths[start : start + BATCH_IMAGES]
        blobs = []
        for path in chunk:
            try:
                blobs.append(Path(path).read_bytes())
            except OSError as exc:
                raise UserError(f"cannot read image {path}: {exc.strerror or exc}") from None
        yield [str(path) for path in chunk], blobs, labels[start : start + BATCH_IMAGES]
