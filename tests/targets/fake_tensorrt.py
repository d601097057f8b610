"""A recording stand-in of TensorRT's Python API, enough for Polygraphy's loaders (NetworkFromOnnxPath,
CreateConfig, EngineFromNetwork, SaveEngine) to drive it: it records which calls the trt target's build
makes with which values (network flag, pool limit, profile, timing cache round trip). Not TensorRT: the
real API is exercised by the gpu tests, and the names used are checked against TensorRT's own binding
name lists (tests/targets/trt_api)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path


class _Enum:
    """A TensorRT enum: members as attributes, __members__, int() of each."""

    def __init__(self, *names):
        self.__members__ = {n: _Member(n, i) for i, n in enumerate(names)}
        for n, m in self.__members__.items():
            setattr(self, n, m)


class _Member(int):
    def __new__(cls, name, value):
        obj = int.__new__(cls, value)
        obj.name = name
        return obj

    def __repr__(self):
        return self.name

    __str__ = __repr__


class _HostMemory(bytes):
    """IHostMemory: a buffer usable as a context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make(calls, strongly_typed=True, parse_ok=True, inputs=("input_ids", "attention_mask"), sample=None):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0.35"

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        def __init__(self):
            pass

    trt.Logger, trt.ILogger = Logger, ILogger
    trt.NetworkDefinitionCreationFlag = _Enum(*(["STRONGLY_TYPED"] if strongly_typed else []))
    trt.BuilderFlag = _Enum("TF32", "REFIT")  # FP16 / INT8 flags are gone in TensorRT 11
    trt.MemoryPoolType = _Enum("WORKSPACE")
    trt.ProfilingVerbosity = _Enum("LAYER_NAMES_ONLY", "NONE", "DETAILED")
    trt.LayerInformationFormat = _Enum("ONELINE", "JSON")
    trt.LayerType = _Enum("SHAPE", "QUANTIZE", "DEQUANTIZE")
    trt.DeviceType = _Enum("GPU", "DLA")
    trt.init_libnvinfer_plugins = lambda logger, ns: calls.append(("init_plugins",))

    class Tensor:
        def __init__(self, name):
            self.name, self.is_shape_tensor, self.shape, self.dtype = name, False, (-1, -1), "INT64"

    class Network:
        num_inputs = len(inputs)

        def get_input(self, i):
            return Tensor(inputs[i])

        def get_flag(self, flag):
            return False

        def __iter__(self):
            return iter(())

    class Cache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return _HostMemory(self.blob + b"+tactics" if not self.blob.endswith(b"+tactics") else self.blob)

        def combine(self, other, ignore_mismatch):
            calls.append(("combine", other.blob))
            return True

    class Config:
        DLA_core, default_device_type, num_optimization_profiles = -1, None, 1

        def __init__(self):
            object.__setattr__(self, "cache", None)
            object.__setattr__(self, "pools", {})

        def set_memory_pool_limit(self, pool, size):
            calls.append(("pool", str(pool), size))
            self.pools[pool] = size

        def get_memory_pool_limit(self, pool):
            return self.pools.get(pool, 0)

        def get_flag(self, flag):
            return False

        def clear_flag(self, flag):
            pass

        def add_optimization_profile(self, p):
            calls.append(("profile", dict(p.shapes)))
            return 0

        def create_timing_cache(self, blob):
            calls.append(("create_timing_cache", bytes(blob)))
            return Cache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            object.__setattr__(self, "cache", cache)
            return True

        def get_timing_cache(self):
            return self.cache

        def __setattr__(self, k, v):
            if k == "profiling_verbosity":
                calls.append(("verbosity", str(v)))
            object.__setattr__(self, k, v)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, mid, hi):
            self.shapes[name] = (tuple(lo), tuple(mid), tuple(hi))

        def __bool__(self):
            return True

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return _HostMemory(b"PLAN:" + config.cache.blob)

    class Error:
        def __str__(self):
            return "In node 12 (importFallbackPluginImporter): UNSUPPORTED_NODE: no importer for op TRT_Bogus"

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            calls.append(("parse_from_file", Path(path).name))
            return parse_ok

        def get_error(self, i):
            return Error()

    class Engine:
        device_memory_size_v2 = 3 << 20

        def __init__(self, plan):
            self.plan = bytes(plan)

        def serialize(self):
            return _HostMemory(self.plan)

        def create_engine_inspector(self):
            return types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps(sample))

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            assert bytes(plan).startswith(b"PLAN:")
            return Engine(plan)

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


POLYGRAPHY_TRT_MODULES = ("polygraphy.backend.trt.loader", "polygraphy.backend.trt.config",
                          "polygraphy.backend.trt.util", "polygraphy.backend.trt.profile")


def install(monkeypatch, trt) -> None:
    """Make `import tensorrt` (and Polygraphy's lazily imported, cached `trt`) return the stand-in, or fail
    with ImportError when trt is None; monkeypatch undoes it after the test."""
    import importlib

    from polygraphy import mod

    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    lazy = mod.lazy_import("tensorrt")  # a fresh LazyModule: Polygraphy's own ones cache their first import
    for name in POLYGRAPHY_TRT_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "trt"):
            monkeypatch.setattr(module, "trt", lazy)
    util = importlib.import_module("polygraphy.backend.trt.util")
    monkeypatch.setattr(util, "TRT_LOGGER", None)
