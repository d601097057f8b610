"""Export stage: torch module -> ONNX file, with dynamic batch/sequence axes, checked and saved with
external data when protobuf's 2 GB limit (or the recipe) asks for it."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List

from compiler.core.errors import BuildError, RecipeError
from compiler.core.feeds import synthetic_feed
from compiler.core.logs import library_output
from compiler.core.schema import DEFAULT_OPSET
from compiler.graph.io import onnx_files, save_onnx
from compiler.graph.roles import vocab_rows
from compiler.rundir.cache import Cache
from compiler.steps.modelopt_dynamo import export_mode

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")


def example_inputs(input_names: List[str], batch: int = 2, seq: int = 16, vocab: int = 30522):
    import torch

    feed = synthetic_feed(input_names, batch, seq, vocab=vocab)
    return tuple(torch.from_numpy(feed[n]) for n in input_names)


def export_onnx(module, input_names: List[str], output_names: List[str], out_path: Path, cfg) -> Path:
    """cfg is the `export` section. Writes out_path (and out_path.data when external)."""
    import onnx
    import torch

    if cfg.exporter not in EXPORTERS:
        raise RecipeError("export.exporter", f"unknown exporter {cfg.exporter!r}", f"use one of {list(EXPORTERS)}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    args = example_inputs(input_names, vocab=vocab_rows(module))
    dyn: Dict[str, Dict[int, str]] = {}
    if cfg.dynamic_axes:
        dyn = {n: {0: "batch", 1: "seq"} for n in input_names}
        for n in output_names:
            dyn[n] = {0: "batch", 1: "seq"} if n == "last_hidden_state" else {0: "batch"}
    # a directory of its own: past 2 GB the TorchScript exporter writes every tensor to a file of its own,
    # named after the tensor, beside the graph; they are read back and saved as one <graph>.data below.
    # The exporters print progress, INFO logs and C++ warnings (e.g. "The shape inference of
    # trt::TRT_FP4QDQ type is missing"): into the run's log file, not the console
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export.") as tmp_dir, library_output("export"):
        tmp = Path(tmp_dir) / "export.onnx"
        try:
            if cfg.exporter == "torchscript":
                torch.onnx.export(module, args, str(tmp), input_names=input_names, output_names=output_names,
                                  dynamic_axes=dyn or None, opset_version=_opset(cfg), dynamo=False,
                                  do_constant_folding=True)
            else:
                shapes = None
                if cfg.dynamic_axes:
                    b, s = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=4096)
                    shapes = {n: {0: b, 1: s} for n in input_names}
                    # the wrapper's positional names: input_ids, attention_mask, token_type_ids

                # modelopt's quantizers need their export mode and a translation of their ops
                with export_mode(module, _opset(cfg)) as table:
                    prog = torch.onnx.export(module, args, input_names=input_names, output_names=output_names,
                                             dynamic_shapes=shapes, opset_version=_opset(cfg), dynamo=True,
                                             external_data=False, custom_translation_table=table or None)
                prog.save(str(tmp))
        except Exception as e:
            raise BuildError(f"export ({cfg.exporter}, opset {_opset(cfg)}) failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e
        model = onnx.load(str(tmp), load_external_data=True)
    return save_onnx(model, out_path, cfg.external_data)


def _opset(cfg) -> int:
    """The export opset: validation resolves an unset (auto) opset; a config built directly gets the default."""
    return int(cfg.opset) if cfg.opset is not None else DEFAULT_OPSET


# ---------------------------------------------------------------- the fp32 export through the run cache

def export_key(model, spec) -> Dict[str, Any]:
    """Everything that determines the fp32 export: the weights' content hash, the model and export
    sections, the graph's input/output names (tool versions and qcompile's source are added by Cache)."""
    # the transformer fusion keys apply to the exported graph (compiler/graph/transformer_fusion.py), not the export
    export = {k: v for k, v in dataclasses.asdict(spec.export).items() if not k.startswith("transformer_fusion")}
    return {"weights_sha256": model.weights_sha256, "model": spec.model, "export": export,
            "input_names": list(model.input_names), "output_names": list(model.output_names)}


def cached_fp32_export(model, spec, out_path: Path, cache: Cache) -> Path:
    """The fp32 export through the cache: sweep points that share model, weights and export settings
    share one export. Only for an unmodified module (no torch-side step ran): a quantized module's
    export depends on the whole recipe and is not cached."""

    def build(d: Path) -> None:
        export_onnx(model.module, model.input_names, model.output_names, d / "export.onnx", spec.export)

    entry = cache.get_or_create("export", export_key(model, spec), build)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    src = entry / "export.onnx"
    # the external-data file name is written inside the graph, so it keeps its name: <graph>.data
    if out_path.name != src.name:
        raise ValueError(f"cached_fp32_export writes {src.name}, not {out_path.name}")
    for f in onnx_files(src):
        shutil.copyfile(f, out_path.parent / f.name)  # copyfile: the copy is writable, the entry stays read-only
    return out_path
