"""Rockchip NPU backend: the bundle's RKNN graph (``vlm-export build-rknn``) through
rknn-toolkit-lite2 on the board.

``rknnlite`` (Rockchip's rknn-toolkit-lite2 wheel, not on PyPI) is imported when the backend is
opened, not when this module is; without it the UserError says what to install. The graph runs
in fp16 on the NPU (RKNN's float type); the condensation's index operations (TopK, gathers,
argmax) run on the board's CPU inside the RKNN runtime. ``RknnBackend`` takes any object with
the RKNN inference API (``inference(inputs=, data_format=)``, ``release()``): RKNNLite on the
board, rknn-toolkit2's simulator when ``build-rknn`` checks the graph it built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.manifest import ANCHORS_INPUT, ANCHORS_VALID_INPUT, IMAGE_INPUT, rknn_engines
from vlm_export.core.optional_import import import_optional
from vlm_export.runtime.engines.base import EngineBackend, HostAnchorRows, check_anchor_shapes

if TYPE_CHECKING:
    from vlm_export.runtime.engines.base import BundleGraph

INSTALL_HINT = (
    "rknn-toolkit-lite2 is not installed: on the board, pip install Rockchip's "
    "rknn_toolkit_lite2 wheel for its Python (see the [rknn] extra; it is not on PyPI)"
)
NO_GRAPH_HINT = (
    "this bundle has no RKNN graph: build one on an x86-64 workstation with "
    "`vlm-export build-rknn BUNDLE --target rk3588` (needs rknn-toolkit2)"
)
#: the NPU cores to run on, by name (RKNNLite's NPU_CORE_* constants)
CORE_MASKS = {
    "auto": "NPU_CORE_AUTO",
    "0": "NPU_CORE_0",
    "1": "NPU_CORE_1",
    "2": "NPU_CORE_2",
    "0_1": "NPU_CORE_0_1",
    "0_1_2": "NPU_CORE_0_1_2",
}


class RknnLiteMissing(UserError):
    """The ``rknnlite`` package (rknn-toolkit-lite2) is not installed or cannot be imported."""


def import_rknnlite() -> Any:
    """The ``RKNNLite`` class; RknnLiteMissing (a UserError) when rknnlite is not installed."""
    return import_optional(
        "rknnlite.api", "rknn-toolkit-lite2", INSTALL_HINT, RknnLiteMissing
    ).RKNNLite


def choose_record(manifest: dict[str, Any], target: str | None = None) -> dict[str, Any]:
    """The RKNN graph to run: the bundle's newest for ``target`` (any target when None and the
    bundle has graphs for one SoC only); UserError when there is none or the choice is open."""
    records = rknn_engines(manifest, target)
    if not records:
        if target is not None and rknn_engines(manifest):
            have = sorted({str(r.get("target")) for r in rknn_engines(manifest)})
            raise UserError(f"this bundle has no RKNN graph for {target} (only {', '.join(have)})")
        raise UserError(NO_GRAPH_HINT)
    targets = sorted({str(record.get("target")) for record in records})
    if len(targets) > 1:
        raise UserError(f"this bundle has RKNN graphs for {', '.join(targets)}: name the target")
    return records[-1]


class RknnBackend(HostAnchorRows, EngineBackend):
    """Runs an RKNN graph through an object with the RKNN inference API.

    ``runtime`` is ready to infer (loaded and initialised); ``outputs`` names the graph's outputs
    in the order the runtime returns them (the manifest record's ``outputs``). The anchors are
    kept here and handed over with every frame (the RKNN API binds no inputs).
    """

    def __init__(
        self,
        graph: BundleGraph,
        runtime: Any,
        outputs: list[str],
        description: str,
        precision: str = "fp16",
    ) -> None:
        self.runtime = runtime
        self.description = description
        self.precision = precision
        self._inputs = graph.engine_io("inputs")
        self._outputs = graph.engine_io("outputs")
        if sorted(outputs) != sorted(self._outputs):
            raise BundleError(
                f"RKNN graph outputs {sorted(outputs)} differ from the manifest's "
                f"{sorted(self._outputs)}"
            )
        self._order = list(outputs)
        self.image_shape = tuple(int(v) for v in self._inputs[IMAGE_INPUT]["shape"])
        self.condensing = ANCHORS_INPUT in self._inputs
        self._anchors: np.ndarray | None = None
        self._valid: np.ndarray | None = None
        if self.condensing:
            shape = tuple(int(v) for v in self._inputs[ANCHORS_INPUT]["shape"])
            self.set_anchors(np.zeros(shape, np.float32), np.zeros(shape[0], np.float32))

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        """Keep copies of anchors [C, R, D] and valid [C] (float32) for the next frames."""
        record = self._inputs.get(ANCHORS_INPUT) or {"shape": ()}
        check_anchor_shapes(self.condensing, tuple(int(v) for v in record["shape"]), anchors, valid)
        self._anchors = np.array(anchors, dtype=np.float32, order="C")
        self._valid = np.array(valid, dtype=np.float32, order="C")

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch [B, 3, H, W] float32; outputs by manifest name, shape and dtype."""
        if image.shape != self.image_shape:
            raise ValueError(
                f"image batch {image.shape} does not fit the engine's {self.image_shape}"
            )
        given = {IMAGE_INPUT: np.ascontiguousarray(image, dtype=np.float32)}
        if self.condensing:
            given[ANCHORS_INPUT] = self._anchors  # type: ignore[assignment]
            given[ANCHORS_VALID_INPUT] = self._valid  # type: ignore[assignment]
        inputs = [given[name] for name in self._inputs]
        try:
            results = self.runtime.inference(inputs=inputs, data_format=["nchw"] * len(inputs))
        except Exception as exc:  # the RKNN runtimes raise plain exceptions
            raise RuntimeError(f"RKNN inference failed: {_one_line(exc)}") from exc
        if results is None or len(results) != len(self._order):
            raise RuntimeError(
                f"RKNN inference returned {0 if results is None else len(results)} outputs, "
                f"expected {len(self._order)}"
            )
        return {
            name: _as_declared(np.asarray(value), self._outputs[name])
            for name, value in zip(self._order, results, strict=True)
        }

    def close(self) -> None:
        """Release the RKNN runtime (once)."""
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            runtime.release()


def _as_declared(value: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """``value`` in the manifest's shape and dtype (integer codes rounded from a float output)."""
    dtype = np.dtype(record.get("dtype", "float32"))
    shape = tuple(int(v) for v in record["shape"])
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(value.dtype, np.integer):
        value = np.rint(value)
    return np.ascontiguousarray(value.reshape(shape), dtype=dtype)


def open_rknn(
    bundle: BundleGraph, target: str | None = None, core_mask: str = "auto"
) -> RknnBackend:
    """The bundle's RKNN graph on this board's NPU through RKNNLite (``core_mask``: CORE_MASKS)."""
    record = choose_record(bundle.manifest, target)
    if core_mask not in CORE_MASKS:
        raise UserError(f"unknown NPU core mask {core_mask!r} ({', '.join(CORE_MASKS)})")
    lite_class = import_rknnlite()
    path = Path(bundle.path) / str(record["file"])
    lite = lite_class(verbose=False)
    if lite.load_rknn(str(path)) != 0:
        lite.release()
        raise BundleError(f"rknn-toolkit-lite2 cannot load {path.name}")
    if lite.init_runtime(core_mask=getattr(lite_class, CORE_MASKS[core_mask])) != 0:
        lite.release()
        raise UserError(
            f"rknn-toolkit-lite2 cannot start the NPU runtime for {path.name} (is this a "
            f"{record.get('target')} board with the RKNPU driver and librknnrt.so?)"
        )
    outputs = [str(name) for name in record.get("outputs") or []]
    try:
        return RknnBackend(
            bundle, lite, outputs, f"rknn:{record['file']}", str(record.get("precision", "fp16"))
        )
    except BaseException:
        lite.release()
        raise


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__
