"""The content-addressed cache: full-sha256 keys that miss when any input changes, atomic entries that
survive concurrent writers, corrupt or partial entries rebuilt, and the fp32 export wired into builds."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import re
import time
from pathlib import Path

import pytest

from compiler.rundir.cache import ENTRY_MANIFEST, Cache, canonical_json, tool_versions
from compiler.stages.export import cached_fp32_export, export_key

VERSIONS = {"torch": "2.13.0+cpu", "onnx": "1.23.2", "onnxruntime": "1.32.0", "nvidia-modelopt": "0.47.0",
            "qcompile": "0.1.0", "qcompile_source_sha256": "ab" * 32}


class Counter:
    """A build function that writes its input into the entry and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, payload: str):
        def build(d: Path) -> None:
            self.calls += 1
            (d / "payload.txt").write_text(payload)
            (d / "sub").mkdir()
            (d / "sub" / "n.json").write_text(json.dumps({"calls": self.calls}))
        return build


def test_miss_then_hit_full_sha256_key(tmp_path):
    cache, count = Cache(tmp_path, versions=VERSIONS), Counter()
    key = {"weights_sha256": "1" * 64, "opset": 17}
    first = cache.get_or_create("export", key, count("a"))
    second = cache.get_or_create("export", key, count("b"))
    assert count.calls == 1 and first == second
    assert (second / "payload.txt").read_text() == "a"  # the stored result, not a second build's
    entry = first.parent
    assert re.fullmatch(r"[0-9a-f]{64}", entry.name)  # the whole sha256, never a prefix
    assert entry.name == cache.key_sha256("export", key)
    assert [e["result"] for e in cache.events] == ["miss", "hit"]
    assert cache.report()["export"] == "mixed"
    meta = json.loads((entry / ENTRY_MANIFEST).read_text())
    assert meta["key_material"]["key"] == key and meta["key_material"]["versions"] == VERSIONS
    assert set(meta["files"]) == {"payload.txt", "sub/n.json"}
    # nobody edits an entry in place: its files are read-only
    assert not os.access(second / "payload.txt", os.W_OK) or os.geteuid() == 0
    assert (os.stat(second / "payload.txt").st_mode & 0o222) == 0


def _tokenized(tiny_bert, texts):
    from compiler.stages.data import tokenize

    return tokenize(tiny_bert.tokenizer, texts, 32, tiny_bert.input_names)


def test_any_input_change_misses(tmp_path, tiny_bert):
    """A tool once returned another model's results from an 8-hex-digit key: here every input counts."""
    from compiler.core.schema import ExportConfig

    from compiler.stages.data import read_sentences, BUILTIN_DIR

    sentences = read_sentences(BUILTIN_DIR / "calibration.txt", "data.calibration_file")[:16]
    changed = list(sentences)
    changed[7] = changed[7].replace(changed[7].split()[0], "Nobody", 1)  # one word of one sentence
    assert changed != sentences
    base = {"weights_sha256": tiny_bert.weights_sha256, "export": ExportConfig(),
            "calibration_sha256": _tokenized(tiny_bert, sentences).sha256(), "method": "minmax"}
    variants = {
        "one calibration sentence": {**base, "calibration_sha256": _tokenized(tiny_bert, changed).sha256()},
        "the opset": {**base, "export": dataclasses.replace(ExportConfig(), opset=18)},
        "the exporter": {**base, "export": dataclasses.replace(ExportConfig(), exporter="dynamo")},
        "the weights": {**base, "weights_sha256": "0" + tiny_bert.weights_sha256[1:]},
        "the calibration method": {**base, "method": "entropy"},
        "an int that became a float": {**base, "method": 1.0},
    }
    count = Counter()
    Cache(tmp_path, versions=VERSIONS).get_or_create("ort_calibration", base, count("base"))
    seen = {Cache(tmp_path, versions=VERSIONS).key_sha256("ort_calibration", base)}
    for what, key in variants.items():
        cache = Cache(tmp_path, versions=VERSIONS)
        out = cache.get_or_create("ort_calibration", key, count(what))
        assert cache.events[-1]["result"] == "miss", what
        assert (out / "payload.txt").read_text() == what
        seen.add(cache.key_sha256("ort_calibration", key))
    for pkg in ("torch", "onnx", "onnxruntime", "nvidia-modelopt", "qcompile", "qcompile_source_sha256"):
        cache = Cache(tmp_path, versions={**VERSIONS, pkg: VERSIONS[pkg] + ".post1"})
        out = cache.get_or_create("ort_calibration", base, count(f"version of {pkg}"))
        assert cache.events[-1]["result"] == "miss", pkg
        assert (out / "payload.txt").read_text() == f"version of {pkg}"
        seen.add(cache.key_sha256("ort_calibration", base))
    assert len(seen) == 1 + len(variants) + 6 and count.calls == len(seen)
    # and the kind is part of the key too
    assert Cache(tmp_path, versions=VERSIONS).key_sha256("export", base) not in seen


