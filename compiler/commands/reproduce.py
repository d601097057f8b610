"""Reproducible builds: `qcompile verify <run dir>` re-hashes a run's artifacts against its manifest and
compares the recorded tool versions and hardware with this machine's; `qcompile rebuild <run dir>` builds
the run's recorded recipe again into a new directory and says which artifacts came out different."""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from compiler.core.errors import BuildError, GateError, QcompileError, RecipeError
from compiler.core.paths import RECIPES_DIR
from compiler.core.status import PARTIAL_SUFFIX, RUN_DIR_SUFFIXES, Status
from compiler.rundir import lifecycle
from compiler.rundir.cache import open_cache
from compiler.rundir.manifest import MANIFEST, check_artifacts, package_versions, read_manifest
from compiler.rundir.manifest import hardware as here_hardware

log = logging.getLogger("qcompile")

# TensorRT engine files: tied to the TensorRT version and the GPU that built them
ENGINE_PATTERNS = ("*.plan", "*.engine", "*.trt")
# artifacts that are not bit-reproducible by design: TensorRT times tactics on the GPU while building
NOT_REPRODUCIBLE = ("*.plan", "*.engine", "*.trt", "timing.cache", "engine.layers.json")
HARDWARE_KEYS = ("machine", "cpu", "cpu_count", "python", "gpu", "gpu_capability", "cuda", "platform")
REBUILD_ROOT = Path("outputs") / "rebuild"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(Path(name).name, p) for p in patterns)


def _run_dir_arg(path: str, command: str) -> Path:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise RecipeError("run_dir", f"{run_dir} is not a directory",
                          f"pass a run directory: qcompile {command} outputs/<date>/<run>")
    if not (run_dir / MANIFEST).is_file():
        if (run_dir / "FAILED.md").exists():
            raise RecipeError("run_dir", f"{run_dir} is a failed build (see its FAILED.md): it has no manifest",
                              "verify or rebuild a finished run")
        raise RecipeError("run_dir", f"{run_dir} has no manifest.json", "pass a finished qcompile run directory")
    return run_dir


# ---------------------------------------------------------------- verify

@dataclass
class VerifyResult:
    run_dir: str
    artifacts: Dict[str, str] = field(default_factory=dict)  # name -> ok | modified | missing
    unlisted: List[str] = field(default_factory=list)  # files the manifest does not cover (added later)
    versions: Dict[str, Dict[str, Optional[str]]] = field(default_factory=dict)  # differing: recorded / installed
    hardware: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # differing: recorded / here
    engine_problems: List[str] = field(default_factory=list)  # a TensorRT engine that must not be used here

    @property
    def artifacts_ok(self) -> bool:
        return all(v == "ok" for v in self.artifacts.values())

    def exit_code(self, strict: bool = False) -> int:
        bad = not self.artifacts_ok or bool(self.engine_problems)
        if strict:
            bad = bad or bool(self.versions) or bool(self.hardware) or bool(self.unlisted)
        return 1 if bad else 0


