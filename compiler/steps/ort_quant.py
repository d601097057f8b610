"""Shared helpers for ONNX-side quantization with onnxruntime.quantization (int8_static, int8_dynamic): the
graph's linear ops and how many got quantized, pre-processing, nodes kept out by module-name pattern or by
layer, the calibration data reader, and keeping the library's console chatter off the console."""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from compiler.core.errors import BuildError
from compiler.core.hashing import onnx_sha256
from compiler.core.patterns import matches_any
from compiler.graph.io import needs_external_data
from compiler.graph.quantized import QDQ_OPS, QUANTIZED_OPS, is_quantized_compute

log = logging.getLogger(__name__)

__all__ = ["LINEAR_OP_TYPES", "QUANTIZED_LINEAR_OP_TYPES", "FeaturesReader",
           "activation_gathers", "check_ops_match", "exclude_nodes", "layer_nodes", "linear_ops_found", "module_name",
           "node_module", "ort_calibration_method", "qdq_fed", "preprocess", "quantized_coverage", "quantized_gathers",
           "quietly"]

# ops that are a quantized linear layer by themselves (QOperator / dynamic / 4-bit formats: compiler/graph/quantized.py)
QUANTIZED_LINEAR_OP_TYPES = tuple(op for op in QUANTIZED_OPS if is_quantized_compute(op))
# ops that carry a layer's weights: what "the graph's linear layers are ..." lists
LINEAR_OP_TYPES = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "FusedMatMul", "Attention") + QUANTIZED_LINEAR_OP_TYPES




def linear_ops_found(model) -> str:
    """'MatMul x16, Gemm x1' for the linear-layer ops of a graph (or all its op types when it has none)."""
    counts = Counter(n.op_type for n in model.graph.node)
    found = {op: counts[op] for op in LINEAR_OP_TYPES if counts.get(op)}
    if found:
        return ", ".join(f"{op} x{c}" for op, c in found.items())
    return "none (its ops: " + ", ".join(sorted(counts)) + ")"


def check_ops_match(model, op_types: list[str], key: str) -> int:
    """Number of nodes that op_types_to_quantize matches; zero is a BuildError, never a silent no-op."""
    n = sum(1 for node in model.graph.node if node.op_type in set(op_types))
    if n == 0:
        raise BuildError(f"{key}: op_types_to_quantize={list(op_types)} matched no node: the graph's linear "
                         f"layers are {linear_ops_found(model)}")
    return n


def qdq_fed(node, producer: dict[str, str]) -> bool:
    """Whether a node computes on dequantized operands (QDQ format): both of its first two inputs (the operands;
    a Gemm's bias is the third) come from DequantizeLinear. One Q/DQ'd operand is not enough: a node kept out of
    quantization shares its activation's Q/DQ with the quantized nodes that read the same tensor (the query,
    key and value projections of one attention block) while its weight stays fp32."""
    operands = [i for i in node.input[:2] if i]
    return len(operands) == 2 and all(producer.get(i) == "DequantizeLinear" for i in operands)


def quantized_coverage(before, after, op_types: list[str]) -> dict[str, Any]:
    """How many of the fp32 graph's op_types nodes are quantized in the output: Q/DQ-fed (QDQ format: qdq_fed)
    or replaced by a quantized op (QOperator / dynamic format)."""
    targets = set(op_types)
    total = sum(1 for n in before.graph.node if n.op_type in targets)
    producer = {o: n.op_type for n in after.graph.node for o in n.output}
    fp_left = sum(1 for n in after.graph.node if n.op_type in targets and not qdq_fed(n, producer))
    quantized = max(total - fp_left, 0)
    by_type = Counter(n.op_type for n in before.graph.node if n.op_type in targets)
    return {"linear_ops": dict(sorted(by_type.items())), "quantized": quantized, "total": total,
            "fraction": round(quantized / total, 4) if total else 0.0,
            "qdq_nodes": sum(1 for n in after.graph.node if n.op_type in QDQ_OPS),
            "quantized_op_nodes": sum(1 for n in after.graph.node if n.op_type in QUANTIZED_LINEAR_OP_TYPES)}


