"""A ladder's rungs on OpenVINO's CPU plugin as one compiled model: one packed copy of the weights.

OpenVINO gives each compiled model its own packed weights and has no public way to hand them to
another, so rungs compiled one by one hold one copy each. Here the rungs' graphs become the
branches of one model: a scalar input ``ladder_rung`` chooses the branch (one ``If`` operation
per rung), and every constant whose bytes two rungs share is one array, the ladder's mapped
weights file where the bytes are a row of it. Inside one compiled model the plugin keys its
packed weights by the memory they come from, so the rungs share one packed copy. Each rung is an
infer request with ``ladder_rung`` fixed to its index and its own anchors; a rung computes only
its own branch, at about the cost of its graph compiled alone (docs/budget.md has the figures).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.core.errors import BundleError
from vlm_export.runtime.engines.backends.openvino_backend import (
    OpenVinoBackend,
    compile_config,
    import_openvino,
    openvino_reason,
)
from vlm_export.runtime.engines.ladder.mapped_weights import MappedWeights

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle

#: the input of the combined model that picks the rung (int32 scalar)
RUNG_INPUT = "ladder_rung"

#: OpenVINO element types whose NumPy view is the constant itself (the same type comes back from
#: a NumPy array): constants of other types (bf16, 4-bit, fp8) stay as the rung has them
SHARED_TYPES = frozenset(
    {"f64", "f32", "f16", "i64", "i32", "i16", "i8", "u64", "u32", "u16", "u8", "boolean"}
)
#: dtype, shape and a few of the bytes: constants with the same key are compared in full
SampleKey = tuple[str, tuple[int, ...], bytes]
#: elements sampled (evenly spaced) into a key
SAMPLES = 64


def sample_key(array: np.ndarray) -> SampleKey:
    """Dtype, shape and ``SAMPLES`` evenly spaced elements of ``array``: equal for equal arrays,
    cheap to compute for a large one."""
    flat = array.reshape(-1)
    picks = np.linspace(0, flat.size - 1, min(flat.size, SAMPLES)).astype(np.int64)
    return array.dtype.str, tuple(array.shape), flat[picks].tobytes()


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays of one dtype and shape hold the same bytes (0.0 and -0.0 differ)."""
    return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


class SharedConstants:
    """One array per distinct constant of the rungs, starting from the mapped weights file."""

    def __init__(self, mapped: MappedWeights | None) -> None:
        self.mapped = mapped
        self._arrays: dict[SampleKey, list[np.ndarray]] = {}
        for array in mapped.arrays.values() if mapped else ():
            self._one_of(array)

    def _one_of(self, data: np.ndarray) -> np.ndarray:
        """The array held for ``data``'s bytes (a copy of ``data`` when none is yet)."""
        same = self._arrays.setdefault(sample_key(data), [])
        for array in same:
            if same_bytes(array, data):
                return array
        array = data if data.flags.writeable else np.array(data)
        same.append(array)
        return array

    def share(self, ops: Any, model: Any) -> None:
        """Point every constant of ``model`` (of a type in ``SHARED_TYPES``) at the one array
        that holds its bytes."""
        for node in model.get_ordered_ops():
            if node.get_type_name() != "Constant":
                continue
            if node.get_element_type().get_type_name() not in SHARED_TYPES:
                continue
            replacement = ops.constant(self._one_of(node.get_data()), shared_memory=True)
            replacement.set_friendly_name(node.get_friendly_name())
            for target in node.output(0).get_target_inputs():
                target.replace_source_output(replacement.output(0))

    def seal(self) -> None:
        """Make the arrays read-only for Python (the compiled model reads them) and hand the
        mapped weights' resident pages back: the packed copies are what the MatMuls read, and
        what else reads the file (biases, norms) pages back in on the first frame."""
        for same in self._arrays.values():
            for array in same:
                array.flags.writeable = False
        if self.mapped is not None:
            self.mapped.release_pages()

    def close(self) -> None:
        """Forget the arrays (the compiled model holds those it reads until it is dropped)."""
        self._arrays.clear()
        self.mapped = None


def rung_switch_model(ov: Any, rungs: Sequence[Any]) -> Any:
    """One model whose input ``ladder_rung`` = i computes ``rungs[i]`` only.

    Rung i is the then-branch of its own ``If`` (condition ``ladder_rung == i``), whose
    else-branch only gives zeros; ``Select`` passes on the outputs of the rung that ran. The Ifs
    stand side by side, not nested: a rung nested in other Ifs' else-branches ran 2-4% slower
    on ViT-B/32. Every rung takes the same inputs and gives the same outputs (names, shapes,
    types), as a ladder's graphs do (``check_alike``); inputs and outputs are paired by name.
    """
    ops = ov.opset13
    first = rungs[0]
    inputs = {
        p.get_friendly_name(): ops.parameter(
            p.get_partial_shape(), p.get_element_type(), name=p.get_friendly_name()
        )
        for p in first.get_parameters()
    }
    rung = ops.parameter([], ov.Type.i32, name=RUNG_INPUT)
    branches = []
    for index, body in enumerate(rungs):
        chosen = ops.equal(rung, ops.constant(np.int32(index))).output(0)
        branch = ops.if_op(chosen)
        idle = _zeros_like_outputs(ov, body)
        branch.set_then_body(body)
        branch.set_else_body(idle)
        parameters = {p.get_friendly_name(): p for p in body.get_parameters()}
        for name, outer in inputs.items():
            branch.set_input(outer.output(0), parameters[name], None)
        results = dict(zip(_output_names(body), body.get_results(), strict=True))
        zeros = dict(zip(_output_names(body), idle.get_results(), strict=True))
        outputs = [branch.set_output(results[name], zeros[name]) for name in _output_names(first)]
        branches.append((chosen, outputs))
    combined = branches[-1][1]
    for chosen, outputs in reversed(branches[:-1]):
        combined = [
            ops.select(chosen, mine, rest).output(0)
            for mine, rest in zip(outputs, combined, strict=True)
        ]
    results = []
    for output, port in zip(combined, first.outputs, strict=True):
        result = ops.result(output)
        result.output(0).set_names(set(port.get_names()))
        results.append(result)
    return ov.Model(results, [*inputs.values(), rung], "ladder")


