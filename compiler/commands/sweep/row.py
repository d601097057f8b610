"""One run of a sweep as the summary sees it: a Row, filled from the run's typed report (runs.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from compiler.core.status import Status

# statuses of a row, in the order a summary counts them
STATUS_ORDER = (Status.PASSED, Status.GATE_FAILED, Status.REPAIR_BUDGET_NOT_MET, Status.BUILD_FAILED,
                Status.INTERNAL_ERROR, Status.INTERRUPTED, Status.RECIPE_ERROR, Status.NOT_RUNNABLE, Status.INCOMPLETE)



@dataclass
class Row:
    """One run of a sweep."""

    num: Optional[int]
    model: str
    recipe: str
    target: str
    status: str
    run_dir: str = ""  # relative to the sweep directory ("" for recipe errors: no directory is kept)
    overrides: Dict[str, str] = field(default_factory=dict)  # the job's command-line overrides
    artifact_mb: Optional[float] = None
    ms_per_sample: Optional[float] = None
    samples_per_s: Optional[float] = None
    # the build's speed over its fp32 engine timed in the same run (compiler/stages/bench/): unlike
    # ms_per_sample it compares across sweep points run while the machine's load changed
    speedup_vs_fp32: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    embedding_cosine: Optional[float] = None
    top1_agreement: Optional[float] = None
    # the gated (or default) task metric against gold labels: its name and drop, fp32 minus target
    task_metric: str = ""
    task_drop: Optional[float] = None
    # a build that ran the repair search (compiler/repair/): its budget, and where it met it, how many
    # layers fell back and the drop of the budgeted metric it measured with them
    repair_budget: Optional[float] = None
    fallback_layers: Optional[int] = None
    repair_metric: str = ""
    repair_drop: Optional[float] = None
    # the quantized layers' weights at their formats (the repair's count: 4-bit + scales, fp8, fp32), MB: unlike
    # artifact_mb it shrinks on target=torch too, whose engine.pt keeps fake-quant weights in fp32
    repair_weight_mb: Optional[float] = None
    fp32_self: bool = False  # an fp32 build, its own baseline: speed ratio 1 by definition
    # what the job returned to the sweeper (compiler/commands/search.py), None where the build measured none
    objectives: Dict[str, Optional[float]] = field(default_factory=dict)
    reason: str = ""
    cache: str = ""
    pareto: bool = False

    @property
    def label(self) -> str:
        return f"{self.recipe}/{self.target}"

