"""Polygraphy runners qcompile needs and Polygraphy lacks: a CPU torch runner (PytRunner always
moves inputs to CUDA) and a runner over any feed -> outputs callable."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Dict, List

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata


class CallableRunner(BaseRunner):
    """Wraps a callable feed -> {name: array} (a target's predictor) as a Polygraphy runner."""

    def __init__(self, predict: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]],
                 input_names: List[str], output_names: List[str], name: str = "qcompile"):
        super().__init__(name=name, prefix="qcompile-runner")
        self._predict = predict
        self._input_names = list(input_names)
        self.output_names = list(output_names)

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for n in self._input_names:
            meta.add(n, dtype=np.int64, shape=("batch", "seq"))
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        out = self._predict(feed_dict)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((n, np.asarray(out[n], dtype=np.float32)) for n in self.output_names)

    def deactivate_impl(self):
        pass


def torch_predictor(module, input_names: List[str], output_names: List[str], device: str = "cpu"):
    """feed -> outputs for a torch module taking the inputs positionally (the export wrapper)."""
    import torch

    def predict(feed):
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feed[n])).to(device) for n in input_names]
            outs = module(*args)
        if not isinstance(outs, (tuple, list)):
            outs = (outs,)
        return {n: o.detach().float().cpu().numpy() for n, o in zip(output_names, outs)}

    return predict
