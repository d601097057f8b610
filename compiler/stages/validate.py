"""Validate stage: the composed recipe against structured schemas and the step x target capability
table. Everything here runs before any model weights are loaded; errors name the key and the fix."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import NotRunnableError, RecipeError, did_you_mean
from compiler.core.schema import (
    DEFAULT_OPSET,
    RECIPE_KEYS,
    SECTIONS,
    TOP_LEVEL_KEYS,
    GateConfig,
    RecipeConfig,
    RepairConfig,
)
from compiler.core.tasks import TASK_KINDS
from compiler.graph.roles import bad_selector
from compiler.graph.transformer_fusion import check_fusion
from compiler.repair.budget import repair_min_opset, validate_repair, validate_repair_budget
from compiler.stages.check import validate_gate
from compiler.stages.data import check_data_files, check_train_file, data_file
from compiler.stages.models import label_names, model_info
from compiler.steps.base import ONNX, STEP_REGISTRY, TORCH, ModelInfo, Step, load_all_steps
from targets.base import get_target, target_names


@dataclass
class BuildSpec:
    """A validated recipe: typed sections, instantiated steps in order, the target's name."""

    model: Any
    data: Any
    export: Any
    check: Any
    bench: Any
    target: Any
    recipe_name: str
    steps: List[Step]
    gate: Any
    seed: int
    model_info: ModelInfo
    raw: DictConfig  # the resolved composed config (written as recipe.yaml)
    doctor: Any = None  # DoctorConfig: the guard rails' thresholds
    cache: Any = None  # CacheConfig: where the content-addressed cache lives, or disabled
    repair: Any = None  # RepairConfig (recipe.repair): per-layer fallbacks searched or replayed
    capabilities: Optional[TargetCapabilities] = None  # the target's declared capabilities (Target.capabilities)

    @property
    def torch_steps(self) -> List[Step]:
        return [s for s in self.steps if s.stage_for(self.target.name) == TORCH]

    @property
    def onnx_steps(self) -> List[Step]:
        return [s for s in self.steps if s.stage_for(self.target.name) == ONNX]

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.steps)

    @property
    def needs_training_text(self) -> bool:
        return any(s.trains for s in self.steps)


_closest = did_you_mean  # the name the command line's key fixes import


def recipe_key(dotted: str) -> Optional[str]:
    """`recipe.<dotted>` when its first part is a key of the recipe section (RecipeConfig: repair, gate, steps,
    name ...), each later part that names no field of its section replaced by the closest field, if one is
    close; None when the first part is no recipe key. Derived from the schema, so a new recipe section gets
    the hint without a list to keep."""
    parts = str(dotted).split(".")
    if parts[0] not in RECIPE_KEYS:
        return None
    node: Any = RecipeConfig()
    out = ["recipe"]
    for part in parts:
        if dataclasses.is_dataclass(node):
            names = [f.name for f in dataclasses.fields(node)]
            if part not in names:
                match = difflib.get_close_matches(part, names, n=1)
                part = match[0] if match else part
            node = getattr(node, part, None)
        else:  # steps (a mapping of step names) or a leaf: the rest as given
            node = None
        out.append(part)
    return ".".join(out)


def top_level_fix(dotted: str) -> str:
    """What to write instead of an unknown top-level key: the same key under `recipe.` when it is one there
    (`repair.enabled` -> recipe.repair.enabled, as recipes/repair/default.yaml spells it without the prefix),
    else the closest top-level key."""
    under = recipe_key(dotted)
    return f"did you mean {under!r}?" if under else _closest(str(dotted).split(".")[0], TOP_LEVEL_KEYS)


def _first_leaf(key: str, node) -> str:
    """`key.a.b` for a node {a: {b: value}} (what `+key.a.b=value` composes to); `key` when it branches."""
    dotted = str(key)
    while isinstance(node, DictConfig) and len(node) == 1:
        (child,) = node.keys()
        dotted += f".{child}"
        node = node._get_node(child)
    return dotted


