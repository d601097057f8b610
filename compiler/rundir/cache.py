"""A content-addressed cache of build intermediates (the fp32 ONNX export, calibration statistics): an
entry is keyed by the full sha256 of everything that determines it, written atomically, and re-hashed
on every read so a corrupt or partial entry is rebuilt instead of returned."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from compiler.core.hashing import file_sha256, onnx_sha256
from compiler.rundir.manifest import package_versions

log = logging.getLogger("qcompile")

CACHE_FORMAT = 1  # bump when the layout or the key material changes: old entries then simply miss
ENTRY_MANIFEST = "entry.json"
DATA = "data"


# ---------------------------------------------------------------- key material

def default_cache_dir() -> Path:
    """$QCOMPILE_CACHE_DIR, else $XDG_CACHE_HOME/qcompile, else ~/.cache/qcompile."""
    if os.environ.get("QCOMPILE_CACHE_DIR"):
        return Path(os.environ["QCOMPILE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "qcompile"


@functools.lru_cache(maxsize=1)
def tool_versions() -> Dict[str, str]:
    """The installed versions of every package that shapes an artifact (torch, onnx, onnxruntime,
    modelopt, transformers, tensorrt, qcompile ...) plus Python, and the sha256 of qcompile's own source:
    an editable install keeps version 0.1.0 while its code changes."""
    out = dict(package_versions())  # holds qcompile_source_sha256 too
    out["python"] = platform.python_version()
    return out


def _jsonable(o: Any) -> Any:
    """Strict conversion to JSON types. Anything unknown is an error, never str(o): a repr that hides the
    content would make two different inputs share a key."""
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return _jsonable(dataclasses.asdict(o))
    if isinstance(o, (DictConfig, ListConfig)):
        return _jsonable(OmegaConf.to_container(o, resolve=True))
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    if o is None or isinstance(o, (bool, int, float, str)):
        return o  # json writes floats with repr: exact, and 1.0 stays distinct from 1 and "1.0"
    if isinstance(o, np.generic):
        return _jsonable(o.item())
    raise TypeError(f"cache key: cannot hash a {type(o).__name__} ({o!r:.60}); pass its content or its sha256")


def canonical_json(obj: Any) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _hash_tree(root: Path) -> Dict[str, str]:
    return {f.relative_to(root).as_posix(): file_sha256(f) for f in sorted(Path(root).rglob("*")) if f.is_file()}


# ---------------------------------------------------------------- the cache

class Cache:
    """cache.get_or_create(kind, key, build) -> directory holding what build(dir) wrote.

    The entry's name is the full sha256 of (cache format, kind, key, tool versions); the key
    must name every input that determines the result. Returned directories are read-only: copy out.
    """

    def __init__(self, root: Path, versions: Optional[Dict[str, str]] = None):
        self.root = Path(root).expanduser()
        self._versions = versions
        self.events: List[Dict[str, str]] = []

    @property
    def versions(self) -> Dict[str, str]:
        if self._versions is None:
            self._versions = tool_versions()
        return self._versions

    def key_material(self, kind: str, key: Dict[str, Any]) -> Dict[str, Any]:
        return {"cache_format": CACHE_FORMAT, "kind": str(kind), "key": _jsonable(key),
                "versions": _jsonable(self.versions)}

    def key_sha256(self, kind: str, key: Dict[str, Any]) -> str:
        return hashlib.sha256(canonical_json(self.key_material(kind, key)).encode()).hexdigest()

    def entry_dir(self, kind: str, key: Dict[str, Any]) -> Path:
        return self.root / _safe_kind(kind) / self.key_sha256(kind, key)

    def problem(self, entry: Path, material: Dict[str, Any]) -> Optional[str]:
        """Why an entry cannot be used (None: it is complete and intact)."""
        mf = entry / ENTRY_MANIFEST
        if not mf.is_file():
            return f"no {ENTRY_MANIFEST}"
        try:
            meta = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return f"unreadable {ENTRY_MANIFEST}: {e}"
        if canonical_json(meta.get("key_material")) != canonical_json(material):
            return "its recorded key differs from the one asked for"
        data = entry / DATA
        if not data.is_dir():
            return f"no {DATA}/ directory"
        want = meta.get("files") or {}
        have = {f.relative_to(data).as_posix() for f in data.rglob("*") if f.is_file()}
        missing, extra = sorted(set(want) - have), sorted(have - set(want))
        if missing:
            return f"missing file {missing[0]}"
        if extra:
            return f"unlisted file {extra[0]}"
        for rel, sha in sorted(want.items()):
            if file_sha256(data / rel) != sha:
                return f"sha256 mismatch in {rel}"
        return None

    def get_or_create(self, kind: str, key: Dict[str, Any], build: Callable[[Path], None]) -> Path:
        material = self.key_material(kind, key)
        digest = hashlib.sha256(canonical_json(material).encode()).hexdigest()
        kind_dir = self.root / _safe_kind(kind)
        entry = kind_dir / digest
        result = "miss"
        for _attempt in range(3):
            if entry.exists():
                why = self.problem(entry, material)
                if why is None:
                    self._record(kind, digest, "hit" if result == "miss" else result)
                    return entry / DATA
                log.warning("cache: %s entry %s is unusable (%s): rebuilding it", kind, digest[:16], why)
                _discard(entry)
                result = "rebuilt"
            kind_dir.mkdir(parents=True, exist_ok=True)
            # a private temp dir next to the entry (same filesystem), renamed in one step when complete:
            # concurrent builds never see a half-written entry, and the loser of a race uses the winner's
            tmp = kind_dir / f".tmp-{digest[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            (tmp / DATA).mkdir(parents=True)
            try:
                t0 = time.perf_counter()
                build(tmp / DATA)
                files = _hash_tree(tmp / DATA)
                if not files:
                    raise RuntimeError(f"cache: the {kind} build wrote no files into {tmp / DATA}")
                meta = {"kind": kind, "key_sha256": digest, "key_material": material, "files": files,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_s": round(time.perf_counter() - t0, 3)}
                (tmp / ENTRY_MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
                for f in (tmp / DATA).rglob("*"):
                    if f.is_file():
                        f.chmod(0o444)  # readers copy out; nobody edits an entry in place
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            try:
                os.rename(tmp, entry)
            except OSError:
                # another process renamed its complete copy first (ENOTEMPTY / EEXIST): verify and use it
                shutil.rmtree(tmp, ignore_errors=True)
                if entry.exists() and self.problem(entry, material) is None:
                    self._record(kind, digest, result)
                    return entry / DATA
                continue
            self._record(kind, digest, result)
            return entry / DATA
        raise RuntimeError(f"cache: could not create a usable {kind} entry {digest} under {kind_dir}")

    def _record(self, kind: str, digest: str, result: str) -> None:
        self.events.append({"kind": kind, "key_sha256": digest, "result": result})
        log.info("cache: %s %s (%s)", kind, result, digest[:16])

    def report(self) -> Dict[str, Any]:
        """For report.json: per kind hit | miss | rebuilt (corrupt entry replaced) | mixed, plus each event."""
        per_kind: Dict[str, str] = {}
        for ev in self.events:
            prev = per_kind.get(ev["kind"])
            per_kind[ev["kind"]] = ev["result"] if prev in (None, ev["result"]) else "mixed"
        return {"enabled": True, "dir": str(self.root), **per_kind, "entries": list(self.events)}


def _safe_kind(kind: str) -> str:
    if not kind or not all(c.isalnum() or c in "-_" for c in kind):
        raise ValueError(f"cache kind must be letters, digits, - or _; got {kind!r}")
    return kind


def _discard(entry: Path) -> None:
    """Move an unusable entry out of the way in one rename, then delete it (a concurrent reader sees
    either the old entry or none, never a half-deleted one)."""
    trash = entry.with_name(f".trash-{entry.name[:16]}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, trash)
    except OSError:
        return  # somebody else moved it already
    shutil.rmtree(trash, ignore_errors=True)


def open_cache(cfg) -> Optional[Cache]:
    """The build's cache from the recipe's `cache` section (None when disabled)."""
    if cfg is None or not bool(getattr(cfg, "enabled", True)):
        return None
    root = Path(str(cfg.dir)).expanduser() if getattr(cfg, "dir", None) else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(f"{root} is not writable")
    except OSError as e:  # a cache is an optimization: a read-only home never fails a build
        log.warning("cache disabled: cannot use %s (%s); set cache.dir=... or QCOMPILE_CACHE_DIR", root, e)
        return None
    return Cache(root)


# ---------------------------------------------------------------- what qcompile caches (the fp32 export: stages/export.py)

def feeds_sha256(feeds) -> str:
    """Content hash of a list of feeds (names, dtypes, shapes, bytes, order): data, seq_len and batch size."""
    import numpy as np

    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            arr = np.ascontiguousarray(feed[name])
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(arr.tobytes())
        h.update(b"/")
    return h.hexdigest()


def cached_reference_predict(model, spec, feeds, predict: Callable, cache: Cache) -> Callable:
    """The fp32 reference's outputs on the evaluation feeds through the cache (every sweep point of one
    model and data compares against the same outputs): a predictor that answers those feeds from the
    entry and runs `predict` for any other feed."""
    import numpy as np

    key = {"weights_sha256": model.weights_sha256, "model": spec.model, "feeds_sha256": feeds_sha256(feeds),
           "input_names": list(model.input_names), "output_names": list(model.output_names)}

    def build(d: Path) -> None:
        for i, feed in enumerate(feeds):
            np.savez(d / f"{i:05d}.npz", **predict(feed))

    entry = cache.get_or_create("reference_outputs", key, build)
    stored = {feeds_sha256([feed]): entry / f"{i:05d}.npz" for i, feed in enumerate(feeds)}

    def replay(feed):
        path = stored.get(feeds_sha256([feed]))
        if path is None:
            return predict(feed)
        with np.load(path) as z:
            return {n: z[n] for n in z.files}

    return replay


def onnx_step_key(step, onnx_path: Path, out_path: Path, ctx) -> Dict[str, Any]:
    """Everything that determines what an ONNX-side step writes (compiler.steps.base.Step.apply_onnx): the
    input graph's bytes, the step and its parameters (with the per-layer formats a repair gave it), the output
    file's name (an external-data file is named after it inside the graph) and every StepContext field a step
    may read except work_dir and report. The step's code is in the key through qcompile's source hash."""
    return {"step": step.name, "params": step.params, "layer_formats": dict(step.layer_formats),
            "graph_sha256": onnx_sha256(onnx_path), "out_name": Path(out_path).name,
            "target": ctx.target, "model_info": ctx.model_info,
            "calibration_sha256": ctx.calibration.sha256() if ctx.calibration is not None else None,
            "calibration_samples": len(ctx.calibration) if ctx.calibration is not None else 0,
            "seed": int(ctx.seed), "exclude": list(ctx.exclude), "opset": int(ctx.opset),
            "batch_size": int(ctx.batch_size)}


STEP_REPORT = "step_report.json"


def _report_value(o: Any) -> Any:
    """json.dumps default for a step's report: numpy scalars as numbers, anything else as its text (report.json
    writes them the same way)."""
    return o.item() if isinstance(o, np.generic) else str(o)


def cached_onnx_step(step, onnx_path: Path, out_path: Path, ctx, cache: Cache) -> Path:
    """step.apply_onnx through the cache: a warm build (the same graph, recipe, data and tool versions) copies
    the step's graph and its report out of the entry instead of running the step again (quantize_static
    re-quantizes every weight even when its calibration ranges come from the cache: about 4 s of a MiniLM
    build). The bytes are those the step wrote, so model.onnx is the same file either way."""
    out_path = Path(out_path)
    built = []

    def build(d: Path) -> None:
        done = Path(step.apply_onnx(onnx_path, d / out_path.name, ctx))
        if done != d / out_path.name:  # a step that returned another file (e.g. its input, unchanged)
            for suffix in ("", ".data"):
                if done.with_name(done.name + suffix).is_file():
                    shutil.copyfile(done.with_name(done.name + suffix), d / (out_path.name + suffix))
        (d / STEP_REPORT).write_text(json.dumps(ctx.report, sort_keys=True, default=_report_value) + "\n")
        built.append(True)

    entry = cache.get_or_create("onnx_step", onnx_step_key(step, onnx_path, out_path, ctx), build)
    if not built:  # a hit: the step did not run in this build, its report comes from the entry
        stored = json.loads((entry / STEP_REPORT).read_text())
        # the entry answered for the whole step: the caches the step consulted when it ran answer as hits now
        ctx.report.clear()
        ctx.report.update({k: ("hit" if k.endswith("_cache") and v == "miss" else v) for k, v in stored.items()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for f in sorted(entry.iterdir()):  # the graph and whatever the step wrote beside it (external data)
        if f.is_file() and f.name != STEP_REPORT:
            shutil.copyfile(f, out_path.parent / f.name)  # copyfile: the copy is writable, the entry stays read-only
    return out_path
