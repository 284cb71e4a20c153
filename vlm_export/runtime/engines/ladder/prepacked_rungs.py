"""A ladder's rungs on the ONNX Runtime CPU provider with shared, pre-packed weights.

Every rung session reads the one mapping of the ladder's weights file (``AddInitializer``) and
packs its MatMul/Gemm weights into one shared container (``ort_capi``), so the ladder holds one
packed copy of the weights and every rung runs as fast as a one-engine bundle, which pre-packs.
After the sessions are made, the mapped pages are handed back to the kernel: packed kernels
never read them again, and what still reads them (biases, norms) pages back in from the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.core.errors import BundleError, first_line
from vlm_export.core.manifest import ANCHORS_INPUT, ANCHORS_VALID_INPUT, IMAGE_INPUT
from vlm_export.runtime.engines.backends import ort_capi
from vlm_export.runtime.engines.base import EngineBackend, check_anchor_shapes
from vlm_export.runtime.engines.ladder.mapped_weights import MappedWeights

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle

DESCRIPTION = "onnxruntime:CPUExecutionProvider"


class PrepackedRungBackend(EngineBackend):
    """One rung: a CPU session in the ladder's shared-weights group, anchors bound once."""

    def __init__(
        self, group: ort_capi.SharedWeightsGroup, bundle: Bundle, onnx: str, threads: int | None
    ) -> None:
        self.description = DESCRIPTION
        self.session = group.session(str(bundle.path / onnx), threads)
        self._inputs = bundle.engine_io("inputs")
        self._outputs = bundle.engine_io("outputs")
        for kind, found, records in (
            ("input", self.session.inputs, self._inputs),
            ("output", self.session.outputs, self._outputs),
        ):
            if set(found) != set(records):
                raise BundleError(
                    f"{onnx}: ONNX {kind}s {sorted(found)} differ from the manifest's "
                    f"{sorted(records)}"
                )
        self.image_shape = tuple(int(v) for v in self._inputs[IMAGE_INPUT]["shape"])
        self.condensing = ANCHORS_INPUT in self._inputs
        self._image = np.zeros(self.image_shape, np.float32)
        self.session.bind(IMAGE_INPUT, self._image)
        if self.condensing:
            shape = tuple(int(v) for v in self._inputs[ANCHORS_INPUT]["shape"])
            self.set_anchors(np.zeros(shape, np.float32), np.zeros(shape[0], np.float32))

    @property
    def output_names(self) -> list[str]:
        """Output names in manifest order."""
        return list(self._outputs)

    def bound_anchors(self) -> tuple[np.ndarray, np.ndarray]:
        """The host arrays currently bound as anchors and anchors_valid."""
        bound = self.session._bound
        return bound[ANCHORS_INPUT][0], bound[ANCHORS_VALID_INPUT][0]

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        """Bind anchors [C, R, D] and valid [C] (read in place, not copied, every frame)."""
        record = self._inputs.get(ANCHORS_INPUT) or {"shape": ()}
        check_anchor_shapes(self.condensing, tuple(int(v) for v in record["shape"]), anchors, valid)
        for name, array in ((ANCHORS_INPUT, anchors), (ANCHORS_VALID_INPUT, valid)):
            self.session.bind(name, np.ascontiguousarray(array, dtype=np.float32))

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch [B, 3, H, W] float32; outputs by manifest name (fresh arrays)."""
        if image.shape != self.image_shape:
            raise ValueError(
                f"image batch {image.shape} does not fit the engine's {self.image_shape}"
            )
        self._image[...] = image
        outputs = {
            name: np.empty([int(v) for v in record["shape"]], np.dtype(record["dtype"]))
            for name, record in self._outputs.items()
        }
        try:
            self.session.run(outputs)
        except ort_capi.CApiError as exc:
            raise RuntimeError(f"ONNX Runtime inference failed: {exc}") from exc
        return outputs

    def close(self) -> None:
        """Release the session (the group releases the shared weights)."""
        self.session.close()


def open_prepacked_rungs(
    bundle: Bundle,
    ort: Any,
    onnx_files: Sequence[str],
    threads: int | None,
    weights_record: dict[str, Any] | None = None,
) -> tuple[list[PrepackedRungBackend], ort_capi.SharedWeightsGroup]:
    """One backend per rung graph, all in one shared-weights group (close the group after the
    backends); the graphs read the weights file of ``weights_record`` (default: the ladder's
    fp32 ``ladder.weights``). ``ort_capi.CApiMissing`` when this onnxruntime ships no C API
    library."""
    weights = MappedWeights(bundle, weights_record or bundle.manifest["ladder"]["weights"])
    group = ort_capi.SharedWeightsGroup(ort_capi.load(ort), weights.arrays)
    group.mapping = weights  # type: ignore[attr-defined]  # the sessions read this memory
    engines: list[PrepackedRungBackend] = []
    try:
        for onnx in onnx_files:
            try:
                engines.append(PrepackedRungBackend(group, bundle, onnx, threads))
            except ort_capi.CApiError as exc:
                raise BundleError(f"ONNX Runtime cannot load {onnx}: {first_line(exc)}") from None
    except BaseException:
        group.close()
        raise
    weights.release_pages()
    return engines, group