def _typed(schema, node, prefix: str):
    """Merge a config node onto its dataclass schema; OmegaConf errors become RecipeErrors."""
    base = OmegaConf.structured(schema)
    fields = [f.name for f in dataclasses.fields(schema)]
    if node is None:
        node = {}
    try:
        merged = OmegaConf.merge(base, node)
        obj = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = str(getattr(e, "key", "") or "")
        raise RecipeError(f"{prefix}.{key}" if key else prefix, "unknown key", _closest(key, fields)) from None
    except ValidationError as e:
        key = str(getattr(e, "full_key", "") or getattr(e, "key", ""))
        want = next((f.type for f in dataclasses.fields(schema) if f.name == key.split(".")[-1]), None)
        value = getattr(e, "value", None)
        want_s = getattr(want, "__name__", str(want)).replace("typing.", "")
        raise RecipeError(f"{prefix}.{key}", f"bad value {value!r}", f"expected {want_s}") from None
    except (ValueError, TypeError) as e:  # a Params.__post_init__ check
        raise RecipeError(prefix, str(e)) from None
    except OmegaConfBaseException as e:
        raise RecipeError(prefix, str(e).splitlines()[0]) from None
    return obj


def _positive(value, key: str, allow_zero: bool = False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}",
                          f"set {key} to a positive number")


def validate_steps(recipe_node, target: TargetCapabilities, info: ModelInfo) -> Tuple[List[Step], Any]:
    """The recipe's steps, typed and checked against the target's capabilities and each other's order."""
    load_all_steps()
    steps_node = recipe_node.get("steps") if recipe_node is not None else None
    if steps_node is None:
        steps_node = {}
    if not isinstance(steps_node, (dict, DictConfig)):
        raise RecipeError("recipe.steps", "must be a mapping of step name -> parameters",
                          "write e.g. steps: {int8_static: {calibration: minmax}}")
    unknown_keys = set(recipe_node.keys()) - set(RECIPE_KEYS)
    if unknown_keys:
        k = sorted(unknown_keys)[0]
        raise RecipeError(f"recipe.{k}", "unknown key", _closest(k, RECIPE_KEYS))
    steps: List[Step] = []
    seen_onnx = None
    for name, params in steps_node.items():
        key = f"recipe.steps.{name}"
        if name not in STEP_REGISTRY:
            raise RecipeError(key, "unknown step", _closest(name, STEP_REGISTRY))
        cls = STEP_REGISTRY[name]
        if isinstance(params, DictConfig) or params is None or isinstance(params, dict):
            typed = _typed(cls.Params, params, key)
        else:
            raise RecipeError(key, f"parameters must be a mapping, got {params!r}", "write {} for the defaults")
        for field_name in LAYER_LIST_FIELDS:  # layer lists may name roles; a misspelt role is an error
            check_layer_selectors(f"{key}.{field_name}", getattr(typed, field_name, None))
        step = cls(typed)
        if target.name not in cls.runs_on:
            ok = sorted(cls.runs_on)
            raise NotRunnableError(key, f"{name} is not runnable on target={target.name}",
                              f"use target={' or target='.join(ok)}" if ok else "remove the step")
        quantizer = next((s for s in steps if s.quantizes_compute), None)
        if cls.must_precede_quantizers and quantizer is not None:
            order = [s.name for s in steps if s is not quantizer] + [name, quantizer.name]
            order += [str(k) for k in list(steps_node.keys())[len(steps) + 1:]]
            raise RecipeError("recipe.steps", f"{name} must come before {quantizer.name} (it changes the weights "
                              f"{quantizer.name} quantizes)",
                              "write steps: {" + ", ".join(f"{k}: ..." for k in order) + "}")
        if cls.must_follow_quantizers:
            check_follows_quantizer(step, steps, list(steps_node.keys()), target)
        stage = cls.runs_on[target.name]
        if stage == ONNX:
            seen_onnx = name
        elif seen_onnx:
            raise RecipeError(key, f"torch-side step {name} comes after ONNX-side step {seen_onnx}",
                              f"put {name} before {seen_onnx} in recipe.steps")
        step = step.for_target(target)
        step.validate(info, target)
        step.validate_after(steps, target)
        steps.append(step)
    gate = _typed(GateConfig, recipe_node.get("gate") if recipe_node is not None else None, "recipe.gate")
    return steps, gate


