"""bf16 with the condensation in fp32: the model cut into stages, each compiled in its precision.

OpenVINO's typed pin (``openvino_precise``) keeps a node in fp32 only while the node lives: the
CPU plugin's transformations replace and fuse nodes (a division becomes a power and a multiply,
a broadcast product a matrix product, element-wise chains one fused kernel) and the new nodes do
not carry it. On an AVX512-BF16 CPU (OpenVINO 2026.4) 33 of the tiny test model's condensation
nodes ran in bf16 despite the pin. So the condensation runs in models of its own: the graph is
cut where it passes between the condensation (``CONDENSATION_NODE_PREFIXES``) and the
transformer, the condensation's stages compile with f32 inference precision and the rest with
bf16, and one request runs the stages in order, handing each stage's output tensors to the next
(OpenVINO tensors, not copies). Every node the plugin makes from a condensation node is inside
an f32 model, whatever the plugin's transformations do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vlm_export.core.manifest import CONDENSATION_NODE_PREFIXES

#: node types that hold data or mark an end: they take the stage of what uses or feeds them
DATA_TYPES = frozenset({"Constant", "Parameter", "Result"})


def condensation_nodes(model: Any) -> set[str]:
    """The friendly names of the condensation's nodes: those named so
    (``CONDENSATION_NODE_PREFIXES``), and the helpers the ONNX reader makes for them (an ArgMax
    read as TopK and Squeeze, a Clip as Maximum and Minimum, a reshape of an input), found as
    nodes that read only condensation nodes or data and feed only condensation nodes."""
    nodes = [node for node in model.get_ordered_ops() if node.get_type_name() not in DATA_TYPES]
    chosen = {
        node.get_friendly_name()
        for node in nodes
        if node.get_friendly_name().startswith(CONDENSATION_NODE_PREFIXES)
    }
    grown = True
    while grown:
        grown = False
        for node in nodes:
            name = node.get_friendly_name()
            if name in chosen:
                continue
            sources = [port.get_source_output().get_node() for port in node.inputs()]
            readers = [
                target.get_node()
                for output in node.outputs()
                for target in output.get_target_inputs()
            ]
            if (
                readers
                and all(
                    source.get_type_name() in DATA_TYPES or source.get_friendly_name() in chosen
                    for source in sources
                )
                and all(reader.get_friendly_name() in chosen for reader in readers)
            ):
                chosen.add(name)
                grown = True
    return chosen


def stage_numbers(model: Any, precise: set[str]) -> dict[str, int]:
    """Each computing node's stage (by friendly name): even stages compute freely, odd ones hold
    the nodes named in ``precise``. A node goes to the earliest stage of its kind after
    everything it reads, so the kinds alternate as seldom as the graph allows; a node computed
    from constants alone (an INT8 weight's dequantization) goes to the stage of its first
    reader, so that a weight never crosses a cut as a runtime input."""
    stage: dict[str, int] = {}
    from_constants: list[Any] = []
    constant_valued: set[str] = set()
    for node in model.get_ordered_ops():
        if node.get_type_name() in DATA_TYPES:
            continue
        name = node.get_friendly_name()
        if name in stage or name in constant_valued:
            raise ValueError(f"two nodes are named {name!r}: the graph cannot be cut by name")
        sources = [port.get_source_output().get_node() for port in node.inputs()]
        if all(
            source.get_type_name() == "Constant" or source.get_friendly_name() in constant_valued
            for source in sources
        ):
            constant_valued.add(name)
            from_constants.append(node)
            continue
        kind = int(name in precise)
        earliest = 0
        for source in sources:
            number = stage.get(source.get_friendly_name())
            if number is not None:
                earliest = max(earliest, number if number % 2 == kind else number + 1)
        stage[name] = earliest if earliest % 2 == kind else earliest + 1
    for node in reversed(from_constants):
        readers = [
            stage.get(target.get_node().get_friendly_name())
            for output in node.outputs()
            for target in output.get_target_inputs()
        ]
        stage[node.get_friendly_name()] = min((r for r in readers if r is not None), default=0)
    return stage


def output_key(output: Any) -> tuple[str, int]:
    """Which output of which node ``output`` is (friendly name, port)."""
    return output.get_node().get_friendly_name(), output.get_index()


def tensor_name(output: Any) -> str:
    """A name for ``output`` that is unique in the graph: its own, else node and port."""
    names = sorted(output.get_names())
    if names:
        return names[0]
    return f"{output.get_node().get_friendly_name()}:{output.get_index()}"


@dataclass
class Stage:
    """One cut of the graph: its inputs and outputs (tensor names) and whether it is precise."""

    number: int
    precise: bool
    parameters: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


#: element types of compressed weights (an INT8 graph's, fp16 ones): kept as they are when
#: shapes are folded, so the plugin still sees the weights' precision
COMPRESSED_TYPES = frozenset({"i8", "u8", "i4", "u4", "f16", "bf16"})


def fold_shapes(ov: Any, model: Any) -> None:
    """Fold what ``model`` computes from constants and static shapes (its ``ShapeOf``
    subgraphs) into constants, so that no shape crosses a cut as a runtime input (the CPU
    plugin refuses a reshape to a shape it cannot know). Compressed weights stand aside while
    it folds (folding would dequantize an INT8 graph's weights to fp32)."""
    from openvino import passes  # imported with the backend, never with this module

    aside = []
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Constant":
            continue
        if node.get_element_type().get_type_name() not in COMPRESSED_TYPES:
            continue
        stand_in = ov.opset13.parameter(node.get_output_partial_shape(0), node.get_element_type())
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(stand_in.output(0))
        aside.append((node, stand_in))
    model.add_parameters([stand_in for _, stand_in in aside])
    manager = passes.Manager()
    manager.register_pass(passes.ConstantFolding())
    manager.run_passes(model)
    for node, stand_in in aside:
        for target in list(stand_in.output(0).get_target_inputs()):
            target.replace_source_output(node.output(0))
        model.remove_parameter(stand_in)


def cut_stages(ov: Any, model: Any, precise: set[str]) -> list[tuple[Stage, Any]]:
    """``model`` cut into stages (each with its own ``ov.Model``), in the order they run.

    ``model`` is taken apart: every edge between two stages becomes a Result of the producing
    stage and a Parameter of the reading one (both named by the tensor), every graph input a
    Parameter of each stage that reads it, and a constant read by several stages a copy for each
    further stage (shape constants and the like: a weight belongs to one stage).
    """
    ops = ov.opset13
    numbers = stage_numbers(model, precise)
    # a graph output keeps the name the model gives it, also where a later stage reads it
    graph_outputs = {
        output_key(result.input(0).get_source_output()): output.get_any_name()
        for result, output in zip(model.get_results(), model.outputs, strict=True)
    }
    stages: dict[int, Stage] = {n: Stage(n, n % 2 == 1) for n in sorted(set(numbers.values()))}

    def stage_of(node: Any) -> int:
        if node.get_type_name() == "Result":  # with what it gives out (a constant: the first)
            node = node.input(0).get_source_output().get_node()
            if node.get_type_name() in ("Constant", "Parameter"):
                return min(stages)
        return numbers[node.get_friendly_name()]

    constant_home: dict[str, int] = {}
    for node in list(model.get_ordered_ops()):
        if node.get_type_name() in ("Constant", "Parameter"):
            continue
        reader = stages[stage_of(node)]
        for port in node.inputs():
            source = port.get_source_output()
            producer = source.get_node()
            kind = producer.get_type_name()
            if kind == "Constant":
                home = constant_home.setdefault(producer.get_friendly_name(), reader.number)
                if home != reader.number:
                    copy = ops.constant(producer.get_data())
                    port.replace_source_output(copy.output(0))
                continue
            name = graph_outputs.get(output_key(source)) or tensor_name(source)
            if kind != "Parameter" and stage_of(producer) == reader.number:
                continue
            if (
                kind != "Parameter"
                and output_key(source) not in graph_outputs  # its own Result is added below
                and name not in stages[stage_of(producer)].results
            ):
                stages[stage_of(producer)].results[name] = ops.result(source)
                source.get_tensor().add_names({name})
            if name not in reader.parameters:
                parameter = ops.parameter(
                    source.get_partial_shape(), source.get_element_type(), name=name
                )
                parameter.output(0).get_tensor().set_names({name})
                reader.parameters[name] = parameter
            port.replace_source_output(reader.parameters[name].output(0))
    for result, output in zip(model.get_results(), model.outputs, strict=True):
        stages[stage_of(result)].results[output.get_any_name()] = result
    built = []
    for stage in stages.values():
        if stage.results:
            graph = ov.Model(
                list(stage.results.values()),
                list(stage.parameters.values()),
                f"stage{stage.number}",
            )
            built.append((stage, graph))
    return built


@dataclass(frozen=True)
class Port:
    """A graph input or output of a split model, as OpenVINO's ports describe themselves."""

    name: str
    partial_shape: Any
    element_type: Any

    def get_any_name(self) -> str:
        return self.name

    def get_partial_shape(self) -> Any:
        return self.partial_shape

    def get_element_type(self) -> Any:
        return self.element_type


class SplitCompiled:
    """The stages compiled, free ones with ``config``, precise ones with f32 inference precision.

    Offers what the backend uses of a compiled model: ``inputs``, ``outputs`` and
    ``create_infer_request``; ``runtime_models`` gives each stage's runtime model.
    """

    def __init__(
        self, ov: Any, core: Any, model: Any, config: dict[str, Any], device: str = "CPU"
    ) -> None:
        self.inputs = [
            Port(p.get_any_name(), p.get_partial_shape(), p.get_element_type())
            for p in model.inputs
        ]
        self.outputs = [
            Port(p.get_any_name(), p.get_partial_shape(), p.get_element_type())
            for p in model.outputs
        ]
        self.ov = ov
        self.stages: list[tuple[Stage, Any]] = []
        fold_shapes(ov, model)
        try:
            stages = cut_stages(ov, model, condensation_nodes(model))
        except (KeyError, ValueError) as exc:  # a node named twice, an output without a producer
            raise RuntimeError(f"the graph cannot be cut into stages: {exc}") from None
        for stage, graph in stages:
            precise = {**config, "INFERENCE_PRECISION_HINT": "f32"}
            compiled = core.compile_model(graph, device, precise if stage.precise else config)
            self.stages.append((stage, compiled))

    def runtime_models(self) -> Iterator[tuple[bool, Any]]:
        """(whether the stage is precise, its runtime model) for every stage, in order."""
        for stage, compiled in self.stages:
            yield stage.precise, compiled.get_runtime_model()

    def create_infer_request(self) -> SplitRequest:
        """A request that runs every stage in order."""
        return SplitRequest(self)


class SplitRequest:
    """Runs the stages of a ``SplitCompiled`` in order. Every tensor that passes between stages
    is made once and bound to both requests (the producer writes into it, the readers read it),
    so nothing is copied or bound per frame."""

    def __init__(self, split: SplitCompiled) -> None:
        self._split = split
        self._requests = [compiled.create_infer_request() for _, compiled in split.stages]
        self._tensors: dict[str, Any] = {}
        for (stage, compiled), request in zip(split.stages, self._requests, strict=True):
            for name in stage.results:
                port = compiled.output(name)
                tensor = split.ov.Tensor(port.get_element_type(), port.get_shape())
                request.set_tensor(name, tensor)
                self._tensors[name] = tensor
        for (stage, _), request in zip(split.stages, self._requests, strict=True):
            for name in stage.parameters:
                if name in self._tensors:
                    request.set_tensor(name, self._tensors[name])

    def set_tensor(self, name: str, tensor: Any) -> None:
        """Bind a graph input for every stage that reads it."""
        found = False
        for (stage, _), request in zip(self._split.stages, self._requests, strict=True):
            if name in stage.parameters:
                request.set_tensor(name, tensor)
                found = True
        if not found:
            raise KeyError(f"the model takes no input {name!r}")
        self._tensors[name] = tensor

    def infer(self) -> None:
        """Run the stages in order, each reading what the earlier ones wrote."""
        for request in self._requests:
            request.infer()

    def get_tensor(self, name: str) -> Any:
        """A graph output (or input) by name, as the last run left it."""
        return self._tensors[name]
