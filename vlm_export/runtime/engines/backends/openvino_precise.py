"""Keep nodes in fp32 under OpenVINO's bf16: an IR whose layers carry the typed precision pin.

OpenVINO's CPU plugin leaves a node in its original precision when the node carries the typed
runtime attribute ``DisablePrecisionConversion`` (``ov::disable_fp16_compression``; the plugin's
``Node`` reads it as "keep original precision" and bf16 enforcement skips such nodes). Python can
only set untyped strings in ``rt_info``, which the plugin does not read; an IR file can carry the
typed attribute: the IR reader builds it from a layer's ``<rt_info><attribute
name="DisablePrecisionConversion" version="0" value="dynamic:bf16,f16"/></rt_info>``. So the
model is written as an IR to a temporary folder, the chosen layers get that element, and the IR
is read back into memory.

The pin holds for a node the plugin keeps (LayerNorm's MVN, a softmax it leaves alone); a node
the plugin's transformations replace or fuse loses it. The condensation therefore does not rely
on it under bf16: it runs in fp32 models of its own (``openvino_split``).
"""

from __future__ import annotations

import tempfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.manifest import CONDENSATION_NODE_PREFIXES

#: the typed runtime attribute, as an IR names it, and its value: from any type, never to bf16
#: or f16 (integer conversions such as i64 -> i32 stay allowed)
PIN_ATTRIBUTE = "DisablePrecisionConversion"
PIN_VALUE = "dynamic:bf16,f16"
#: the key under which OpenVINO lists the typed attribute in a node's rt_info
PIN_RT_KEY = f"{PIN_ATTRIBUTE}_0"
#: OpenVINO operation types kept precise under bf16 (LayerNorm becomes MVN; softmax)
PRECISE_TYPES = frozenset({"MVN", "Softmax", "NormalizeL2"})
#: node types that only hold or pass data: never marked
UNMARKED_TYPES = frozenset({"Constant", "Parameter", "Result"})


def precise_node_names(model: Any) -> list[str]:
    """The condensation, anchor selection, normalisations and softmaxes (friendly names, in
    graph order): the nodes that must not run in bf16."""
    names = []
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind in UNMARKED_TYPES:
            continue
        name = node.get_friendly_name()
        if kind in PRECISE_TYPES or name.startswith(CONDENSATION_NODE_PREFIXES):
            names.append(name)
    return names


def pin_ir_layers(xml_path: Path, names: Iterable[str]) -> int:
    """Add the typed pin to the IR layers named ``names``; how many layers were pinned."""
    wanted = set(names)
    tree = ElementTree.parse(xml_path)
    pinned = 0
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") not in wanted:
            continue
        info = layer.find("rt_info")
        if info is None:
            info = ElementTree.Element("rt_info")
            layer.insert(0, info)
        ElementTree.SubElement(
            info, "attribute", {"name": PIN_ATTRIBUTE, "version": "0", "value": PIN_VALUE}
        )
        pinned += 1
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)
    return pinned


def pinned_model(ov: Any, core: Any, model: Any) -> tuple[Any, list[str]]:
    """``model`` read back from an IR whose precise nodes carry the typed pin, and their names.

    The IR lives in a temporary folder only while it is written and read into memory.
    """
    names = precise_node_names(model)
    with tempfile.TemporaryDirectory(prefix="vlm-ov-pin-") as folder:
        xml_path = Path(folder) / "pinned.xml"
        ov.save_model(model, str(xml_path), compress_to_fp16=False)
        pin_ir_layers(xml_path, names)
        weights = np.fromfile(xml_path.with_suffix(".bin"), dtype=np.uint8)
        pinned = core.read_model(xml_path.read_text(encoding="utf-8"), ov.Tensor(weights))
    return pinned, names


def carries_typed_pin(node: Any) -> bool:
    """True when ``node`` carries OpenVINO's typed pin, not a string under the same key (the
    typed attribute has no Python form: reading its value raises TypeError)."""
    info = node.get_rt_info()
    if PIN_RT_KEY not in info:
        return False
    try:
        return not isinstance(info[PIN_RT_KEY].value, str)
    except TypeError:
        return True


def pinned_names(model: Any) -> list[str]:
    """The nodes of ``model`` that carry the typed pin (friendly names, in graph order)."""
    return [node.get_friendly_name() for node in model.get_ordered_ops() if carries_typed_pin(node)]


def runtime_precisions(compiled: Any) -> dict[str, str]:
    """What each original node runs in (``runtimePrecision`` of the runtime model's node that
    holds it), over every stage of a split model (``openvino_split``) or one compiled model."""
    models = (
        [model for _, model in compiled.runtime_models()]
        if hasattr(compiled, "runtime_models")
        else [compiled.get_runtime_model()]
    )
    precisions = {}
    for model in models:
        for op in model.get_ordered_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) in ("Input", "Output", "Const"):
                continue
            for name in info["originalLayersNames"].astype(str).split(","):
                precisions[name] = info["runtimePrecision"].astype(str)
    return precisions


def bf16_condensation_nodes(compiled: Any) -> list[str]:
    """Original names of condensation nodes the compiled model runs in bf16 (none when the
    condensation is kept in fp32)."""
    return [
        name
        for name, precision in runtime_precisions(compiled).items()
        if precision == "bf16" and name.startswith(CONDENSATION_NODE_PREFIXES)
    ]
