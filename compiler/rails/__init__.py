"""Guard rails: one module per dead end that people hit by hand, each a pure check over a graph, an
engine or a report, returning one result dict {"rail", "status", "message", ...numbers}.

Each rail module declares `NAME`, `run(ctx)`, and the targets it applies to as a question on their
declared capabilities: `applies_to(caps) -> bool` with `APPLIES_TO`, the same in words for the skip
message. The doctor runs a rail only where it applies; no rail compares target names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from compiler.core.capabilities import TargetCapabilities
from compiler.core.schema import CONSTANT_PROMOTE_BYTES
from compiler.core.status import Status
from compiler.graph.io import PROTOBUF_LIMIT

PASSED, WARNED, FAILED, SKIPPED = Status.PASSED, Status.WARNED, Status.FAILED, Status.SKIPPED
ORDER = (PASSED, SKIPPED, WARNED, FAILED)  # worst last

# The order rails appear in the report and in `qcompile doctor`.
RAIL_NAMES = ("shape_inference", "size", "fp16_types", "coverage", "memcpy", "provider_fallback", "input_dependence",
              "trt_explicit_quant",
              "int8_speed", "int8_saturation")


def result(rail: str, status: str, message: str, **numbers: Any) -> Dict[str, Any]:
    assert status in ORDER, status
    return {"rail": rail, "status": status, "message": message, **numbers}


def worst(statuses) -> str:
    return max(statuses, key=ORDER.index, default=PASSED)


@dataclass
class RailContext:
    """What the rails may look at. A build fills it from its artifacts; `qcompile doctor` from a file."""

    target: TargetCapabilities  # what the target declares it can do (targets/<runtime>.py)
    config: Any  # compiler.core.schema.DoctorConfig
    onnx_path: Optional[Path] = None  # the graph the target was lowered from (None: torch target)
    providers: List[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    exporter: str = "unknown"  # export.exporter of the build, or "unknown" for a file from elsewhere
    quantized: Optional[bool] = None  # does the recipe quantize (None: judge from the graph)
    steps: Dict[str, Any] = field(default_factory=dict)  # the build's step reports (report["steps"])
    recipe_steps: List[Any] = field(default_factory=list)  # the build's Step objects: their declared facts
    predict: Optional[Callable] = None  # feed -> outputs of the lowered engine (input dependence)
    input_names: List[str] = field(default_factory=list)
    module: Any = None  # the torch target's module
    optimized_path: Optional[Path] = None  # ONNX Runtime's optimized graph for `providers`
    placement: Optional[Dict[str, Dict[str, int]]] = None  # provider -> op type -> nodes, from ORT
    probe_error: Optional[str] = None  # why ORT could not build a session on the graph, if it could not
    provider_error: Optional[str] = None  # the provider asked for is missing, or the session fell back
    constant_limit: int = CONSTANT_PROMOTE_BYTES  # a Constant node at least this big blocks external data
    proto_limit: int = PROTOBUF_LIMIT
    # the int8 capability probe of this machine (compiler/stages/bench/probe.py): int8_gemm_vs_fp32, cpu_flags
    int8_probe: Optional[Dict[str, Any]] = None
    _model: Any = None

    def model(self):
        """The graph without its external data (structure only), loaded once."""
        import onnx

        if self._model is None and self.onnx_path is not None:
            self._model = onnx.load(str(self.onnx_path), load_external_data=False)
        return self._model


def iter_nodes(graph):
    """Every node of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_nodes(g)


def first_line(err: BaseException | str, limit: int = 300) -> str:
    text = str(err).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__ if isinstance(err, BaseException) else "")
    return line[:limit]


def applies(rail, caps: TargetCapabilities) -> bool:
    """Does the rail module's declaration (`applies_to`) cover this target? Rails without one apply to all."""
    check = getattr(rail, "applies_to", None)
    return True if check is None else bool(check(caps))


def not_applicable(rail, caps: TargetCapabilities) -> Dict[str, Any]:
    """The skipped row of a rail that does not apply to the target, saying why in the rail's own words."""
    return result(rail.NAME, SKIPPED, f"applies to {getattr(rail, 'APPLIES_TO', 'other targets')}; "
                  f"target={caps.name} is not one")
