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


#: the stage of the work that reads only rarely changing inputs (the anchors): it runs first,
#: in fp32, and only again when those inputs change
RARE_STAGE = -1


def stage_numbers(
    model: Any, precise: set[str], rare_inputs: frozenset[str] = frozenset()
) -> dict[str, int]:
    """Each computing node's stage (by friendly name): even stages compute freely, odd ones hold
    the nodes named in ``precise``. A node goes to the earliest stage of its kind after
    everything it reads, so the kinds alternate as seldom as the graph allows; a node computed
    from constants alone (an INT8 weight's dequantization) goes to the stage of its first
    reader (``cut_stages`` gives later readers a copy); a node computed from ``rare_inputs``
    (and constants) alone goes to ``RARE_STAGE``."""
    constant_valued = computed_from_constants(model)
    stage: dict[str, int] = {}
    for node in model.get_ordered_ops():
        name = node.get_friendly_name()
        if node.get_type_name() in DATA_TYPES or name in constant_valued:
            continue
        sources = [port.get_source_output() for port in node.inputs()]
        kinds = [source_kind(source, constant_valued, stage, rare_inputs) for source in sources]
        if all(kind in ("constant", "rare") for kind in kinds):
            stage[name] = RARE_STAGE
            continue
        kind = int(name in precise)
        earliest = 0
        for source in sources:
            number = stage.get(source.get_node().get_friendly_name())
            if number is not None and number != RARE_STAGE:
                earliest = max(earliest, number if number % 2 == kind else number + 1)
        stage[name] = earliest if earliest % 2 == kind else earliest + 1
    for node in reversed(model.get_ordered_ops()):
        if node.get_friendly_name() in constant_valued:
            readers = [
                stage.get(target.get_node().get_friendly_name())
                for output in node.outputs()
                for target in output.get_target_inputs()
            ]
            stage[node.get_friendly_name()] = min((r for r in readers if r is not None), default=0)
    return stage


def computed_from_constants(model: Any) -> set[str]:
    """The computing nodes whose inputs are all constants or such nodes (friendly names); a
    name two computing nodes share is refused (the graph is cut by name)."""
    seen: set[str] = set()
    found: set[str] = set()
    for node in model.get_ordered_ops():
        if node.get_type_name() in DATA_TYPES:
            continue
        name = node.get_friendly_name()
        if name in seen:
            raise ValueError(f"two nodes are named {name!r}: the graph cannot be cut by name")
        seen.add(name)
        sources = [port.get_source_output().get_node() for port in node.inputs()]
        if all(s.get_type_name() == "Constant" or s.get_friendly_name() in found for s in sources):
            found.add(name)
    return found


def source_kind(
    source: Any, constant_valued: set[str], stage: dict[str, int], rare_inputs: frozenset[str]
) -> str:
    """Whether ``source`` is a constant (or computed from constants), a rarely changing input
    (or computed from them), or anything else."""
    node = source.get_node()
    kind = node.get_type_name()
    if kind == "Constant" or node.get_friendly_name() in constant_valued:
        return "constant"
    if kind == "Parameter":
        return "rare" if source.get_names() & rare_inputs else "other"
    return "rare" if stage.get(node.get_friendly_name()) == RARE_STAGE else "other"


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


