"""The interface every engine backend implements (ONNX Runtime, TensorRT, test fakes), and the
view of a bundle that a backend reads (``BundleGraph``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import BundleError


def check_anchor_shapes(
    condensing: bool, expected: tuple[int, ...], anchors: np.ndarray, valid: np.ndarray
) -> None:
    """BundleError for an engine that takes no anchors; ValueError for arrays of other shapes
    than the engine's anchors ``expected`` [C, R, D] and valid [C]."""
    if not condensing:
        raise BundleError("this engine does not condense tokens: it takes no anchors")
    if anchors.shape != expected or valid.shape != expected[:1]:
        raise ValueError(
            f"anchors {anchors.shape} / valid {valid.shape} do not fit the engine's "
            f"{expected} / {expected[:1]}"
        )


class EngineBackend(ABC):
    """Runs the bundle's image engine.

    The anchors of a condensing engine are state of the backend: ``set_anchors`` is called only
    when the reservoir changed them, so a backend can keep them where the engine reads them (a
    bound CPU buffer, GPU memory) and skip the copy on every other frame.
    """

    #: short name of what actually executes ("onnxruntime:CPUExecutionProvider", "tensorrt", ...)
    description: str = "unknown"
    #: the drop rate of the graph that runs, when the bundle is a ladder of budgets (else None)
    drop_rate: float | None = None

    @abstractmethod
    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        """Set the anchors [C, R, D] float32 and their per-class valid flags [C] float32."""

    def update_anchor_rows(self, anchors: np.ndarray, valid: np.ndarray, rows: np.ndarray) -> None:
        """Like ``set_anchors``, when only the classes ``rows`` changed (anchor and valid flag).

        The default hands over everything; a backend that copies anchors to a device overrides
        it to copy just those rows (one class is R x D floats, the whole array C x R x D).
        """
        self.set_anchors(anchors, valid)

    @abstractmethod
    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one preprocessed batch [B, 3, H, W] float32; return the outputs by manifest name."""

    def close(self) -> None:  # noqa: B027 - an optional hook, not every backend holds resources
        """Release engine resources (optional)."""


class HostAnchorRows:
    """For a backend whose engine reads anchors from float32 arrays the backend owns
    (``_anchors`` [C, R, D], ``_valid`` [C], set by its ``set_anchors``): moved classes are
    written into those arrays in place."""

    _anchors: np.ndarray | None = None
    _valid: np.ndarray | None = None

    def update_anchor_rows(self, anchors: np.ndarray, valid: np.ndarray, rows: np.ndarray) -> None:
        """Write only the classes ``rows`` into the owned arrays (all of them the first time)."""
        if self._anchors is None or self._valid is None:
            self.set_anchors(anchors, valid)  # type: ignore[attr-defined]
            return
        check_anchor_shapes(True, self._anchors.shape, anchors, valid)  # no silent broadcast
        rows = np.asarray(rows, dtype=np.int64)
        self._anchors[rows] = anchors[rows]
        self._valid[rows] = valid[rows]


@dataclass(frozen=True)
class BundleGraph:
    """What ``OnnxRuntimeBackend`` reads of a bundle: its folder, manifest, ONNX file and I/O.

    A ``Bundle`` also loads the text embeddings and the class list, which the engine check does
    not need (and which a bundle being built into may not be verified against yet).
    """

    path: Path
    manifest: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return Path(self.path) / self.manifest["engine"]["onnx"]

    def engine_io(self, kind: str) -> dict[str, dict[str, Any]]:
        return {record["name"]: record for record in self.manifest["engine"][kind]}
