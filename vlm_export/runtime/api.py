"""The Python face of the runtime: ``open_pipeline(bundle)`` and ``pipeline.classify(image)``.

Defaults are ``vlm-edge run``'s: the bundle's method (:func:`default_method`, which both use),
the reservoir resumed from and saved to ``state``, the engine chosen by ``backend="auto"``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import uses_condensation
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.io.preprocess import image_from_array, load_image
from vlm_export.runtime.pipeline import METHOD_STAGES, FrameResult, Pipeline, Stages
from vlm_export.runtime.rail.fusion import RailFusion
from vlm_export.runtime.rail.models import fusion_beta, load_predictor
from vlm_export.runtime.tca.stage import build_reservoir

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
    """A pipeline opened by :func:`open_pipeline`; a context manager that saves the state."""

    def __init__(self, pipeline: Pipeline, state: Path | None) -> None:
        self.pipeline = pipeline
        self.state = state
        self._frames = 0
        self.closed = False

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

    def classify(
        self, image: ImageInput, *, channels: str | None = None, topk: int = 5
    ) -> FrameResult:
        """Classify one image: a PIL image, an image file path, or a uint8 array.

        An HxWx3 array needs ``channels="RGB"`` or ``"BGR"`` (OpenCV frames are BGR), an HxWx4
        one ``"RGBA"`` or ``"BGRA"``; HxW arrays are grayscale. Bad input raises ImageError (a
        UserError) with one line saying what is wrong; so does an unreadable file.
        """
        if self.closed:
            raise UserError("the pipeline is closed (its with block ended): open it again")
        if isinstance(image, np.ndarray):
            frame, source = image_from_array(image, channels), ""
        elif isinstance(image, Image.Image):
            frame, source = image, ""
        elif isinstance(image, str | Path):
            limits = self.pipeline.preprocessor
            frame, source = load_image(image, limits.max_pixels, limits.max_aspect), str(image)
        else:
            raise UserError(
                f"cannot classify a {type(image).__name__}: give a PIL image, a "
                "path or a numpy array"
            )
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise UserError(f"topk must be at least 1 (a whole number), got {topk!r}")
        self.pipeline.topk = min(topk, self.bundle.num_classes)
        result = self.pipeline.process(frame, self._frames, source)
        self._frames += 1
        return result

    def save_state(self, path: str | Path | None = None) -> None:
        """Save the adaptation state to ``path`` (default: the ``state`` it was opened with)."""
        target = path if path is not None else self.state
        if target is None:
            raise UserError("no state file: open_pipeline(..., state=FILE) or save_state(FILE)")
        self.pipeline.save_state(target)

    def close(self) -> None:
        """Release the engine (once; ``classify`` then refuses)."""
        if not self.closed:
            self.closed = True
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


def open_pipeline(
    bundle: str | Path | Bundle,
    method: str | None = None,
    state: str | Path | None = None,
    backend: str = "auto",
    *,
    rail_state: str | Path | None = None,
    providers: list[str] | None = None,
    threads: int | None = None,
    verify: bool = True,
) -> EdgePipeline:
    """Open a bundle for classification, with ``vlm-edge run``'s defaults.

    ``method`` None is the bundle's method (:func:`default_method`); ``state`` is the TCA
    reservoir file, resumed if it exists and saved when the ``with`` block ends; ``rail_state``
    a RAIL state from ``vlm-edge learn`` (methods rail and tca+rail).
    """
    if not isinstance(bundle, Bundle | str | Path):
        raise UserError(
            f"open_pipeline needs a bundle folder (a path or a Bundle), got {type(bundle).__name__}"
        )
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
    engine = open_backend(bundle, backend, providers, threads)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(engine.close)  # closed again only if the pipeline cannot be built
        pipeline = Pipeline(bundle, engine, method, reservoir, fusion)
        cleanup.pop_all()
    return EdgePipeline(pipeline, Path(state) if state is not None else None)