def verify_run(run_dir: Path, versions: Optional[Dict[str, str]] = None,
               hardware: Optional[Dict[str, Any]] = None) -> VerifyResult:
    """Re-hash every artifact listed in manifest.json; compare versions and hardware with this machine's
    (or with the given ones: tests plant a different machine)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    res = VerifyResult(run_dir=str(run_dir))
    recorded = manifest.get("artifacts", {})
    res.artifacts, res.unlisted = check_artifacts(run_dir, manifest)

    installed = package_versions() if versions is None else versions
    rec_versions = manifest.get("versions", {})
    for name in sorted(set(rec_versions) | set(installed)):
        if rec_versions.get(name) != installed.get(name):
            res.versions[name] = {"recorded": rec_versions.get(name), "installed": installed.get(name)}
    here = here_hardware() if hardware is None else hardware
    rec_hw = manifest.get("hardware", {})
    for key in HARDWARE_KEYS:
        if key in rec_hw or key in here:
            if rec_hw.get(key) != here.get(key):
                res.hardware[key] = {"recorded": rec_hw.get(key), "here": here.get(key)}

    # a TensorRT engine is never reused across a TensorRT version or a GPU change
    engines = sorted(n for n in set(recorded) | set(res.unlisted) if _matches(n, ENGINE_PATTERNS))
    for name in engines:
        if name in res.unlisted:
            res.engine_problems.append(
                f"{name} is not in the manifest (built after the run, e.g. by build_engine.sh): the TensorRT "
                "version and GPU it was built for are unknown; rebuild it on this machine")
            continue
        changed = [k for k in ("tensorrt",) if k in res.versions] + [k for k in ("gpu", "gpu_capability", "cuda")
                                                                    if k in res.hardware]
        if changed:
            was = ", ".join(f"{k}={(res.versions.get(k) or res.hardware.get(k))['recorded']}" for k in changed)
            here = {k: res.versions[k].get("installed") if k in res.versions else res.hardware[k]["here"]
                    for k in changed}
            now = ", ".join(f"{k}={here[k]}" for k in changed)
            res.engine_problems.append(f"{name} was built for {was}; this machine has {now}: a TensorRT engine is "
                                       f"never reused across a TensorRT version or GPU change -- rebuild it "
                                       f"(qcompile rebuild {run_dir})")
    return res


def render_verify(res: VerifyResult) -> str:
    lines = [f"qcompile verify {res.run_dir}", ""]
    ok = sum(v == "ok" for v in res.artifacts.values())
    lines.append(f"artifacts: {ok}/{len(res.artifacts)} match manifest.json")
    for name, status in res.artifacts.items():
        lines.append(f"  {'ok      ' if status == 'ok' else status.upper():8s}  {name}")
    for name in res.unlisted:
        lines.append(f"  UNLISTED  {name} (not in the manifest: added after the build)")
    if res.versions:
        lines += ["", "versions differ from the recorded ones (rebuilt artifacts may differ):"]
        for name, v in res.versions.items():
            lines.append(f"  {name}: recorded {v['recorded']}, installed {v['installed']}")
    else:
        lines += ["", "versions: same as recorded"]
    if res.hardware:
        lines += ["hardware differs from the recorded one:"]
        for key, v in res.hardware.items():
            lines.append(f"  {key}: recorded {v['recorded']}, here {v['here']}")
    else:
        lines += ["hardware: same as recorded"]
    for p in res.engine_problems:
        lines += ["", f"ENGINE: {p}"]
    return "\n".join(lines)


def verify_main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="qcompile verify", description=(
        "Re-hash every artifact of a run directory against its manifest.json and compare the recorded "
        "tool versions and hardware with this machine's. Exit 1 when an artifact is modified or missing, "
        "or a TensorRT engine was built for another TensorRT version or GPU."))
    ap.add_argument("run_dir")
    ap.add_argument("--strict", action="store_true", help="also fail on version, hardware or unlisted-file differences")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(list(argv))
    res = verify_run(_run_dir_arg(args.run_dir, "verify"))
    code = res.exit_code(args.strict)
    print(json.dumps({**asdict(res), "exit_code": code}, indent=2) if args.json else render_verify(res))
    if not args.json:
        print("\nverify: " + ("OK" if code == 0 else "FAILED"))
    return code


# ---------------------------------------------------------------- rebuild

@dataclass
class RebuildResult:
    original: str
    rebuild: str
    status: str  # the rebuild's own build status: passed | gate failed
    artifacts: Dict[str, Dict[str, Optional[str]]] = field(default_factory=dict)  # name -> original, rebuild, result
    inputs: Dict[str, str] = field(default_factory=dict)  # weights / data / recipe: same | differs
    versions: Dict[str, Dict[str, Optional[str]]] = field(default_factory=dict)  # recorded vs now, when different
    recipe_drift: List[str] = field(default_factory=list)  # keys where today's recipes/ composes differently
    overrides: List[str] = field(default_factory=list)

    @property
    def differing(self) -> List[str]:
        return [n for n, a in self.artifacts.items() if a["result"] not in ("identical", "differs (expected)")]

    @property
    def identical(self) -> bool:
        return not self.differing


def compare_artifacts(original: Dict[str, str], rebuilt: Dict[str, str]) -> Dict[str, Dict[str, Optional[str]]]:
    out = {}
    for name in sorted(set(original) | set(rebuilt)):
        a, b = original.get(name), rebuilt.get(name)
        if a is None:
            result = "only in rebuild"
        elif b is None:
            result = "only in original"
        elif a == b:
            result = "identical"
        else:
            result = "differs (expected)" if _matches(name, NOT_REPRODUCIBLE) else "differs"
        out[name] = {"original": a, "rebuild": b, "result": result}
    return out


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def recipe_drift(recorded_cfg, overrides: List[str]) -> List[str]:
    """Keys where composing today's recipes/ with the run's recorded overrides gives another value than
    its recipe.yaml (the rebuild always uses recipe.yaml; drift only explains a difference)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(RECIPES_DIR).resolve()), version_base="1.3"):
            now = compose(config_name="config", overrides=list(overrides))
        a = _flat(OmegaConf.to_container(recorded_cfg, resolve=True))
        b = _flat(OmegaConf.to_container(now, resolve=True))
    except Exception as e:
        return [f"(cannot compose today's recipes with {overrides}: {type(e).__name__}: {str(e).splitlines()[0]})"]
    finally:
        GlobalHydra.instance().clear()
    return [f"{k}: recorded {a.get(k)!r}, today {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def default_rebuild_dir(run_dir: Path) -> Path:
    name = run_dir.name
    for suffix in RUN_DIR_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return REBUILD_ROOT / time.strftime("%Y-%m-%d") / f"{time.strftime('%H-%M-%S')}_{name}"


def rebuild_run(run_dir: Path, out_dir: Optional[Path] = None, use_cache: bool = False) -> RebuildResult:
    """Build run_dir's recipe.yaml again into a new directory (no cache unless asked: a cache hit would
    copy the old export instead of reproducing it) and compare every artifact's sha256."""
    from omegaconf import OmegaConf

    # why: the pipeline imports torch (+2 s), validate onnx and polygraphy: `qcompile verify` starts without them
    from compiler.pipeline import run_build
    from compiler.stages.validate import validate

    run_dir = Path(run_dir)
    original = read_manifest(run_dir)
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        raise RecipeError("run_dir", f"{run_dir} has no recipe.yaml", "pass a finished qcompile run directory")
    cfg = OmegaConf.load(recipe)
    overrides: List[str] = []
    if (run_dir / ".hydra" / "overrides.yaml").is_file():
        overrides = [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    drift = recipe_drift(cfg, overrides) if overrides or (run_dir / ".hydra").is_dir() else []
    spec = validate(cfg)

    # absolute, as Hydra makes a build's output_dir: steps may chdir (ORT's pre-processing runs in the
    # work dir) and a relative run dir would then point nowhere
    final = (Path(out_dir) if out_dir else default_rebuild_dir(run_dir)).expanduser().resolve()
    if final.exists():
        raise RecipeError("--out", f"{final} exists already", "choose a new directory: runs are never overwritten")
    staging = final.with_name(final.name + PARTIAL_SUFFIX)
    staging.mkdir(parents=True)
    lifecycle.begin(staging)
    if (run_dir / ".hydra").is_dir():  # provenance: the rebuild can be summarized and rebuilt in turn
        shutil.copytree(run_dir / ".hydra", staging / ".hydra")
    cache = open_cache(spec.cache) if use_cache else None
    status = Status.PASSED
    try:
        # the recorded overrides: what the run directory's scripts quote (build_engine.sh's qcompile line)
        run_build(spec, staging, cache=cache, overrides=overrides if (run_dir / ".hydra" / "overrides.yaml").is_file()
                  else None)
    except GateError:
        status = Status.GATE_FAILED
    except QcompileError as e:
        kept = lifecycle.fail(staging, e.message, kind=e.kind)
        raise BuildError(f"the rebuild failed: {e.message} (kept in {kept})") from e
    except BaseException as e:
        lifecycle.fail(staging, f"{type(e).__name__}: {e}", kind=Status.INTERNAL_ERROR)
        raise
    final = lifecycle.succeed(staging, gate_failed=status == Status.GATE_FAILED)
    new = read_manifest(final)
    res = RebuildResult(original=str(run_dir), rebuild=str(final), status=status, overrides=overrides,
                        recipe_drift=drift, artifacts=compare_artifacts(original.get("artifacts", {}),
                                                                         new.get("artifacts", {})))
    for key in sorted(set(original.get("inputs", {})) | set(new.get("inputs", {}))):
        res.inputs[key] = "same" if original.get("inputs", {}).get(key) == new.get("inputs", {}).get(key) else "differs"
    ov, nv = original.get("versions", {}), new.get("versions", {})
    res.versions = {k: {"recorded": ov.get(k), "now": nv.get(k)} for k in sorted(set(ov) | set(nv))
                    if ov.get(k) != nv.get(k)}
    (final / "rebuild.json").write_text(json.dumps({**asdict(res), "identical": res.identical}, indent=2) + "\n")
    return res


def render_rebuild(res: RebuildResult) -> str:
    lines = [f"qcompile rebuild {res.original}", f"  into {res.rebuild} (build status: {res.status})"]
    if res.overrides:
        lines.append("  recorded overrides: " + " ".join(res.overrides))
    lines += ["", f"{'artifact':40s} {'original':16s} {'rebuild':16s} result"]
    for name, a in res.artifacts.items():
        lines.append(f"{name:40s} {(a['original'] or '-')[:16]:16s} {(a['rebuild'] or '-')[:16]:16s} {a['result']}")
    lines.append("")
    lines.append("inputs: " + ", ".join(f"{k} {v}" for k, v in res.inputs.items()))
    if res.versions:
        lines.append("versions differ from the original build's (differences may come from them): "
                     + ", ".join(f"{k} {v['recorded']} -> {v['now']}" for k, v in res.versions.items()))
    if res.recipe_drift:
        lines.append("today's recipes/ compose differently from the recorded recipe.yaml (the rebuild used "
                     "recipe.yaml): " + "; ".join(res.recipe_drift[:8]))
    n = len([a for a in res.artifacts.values() if a["result"] == "identical"])
    lines.append("")
    lines.append(f"rebuild: {n}/{len(res.artifacts)} artifacts byte-identical" +
                 ("" if res.identical else f"; DIFFERENT: {', '.join(res.differing)}"))
    return "\n".join(lines)


def rebuild_main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="qcompile rebuild", description=(
        "Rebuild a run from its recipe.yaml into a new directory and compare every artifact's sha256 with "
        "the original's manifest. Exit 0 when all are byte-identical (TensorRT plans excepted), 1 otherwise."))
    ap.add_argument("run_dir")
    ap.add_argument("--out", help="the new run directory (default: outputs/rebuild/<date>/<time>_<run name>)")
    ap.add_argument("--use-cache", action="store_true",
                    help="let the build reuse cached exports/calibration (default: rebuild everything)")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = ap.parse_args(list(argv))
    res = rebuild_run(_run_dir_arg(args.run_dir, "rebuild"), Path(args.out) if args.out else None, args.use_cache)
    print(json.dumps({**asdict(res), "identical": res.identical}, indent=2) if args.json else render_rebuild(res))
    return 0 if res.identical else 1
