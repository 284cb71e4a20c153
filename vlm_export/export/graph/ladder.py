"""A ladder of token budgets in one bundle: one condensing graph per drop rate, weights stored once.

Every rung is the same tower traced at another drop rate, so its weights are the same tensors.
``share_weights`` moves every large initializer of the rung graphs into one ONNX external-data
file, each distinct tensor once, and names it by its content (``w_<sha256 prefix>``): the same
weight has the same name in every rung, which is what a runtime needs to share it in memory
(ONNX Runtime ``SessionOptions.add_initializer``). Data movement on weights (the condensing
blocks' split and transposed q/k/v parts) is folded first (``weight_folding``), so that those
parts are shared weights too rather than constants each session folds for itself.

Rung 0 may be drop rate 0: pass-through reduction blocks that keep every token but still inject
the anchor, so the anchors input [K, R, D] is the same for every rung and one reservoir serves
them all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import IMAGE_ENCODER_ONNX
from vlm_export.export.graph.weight_folding import fold_weight_transforms
from vlm_export.models.schedule import ScheduleError

#: the external-data file the rung graphs share
WEIGHTS_FILE = "image_encoder.weights"
#: initializers smaller than this stay inside each graph (shape constants, index tables)
MIN_SHARED_BYTES = 1024
#: offsets in the weights file are multiples of this (ONNX Runtime maps the file; pages align)
ALIGN = 4096


def parse_drop_rates(text: str) -> list[float]:
    """``"0,0.035,0.1"`` -> sorted distinct rates (largest budget first); UserError if bad."""
    parts = text.split(",")
    if any(part.strip() for part in parts) and not all(part.strip() for part in parts):
        raise UserError(f"--drop-rates has an empty item: {text[:80]!r}")
    try:
        rates = [float(part) for part in parts if part.strip()]
    except ValueError:
        raise UserError(
            f"--drop-rates: expected comma-separated numbers, got {text[:80]!r}"
        ) from None
    if not rates:
        raise UserError("--drop-rates is empty: give two or more rates, e.g. 0,0.035,0.1")
    if len(rates) < 2:
        raise UserError("--drop-rates needs at least two rates (one rate: use --drop-rate)")
    if len(set(rates)) != len(rates):
        raise UserError(f"--drop-rates lists a rate twice: {text[:80]}")
    bad = [rate for rate in rates if not 0.0 <= rate < 1.0]
    if bad:
        raise UserError(f"--drop-rates: every rate must be in [0, 1), got {bad[0]}")
    return sorted(rates)


def rung_file(index: int) -> str:
    """The ONNX file of rung ``index``: rung 0 is the bundle's image encoder."""
    return IMAGE_ENCODER_ONNX if index == 0 else f"image_encoder.rung{index}.onnx"


def rung_problem(index: int, rate: float, error: ScheduleError) -> UserError:
    """A schedule error of one rung as one line naming the rung (the error names the block)."""
    return ScheduleError(f"--drop-rates rung {index} (drop rate {rate}): {error}")


def _content_key(tensor: TensorProto) -> str:
    digest = hashlib.sha256()
    digest.update(f"{tensor.data_type}:{list(tensor.dims)}:".encode())
    digest.update(tensor.raw_data)
    return digest.hexdigest()


def _shareable(tensor: TensorProto) -> bool:
    return tensor.HasField("raw_data") and len(tensor.raw_data) >= MIN_SHARED_BYTES


def share_weights(graphs: Sequence[Path], weights_name: str = WEIGHTS_FILE) -> dict[str, Any]:
    """Rewrite ``graphs`` (in one folder) to read their large initializers from one shared file.

    Each distinct tensor (dtype, shape, bytes) is written once to ``weights_name`` beside the
    graphs and renamed ``w_<sha256 prefix>`` in every graph that uses it (a graph using the same
    content twice keeps one initializer). Returns the manifest's ``ladder.weights`` record, whose
    ``table`` lists each shared tensor's name, offset, shape and dtype.
    """
    folder = Path(graphs[0]).parent
    offsets: dict[str, tuple[int, int]] = {}
    table: list[dict[str, Any]] = []
    size = 0
    with open(folder / weights_name, "wb") as blob:
        for path in graphs:
            model = onnx.load(str(path), load_external_data=False)
            graph = model.graph
            fold_weight_transforms(graph)  # split/transposed weights shared too, not per session
            renamed: dict[str, str] = {}
            kept: list[TensorProto] = []
            names: set[str] = set()
            for tensor in graph.initializer:
                if not _shareable(tensor):
                    kept.append(tensor)
                    continue
                key = _content_key(tensor)
                name = f"w_{key[:24]}"
                renamed[tensor.name] = name
                if key not in offsets:
                    pad = -size % ALIGN
                    blob.write(b"\0" * pad)
                    offsets[key] = (size + pad, len(tensor.raw_data))
                    table.append(_table_row(name, tensor, size + pad))
                    blob.write(tensor.raw_data)
                    size += pad + len(tensor.raw_data)
                if name in names:
                    continue
                names.add(name)
                offset, length = offsets[key]
                tensor.name = name
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
                del tensor.external_data[:]
                for field, value in (
                    ("location", weights_name),
                    ("offset", str(offset)),
                    ("length", str(length)),
                ):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = field, value
                kept.append(tensor)
            del graph.initializer[:]
            graph.initializer.extend(kept)
            for node in graph.node:
                for position, name in enumerate(node.input):
                    if name in renamed:
                        node.input[position] = renamed[name]
            onnx.save(model, str(path))
            onnx.checker.check_model(str(path), full_check=True)
    return {"file": weights_name, "bytes": size, "tensors": len(offsets), "table": table}


def _table_row(name: str, tensor: TensorProto, offset: int) -> dict[str, Any]:
    """Where a shared tensor lies in the weights file, for a runtime that maps it itself."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
    return {"name": name, "offset": offset, "shape": list(tensor.dims), "dtype": dtype}
