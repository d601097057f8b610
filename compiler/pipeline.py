"""The pipeline of one build: validate -> load -> quantize -> export -> lower -> check -> bench -> report.
Each stage is a plain function over artifacts; this module only wires them in order."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from compiler import graph as graph_passes
from compiler.graph import transformer_fusion
from compiler.core.errors import GateError
from compiler.core.hashing import text_sha256
from compiler.core.logs import stage_extra
from compiler.core.status import Status
from compiler.graph.io import onnx_size_bytes, op_histogram, save_onnx
from compiler.graph.roles import expand_patterns, is_role_selector
from compiler.rails import doctor
from compiler.repair import loss_sources
from compiler.repair.result import RepairBudgetError
from compiler.repair.run import repairs_onnx, run_repair
from compiler.rundir.cache import cached_onnx_step, cached_reference_predict
from compiler.rundir.manifest import write_manifest
from compiler.runners.callable import CallableRunner, torch_predictor
from compiler.stages.bench import bench_engine, int8_speed_note
from compiler.stages.bench.probe import probe_for_build
from compiler.stages.check import run_check
from compiler.stages.data import Dataset, load_data
from compiler.stages.export import cached_fp32_export, export_onnx
from compiler.stages.models import LoadedModel, label_names, load_model, write_predict_files
from compiler.stages.report import write_report
from compiler.stages.validate import BuildSpec
from compiler.steps.base import Step, StepContext
from targets.base import BuildInfo, Engine, get_target

log = logging.getLogger("qcompile")


@contextmanager
def stage(name: str, timings: Dict[str, float]):
    """Times a stage. Its start goes to cli.log; its end is the one line the console shows for it
    (compiler.core.logs.ConsoleHandler draws records that carry stage_extra)."""
    log.info("[%s] ...", name)
    t0, cpu0 = time.perf_counter(), time.process_time()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)
    # the CPU seconds beside the wall ones: on shared cores the wall clock carries other processes' load
    log.info("[%s] done in %.1fs (%.1fs CPU)", name, timings[name], time.process_time() - cpu0,
             extra=stage_extra(name, timings[name]))


def step_context(spec: BuildSpec, data: Optional[Dataset], work_dir: Path, cache=None, roles=None, teacher=None,
                 run_dir: Optional[Path] = None, training_follows: bool = False) -> StepContext:
    """What a step may read: the target's capabilities, the data, the resolved opset and batch size; a step that
    trains also the fp32 teacher, the training text, the held-out evaluation rows and the run directory."""
    return StepContext(target=spec.capabilities, model_info=spec.model_info,
                       calibration=data.calibration if data is not None else None, work_dir=work_dir,
                       seed=spec.seed, exclude=expand_patterns(spec.model.exclude, roles),  # may name roles (`head`)
                       opset=int(spec.export.opset), batch_size=int(spec.data.batch_size), cache=cache,
                       teacher=teacher, train=data.train if data is not None else None,
                       evaluation=data.evaluation if data is not None else None, task=str(spec.model.task),
                       run_dir=run_dir, training_follows=training_follows)


def a_later_step_trains(steps: list[Step], i: int) -> bool:
    """Whether a step after steps[i] trains the module (StepContext.training_follows)."""
    return any(later.trains for later in steps[i + 1:])


def resolve_roles(steps: list[Step], roles) -> list[Step]:
    """The steps with the role selectors of their layer lists (`exclude`, `layers`: `ffn_down`,
    `attention_output[0]`) replaced by the module names the model's roles give, so every step method sees
    module-name patterns. The recipe (recipe.yaml) keeps the roles."""
    out = []
    for step in steps:
        changes = {f: expand_patterns(getattr(step.params, f), roles) for f in ("exclude", "layers")
                   if isinstance(getattr(step.params, f, None), (list, tuple))
                   and any(is_role_selector(p) for p in getattr(step.params, f))}
        if changes:
            step = copy.copy(step)
            step.params = dataclasses.replace(step.params, **changes)
        out.append(step)
    return out


def repair_stage(spec: BuildSpec, model: LoadedModel, data: Dataset, run_dir: Path, work_dir: Path,
                 report: dict[str, Any], cache=None, exported: Optional[Path] = None, reference_module=None,
                 after_training: bool = False):
    """The repair stage (compiler/repair/run.py) with this build's step context; an unmet budget leaves
    report.json and REPORT.md (with the repair section) before it exits. Returns (spec, REPORT.md section)."""
    try:
        return run_repair(spec, model, data, run_dir, work_dir, report,
                          lambda d: step_context(spec, data, d, cache, model.roles), cache, exported, reference_module,
                          after_training)
    except RepairBudgetError as e:
        write_report(run_dir, report)
        with open(run_dir / "REPORT.md", "a") as f:
            f.write(e.markdown)
        shutil.rmtree(work_dir, ignore_errors=True)
        raise


def quantize_torch(model: LoadedModel, spec: BuildSpec, data: Dataset, work_dir: Path,
                   step_reports: Dict[str, Any], cache=None, teacher=None, run_dir: Optional[Path] = None) -> LoadedModel:
    """Quantize stage (torch side): the recipe's torch steps in order, on a copy of the module. teacher: the fp32
    module a training step (distill) matches."""
    if not spec.torch_steps:
        return model  # nothing to do: a module not loaded yet stays unloaded
    module = model.module
    steps = list(spec.torch_steps)
    for i, step in enumerate(steps):
        ctx = step_context(spec, data, work_dir, cache, model.roles, teacher if step.trains else None, run_dir,
                           training_follows=a_later_step_trains(steps, i))
        module = step.apply_torch(module, ctx)
        step_reports[step.name] = {"where": "torch", **ctx.report}
    return LoadedModel(**{**model.__dict__, "module": module})


def quantize_onnx(onnx_path: Path, spec: BuildSpec, data: Dataset, work_dir: Path, step_reports: Dict[str, Any],
                  cache=None, roles=None) -> Path:
    """Quantize stage (ONNX side): the recipe's ONNX steps in order, each writing a new graph."""
    current = onnx_path
    for i, step in enumerate(spec.onnx_steps):
        ctx = step_context(spec, data, work_dir, cache, roles)
        out = work_dir / f"{i:02d}_{step.name}.onnx"
        if cache is not None:  # a warm build copies the step's graph from the cache (compiler/rundir/cache.py)
            current = cached_onnx_step(step, current, out, ctx, cache)
        else:
            current = step.apply_onnx(current, out, ctx)
        step_reports[step.name] = {"where": "onnx", **ctx.report}
    return current