def test_real_tool_versions_are_in_every_key():
    v = tool_versions()
    for pkg in ("torch", "onnx", "onnxruntime", "nvidia-modelopt", "qcompile"):
        assert v.get(pkg), pkg
    assert re.fullmatch(r"[0-9a-f]{64}", v["qcompile_source_sha256"])


def test_key_refuses_what_it_cannot_hash(tmp_path):
    with pytest.raises(TypeError, match="cannot hash a object"):
        Cache(tmp_path, versions=VERSIONS).key_sha256("export", {"model": object()})
    assert canonical_json({"b": 1, "a": [1.0, None]}) == '{"a":[1.0,null],"b":1}'


@pytest.mark.parametrize("damage", ["edit a file", "delete a file", "add a file", "delete entry.json",
                                    "truncate entry.json"])
def test_corrupt_or_partial_entry_is_rebuilt(tmp_path, damage):
    cache, count = Cache(tmp_path, versions=VERSIONS), Counter()
    key = {"k": damage}
    data = cache.get_or_create("export", key, count("good"))
    entry = data.parent
    target = data / "payload.txt"
    target.chmod(0o644)
    if damage == "edit a file":
        target.write_text("goad")  # same length, one byte changed
    elif damage == "delete a file":
        (data / "sub" / "n.json").unlink()
    elif damage == "add a file":
        (data / "extra.bin").write_bytes(b"\0")
    elif damage == "delete entry.json":  # a writer killed before it finished: no manifest
        (entry / ENTRY_MANIFEST).unlink()
    else:
        (entry / ENTRY_MANIFEST).write_text((entry / ENTRY_MANIFEST).read_text()[:40])
    again = Cache(tmp_path, versions=VERSIONS)
    out = again.get_or_create("export", key, count("rebuilt"))
    assert count.calls == 2 and again.events[-1]["result"] == "rebuilt"
    assert (out / "payload.txt").read_text() == "rebuilt"
    assert again.problem(out.parent, again.key_material("export", key)) is None
    third = Cache(tmp_path, versions=VERSIONS)
    third.get_or_create("export", key, count("never"))
    assert count.calls == 2 and third.events[-1]["result"] == "hit"


def test_failed_build_leaves_no_entry(tmp_path):
    cache = Cache(tmp_path, versions=VERSIONS)

    def boom(d: Path):
        (d / "half.onnx").write_text("half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        cache.get_or_create("export", {"k": 1}, boom)
    assert not cache.entry_dir("export", {"k": 1}).exists()
    assert list((tmp_path / "export").iterdir()) == []  # no temp dir left behind


def _race(args):
    root, start, i = args
    cache = Cache(Path(root), versions=VERSIONS)
    while time.time() < start:  # everybody misses at the same moment
        time.sleep(0.001)

    def build(d: Path):
        time.sleep(0.3)
        (d / "payload.txt").write_text(f"writer {i}")
        (d / "big.bin").write_bytes(os.urandom(1 << 16))

    out = cache.get_or_create("export", {"shared": True}, build)
    return str(out), (out / "payload.txt").read_text(), cache.events[-1]["result"]


def test_concurrent_writers_share_one_complete_entry(tmp_path):
    """Parallel sweep jobs: each writes a private temp dir and renames it; the loser uses the winner's."""
    start = time.time() + 1.5
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.map(_race, [(str(tmp_path), start, i) for i in range(4)])
    paths = {r[0] for r in results}
    assert len(paths) == 1, paths
    winner = (Path(paths.pop()) / "payload.txt").read_text()
    assert all(r[1] == winner for r in results)  # every job reads the same, complete entry
    cache = Cache(tmp_path, versions=VERSIONS)
    entry = cache.entry_dir("export", {"shared": True})
    assert cache.problem(entry, cache.key_material("export", {"shared": True})) is None
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [entry.name]  # no temp or trash left


def _spec(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from compiler.core.paths import RECIPES_DIR
    from compiler.stages.validate import validate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny_bert", "recipe=fp32", "target=ort",
                                                        f"cache.dir={tmp_path}", *overrides])
    GlobalHydra.instance().clear()
    return validate(cfg)