def cut_stages(
    ov: Any, model: Any, precise: set[str], rare_inputs: frozenset[str] = frozenset()
) -> list[tuple[Stage, Any]]:
    """``model`` cut into stages (each with its own ``ov.Model``), in the order they run.

    ``model`` is taken apart: every edge between two stages becomes a Result of the producing
    stage and a Parameter of the reading one (both named by the tensor; a graph input or output
    by the name the model gives it), every graph input a Parameter of each stage that reads it,
    and what is computed from constants alone (a weight, its dequantization, a shape) is copied
    into each further stage that reads it, so that no weight crosses a cut as a runtime input.
    """
    ops = ov.opset13
    numbers = stage_numbers(model, precise, rare_inputs)
    constant_valued = computed_from_constants(model)
    # graph inputs and outputs keep the names the model gives them, also where a stage reads them
    given_names = {
        output_key(parameter.output(0)): port.get_any_name()
        for parameter, port in zip(model.get_parameters(), model.inputs, strict=True)
    }
    graph_outputs = {
        output_key(result.input(0).get_source_output()): output.get_any_name()
        for result, output in zip(model.get_results(), model.outputs, strict=True)
    }
    given_names.update(graph_outputs)
    stages: dict[int, Stage] = {n: Stage(n, n % 2 == 1) for n in sorted(set(numbers.values()))}
    copies: dict[int, dict[tuple[str, int], Any]] = {}

    def stage_of(node: Any) -> int:
        if node.get_type_name() == "Result":  # with what it gives out
            node = node.input(0).get_source_output().get_node()
            if node.get_type_name() in ("Constant", "Parameter"):  # the first that runs always
                return min((n for n in stages if n != RARE_STAGE), default=RARE_STAGE)
        return numbers[node.get_friendly_name()]

    def copy_into(output: Any, number: int) -> Any:
        """``output`` (computed from constants alone) made anew for stage ``number``: the
        subgraph is cloned with its constants (types such as bf16 and 4-bit kept)."""
        made = copies.setdefault(number, {})
        key = output_key(output)
        if key not in made:
            handle = ops.result(output)
            clone = ov.Model([handle], [], "copy").clone().get_results()[0]
            output.remove_target_input(handle.input(0))
            made[key] = clone.input(0).get_source_output()
            made[key].remove_target_input(clone.input(0))
        return made[key]

    constant_home: dict[str, int] = {}
    for node in list(model.get_ordered_ops()):
        if node.get_type_name() in ("Constant", "Parameter"):
            continue
        reader = stages[stage_of(node)]
        for port in node.inputs():
            source = port.get_source_output()
            producer = source.get_node()
            kind = producer.get_type_name()
            if kind == "Constant" or producer.get_friendly_name() in constant_valued:
                home = (
                    constant_home.setdefault(producer.get_friendly_name(), reader.number)
                    if kind == "Constant"
                    else numbers[producer.get_friendly_name()]
                )
                if home != reader.number:
                    port.replace_source_output(copy_into(source, reader.number))
                continue
            name = given_names.get(output_key(source)) or tensor_name(source)
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
    ``create_infer_request``; ``runtime_models`` gives each stage's runtime model. The work that
    reads only ``rare_inputs`` (and constants) is a stage of its own, which a request runs only
    when those inputs were bound or said to have changed (``SplitRequest.inputs_changed``).
    """

    def __init__(
        self,
        ov: Any,
        core: Any,
        model: Any,
        config: dict[str, Any],
        rare_inputs: frozenset[str] = frozenset(),
        device: str = "CPU",
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
            stages = cut_stages(ov, model, condensation_nodes(model), rare_inputs)
        except (KeyError, ValueError) as exc:  # a node named twice, an output without a producer
            raise RuntimeError(f"the graph cannot be cut into stages: {exc}") from None
        for stage, graph in stages:
            for port in (*graph.inputs, *graph.outputs):
                if not port.get_partial_shape().is_static:
                    raise RuntimeError(
                        f"{port.get_any_name()} passes between stages with a shape known only "
                        f"when it runs ({port.get_partial_shape()})"
                    )
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
    so nothing is copied or bound per frame. The rare inputs' stage runs on the first frame and
    after those inputs change."""

    def __init__(self, split: SplitCompiled) -> None:
        self._split = split
        self._requests = [compiled.create_infer_request() for _, compiled in split.stages]
        self._tensors: dict[str, Any] = {}
        self._stale = True  # the rare inputs' stage has not run on the inputs bound now
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
        """Bind a graph input (by the name the model gives it) for every stage that reads it;
        an input no stage reads (one only its shape was taken of) is kept, and read by none."""
        if name not in {port.name for port in self._split.inputs}:
            raise KeyError(f"the model takes no input {name!r}")
        for (stage, _), request in zip(self._split.stages, self._requests, strict=True):
            if name in stage.parameters:
                request.set_tensor(name, tensor)
                self._stale |= stage.number == RARE_STAGE
        self._tensors[name] = tensor

    def inputs_changed(self) -> None:
        """Say that a rare input's bound memory was written: its stage runs again next frame."""
        self._stale = True

    def infer(self) -> None:
        """Run the stages in order, each reading what the earlier ones wrote."""
        for (stage, _), request in zip(self._split.stages, self._requests, strict=True):
            if stage.number == RARE_STAGE:
                if not self._stale:
                    continue
                request.infer()
                self._stale = False
            else:
                request.infer()

    def get_tensor(self, name: str) -> Any:
        """A graph output (or input) by name, as the last run left it."""
        return self._tensors[name]