def module_name(node_name: str) -> str:
    """The torch module a TorchScript-exported node came from: '/inner/encoder/layer.0/output/dense/MatMul'
    -> 'inner.encoder.layer.0.output.dense', so model.exclude patterns mean the same on both sides."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1]) if len(parts) > 1 else node_name


def node_module(node) -> str:
    """The torch module an exported node came from, on either exporter: the dynamo exporter names nodes
    'node_MatMul_54' and records the module path in the node's metadata ('pkg.torch.onnx.name_scopes': ['',
    'inner', ..., 'inner.encoder.layer.0.attention.self.query', 'linear'], which onnxruntime's pre-processing
    keeps); the TorchScript exporter puts it in the node name."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            module = ""
            for scope in scopes:  # nested module paths, then the op's own name ('linear'), which ends the chain
                if scope and (not module or scope.startswith(module + ".")):
                    module = scope
                elif scope:
                    break
            if module:
                return module
    return module_name(node.name)


def exclude_nodes(model, patterns: list[str], op_types: list[str] | None = None) -> list[str]:
    """Nodes (of op_types, if given) whose name or module name matches a pattern ('*pooler*',
    '*layer.0.output.dense')."""
    if not patterns:
        return []
    return sorted(n.name for n in model.graph.node if n.name and (op_types is None or n.op_type in op_types)
                  and (matches_any(n.name, patterns) or matches_any(node_module(n), patterns)))


def layer_nodes(model, layers: Iterable[str], op_types: list[str] | None = None) -> list[str]:
    """The nodes (of op_types, if given) that torch module ``layers`` (exact module names, as Step.layers()
    returns them) were exported to (node_module: TorchScript node scopes or dynamo's name_scopes metadata)."""
    wanted = set(layers)
    if not wanted:
        return []
    return sorted(n.name for n in model.graph.node if n.name and (op_types is None or n.op_type in op_types)
                  and node_module(n) in wanted)


def activation_gathers(model) -> list[str]:
    """Gather nodes whose data is not an initializer (shape arithmetic, activations): no table to store int8."""
    inits = {i.name for i in model.graph.initializer}
    return sorted(n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] not in inits)


def quantized_gathers(model) -> int:
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "Gather" and producer.get(n.input[0]) == "DequantizeLinear")


def preprocess(onnx_path: Path, out_path: Path, report: dict[str, Any], cache=None) -> Path:
    """onnxruntime's quant_pre_process, retried with the settings that fix known shape-inference failures
    (BERT: 'Incomplete symbolic shape inference' -> auto_merge; ModernBERT rotary -> skip symbolic);
    if every attempt fails the graph is quantized as exported. What happened goes into the report.
    With a build cache its result is content-addressed by the input graph's bytes (the cache keys carry
    onnxruntime's version): every sweep point and rebuild of one export shares it (MiniLM: ~3 s a build)."""
    import json
    import shutil

    if cache is None or needs_external_data(onnx_path):  # a > 2 GB graph is not copied into the cache
        return _preprocess(onnx_path, out_path, report)

    def build(d: Path) -> None:
        rep: dict[str, Any] = {}
        done = _preprocess(onnx_path, Path(d) / "model.pre.onnx", rep)
        rep["preprocessed"] = Path(done) == Path(d) / "model.pre.onnx"
        (Path(d) / "preprocess.json").write_text(json.dumps(rep, sort_keys=True) + "\n")

    entry = Path(cache.get_or_create("ort_preprocess", {"graph": onnx_sha256(onnx_path)}, build))
    rep = json.loads((entry / "preprocess.json").read_text())
    if not rep.pop("preprocessed"):
        report.update(rep)
        return Path(onnx_path)
    shutil.copyfile(entry / "model.pre.onnx", out_path)
    Path(out_path).chmod(0o644)  # cache entries are read-only; the copy is the build's own
    report.update(rep)
    return Path(out_path)


