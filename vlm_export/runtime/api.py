"""The Python face of the runtime: ``open_pipeline(bundle)`` and ``pipeline.classify(image)``;
``pipeline.embed(image)`` and ``pipeline.embed_text(texts)`` for CLIP embeddings.

A pipeline may be shared between threads: its calls run one at a time (the engine, the
reservoir and the taught examples are one state), so each gets the answer for its own image. For
frames in parallel, open one pipeline per thread.

Errors name the Python parameters (``min_score``), never the command line's flags
(``vlm_export.core.option_names``).

Defaults are ``vlm-edge run``'s: the bundle's method (:func:`default_method`, which both use),
the reservoir resumed from and saved to ``state``, the engine chosen by ``backend="auto"``.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import EMBEDDING_OUTPUT, uses_condensation
from vlm_export.core.option_names import python_names
from vlm_export.core.paths import check_paths, tree_reads
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.factory import capped_threads, open_backend
from vlm_export.runtime.engines.ladder.ladder import BudgetRun, open_budgeted, runs_ladder
from vlm_export.runtime.io.preprocess import Preprocessor, image_from_array, load_image
from vlm_export.runtime.pipeline import (
    METHOD_STAGES,
    FrameResult,
    Pipeline,
    Stages,
    check_min_score,
)
from vlm_export.runtime.rail.fusion import RailFusion
from vlm_export.runtime.rail.models import fusion_beta, load_predictor
from vlm_export.runtime.tca.stage import build_reservoir

if TYPE_CHECKING:  # imported when first taught: scipy and sqlite3 stay out of start-up
    from vlm_export.runtime.teach.examples import Example
    from vlm_export.runtime.teach.local import LocalTeaching

log = logging.getLogger(__name__)

ImageInput = Image.Image | np.ndarray | str | Path


def default_method(bundle: Bundle, with_rail: bool) -> str:
    """The bundle's method, with RAIL fusion exactly when a RAIL state is given.

    A rail or tca+rail bundle without a RAIL state runs zeroshot or tca (the runtime cannot
    fuse without one); :func:`fusion_dropped` tells when that happened.
    """
    wanted = Stages(tca=uses_condensation(bundle.method), fusion=with_rail)
    return next(name for name, stages in METHOD_STAGES.items() if stages == wanted)


def fusion_dropped(bundle: Bundle, with_rail: bool) -> bool:
    """True when the bundle's method fuses with RAIL but no RAIL state was given."""
    return METHOD_STAGES[bundle.method].fusion and not with_rail


