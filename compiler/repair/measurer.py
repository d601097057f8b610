"""The interface both measurers (torch_measure.TorchMeasurer, onnx_measure.OnnxMeasurer) offer the orchestration
(run.py): the search only ever calls measure(fallback_layers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Measurer(Protocol):
    """Built for one build's side with the ranking rows; then:
    start(score) -> the layers to search over (forward order); score(batches) turns one forward's outputs into
      a measurement (metric.Scorer), after which
    measurer(fallback_layers) -> that measurement of the build with those layers in the fallback (memoized);
    sensitivity(confirm_top) -> the per-layer sensitivity (search.sensitivity_unless_met's compute);
    key() -> what the sensitivity depends on beyond the build's inputs (cache key);
    finish(chosen) -> counts for report.json's repair.seconds."""

    reference_batches: list[dict[str, np.ndarray]]  # the fp32 outputs, per batch, in the measurer's batches
    unsort: np.ndarray | None  # puts the measurer's rows back in evaluation order (None: in order)
    roles: dict[str, str]
    counts: dict[str, int]  # weights per layer (the size estimate)

    def start(self, score) -> list[str]: ...

    def __call__(self, fallback_layers) -> Any: ...

    def sensitivity(self, confirm_top: int) -> dict[str, Any]: ...

    def key(self) -> dict[str, Any]: ...

    def finish(self, chosen: Sequence[str]) -> dict[str, Any]: ...
