"""Sweep summaries: one row per run of a multirun (read from each run directory's report.json, failed and
impossible runs included) written as summary.md, summary.csv and pareto.png in the sweep directory, by a Hydra
callback at the end of `qcompile -m ...` or by `qcompile summarize <sweep dir>`.

By job: row (a run as the summary sees it), runs (reading a sweep directory), axes (the summary's axes and the
Pareto front), tables (summary.md, summary.csv), plot (pareto.png), callback (the Hydra callback, the sweep's
exit code, `qcompile summarize`). The names below are the package's interface."""

from compiler.commands.sweep.axes import (COSINE, DROP, LATENCY, REPAIR_DROP, REPAIR_SIZE, SIZE, SPEEDUP, Axis,
                                          choose_axes, mark_pareto, pareto_front, pareto_front_min, ratio_missing)
from compiler.commands.sweep.callback import (SWEEP_OUTCOME, SweepSummary, read_sweep_exit_code, summarize_main,
                                              sweep_exit_code, write_summary)
from compiler.commands.sweep.plot import plot_pareto
from compiler.commands.sweep.row import STATUS_ORDER, Row
from compiler.commands.sweep.runs import JOBS_DIR, collect_rows, is_run_dir, read_job_records, read_run
from compiler.commands.sweep.tables import CSV_COLUMNS, render_markdown, varied_keys, write_csv

__all__ = ["COSINE", "DROP", "LATENCY", "REPAIR_DROP", "REPAIR_SIZE", "SIZE", "SPEEDUP", "Axis", "choose_axes",
           "mark_pareto", "pareto_front", "pareto_front_min", "ratio_missing", "SWEEP_OUTCOME", "SweepSummary",
           "read_sweep_exit_code", "summarize_main", "sweep_exit_code", "write_summary", "plot_pareto",
           "STATUS_ORDER", "Row", "JOBS_DIR", "collect_rows", "is_run_dir", "read_job_records", "read_run",
           "CSV_COLUMNS", "render_markdown", "varied_keys", "write_csv"]