def move_onnx(src: Path, dst: Path) -> Path:
    """Move a graph (and its external data, renamed with the graph) to dst."""
    import onnx

    src, dst = Path(src), Path(dst)
    if src.with_name(src.name + ".data").exists() or any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(src), load_external_data=False).graph.initializer):
        model = onnx.load(str(src), load_external_data=True)
        return save_onnx(model, dst, "always", check=False)
    shutil.move(str(src), str(dst))
    return dst


def reference_runner(reference: LoadedModel, spec=None, feeds=None, cache=None) -> CallableRunner:
    def predict(feed):  # reads reference.module on the first feed the cache does not answer (it may load then)
        return torch_predictor(reference.module, reference.input_names, reference.output_names)(feed)

    if cache is not None and feeds:
        # the fp32 outputs on the evaluation set are the same for every sweep point of one model and data
        predict = cached_reference_predict(reference, spec, feeds, predict, cache)
    return CallableRunner(predict, reference.input_names, reference.output_names, name="fp32-reference")


@dataclass
class TrainedFirst:
    """What train_before_repair did: each training step's report section, each layout transform's (reorder, rotate:
    run once, on the fp32 model), and that fp32 model in the transformed layout (the outputs the search compares
    against, and the weights the layers the map keeps wider take back)."""

    trained: Dict[str, Any]
    transformed: Dict[str, Any]
    fp32_module: Any


