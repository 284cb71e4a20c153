"""A ladder bundle on the device: one engine per token budget (rung), one set of anchors, switched.

Every rung takes the same anchors [K, R, D], so one TCA reservoir serves all of them: the ladder
keeps the latest anchors and hands them to a rung when it becomes active. With ONNX Runtime the
rungs share their weights in memory too: the shared weights file is mapped once and every
session gets the same buffers (``SessionOptions.add_initializer``; the Python API has no shared
pre-packed weights container, so each session still pre-packs its own MatMul weights).
OpenVINO compiles each rung on its own (it copies the weights into its compiled model; nothing
is shared between compiled models but the file in the page cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.core.errors import BundleError, UserError
from vlm_export.runtime.engines.base import EngineBackend

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle

#: backends that run ladder rungs (TensorRT engines and INT8 graphs are built for rung 0 only)
LADDER_BACKENDS = ("auto", "onnxruntime", "openvino")


@dataclass(frozen=True)
class Rung:
    """One token budget of a ladder: drop rate, graph, GFLOPs, tokens after the last reduction."""

    index: int
    drop_rate: float
    onnx: str
    gflops: float
    tokens: int

    @property
    def label(self) -> str:
        """How messages name it: ``rung 1 (drop rate 0.035, 53 tokens)``."""
        return f"rung {self.index} (drop rate {self.drop_rate:g}, {self.tokens} tokens)"


def ladder_rungs(manifest: dict[str, Any]) -> list[Rung]:
    """The rungs of a ladder bundle, largest budget first; empty for a one-engine bundle.

    BundleError when a rung's graph or the weights file is not a listed (hashed) bundle file.
    """
    ladder = manifest.get("ladder")
    if not isinstance(ladder, dict):
        return []
    listed = manifest["files"]
    names = [record["onnx"] for record in ladder["rungs"]] + [ladder["weights"]["file"]]
    unlisted = [name for name in names if name not in listed]
    if unlisted:
        raise BundleError(f"manifest ladder names unlisted files: {', '.join(unlisted[:3])}")
    return [
        Rung(
            index=index,
            drop_rate=float(record["drop_rate"]),
            onnx=str(record["onnx"]),
            gflops=float(record["gflops"]),
            tokens=int(record["schedule"][-1]["tokens_out"]),
        )
        for index, record in enumerate(ladder["rungs"])
    ]


class SharedWeights:
    """The ladder's weights file mapped once, as one ONNX Runtime value per shared tensor."""

    def __init__(self, bundle: Bundle, ort: Any) -> None:
        weights = bundle.manifest["ladder"]["weights"]
        table = weights.get("table") or []
        path = bundle.path / weights["file"]
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if table else None
        self.values: dict[str, Any] = {}
        for row in table:
            dtype = np.dtype(row["dtype"])
            count = int(np.prod(row["shape"], dtype=np.int64))
            end = int(row["offset"]) + count * dtype.itemsize
            if end > len(self._map):
                raise BundleError(f"{weights['file']} is shorter than its table says")
            array = np.ndarray(row["shape"], dtype, self._map, int(row["offset"]))
            self.values[row["name"]] = ort.OrtValue.ortvalue_from_numpy(array)


class LadderBackend(EngineBackend):
    """The rungs' engines behind one backend: ``select`` switches the one that runs.

    Anchors are state of the ladder: set on the active rung, and handed whole to a rung when it
    becomes active, so the reservoir never needs to know which rung runs.
    """

    def __init__(self, rungs: Sequence[Rung], engines: Sequence[EngineBackend], start: int = 0):
        if len(rungs) != len(engines) or not rungs:
            raise ValueError("one engine per rung")
        self.rungs = list(rungs)
        self.engines = list(engines)
        self.active = start
        self._anchors: tuple[np.ndarray, np.ndarray] | None = None
        self._current = {start}  # rungs that hold the latest anchors
        self.notes: list[str] = []

    @property
    def rung(self) -> Rung:
        """The rung that runs now."""
        return self.rungs[self.active]

    @property
    def drop_rate(self) -> float:  # type: ignore[override]
        return self.rung.drop_rate

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"{self.engines[self.active].description} ladder {self.rung.label}"

    def select(self, index: int) -> None:
        """Run rung ``index`` from the next frame on (it gets the current anchors)."""
        if not 0 <= index < len(self.rungs):
            raise UserError(f"the ladder has rungs 0..{len(self.rungs) - 1}, not {index}")
        if index not in self._current and self._anchors is not None:
            self.engines[index].set_anchors(*self._anchors)
        self._current.add(index)
        self.active = index

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        self._anchors = (anchors, valid)
        self._current = {self.active}
        self.engines[self.active].set_anchors(anchors, valid)

    def update_anchor_rows(self, anchors: np.ndarray, valid: np.ndarray, rows: np.ndarray) -> None:
        self._anchors = (anchors, valid)
        self._current = {self.active}
        self.engines[self.active].update_anchor_rows(anchors, valid, rows)

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return self.engines[self.active].infer(image)

    def close(self) -> None:
        for engine in self.engines:
            engine.close()


def open_ladder(
    bundle: Bundle,
    backend: str = "auto",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    precision: str | None = None,
    start: int = 0,
    share_memory: bool = True,
) -> LadderBackend:
    """Open every rung of a ladder bundle with one backend (``auto``: ONNX Runtime).

    ``share_memory`` hands ONNX Runtime sessions the one mapping of the weights file.
    """
    from vlm_export.runtime.engines.factory import graph_view

    rungs = ladder_rungs(bundle.manifest)
    if not rungs:
        raise UserError("this bundle has one engine, not a ladder (export with --drop-rates)")
    if backend not in LADDER_BACKENDS:
        raise UserError(
            f"ladder rungs run on {', '.join(LADDER_BACKENDS[1:])}; the {backend} engine is "
            "built for rung 0 only"
        )
    if precision not in (None, "fp32") and not (backend == "openvino" and precision == "bf16"):
        raise UserError(f"ladder rungs run fp32 (openvino also bf16), not {precision}")
    engines: list[EngineBackend] = []
    try:
        if backend == "openvino":
            from vlm_export.runtime.engines.openvino_backend import OpenVinoBackend

            for rung in rungs:
                engines.append(
                    OpenVinoBackend(
                        bundle, precision or "fp32", threads, graph=bundle.path / rung.onnx
                    )
                )
        else:
            from vlm_export.runtime.engines.onnxruntime_backend import (
                OnnxRuntimeBackend,
                import_onnxruntime,
            )

            shared = SharedWeights(bundle, import_onnxruntime()) if share_memory else None
            for rung in rungs:
                view = graph_view(bundle, rung.onnx)
                engine = OnnxRuntimeBackend(
                    view,  # type: ignore[arg-type]
                    providers=providers,
                    threads=threads,
                    initializers=shared.values if shared else None,
                )
                engine.shared = shared  # type: ignore[attr-defined]  # keeps the mapping alive
                engines.append(engine)
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return LadderBackend(rungs, engines, start)