def _output_names(model: Any) -> list[str]:
    """A model's output names, in its order."""
    return [port.get_any_name() for port in model.outputs]


def _typed_shape(port: Any) -> tuple[str, str]:
    return port.get_element_type().get_type_name(), str(port.get_partial_shape())


def _signature(model: Any) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """(inputs, outputs) of a model: name -> (element type, shape)."""
    inputs = {p.get_friendly_name(): _typed_shape(p.output(0)) for p in model.get_parameters()}
    outputs = {port.get_any_name(): _typed_shape(port) for port in model.outputs}
    return inputs, outputs


def check_alike(models: Sequence[Any], names: Sequence[str]) -> None:
    """BundleError unless every model takes the inputs and gives the outputs of the first (names,
    types, static shapes), as one ladder's rungs do; ``names`` name the models in messages."""
    expected = _signature(models[0])
    if any(not port.get_partial_shape().is_static for port in models[0].outputs):
        raise BundleError(f"{names[0]} has outputs of dynamic shape: a ladder's rungs are static")
    for model, name in zip(models[1:], names[1:], strict=True):
        signature = _signature(model)
        for kind, found, want in zip(("inputs", "outputs"), signature, expected, strict=True):
            if found != want:
                raise BundleError(
                    f"{name} has other {kind} than {names[0]} ({sorted(found)} against "
                    f"{sorted(want)}, with their types and shapes): not rungs of one ladder"
                )


def _zeros_like_outputs(ov: Any, model: Any) -> Any:
    """A model without inputs whose outputs are zeros shaped and typed as ``model``'s."""
    ops = ov.opset13
    zeros = [
        ops.result(
            ops.constant(
                np.zeros(
                    [int(v) for v in result.get_output_shape(0)],
                    result.get_output_element_type(0).to_dtype(),
                )
            )
        )
        for result in model.get_results()
    ]
    return ov.Model(zeros, [], "another_rung")


class OpenVinoRungs:
    """Every rung of a ladder compiled as one OpenVINO model (``compiled``) with shared weights.

    ``close`` after the rungs' backends: it drops the compiled model, then the arrays it reads.
    """

    def __init__(
        self,
        ov: Any,
        core: Any,
        graphs: Sequence[Path],
        config: dict[str, Any],
        mapped: MappedWeights | None,
    ) -> None:
        self.constants = SharedConstants(mapped)
        combined = self._combined(ov, core, graphs)
        try:
            self.compiled = core.compile_model(combined, "CPU", config)
        except RuntimeError as exc:
            raise BundleError(
                f"OpenVINO cannot compile the ladder: {openvino_reason(exc)}"
            ) from None
        self.constants.seal()

    def _combined(self, ov: Any, core: Any, graphs: Sequence[Path]) -> Any:
        """The rungs' graphs read, checked alike, their constants shared, as one model."""
        models = []
        for path in graphs:
            try:
                models.append(core.read_model(str(path)))
            except RuntimeError as exc:
                raise BundleError(
                    f"OpenVINO cannot read {path.name}: {openvino_reason(exc)}"
                ) from None
        check_alike(models, [path.name for path in graphs])
        for model in models:
            self.constants.share(ov.opset13, model)
        try:
            return rung_switch_model(ov, models)
        except RuntimeError as exc:
            message = f"OpenVINO cannot join the ladder's rungs: {openvino_reason(exc)}"
            raise BundleError(message) from None

    def close(self) -> None:
        """Drop the compiled model, then the weights it reads."""
        self.compiled = None
        self.constants.close()


def open_openvino_rungs(
    bundle: Bundle,
    graphs: Sequence[str],
    precision: str,
    threads: int | None,
    weights_record: dict[str, Any] | None = None,
) -> tuple[list[OpenVinoBackend], OpenVinoRungs]:
    """One OpenVINO backend per rung graph, all running in one compiled model (close the
    returned group after the backends); the graphs read the weights file of ``weights_record``
    (default: the ladder's fp32 ``ladder.weights``)."""
    ov = import_openvino()
    record = weights_record or bundle.manifest["ladder"]["weights"]
    mapped = MappedWeights(bundle, record, writable=True) if record.get("table") else None
    group = OpenVinoRungs(
        ov, ov.Core(), [bundle.path / g for g in graphs], compile_config(precision, threads), mapped
    )
    engines: list[OpenVinoBackend] = []
    try:
        for index in range(len(graphs)):
            rung = {RUNG_INPUT: np.array(index, np.int32)}
            engines.append(
                OpenVinoBackend(
                    bundle, precision, threads, compiled=group.compiled, fixed_inputs=rung
                )
            )
    except BaseException:
        for engine in engines:
            engine.close()
        group.close()
        raise
    return engines, group