def train_before_repair(spec: BuildSpec, model: LoadedModel, reference: LoadedModel, data: Dataset, work_dir: Path,
                        cache, run_dir: Path) -> tuple[LoadedModel, BuildSpec, TrainedFirst]:
    """Repair with a step that trains (distill): the training runs first, with every layer in the recipe's 4-bit
    format; the repair then searches, and the build quantizes, the trained float weights in the layers that stay
    4-bit and the fp32 weights in the layers the map keeps wider (keep_reference_weights); the training step leaves
    the rest of the build. Why this order: the search then measures the model the build makes (the check equals its
    figure); training after a post-training search left the searched figure a guess (on MiniLM, at the old lr 5e-4,
    the training diverged on the chosen map: 0.9904 -> 0.9774; docs/accuracy.md). A step that changes the layout
    of the fp32 weights before the quantizers (must_precede_quantizers: reorder permutes channels, rotate wraps
    Linears) runs once, here, on the fp32 model, and leaves the spec with the training steps: the trained weights
    and the fp32 ones must share one layout (re-running reorder on the trained weights computed a new channel order
    from a half-permuted model: cosine 0.05). The trained Linears also carry what their quantizing step needs to
    quantize them again as the training did (Step.carry_trained_state: NVFP4's calibrated scales; a second mse
    calibration of the trained weights measured 0.971 where the trained model measures 0.985). Returns the model
    holding the trained weights, the spec without those steps, and what was done (TrainedFirst)."""
    import torch

    transforms = [s for s in spec.torch_steps if s.must_precede_quantizers and not s.quantizes_compute]
    base = copy.deepcopy(reference.module)
    transformed: Dict[str, Any] = {}
    for step in transforms:
        ctx = step_context(spec, data, work_dir, cache, model.roles)
        base = step.apply_torch(base, ctx)
        transformed[step.name] = dict(ctx.report)
    module = copy.deepcopy(base)
    sections: Dict[str, Any] = {}
    steps = list(spec.torch_steps)
    for i, step in enumerate(steps):
        if step in transforms:
            continue
        ctx = step_context(spec, data, work_dir, cache, model.roles, reference.module if step.trains else None, run_dir,
                           training_follows=a_later_step_trains(steps, i))
        # train_only: the float weights before their rounding onto the 4-bit grid (the fallback layers need them)
        module = step.train_only(module, ctx) if step.trains else step.apply_torch(module, ctx)
        if step.trains:
            sections[step.name] = dict(ctx.report)
    trained = copy.deepcopy(base)
    quantizers = [s for s in steps if s.quantizes_compute]
    with torch.no_grad():
        for name, sub in module.named_modules():
            if getattr(sub, "weight_quantizer", None) is None or not isinstance(sub, torch.nn.Linear):
                continue
            target = trained.get_submodule(name)
            target.weight.copy_(sub.weight)
            if getattr(sub, "bias", None) is not None:
                target.bias.copy_(sub.bias)
            for step in quantizers:  # e.g. the calibrated scales the training ran under (the search re-quantizes)
                step.carry_trained_state(target, sub)
    from compiler.steps.distill import state_sha256  # why: the distill step's own hash of a module's whole state

    model = LoadedModel(**{**model.__dict__, "module": trained, "weights_sha256": state_sha256(trained)})
    spec = dataclasses.replace(spec, steps=[s for s in spec.steps if not s.trains and s not in transforms])
    return model, spec, TrainedFirst(sections, transformed, base)


def keep_reference_weights(module, reference, layer_map) -> None:
    """The Linear layers a repair map keeps out of the 4-bit format get the fp32 model's weights and bias (after
    train_before_repair: the trained ones compensate 4-bit rounding the layer no longer has)."""
    import torch

    with torch.no_grad():
        for name in layer_map:
            mine, theirs = module.get_submodule(name), reference.get_submodule(name)
            mine.weight.copy_(theirs.weight)
            if getattr(mine, "bias", None) is not None:
                mine.bias.copy_(theirs.bias)