def check_follows_quantizer(step: Step, before: List[Step], names: List[str], target: TargetCapabilities) -> None:
    """A step that trains what a quantizing step made (distill) needs one before it whose torch-side output is
    trainable fake-quant on this target."""
    key = f"recipe.steps.{step.name}"
    quant = [s for s in before if s.quantizes_compute]
    trainable = [s for s in quant if s.trainable_fake_quant and s.stage_for(target.name) == TORCH]
    if trainable:
        return
    later = [n for n in names[names.index(step.name) + 1:]
             if n in STEP_REGISTRY and STEP_REGISTRY[n].quantizes_compute]
    others = [n for n in names if n != step.name]
    if later:
        order = [n for n in others if n not in later] + later + [step.name]
        raise RecipeError("recipe.steps", f"{step.name} must come after {later[0]} (it trains the model "
                          f"{later[0]} quantizes)", "write steps: {" + ", ".join(f"{k}: ..." for k in order) + "}")
    if quant:
        raise NotRunnableError(key, f"{step.name} trains torch fake-quant, but {quant[0].name} runs on the ONNX graph "
                               f"on target={target.name}", "use target=torch, or a torch-side quantizing step")
    fit = sorted(n for n, c in STEP_REGISTRY.items() if c.quantizes_compute and c.trainable_fake_quant
                 and c.runs_on.get(target.name) == TORCH)
    raise RecipeError(key, f"{step.name} needs a quantizing step before it (it trains the fake-quantized model "
                      "against the fp32 one); the recipe has none",
                      f"put one of {fit} before {step.name}, e.g. steps: {{nvfp4: {{}}, {step.name}: {{}}}}")


LAYER_LIST_FIELDS = ("exclude", "exclude_on_ort", "layers")  # step parameters that list layers (names or roles)


def check_layer_selectors(key: str, patterns) -> None:
    """A misspelt layer role (`ffn_dwn`) in a layer list would match no module name and silently pick
    nothing: it is an error naming the key."""
    for p in list(patterns or []):
        why = bad_selector(str(p))
        if why:
            raise RecipeError(key, f"{p!r} is not a layer role", why)