class EdgePipeline:
    """A pipeline opened by :func:`open_pipeline`; a context manager that saves the state.
    Thread-safe: calls from several threads run one at a time."""

    def __init__(
        self,
        pipeline: Pipeline,
        state: Path | None,
        reads: list[tuple[str, str | Path | None]] | None = None,
        budget: BudgetRun | None = None,
        examples: str | Path | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.state = state
        self._reads = reads or []  # what the write guard protects from save_state
        self._frames = 0
        self._text_encoder = None
        self._teaching: LocalTeaching | None = None
        self._examples = examples
        #: the ladder's latency budget (open_pipeline's target_ms), None without one
        self.budget = budget
        self.closed = False
        self._lock = threading.RLock()  # one call at a time: engine, reservoir, examples

    @property
    def bundle(self) -> Bundle:
        """The opened bundle."""
        return self.pipeline.bundle

    @property
    def method(self) -> str:
        """The method running (zeroshot, tca, rail or tca+rail)."""
        return self.pipeline.method

    @property
    def backend(self) -> str:
        """What executes the engine, e.g. ``onnxruntime:CPUExecutionProvider``."""
        return self.pipeline.backend.description

    @python_names()
    def classify(
        self, image: ImageInput, *, channels: str | None = None, topk: int = 5
    ) -> FrameResult:
        """Classify one image: a PIL image, an image file path, or a uint8 array.

        An HxWx3 array needs ``channels="RGB"`` or ``"BGR"`` (OpenCV frames are BGR), an HxWx4
        one ``"RGBA"`` or ``"BGRA"``; HxW arrays are grayscale. Bad input raises ImageError (a
        UserError) with one line saying what is wrong; so does an unreadable file.
        """
        count = _whole_number(topk)
        if count is None or count < 1:
            raise UserError(f"topk must be at least 1 (a whole number), got {topk!r}")
        with self._lock:
            frame, source = self._frame(image, channels, "classify")
            self.pipeline.topk = min(count, self.bundle.num_classes)
            result = self.pipeline.process(frame, self._frames, source)
            self._frames += 1
            switched = self.budget.after_frame(result.timings["total"]) if self.budget else None
        if switched:
            log.info(switched)
        return result

    @python_names()
    def embed(self, image: ImageInput, *, channels: str | None = None) -> np.ndarray:
        """The image's CLIP embedding [E] float32, L2-normalised (inputs as ``classify``).

        Only the image engine runs: the adaptation state is neither updated nor used for the
        decision (a condensing engine condenses with the anchors it holds, none until TCA has
        seen frames).
        """
        with self._lock:
            frame, _ = self._frame(image, channels, "embed")
            tensor = self.pipeline.preprocessor.convert(frame)[None]
            outputs = self.pipeline.backend.infer(tensor)
            embedding = np.array(outputs[EMBEDDING_OUTPUT][0], np.float32)  # a copy, in hand
        norm = float(np.linalg.norm(embedding))
        if not np.isfinite(embedding).all() or norm == 0.0:
            raise UserError("the engine returned no usable embedding for this image")
        return embedding / np.float32(norm)

    @python_names()
    def embed_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """CLIP embeddings [N, E] float32, L2-normalised, of ``texts`` as written (no templates),
        by the bundle's text engine; a single string gives one row."""
        from vlm_export.runtime.text.encoder import TextEncoder

        self._check_open()
        if isinstance(texts, str):
            items = [texts]
        elif isinstance(texts, (list, tuple)):
            items = list(texts)
        else:
            items = []
        if not items or not all(isinstance(text, str) for text in items):
            raise UserError(
                f"embed_text takes a string or a non-empty list of strings, got "
                f"{type(texts).__name__}"
            )
        with self._lock:
            self._check_open()
            if self._text_encoder is None:
                self._text_encoder = TextEncoder.open(self.bundle)
            rows = np.asarray(self._text_encoder.embed_prompts(items), dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def teach(self, image: ImageInput, label: str, *, channels: str | None = None) -> str:
        """Learn that ``image`` (inputs as ``classify``) shows ``label``; return the example's id.

        The next decisions fuse RAIL's ridge regression on the taught examples with zero-shot
        (and TCA): images like it are decided as ``label``. A label that is not a class becomes
        one (domain ``taught``, its text embedding from the text engine); ``"unknown"`` teaches
        what to reject. Examples are kept in ``open_pipeline(..., examples=FILE)`` (SQLite), or
        in memory.
        """
        with self._lock:
            embedding = self.embed(image, channels=channels)
            return self._taught().teach(embedding, label).id

    def forget(self, example_id: str) -> bool:
        """Unlearn one taught example exactly (the state learned without it); False if unknown."""
        with self._lock:
            return self._taught().forget(example_id)

    def examples(self, label: str | None = None) -> list[Example]:
        """The taught examples, newest first (``label``: only those)."""
        if label is not None and not isinstance(label, str):
            raise UserError(f"label must be a string, got {type(label).__name__}")
        with self._lock:
            return self._taught().examples(label)

    def _taught(self) -> LocalTeaching:
        with self._lock:
            self._check_open()
            if self._teaching is None:
                from vlm_export.runtime.teach.local import LocalTeaching

                self._teaching = LocalTeaching(self.pipeline, self._examples)
            return self._teaching

    @python_names()
    def save_state(self, path: str | Path | None = None) -> None:
        """Save the adaptation state to ``path`` (default: the ``state`` it was opened with)."""
        target = path if path is not None else self.state
        if target is None:
            raise UserError("no state file: open_pipeline(..., state=FILE) or save_state(FILE)")
        _check_path_type("path", target)
        check_paths(self._reads, [("state", target)])  # never over the bundle or the RAIL state
        with self._lock:
            self.pipeline.save_state(target)

    def _frame(self, image: ImageInput, channels: str | None, what: str) -> tuple[Image.Image, str]:
        self._check_open()
        return _frame(image, channels, what, self.pipeline.preprocessor)

    def _check_open(self) -> None:
        if self.closed:
            raise UserError("the pipeline is closed (its with block ended): open it again")

    def close(self) -> None:
        """Release the engine (once, after a call in progress in another thread; later calls
        are refused)."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self._text_encoder = None
                if self._teaching is not None:
                    self._teaching.close()
                self.pipeline.backend.close()

    def __enter__(self) -> EdgePipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Save the state (also after an error in the block, not after Ctrl-C), then close.

        After an error in the block, a state that cannot be saved is logged, not raised, so
        that the block's own error is the one that propagates.
        """
        try:
            interrupted = exc_type is not None and not issubclass(exc_type, Exception)
            if self.state is not None and self.pipeline.reservoir is not None and not interrupted:
                try:
                    self.save_state()
                except UserError as error:
                    if exc_type is None:
                        raise
                    log.error("state not saved after an error in the with block: %s", error)
        finally:
            self.close()


def _frame(
    image: ImageInput, channels: str | None, what: str, limits: Preprocessor
) -> tuple[Image.Image, str]:
    """A PIL image and its source name from what ``classify`` and ``embed`` accept; files are
    checked against the preprocessor's size and aspect limits before they are decoded."""
    if isinstance(image, np.ndarray):
        return image_from_array(image, channels), ""
    if channels is not None and isinstance(image, Image.Image | str | Path):
        raise UserError(
            f"channels={channels!r} applies to numpy arrays: a PIL image or an image file knows "
            "its own channel order (leave channels out)"
        )
    if isinstance(image, Image.Image):
        return image, ""
    if isinstance(image, str | Path):
        return load_image(image, limits.max_pixels, limits.max_aspect), str(image)
    raise UserError(
        f"cannot {what} a {type(image).__name__}: give a PIL image, a path or a numpy array"
    )


def _whole_number(value: object) -> int | None:
    """``value`` as an int if it is a whole number (a numpy integer too, never a bool)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_path_type(name: str, value: object) -> None:
    """UserError unless ``value`` is a path (str or os.PathLike) or None."""
    if value is not None and not isinstance(value, str | Path):
        raise UserError(f"{name} must be a path (a str or a Path), got {type(value).__name__}")


@python_names()
def open_pipeline(
    bundle: str | Path | Bundle,
    method: str | None = None,
    state: str | Path | None = None,
    backend: str = "auto",
    *,
    rail_state: str | Path | None = None,
    providers: list[str] | None = None,
    threads: int | None = None,
    precision: str | None = None,
    verify: bool | str = True,
    min_score: float | None = None,
    crop: str | None = None,
    target_ms: float | None = None,
    adapt_budget: bool = False,
    measure: bool = False,
    allow_drift: bool = False,
    examples: str | Path | None = None,
) -> EdgePipeline:
    """Open a bundle for classification, with ``vlm-edge run``'s defaults.

    ``method`` None is the bundle's method (:func:`default_method`); ``state`` is the TCA
    reservoir file, resumed if it exists and saved when the ``with`` block ends; ``rail_state``
    a RAIL state from ``vlm-edge learn`` (methods rail and tca+rail). ``verify``: "cached"
    (or True), "full" or "off" (or False), as ``Bundle.open``. With ``min_score`` a
    decision whose reported score is below it is unknown (``label`` -1, ``class_name``
    ``"unknown"``). ``crop`` is ``vlm-edge run --crop``: center, letterbox or squash.

    A ladder bundle (``vlm-export --drop-rates``) with ``target_ms`` starts on the largest
    budget whose p90 recorded by ``vlm-edge bench`` meets it (``measure``: time the rungs now if
    none is recorded); ``adapt_budget`` switches rungs while running. ``pipeline.budget.reason``
    says which rung and why; each result's ``drop_rate`` is the rung it ran on.

    The engine runs the bundle's reference images when it opens and is refused (a UserError)
    when its embeddings drifted from the bundle's record or collapsed; ``allow_drift`` runs a
    drifted one with a logged warning (docs/precision.md). ``precision`` is ``vlm-edge run
    --precision``: fp32, bf16 (OpenVINO, where the CPU has it), int8 (the bundle's quantized
    graph) or fp16 (TensorRT); None is the backend's default.

    ``examples`` is the SQLite file that ``pipeline.teach`` keeps taught examples in (resumed
    when it exists: they decide from the first frame); without it they live in memory.
    ``threads`` above this machine's cores is capped at them (a logged warning).
    """
    if not isinstance(bundle, Bundle | str | Path):
        raise UserError(
            f"open_pipeline needs a bundle folder (a path or a Bundle), got {type(bundle).__name__}"
        )
    for name, value in (("state", state), ("rail_state", rail_state), ("examples", examples)):
        _check_path_type(name, value)
    if method is not None and not isinstance(method, str):
        raise UserError(f"method must be a string, got {type(method).__name__}")
    if precision is not None and not isinstance(precision, str):
        raise UserError(f"precision must be a string, got {type(precision).__name__}")
    if providers is not None and (
        isinstance(providers, str)
        or not isinstance(providers, list | tuple)
        or not all(isinstance(name, str) for name in providers)
    ):
        raise UserError(
            "providers must be a list of ONNX Runtime provider names, e.g. "
            '["CUDAExecutionProvider", "CPUExecutionProvider"]'
        )
    threads = capped_threads(threads)
    if isinstance(min_score, np.floating | np.integer):
        min_score = float(min_score)
    min_score = check_min_score(min_score)
    reads = [*tree_reads("bundle", bundle.path if isinstance(bundle, Bundle) else bundle)]
    reads.append(("rail_state", rail_state))
    check_paths(reads, [("state", state), ("examples", examples)])  # before any work
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle, verify=verify)
    if method is None:
        method = default_method(bundle, rail_state is not None)
        if fusion_dropped(bundle, rail_state is not None):
            log.info(
                "method %s needs a RAIL state (rail_state=FILE); running %s", bundle.method, method
            )
    if method not in METHOD_STAGES:
        raise UserError(f"unknown method {method!r} (choose from {', '.join(METHOD_STAGES)})")
    stages = METHOD_STAGES[method]
    if state is not None and not stages.tca:
        raise UserError(f"a state file needs method tca or tca+rail (running {method})")
    reservoir = build_reservoir(bundle, state=state) if stages.tca else None
    fusion = None
    if rail_state is not None:
        if not stages.fusion:
            raise UserError(f"rail_state needs method rail or tca+rail (running {method})")
        fusion = RailFusion(
            load_predictor(rail_state, bundle.fingerprint), fusion_beta(bundle.manifest)
        )
    budget = None
    if runs_ladder(bundle, backend, precision, target_ms, adapt_budget, measure):
        engine, budget = open_budgeted(
            bundle,
            backend,
            providers,
            threads,
            precision,
            target_ms=target_ms,
            adapt=adapt_budget,
            measure_first=measure,
            allow_drift=allow_drift,
        )
        if budget is not None:
            log.info("budget: %s", budget.reason)
    else:
        engine = open_backend(
            bundle, backend, providers, threads, precision, allow_drift=allow_drift
        )
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(engine.close)  # closed again only if the pipeline cannot be built
        pipeline = Pipeline(
            bundle, engine, method, reservoir, fusion, min_score=min_score, crop=crop
        )
        cleanup.pop_all()
    edge = EdgePipeline(
        pipeline, Path(state) if state is not None else None, reads, budget, examples
    )
    if examples is not None:  # the stored examples decide from the first frame
        try:
            edge._taught()
        except BaseException:
            edge.close()
            raise
    return edge
