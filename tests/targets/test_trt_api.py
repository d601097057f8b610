"""TensorRT API guard without TensorRT: every `trt.<Name>` the targets use, every attribute they read or
method they call on a TensorRT object, and every name they probe with getattr/hasattr, must exist in the
names TensorRT 10.13 and 11.4's Python bindings export (tests/targets/trt_api/, extracted from the wheels by
extract_names.py). A name that exists in one version only must be probed (getattr / hasattr with a
fallback), never used directly."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
API = Path(__file__).parent / "trt_api"
VERSIONS = ("10.13.0.35", "11.4.0.106")
# the module that talks to TensorRT objects directly, and the names its TensorRT objects go by there
TRT_MODULES = {"targets/trt_build.py": {"trt", "builder", "network", "parser", "config", "engine", "cache",
                                        "previous", "runtime", "inspector"}}
PROBES = {"getattr", "hasattr"}


@cache
def exported(version: str) -> tuple[set[str], str]:
    """(names, the same joined with NULs): a name is exported when it is listed or the tail of a listed
    name (the linker stores "serialize" inside "deserialize")."""
    lines = [ln for ln in (API / f"tensorrt-{version}.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    return set(lines), "\0" + "\0".join(lines) + "\0"


def has(version: str, name: str) -> bool:
    names, joined = exported(version)
    return name in names or f"{name}\0" in joined


def _root(node) -> tuple[str, list[str]]:
    """(root variable, attribute chain) of x.a().b.c: ('x', ['a', 'b', 'c'])."""
    chain: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Name):
            return node.id, chain[::-1]
        else:
            return "", chain[::-1]


def used_names(source: str, objects: set[str]) -> dict[str, set[str]]:
    """name -> how it is used ('direct' or 'probed'), for every attribute of the TensorRT module and of
    TensorRT objects (variables named in `objects`) in the source."""
    out: dict[str, set[str]] = {}
    tree = ast.parse(source)
    # only the outermost attribute of a chain: its parts are collected from it
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            root, chain = _root(node)
            if root in objects:
                for name in chain:
                    out.setdefault(name, set()).add("direct")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PROBES
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            root, chain = _root(node.args[0])
            if root in objects:
                for name in chain:
                    out.setdefault(name, set()).add("direct")
                out.setdefault(str(node.args[1].value), set()).add("probed")
    return out


def problems(used: dict[str, set[str]]) -> list[str]:
    out = []
    for name, how in sorted(used.items()):
        present = [v for v in VERSIONS if has(v, name)]
        if not present:
            out.append(f"{name}: in no TensorRT version ({', '.join(VERSIONS)})")
        elif len(present) < len(VERSIONS) and "direct" in how:
            out.append(f"{name}: only in TensorRT {', '.join(present)}, used without a getattr/hasattr fallback")
    return out


def test_name_lists_are_the_two_bindings():
    for v in VERSIONS:
        names, _ = exported(v)
        assert len(names) > 4000 and {"OnnxParser", "ICudaEngine", "__version__"} <= names
        assert has(v, "Builder") and not has(v, "NoSuchTensorRTClass")
    # the documented differences: EXPLICIT_BATCH is gone in 11, STRONGLY_TYPED is in both
    assert has("10.13.0.35", "EXPLICIT_BATCH") and not has("11.4.0.106", "EXPLICIT_BATCH")
    assert all(has(v, "STRONGLY_TYPED") for v in VERSIONS)
    assert all(has(v, "serialize") for v in VERSIONS)  # stored as the tail of "deserialize"


@pytest.mark.parametrize("path", sorted(TRT_MODULES))
def test_every_tensorrt_name_the_target_uses_exists_in_both_versions(path):
    used = used_names((ROOT / path).read_text(), TRT_MODULES[path])
    # what the build really asks of TensorRT (a scan that finds nothing would pass anything)
    assert {"NetworkDefinitionCreationFlag", "MemoryPoolType", "WORKSPACE", "ProfilingVerbosity", "DETAILED",
            "create_engine_inspector", "get_engine_information", "LayerInformationFormat", "JSON",
            "get_timing_cache", "combine", "STRONGLY_TYPED", "device_memory_size_v2"} <= set(used), sorted(used)
    assert problems(used) == []


def test_only_trt_build_and_its_helpers_touch_tensorrt():
    """Other target modules reach TensorRT through Polygraphy or trt_build only (so the scan above is whole)."""
    for path in sorted((ROOT / "targets").glob("*.py")):
        rel = f"targets/{path.name}"
        if rel in TRT_MODULES:
            continue
        assert "trt" not in {r for r, _ in (_root(n) for n in ast.walk(ast.parse(path.read_text()))
                                            if isinstance(n, ast.Attribute))}, rel


def test_a_planted_name_fails():
    src = ("import tensorrt as trt\n"
           "flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)\n"
           "n = network.get_inptu(0)\n"
           "mem = getattr(engine, 'device_memory_size', None)\n"
           "ok = trt.BuilderFlag.TF32\n")
    found = problems(used_names(src, {"trt", "network", "engine"}))
    assert found == ["EXPLICIT_BATCH: only in TensorRT 10.13.0.35, used without a getattr/hasattr fallback",
                     "get_inptu: in no TensorRT version (10.13.0.35, 11.4.0.106)"]


def test_the_recording_stand_in_only_speaks_tensorrt():
    """tests/targets/fake_tensorrt.py, which the build tests drive through Polygraphy, invents no API:
    its classes, enums, enum values and methods all exist in both TensorRT versions."""
    import inspect

    from tests.targets import fake_tensorrt as FT

    fake = FT.make([], sample={})
    names = set()
    for attr, value in vars(fake).items():
        if attr.startswith("__") and attr != "__version__":
            continue
        names.add(attr)
        if isinstance(value, FT._Enum):
            names.update(value.__members__)
        elif inspect.isclass(value):
            names.update(n for n in vars(value) if not n.startswith("_"))
    assert {"Builder", "OnnxParser", "STRONGLY_TYPED", "WORKSPACE", "create_builder_config"} <= names
    assert [n for n in sorted(names) if not all(has(v, n) for v in VERSIONS)] == []