def validate(cfg: DictConfig) -> BuildSpec:
    """Validate stage: the composed Hydra config -> BuildSpec, or RecipeError."""
    for key in cfg.keys():
        if key not in TOP_LEVEL_KEYS and key != "hydra":  # hydra: present when composed with return_hydra_config
            dotted = _first_leaf(key, cfg._get_node(key))
            raise RecipeError(dotted, "unknown top-level key", top_level_fix(dotted))
    typed = {name: _typed(schema, cfg.get(name), name) for name, schema in SECTIONS.items()}
    model, data, target = typed["model"], typed["data"], typed["target"]
    if target.name not in target_names():
        raise RecipeError("target.name", f"unknown target {target.name!r}", _closest(target.name, target_names()))
    capabilities: TargetCapabilities = get_target(target.name).capabilities_for(target)
    for k in ("calibration_samples", "evaluation_samples", "seq_len", "batch_size"):
        _positive(getattr(data, k), f"data.{k}")
    if data.on_short_data not in ("clamp", "error"):
        raise RecipeError("data.on_short_data", f"bad value {data.on_short_data!r}", "use clamp or error")
    for k in ("batch_size", "seq_len", "iterations", "server_batch"):
        _positive(getattr(typed["bench"], k), f"bench.{k}")
    _positive(typed["bench"].warmup, "bench.warmup", allow_zero=True)
    _positive(typed["bench"].threads, "bench.threads", allow_zero=True)
    _positive(typed["bench"].rounds, "bench.rounds")
    for key, value, allowed in (("bench.baseline", typed["bench"].baseline, ("fp32", "none")),
                                ("bench.shapes", typed["bench"].shapes, ("fixed", "data"))):
        if value not in allowed:
            raise RecipeError(key, f"bad value {value!r}", f"use {' or '.join(allowed)}")
    _positive(typed["doctor"].max_memcpy, "doctor.max_memcpy", allow_zero=True)
    if not 0.0 <= typed["doctor"].min_quantized_fraction <= 1.0:
        raise RecipeError("doctor.min_quantized_fraction",
                          f"{typed['doctor'].min_quantized_fraction} is not a fraction",
                          "use a value between 0 and 1")
    if model.task not in TASK_KINDS:
        raise RecipeError("model.task", f"bad value {model.task!r}", f"use {' or '.join(TASK_KINDS)}")
    if typed["export"].exporter not in ("torchscript", "dynamo"):
        raise RecipeError("export.exporter", f"bad value {typed['export'].exporter!r}", "use torchscript or dynamo")
    if typed["export"].external_data not in ("auto", "always", "never"):
        raise RecipeError("export.external_data", f"bad value {typed['export'].external_data!r}",
                          "use auto, always or never")
    check_layer_selectors("model.exclude", model.exclude)
    info = model_info(model)  # reads config.json only
    check_fusion(typed["export"], info, capabilities)
    if info.max_positions:
        for key, seq in (("data.seq_len", data.seq_len), ("bench.seq_len", typed["bench"].seq_len)):
            if seq > info.max_positions:
                raise RecipeError(key, f"{seq} is above {model.name}'s maximum of {info.max_positions} positions",
                                  f"set {key}<={info.max_positions}")
    recipe_node = cfg.get("recipe")
    if recipe_node is None:
        raise RecipeError("recipe", "no recipe selected", "pass recipe=<name>")
    steps, gate = validate_steps(recipe_node, capabilities, info)
    for step in steps:  # checks against the export settings: an explicit opset below a step's min_opset
        step.validate_export(typed["export"], capabilities)
    repair = _typed(RepairConfig, recipe_node.get("repair"), "recipe.repair")
    validate_repair(repair, steps, capabilities, typed["export"].opset)
    if typed["export"].opset is None:
        # auto: the highest opset the steps need on this target (fp8 on ort: 19, nvfp4: 23), at least the
        # default; written into the resolved recipe.yaml so a rebuild exports at the same opset
        opset = max([DEFAULT_OPSET, repair_min_opset(repair, capabilities)] + [s.min_opset(capabilities) for s in steps])
        typed["export"] = dataclasses.replace(typed["export"], opset=opset)
        with open_dict(cfg):
            if cfg.get("export") is None:
                cfg.export = {}
            cfg.export.opset = opset
    eval_task = check_data_files(data, need_calibration=any(s.needs_calibration for s in steps),
                                 model_task=model.task, label_names=label_names(model))
    if any(s.trains for s in steps):
        check_train_file(data, model.task)
    validate_gate(gate, eval_task, str(data_file(data, "evaluation")))
    validate_repair_budget(repair, gate, model.task, eval_task, str(data_file(data, "evaluation")))
    tgt = get_target(target.name)(target)
    tgt.check_environment(recipe_node)
    return BuildSpec(model=model, data=data, export=typed["export"], check=typed["check"], bench=typed["bench"],
                     target=target, recipe_name=str(recipe_node.get("name", "custom")), steps=steps, gate=gate,
                     seed=int(cfg.get("seed", 0)), model_info=info, raw=cfg, doctor=typed["doctor"],
                     cache=typed["cache"], capabilities=capabilities, repair=repair)
