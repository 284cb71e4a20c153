"""ncnn backend (CPU): the bundle's ncnn graph (``vlm-export build-ncnn``), fp32, no torch.

``ncnn`` is imported when a backend is opened, not when this module is; without it the UserError
names the extra to install. ncnn runs batch 1 with the batch axis dropped, so every output is
reshaped to the manifest's shape, and the outputs the converter turned into floats (token_fate)
are rounded back to the manifest's integer type. fp16 and bf16 storage and arithmetic are off:
ncnn would otherwise lower precision on CPUs that have them.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.manifest import ANCHORS_INPUT, ANCHORS_VALID_INPUT, IMAGE_INPUT, ncnn_engines
from vlm_export.core.option_names import option
from vlm_export.core.optional_import import import_optional
from vlm_export.runtime.engines.base import EngineBackend, check_anchor_shapes
from vlm_export.runtime.engines.select import IMAGE_ROLE

INSTALL_HINT = 'ncnn is not installed: pip install ".[ncnn]"'
#: ncnn options that trade precision for speed: all off (the graph is checked in fp32)
LOW_PRECISION_OPTIONS = (
    "use_fp16_packed",
    "use_fp16_storage",
    "use_fp16_arithmetic",
    "use_bf16_storage",
    "use_bf16_packed",
)


class NcnnMissing(UserError):
    """The ``ncnn`` package is not installed (or cannot be imported)."""


class GraphSource(Protocol):
    """What the backend reads of a bundle (a ``Bundle`` or a ``BundleGraph``)."""

    path: Path
    manifest: dict[str, Any]

    def engine_io(self, kind: str) -> dict[str, dict[str, Any]]: ...


def import_ncnn() -> ModuleType:
    """The ``ncnn`` module; NcnnMissing (a UserError) when it is not installed."""
    return import_optional("ncnn", "ncnn", INSTALL_HINT, NcnnMissing)


def ncnn_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """The bundle's newest ncnn graph record; UserError when it has none."""
    records = [r for r in ncnn_engines(manifest) if r.get("role", IMAGE_ROLE) == IMAGE_ROLE]
    if not records:
        raise UserError(
            "this bundle has no ncnn graph: add one with `vlm-export build-ncnn BUNDLE`"
        )
    return records[-1]


def missing_layers(ncnn: ModuleType, param_text: str) -> list[str]:
    """Layer types of the .param that this ncnn build cannot create (in .param order)."""
    kinds = dict.fromkeys(line.split()[0] for line in param_text.splitlines()[2:] if line.strip())
    return [kind for kind in kinds if ncnn.create_layer(kind) is None]