def test_cached_export_equals_a_fresh_export(tmp_path, tiny_bert):
    from compiler.stages.export import export_onnx

    spec = _spec(tmp_path / "c")
    cache = Cache(tmp_path / "c")
    a = cached_fp32_export(tiny_bert, spec, tmp_path / "a" / "export.onnx", cache)
    b = cached_fp32_export(tiny_bert, spec, tmp_path / "b" / "export.onnx", cache)
    fresh = export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names,
                        tmp_path / "f" / "export.onnx", spec.export)
    assert [e["result"] for e in cache.events] == ["miss", "hit"]
    assert a.read_bytes() == b.read_bytes() == fresh.read_bytes()
    assert os.access(b, os.W_OK)  # the copy belongs to the build, the entry stays read-only
    spec18 = _spec(tmp_path / "c", "export.opset=18")
    assert export_key(tiny_bert, spec18) != export_key(tiny_bert, spec)
    cached_fp32_export(tiny_bert, spec18, tmp_path / "d" / "export.onnx", cache)
    assert cache.events[-1]["result"] == "miss"


def test_builds_report_export_hit_and_miss(tmp_path):
    """Two builds with the same model and export settings: the second reuses the export, and its
    model.onnx is byte-identical; the report says which."""
    from compiler.rundir.cache import open_cache
    from compiler.pipeline import run_build

    fast = ["data.calibration_samples=8", "data.evaluation_samples=16", "data.seq_len=32", "bench.iterations=2",
            "bench.warmup=1", "bench.seq_len=32"]
    reports = []
    for name in ("one", "two"):
        spec = _spec(tmp_path / "cache", *fast)
        run_dir = tmp_path / name
        run_dir.mkdir()
        reports.append(run_build(spec, run_dir, cache=open_cache(spec.cache)))
    assert reports[0]["cache"]["export"] == "miss" and reports[1]["cache"]["export"] == "hit"
    assert reports[0]["cache"]["dir"] == str(tmp_path / "cache")
    assert (tmp_path / "one" / "model.onnx").read_bytes() == (tmp_path / "two" / "model.onnx").read_bytes()
    spec = _spec(tmp_path / "cache", *fast, "cache.enabled=false")
    assert open_cache(spec.cache) is None
    (tmp_path / "three").mkdir()
    assert run_build(spec, tmp_path / "three", cache=None)["cache"] == {"enabled": False}


def test_unwritable_cache_dir_disables_the_cache(tmp_path, caplog):
    from compiler.rundir.cache import open_cache
    from compiler.core.schema import CacheConfig

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert open_cache(CacheConfig(dir=str(blocker / "cache"))) is None
    assert "cache disabled" in caplog.text


@dataclasses.dataclass
class _NoParams:
    pass


def test_export_of_a_torch_quantized_module_is_not_cached(tmp_path):
    """Only the unmodified fp32 export is shared: after a torch-side step the export depends on the
    whole recipe, so it is built every time."""
    from compiler.rundir.cache import open_cache
    from compiler.pipeline import run_build
    from compiler.steps.base import STEP_REGISTRY, TORCH, Step

    class _TorchNoop(Step):
        name = "_test_torch_noop"
        Params = _NoParams
        runs_on = {"ort": TORCH, "torch": TORCH}
        summary = "test only"

        def apply_torch(self, module, ctx):
            return module

    try:
        spec = _spec(tmp_path / "cache", "+recipe.steps._test_torch_noop={}", "data.evaluation_samples=16",
                     "data.seq_len=32", "bench.iterations=2", "bench.warmup=1", "bench.seq_len=32",
                     "bench.baseline=none")  # the bench's fp32 baseline would share the (fp32) export
        assert [s.name for s in spec.torch_steps] == ["_test_torch_noop"]
        (tmp_path / "run").mkdir()
        report = run_build(spec, tmp_path / "run", cache=open_cache(spec.cache))
    finally:
        STEP_REGISTRY.pop("_test_torch_noop", None)
    assert "export" not in report["cache"] and [e for e in report["cache"]["entries"] if e["kind"] == "export"] == []
    assert not (tmp_path / "cache" / "export").exists()