def run_build(spec: BuildSpec, run_dir: Path, cache=None, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """One whole build into run_dir (already created). Returns the report; raises GateError when the
    accuracy gate fails (after writing the report), BuildError when a stage fails."""
    import torch

    run_dir = Path(run_dir)
    work_dir = run_dir / "work"
    work_dir.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    log.info("build starts after %.1fs CPU (imports, Hydra composition, validation)", time.process_time())
    target = get_target(spec.target.name)(spec.target)
    recipe_yaml = OmegaConf.to_yaml(spec.raw, resolve=True, sort_keys=False)
    (run_dir / "recipe.yaml").write_text(recipe_yaml)
    report: Dict[str, Any] = {
        "build": {"model": spec.model.name, "recipe": spec.recipe_name, "target": spec.target.name,
                  "run_dir": str(run_dir)},
        "steps": {}, "timings_s": timings, "notes": [], "gate": OmegaConf.to_container(OmegaConf.structured(spec.gate)),
    }
    torch.manual_seed(spec.seed)

    # a build that runs the module only through its ONNX export (no torch-side step, an ONNX target, no torch-side
    # repair) reads the module's facts from the cache and loads the module only when a cache entry misses
    lazy = (cache is not None and not spec.torch_steps and target.needs_onnx
            and not (spec.repair is not None and (spec.repair.enabled or spec.repair.layers) and not repairs_onnx(spec)))
    with stage("load", timings):
        model = load_model(spec.model, cache=cache if lazy else None)
        data = load_data(spec.data, model.tokenizer, model.input_names, need_calibration=spec.needs_calibration,
                         label_names=label_names(spec.model), evaluation_limit=spec.check.samples,
                         model_task=spec.model.task, need_train=spec.needs_training_text)
        if model.module_loaded:
            reference = LoadedModel(**{**model.__dict__, "module": copy.deepcopy(model.module)})
        else:  # no torch-side step will change model.module: the reference copies it when first used
            reference = LoadedModel(**{**model.__dict__, "module": None,
                                       "load_module": lambda: copy.deepcopy(model.module)})
        write_predict_files(model, run_dir, int(spec.data.seq_len))  # `qcompile predict` needs only the run dir
    spec = dataclasses.replace(spec, steps=resolve_roles(spec.steps, model.roles))
    source_weights = model.weights_sha256  # the manifest's input: a repair after training swaps in trained weights
    report["model"] = {"name": model.name, "architecture": model.info.architecture, "hidden_size": model.info.hidden_size,
                       "parameters": model.parameters,
                       "weights_sha256": model.weights_sha256, **model.source}
    if model.roles is not None:  # how many Linear layers of each role the dataflow found (compiler/graph/roles.py)
        report["model"]["layer_roles"] = {r: len(model.roles.names(r)) for r in sorted(set(model.roles.role.values()))}
    report["data"] = {"calibration_samples": len(data.calibration), "evaluation_samples": len(data.evaluation),
                      "seq_len": int(spec.data.seq_len), "files": data.files,
                      "evaluation_task": data.evaluation_labels.task if data.evaluation_labels else None}
    repair_md = ""
    trained_first: Optional[TrainedFirst] = None
    trained_steps: List[Step] = []  # the training steps train_before_repair ran (and took out of spec.steps)
    if spec.repair is not None and (spec.repair.enabled or spec.repair.layers) and not repairs_onnx(spec):
        # a search (or its replay: enabled, with the map it wrote) measures the trained model, so the training runs
        # first; a map given by hand (recipe.repair.layers, enabled false) is applied first and the training runs
        # on it, the better order when nothing has to be searched (MiniLM, 4 FP8 layers: 0.98826 trained on the
        # map, 0.98750 trained first; docs/accuracy.md)
        if any(step.trains for step in spec.torch_steps) and spec.repair.enabled:
            trained_steps = [step for step in spec.steps if step.trains]
            with stage("distill", timings):
                model, spec, trained_first = train_before_repair(spec, model, reference, data, work_dir, cache, run_dir)
        with stage("repair", timings):
            spec, repair_md = repair_stage(spec, model, data, run_dir, work_dir, report, cache,
                                           reference_module=trained_first.fp32_module if trained_first else None,
                                           after_training=trained_first is not None)
            recipe_yaml = OmegaConf.to_yaml(spec.raw, resolve=True, sort_keys=False)
            (run_dir / "recipe.yaml").write_text(recipe_yaml)  # now holds recipe.repair.layers: rebuilds replay it
        if trained_first is not None:  # the layers the map keeps wider take the fp32 model's weights back
            keep_reference_weights(model.module, trained_first.fp32_module, spec.raw.recipe.repair.get("layers") or {})

    if data.train_info is not None:
        report["data"]["train"] = data.train_info
    with stage("quantize-torch", timings):
        # the fp32 teacher only for a step that trains: reading reference.module loads a lazily loaded module
        teacher = reference.module if any(step.trains for step in spec.torch_steps) else None
        model = quantize_torch(model, spec, data, work_dir, report["steps"], cache, teacher, run_dir)
        for step in spec.torch_steps:  # a training step's numbers are a typed section of their own
            if step.trains:
                report["distill"] = {k: v for k, v in report["steps"].pop(step.name).items() if k != "where"}
                report["steps"][step.name] = {"where": "torch", "report": "distill"}
        if trained_first is not None:  # trained before the repair: the map was then applied to the trained weights
            for name, section in trained_first.transformed.items():
                report["steps"][name] = {"where": "torch", **section}
            for name, section in trained_first.trained.items():
                report["distill"] = section
                report["steps"][name] = {"where": "torch", "report": "distill"}

    onnx_path: Optional[Path] = None
    # where export.transformer_fusion applies: the fp32 export, or the graph the ONNX-side steps quantized
    fuse_at = None
    if transformer_fusion.enabled(spec.export):
        fuse_at = ("quantized" if spec.onnx_steps and spec.export.transformer_fusion_order == "after_quantize"
                   else "export")
    if target.needs_onnx:
        with stage("export", timings):
            export_cfg = spec.export  # its opset resolved by validation from the steps' min_opset
            if cache is not None and not spec.torch_steps:
                # the unmodified fp32 export is what sweep points share (compiler/rundir/cache.py)
                exported = cached_fp32_export(model, spec, work_dir / "export.onnx", cache)
            else:
                exported = export_onnx(model.module, model.input_names, model.output_names, work_dir / "export.onnx",
                                       export_cfg)
            exported = graph_passes.fix_exported(exported, work_dir, export_cfg, report)
            for i, step in enumerate(spec.torch_steps):
                ctx = step_context(spec, data, work_dir, cache, model.roles)
                exported = step.after_export(exported, work_dir / f"export_{i:02d}_{step.name}.onnx", ctx)
                if ctx.report:  # what the step's graph pass did (e.g. weights folded, custom ops lowered)
                    report["steps"].setdefault(step.name, {})["after_export"] = dict(ctx.report)
            if fuse_at == "export":  # onnxruntime's transformer fusions on the fp32 graph (export.transformer_fusion)
                exported, report["transformer_fusion"] = transformer_fusion.fuse(
                    exported, work_dir / "export_fused.onnx", spec.export, spec.model_info, "fp32 export", cache)
            graph_passes.check_input_flow(exported, model.input_names, report)
            exported = doctor.after_export(exported, spec, report)
        if repairs_onnx(spec):  # ONNX-side steps: the search quantizes and runs the exported graph
            with stage("repair", timings):
                spec, repair_md = repair_stage(spec, model, data, run_dir, work_dir, report, cache,
                                                exported=exported, reference_module=reference.module)
                recipe_yaml = OmegaConf.to_yaml(spec.raw, resolve=True, sort_keys=False)
                (run_dir / "recipe.yaml").write_text(recipe_yaml)  # holds recipe.repair.layers: rebuilds replay it
        with stage("quantize-onnx", timings):
            final = quantize_onnx(exported, spec, data, work_dir, report["steps"], cache, model.roles)
            if fuse_at == "quantized":
                final, report["transformer_fusion"] = transformer_fusion.fuse(
                    final, work_dir / "quantized_fused.onnx", spec.export, spec.model_info, "quantized graph", cache)
            onnx_path = move_onnx(final, run_dir / "model.onnx")
        report["onnx"] = {"path": "model.onnx", "bytes": onnx_size_bytes(onnx_path), "ops": op_histogram(onnx_path),
                          "opset": int(export_cfg.opset), "exporter": spec.export.exporter}

    with stage("lower", timings):
        engine: Engine = target.lower(model, onnx_path, run_dir,
                                      BuildInfo(model_name=model.name, recipe_name=spec.recipe_name, overrides=overrides))
        report["lower"] = engine.info
        reasons = {name: s["kernels_reason"] for name, s in report["steps"].items() if s.get("kernels_reason")}
        kernels = engine.info.get("kernels")
        # why a step runs without a real kernel here (none to give where the lowering ran every layer in int8)
        if reasons and isinstance(kernels, dict) and kernels.get("fake_quant_layers"):
            kernels["reasons"] = reasons
        report["placement"] = target.placement(engine)
        # what a target could not do here (e.g. no TensorRT engine without a GPU) is said up front
        report["notes"] += [str(n) for n in engine.info.get("notes", []) or []]
    if spec.bench.enabled and spec.bench.probe:
        with stage("probe", timings):  # the machine's int8 speed (cached per machine): for the int8_speed rail
            report["int8_probe"] = probe_for_build(spec, target.capabilities, cache)
    report["doctor"] = doctor.after_lower(engine, onnx_path, target, spec, report)

    if spec.check.enabled:
        with stage("check", timings):
            # check.samples already limited the evaluation examples at load (pairs stay whole)
            feeds = list(data.evaluation.batches(int(spec.data.batch_size)))
            result = run_check(reference_runner(reference, spec, feeds, cache), target.runner(engine), feeds, model.task, spec.gate,
                               labels=data.evaluation_labels)
            report["check"] = result
    if loss_sources.applies(spec):
        with stage("loss-sources", timings):  # 4-bit builds: the loss by operand and by layer role
            # a training step run before the repair is named again: the table's reading says it measures without it
            report["loss_sources"] = loss_sources.run_loss_sources(
                dataclasses.replace(spec, steps=spec.steps + trained_steps), reference, data, work_dir,
                lambda d: step_context(spec, data, d, cache, model.roles), cache,
                exported=exported if target.needs_onnx else None)

    if spec.bench.enabled:
        with stage("bench", timings):
            report["bench"] = bench_engine(target, engine, reference, spec, data.evaluation, cache, work_dir,
                                           onnx_path, report.get("int8_probe"))
            note = int8_speed_note(report["bench"], report.get("doctor", []))
            if note:
                report["notes"].append(note)
    report["placement"] = target.placement(engine)  # again: what running the engine measured (TensorRT GPU memory)
    shutil.rmtree(work_dir, ignore_errors=True)

    failures = report.get("check", {}).get("gate_failures", [])
    report["status"] = Status.GATE_FAILED if failures else Status.PASSED
    report["cache"] = cache.report() if cache is not None else {"enabled": False}
    if failures:
        report["reason"] = failures[0]
    write_report(run_dir, report)
    if repair_md:
        with open(run_dir / "REPORT.md", "a") as f:
            f.write(repair_md)
    write_manifest(run_dir, inputs={
        "weights_sha256": source_weights,
        "data_sha256": data.files_sha256,
        "recipe_sha256": text_sha256(recipe_yaml),
    }, seed=spec.seed, extra={"int8_probe": report["int8_probe"]} if report.get("int8_probe") else None)
    if failures:
        raise GateError("; ".join(failures))
    return report