class NcnnBackend(EngineBackend):
    """Runs the bundle's ncnn graph on the CPU (one extractor per frame, anchors kept as Mats).

    ``record`` is the manifest's ncnn record (default: the newest) and ``folder`` where its files
    are (default: the bundle's folder; ``vlm-export build-ncnn`` points it at its staging folder).
    """

    precision = "fp32"

    def __init__(
        self,
        bundle: GraphSource,
        threads: int | None = None,
        record: dict[str, Any] | None = None,
        folder: str | Path | None = None,
    ) -> None:
        self._ncnn = ncnn = import_ncnn()
        record = record if record is not None else ncnn_record(bundle.manifest)
        folder = Path(folder) if folder is not None else Path(bundle.path)
        self._inputs = bundle.engine_io("inputs")
        self._outputs = bundle.engine_io("outputs")
        self._blobs = record.get("blobs") or {}
        self._rounded = set(record.get("rounded_outputs") or [])
        self._check_blobs(record)
        self.net = self._load(ncnn, folder / record["file"], folder / record["weights"], threads)
        self.description = f"ncnn:cpu:{record['file']}"
        self.image_shape = tuple(int(v) for v in self._inputs[IMAGE_INPUT]["shape"])
        if self.image_shape[0] != 1:
            raise BundleError(f"ncnn runs batch 1; this engine takes {self.image_shape}")
        self.condensing = ANCHORS_INPUT in self._inputs
        self._anchor_mats: dict[str, Any] = {}
        if self.condensing:
            shape = tuple(int(v) for v in self._inputs[ANCHORS_INPUT]["shape"])
            self.set_anchors(np.zeros(shape, np.float32), np.zeros(shape[0], np.float32))

    def _check_blobs(self, record: dict[str, Any]) -> None:
        for kind, names in (("inputs", self._inputs), ("outputs", self._outputs)):
            mapped = self._blobs.get(kind) or {}
            if set(mapped) != set(names):
                raise BundleError(
                    f"the ncnn record {record.get('file')} maps {kind} {sorted(mapped)}, the "
                    f"manifest has {sorted(names)}"
                )

    @staticmethod
    def _load(ncnn: ModuleType, param: Path, weights: Path, threads: int | None) -> Any:
        for path in (param, weights):
            if not path.is_file():
                raise BundleError(f"ncnn file missing: {path.name}")
        if threads is not None and threads < 1:
            raise UserError(f"{option('threads')} must be at least 1, got {threads}")
        missing = missing_layers(ncnn, param.read_text(encoding="utf-8", errors="replace"))
        if missing:
            raise BundleError(
                f"this ncnn build has no layer {', '.join(missing)} that {param.name} uses"
            )
        net = ncnn.Net()
        for name in LOW_PRECISION_OPTIONS:
            if hasattr(net.opt, name):
                setattr(net.opt, name, False)
        net.opt.use_vulkan_compute = False
        if threads is not None:
            net.opt.num_threads = threads
        if net.load_param(str(param)) != 0:
            raise BundleError(f"ncnn cannot read {param.name}")
        if net.load_model(str(weights)) != 0:
            raise BundleError(f"ncnn cannot read {weights.name} (the weights of {param.name})")
        return net

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        """Keep anchors [C, R, D] and valid [C] as ncnn Mats owned by the backend (copies)."""
        record = self._inputs.get(ANCHORS_INPUT) or {"shape": ()}
        check_anchor_shapes(self.condensing, tuple(int(v) for v in record["shape"]), anchors, valid)
        for name, array in ((ANCHORS_INPUT, anchors), (ANCHORS_VALID_INPUT, valid)):
            owned = np.ascontiguousarray(array, dtype=np.float32)
            self._anchor_mats[name] = self._ncnn.Mat(owned).clone()

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch [1, 3, H, W] float32; outputs by manifest name, in manifest shapes."""
        if image.shape != self.image_shape:
            raise ValueError(
                f"image batch {image.shape} does not fit the engine's {self.image_shape}"
            )
        frame = np.ascontiguousarray(image[0], dtype=np.float32)
        inputs = self._blobs["inputs"]
        with self.net.create_extractor() as extractor:
            extractor.input(inputs[IMAGE_INPUT], self._ncnn.Mat(frame).clone())
            for name, mat in self._anchor_mats.items():
                extractor.input(inputs[name], mat)
            return {name: self._extract(extractor, name) for name in self._outputs}

    def _extract(self, extractor: Any, name: str) -> np.ndarray:
        status, mat = extractor.extract(self._blobs["outputs"][name])
        if status != 0:
            raise RuntimeError(f"ncnn inference failed: {name} (status {status})")
        record = self._outputs[name]
        shape = tuple(int(v) for v in record["shape"])
        values = np.array(mat, dtype=np.float32)
        if values.size != int(np.prod(shape)):
            raise RuntimeError(
                f"ncnn output {name} has {values.size} values, the manifest's {list(shape)} "
                f"needs {int(np.prod(shape))}"
            )
        values = values.reshape(shape)
        if name in self._rounded:
            return np.rint(values).astype(record.get("dtype", "int32"))
        return values

    def close(self) -> None:
        """Release the network."""
        self._anchor_mats = {}
        if getattr(self, "net", None) is not None:
            self.net.clear()
            self.net = None