def _preprocess(onnx_path: Path, out_path: Path, report: dict[str, Any]) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # past 2 GB the graph must be written with external data, and onnxruntime only does so when told
    large = {"save_as_external_data": True, "all_tensors_to_one_file": True,
             "external_data_location": Path(out_path).name + ".data"} if needs_external_data(onnx_path) else {}
    attempts = [("default", {}), ("auto_merge", {"auto_merge": True}),
                ("skip_symbolic_shape", {"skip_symbolic_shape": True}),
                ("skip_symbolic_shape+skip_optimization", {"skip_symbolic_shape": True, "skip_optimization": True})]
    failures = []
    for label, kwargs in attempts:
        try:
            # onnxruntime's symbolic shape inference saves sym_shape_infer_temp.onnx (+ data) into the current
            # directory when it gives up: run it from the work directory so nothing lands where the user is
            src, dst = Path(onnx_path).resolve(), Path(out_path).resolve()  # before the chdir below
            with _in_dir(dst.parent):
                quietly(quant_pre_process, str(src), str(dst), **kwargs, **large)
            report["preprocess"] = label
            if failures:
                report["preprocess_failures"] = failures
                # expected, and handled: BERT exports stop onnxruntime's symbolic shape inference with its
                # default settings; a working fallback is no console warning (INFO: cli.log only)
                log.info("quant_pre_process: settings %s worked after %s failed (expected on BERT and ModernBERT "
                         "exports: onnxruntime's symbolic shape inference is incomplete on them by default)",
                         label, ", ".join(f.split(":")[0] for f in failures))
            return out_path
        except Exception as e:  # the shape-inference helpers raise bare Exception / AssertionError
            failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            log.info("quant_pre_process with settings %s failed (next settings follow): %s", label, failures[-1])
    report["preprocess"] = "skipped (every attempt failed)"
    report["preprocess_failures"] = failures
    log.info("quant_pre_process failed with every setting: the graph is quantized as exported, without "
             "onnxruntime's pre-processing (report.json: steps.<step>.preprocess_failures)")
    return Path(onnx_path)


@contextlib.contextmanager
def _in_dir(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def quietly(fn, *args, **kwargs):
    """onnxruntime.quantization logs 'please pre-process' warnings through the root logger and prints its
    calibrators' progress to stdout; keep both off the console (the step reports what matters)."""
    import io

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return fn(*args, **kwargs)
    finally:
        root.setLevel(level)
        if printed.getvalue().strip():
            log.debug("onnxruntime.quantization: %s", printed.getvalue().strip())


# ---------------------------------------------------------------------------------------------------------------
# calibration data


class FeaturesReader:
    """onnxruntime CalibrationDataReader over compiler.stages.data.Features, with a progress bar."""

    def __init__(self, features, input_names: list[str], batch_size: int, label: str = "calibration"):
        self._feeds = [{n: np.ascontiguousarray(b[n]) for n in input_names}
                       for b in features.batches(max(int(batch_size), 1))]
        self._label = label
        self.rewind()

    def rewind(self):
        self._i, self._end = 0, len(self._feeds)
        self._progress = None

    def set_range(self, start_index: int, end_index: int):
        self._i, self._end = start_index, min(end_index, len(self._feeds))

    def __len__(self):
        return len(self._feeds)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def get_next(self) -> dict[str, np.ndarray] | None:
        from rich.progress import Progress

        if self._progress is None:
            self._progress = Progress(transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=self._end - self._i)
        if self._i >= self._end:
            self._progress.stop()
            return None
        feed = self._feeds[self._i]
        self._i += 1
        self._progress.advance(self._task)
        return feed


def ort_calibration_method(name: str):
    """onnxruntime's CalibrationMethod for one of compiler.steps.base.CALIBRATION_METHODS."""
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]