def test_warm_build_copies_the_onnx_step_and_never_loads_the_module(tmp_path, monkeypatch):
    """The warm default build: a second build of the same recipe takes the quantized graph from the cache (the
    step does not run again) and the module's facts from the cache (the torch module never loads: no export,
    reference output or step needs it); model.onnx and the step's report are those of the first build. A
    different step parameter runs the step again."""
    from compiler.pipeline import run_build
    from compiler.rundir.cache import open_cache
    from compiler.stages import models
    from compiler.steps.int8_static import Int8StaticStep

    calls = {"apply_onnx": 0, "load": 0}
    apply_onnx, load_wrapped = Int8StaticStep.apply_onnx, models._load_wrapped

    def counted_apply(self, *a, **k):
        calls["apply_onnx"] += 1
        return apply_onnx(self, *a, **k)

    def counted_load(*a, **k):
        calls["load"] += 1
        return load_wrapped(*a, **k)

    monkeypatch.setattr(Int8StaticStep, "apply_onnx", counted_apply)
    monkeypatch.setattr(models, "_load_wrapped", counted_load)
    fast = ["recipe=int8_static", "data.calibration_samples=8", "data.evaluation_samples=16", "data.seq_len=32",
            "bench.iterations=2", "bench.warmup=1", "bench.seq_len=32", "bench.rounds=1", "bench.profile=false"]
    reports, seen = [], []
    for name, extra in (("one", []), ("two", []), ("three", ["recipe.steps.int8_static.per_channel=false"])):
        spec = _spec(tmp_path / "cache", *fast, *extra)
        (tmp_path / name).mkdir()
        reports.append(run_build(spec, tmp_path / name, cache=open_cache(spec.cache)))
        seen.append(dict(calls))
    assert seen[0] == {"apply_onnx": 1, "load": 1}  # cold: the step ran, the module loaded once (export + reference)
    assert seen[1] == seen[0]  # warm: neither ran again
    assert seen[2]["apply_onnx"] == 2 and seen[2]["load"] == 1  # another parameter: the step runs, the module stays
    one, two = reports[0], reports[1]
    assert one["cache"]["onnx_step"] == "miss" and two["cache"]["onnx_step"] == "hit"
    assert one["cache"]["model_facts"] == "miss" and two["cache"]["model_facts"] == "hit"
    assert one["cache"]["graph_flops"] == "miss" and two["cache"]["graph_flops"] == "hit"
    assert two["bench"]["flops"] == one["bench"]["flops"] and one["bench"]["flops"]["gflop"] > 0
    assert (tmp_path / "one" / "model.onnx").read_bytes() == (tmp_path / "two" / "model.onnx").read_bytes()
    assert two["steps"]["int8_static"] == {**one["steps"]["int8_static"], "calibration_cache": "hit"}
    assert two["model"] == one["model"] and two["check"]["fidelity"] == one["check"]["fidelity"]


def test_model_facts_from_the_cache_equal_a_loaded_model(tmp_path, tiny_bert):
    """load_model with a cache: the facts a build reads (content hash, input names, roles in forward order,
    vocabulary, parameters) equal those of an eager load, and the module loads on first use with the same
    weights."""
    from compiler.stages.models import load_model, state_dict_sha256
    from tests.conftest import model_cfg

    cache = Cache(tmp_path)
    first = load_model(model_cfg("tiny_bert"), cache=cache)  # miss: loads the module to read its facts
    lazy = load_model(model_cfg("tiny_bert"), cache=cache)
    assert [e["result"] for e in cache.events] == ["miss", "hit"]
    assert first.module_loaded and not lazy.module_loaded
    for f in ("weights_sha256", "input_names", "output_names", "vocab", "parameters", "labels"):
        assert getattr(lazy, f) == getattr(tiny_bert, f), f
    assert list(lazy.roles.role.items()) == list(tiny_bert.roles.role.items())
    assert lazy.roles.index == tiny_bert.roles.index
    assert lazy.parameters == sum(p.numel() for p in tiny_bert.module.parameters())
    assert state_dict_sha256(lazy.module) == tiny_bert.weights_sha256 and lazy.module_loaded
