"""Report stage: report.json (everything measured) and REPORT.md (the same, for people)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Union

from compiler.core.report_types import SCHEMA_PATH, Report, loss_text

# set (tests/conftest.py does, for every build the tests run, subprocesses included): each report.json written
# is checked against docs/report.schema.json, so a key no type declares fails the test that wrote it
VALIDATE_ENV = "QCOMPILE_VALIDATE_REPORTS"


def _clean(o):
    """JSON-safe: numpy scalars to Python, NaN/inf to strings, paths to str."""
    import numpy as np

    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else str(f)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, Path):
        return str(o)
    return o


def typed_report(report: Union[Report, dict[str, Any]]) -> Report:
    """The pipeline's report (a dict it fills stage by stage) as the typed Report: a declared key of the wrong
    type or a missing section raises here, before anything is written."""
    return report if isinstance(report, Report) else Report.from_dict(_clean(report))


def write_report_json(run_dir: Path, report: Union[Report, dict[str, Any]]) -> Path:
    """report.json: the typed report as JSON (NaN and infinities as strings), keys sorted."""
    data = _clean(typed_report(report).to_dict())
    if os.environ.get(VALIDATE_ENV):
        validate_report(data)
    path = Path(run_dir) / "report.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def validate_report(data: dict[str, Any]) -> None:
    """Raise ValueError naming each place where data breaks docs/report.schema.json."""
    # jsonschema is a dev dependency (the [dev] extra): imported only where a test asked for validation
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ValueError("report.json does not fit docs/report.schema.json (declare the key in "
                         "compiler/core/report_types.py and regenerate the schema): "
                         + "; ".join(f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message[:200]}"
                                     for e in errors[:5]))


def _fmt(v, nd=4):
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def _fidelity_rows(chk: dict[str, Any], gate: dict[str, Any]):
    f = chk.get("fidelity", {}) or {}
    if "label_agreement" in f:  # a classifier: its logits are compared as distributions, never by cosine
        return [("label agreement with fp32", f.get("label_agreement"), f">= {gate.get('min_top1_agreement')}"),
                ("mean KL(softmax(target) || softmax(fp32)), nats", f.get("kl_target_reference_mean"), ""),
                ("max abs logit difference", f.get("max_abs_logit_diff"), "")]
    return [("mean embedding cosine to fp32", f.get("embedding_cosine_mean"), f">= {gate.get('min_embedding_cosine')}"),
            ("min embedding cosine to fp32", f.get("embedding_cosine_min"), ""),
            ("retrieval top-1 agreement with fp32", f.get("top1_agreement"), f">= {gate.get('min_top1_agreement')}")]


def task_line(task: dict[str, Any]) -> str:
    """One line for the gated (or default) task metric: fp32 / target / drop with its 95% interval."""
    m = task["metric"]
    r = task["metrics"][m]
    lo, hi = r["drop_ci95"]
    budget = task.get("max_task_drop")
    return (f"{task['task']} {m}: fp32 {_fmt(r['fp32'])} / target {_fmt(r['target'])} / drop {_fmt(r['drop'])} "
            f"(95% interval [{_fmt(lo)}, {_fmt(hi)}], {task['examples']} examples"
            + (f", budget {budget})" if budget is not None else ", not gated)"))


def _task_lines(task) -> list:
    if not task:
        return []
    budget = task.get("max_task_drop")
    lines = [f"### Task metrics against gold labels ({task['task']}, {task['examples']} examples)", "",
             ("Drop = fp32 - target; its 95% interval is a paired bootstrap over the examples (1000 resamples, "
              "seed 0): an interval that holds 0 is within noise."), "",
             "| metric | fp32 | target | drop | 95% interval of the drop | budget |", "|---|---|---|---|---|---|"]
    for m, r in task["metrics"].items():
        lo, hi = r["drop_ci95"]
        gated = m == task["metric"] and budget is not None
        lines.append(f"| {m} | {_fmt(r['fp32'])} | {_fmt(r['target'])} | {_fmt(r['drop'])} | "
                     f"[{_fmt(lo)}, {_fmt(hi)}] | {'<= ' + str(budget) if gated else ''} |")
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    b = report.get("build", {})
    lines = [f"# qcompile: {b.get('model')} / {b.get('recipe')} / {b.get('target')}", ""]
    status = report.get("status", "?")
    lines.append(f"**Status: {status}**" + (f" -- {report.get('reason')}" if report.get("reason") else ""))
    lines.append("")
    steps = report.get("steps", {})
    if steps:
        lines += ["## Steps", "", "| step | where | details |", "|---|---|---|"]
        for name, info in steps.items():
            details = ", ".join(f"{k}={_fmt(v)}" for k, v in info.items()
                                if k not in ("where",) and not isinstance(v, (dict, list)))
            lines.append(f"| {name} | {info.get('where', '')} | {details} |")
        lines.append("")
    tf = report.get("transformer_fusion")
    if tf:  # export.transformer_fusion (compiler/graph/transformer_fusion.py)
        fused = ", ".join(f"{op} x{n}" for op, n in (tf.get("fused") or {}).items()) or "nothing"
        lines += [f"Transformer fusion ({tf.get('mode')}, on the {tf.get('applied_to')}, num_heads "
                  f"{tf.get('num_heads')}, hidden {tf.get('hidden_size')}, left out: "
                  f"{', '.join(tf.get('off') or []) or 'none'}): fused {fused}.", ""]
    chk = report.get("check")
    if chk:
        gate = report.get("gate", {})
        lines += ["## Check (Polygraphy, target vs fp32 reference)", "",
                  f"{chk.get('samples')} evaluation samples.", "",
                  "| output | cosine mean | cosine min | max abs diff | mean abs diff | median abs diff "
                  "| within atol/rtol |",
                  "|---|---|---|---|---|---|---|"]
        for name, s in chk.get("per_output", {}).items():
            lines.append(f"| {name} | {_fmt(s.get('cosine_mean'), 6)} | {_fmt(s.get('cosine_min'), 6)} | "
                         f"{_fmt(s.get('max_absdiff'))} | {_fmt(s.get('mean_absdiff'))} | "
                         f"{_fmt(s.get('median_absdiff'))} | "
                         f"{'yes' if s.get('tolerance_passed') else 'no'} |")
        lines += ["", "| fidelity to fp32 | value | gate |", "|---|---|---|"]
        lines += [f"| {label} | {_fmt(value, 6)} | {bound} |" for label, value, bound in _fidelity_rows(chk, gate)]
        lines.append("")
        lines += _task_lines(chk.get("task"))
        if chk.get("gate_failures"):
            lines += ["### Gate failures", ""] + [f"- {f}" for f in chk["gate_failures"]] + [""]
        else:
            lines += ["Gate: passed.", ""]
    lines += loss_sources_lines(report.get("loss_sources"))
    bench = report.get("bench")
    if bench:
        lines += ["## Bench", "", "| metric | value |", "|---|---|"]
        for k in ("batch_size", "seq_len", "threads", "latency_ms_p50", "latency_ms_p90", "ms_per_sample",
                  "samples_per_s", "peak_rss_mb", "artifact_mb"):
            if k in bench:
                lines.append(f"| {k} | {_fmt(bench[k], 3)} |")
        lines += speed_lines(bench, report.get("int8_probe"))
        lines.append("")
        if bench.get("profile") or bench.get("scaling"):
            # why: the bench package imports the export stage (torch); the CLI reads this module on --help
            from compiler.stages.bench import op_profile, scaling

            if bench.get("profile"):
                lines += op_profile.markdown_lines(bench["profile"]) + [""]
            if bench.get("scaling"):
                lines += scaling.markdown_lines(bench["scaling"]) + [""]
    rails = report.get("doctor")
    if rails:
        lines += ["## Guard rails", "", "| rail | status | details |", "|---|---|---|"]
        for r in rails:
            lines.append(f"| {r.get('rail')} | {r.get('status')} | {r.get('message', '')} |")
        lines.append("")
    notes = report.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lower = report.get("lower")
    if lower:
        lines += ["## Lowering", "", "```json", json.dumps(_clean(lower), indent=2, sort_keys=True)[:4000], "```", ""]
    return "\n".join(lines)


LOSS_ROW_LABELS = {"weights_only": "4-bit weights only", "activations_only": "4-bit activations only",
                   "both": "the build: everything it quantizes"}


def loss_sources_lines(ls: dict[str, Any] | None) -> list[str]:
    """The "Where the 4-bit loss comes from" table (report.json loss_sources, compiler/repair/loss_sources.py)."""
    if not ls:
        return []
    lines = ["## Where the 4-bit loss comes from", ""]
    if ls.get("skipped"):
        return lines + [f"Not measured: {ls['skipped']}.", ""]
    metric = ls.get("metric")
    how = "read from the cache" if ls.get("cached") else f"{ls.get('forwards')} forwards"
    lines += [f"Loss = 1 - {metric} against fp32 on the {ls.get('rows')} evaluation rows ({ls.get('measured_on')}; "
              f"{how}). Each row quantizes only what it names; everything else stays fp32.", "",
              "| quantized | layers | loss | share of the build's loss |", "|---|---|---|---|"]
    both = (ls.get("operands") or {}).get("both", {}).get("loss")

    def cells(r):
        if r.get("loss") is None:
            return f"| n/a ({r.get('not_applicable')}) | |"
        share = f"{r['loss'] / both:.0%}" if both else ""
        return f"| {loss_text(r['loss'])} | {share} |"

    operands = ls.get("operands") or {}
    for key in [k for k in LOSS_ROW_LABELS if k in operands] + [k for k in operands if k not in LOSS_ROW_LABELS]:
        r = operands[key]
        lines.append(f"| {LOSS_ROW_LABELS.get(key, key)} | {r.get('layers') or ''} {cells(r)}")
    roles = ls.get("roles") or {}  # largest loss first, a role without quantized layers last
    for role in sorted(roles, key=lambda k: (roles[k].get("loss") is None, -(roles[k].get("loss") or 0.0), k)):
        r = roles[role]
        lines.append(f"| only the {role} layers | {r.get('layers') or ''} {cells(r)}")
    return lines + ["", str(ls.get("reading", "")), ""]


def speed_lines(bench: dict[str, Any], probe: dict[str, Any] | None) -> list[str]:
    """The same-run ratio to fp32, the fraction of the machine's peak and the data-shape figure, each
    saying what it measured (compiler/stages/bench/)."""
    lines = []
    if "speedup_vs_fp32" in bench:
        lo, hi = bench["speedup_vs_fp32_spread"]
        lines += [f"| speedup_vs_fp32 (same run, {bench.get('speedup_clock')}) | {bench['speedup_vs_fp32']:.3f} "
                  f"(rounds {lo:.2f}..{hi:.2f}) |",
                  f"| fp32 latency_ms_p50 (same run) | {_fmt(bench.get('fp32_latency_ms_p50'), 3)} |"]
    for k in ("fraction_of_fp32_peak", "fp32_fraction_of_fp32_peak"):
        if k in bench:
            lines.append(f"| {k} ({bench['flops']['gflop']:.3g} GFLOP / {bench['fp32_peak_gflops']:.1f} GFLOP/s) | "
                         f"{bench[k]:.2f} |")
    if probe and "int8_gemm_vs_fp32" in probe:
        lines.append(f"| int8 probe ({probe.get('runtime')} matrix product {probe.get('shape_mkn')}) | int8 "
                     f"{probe['int8_gemm_vs_fp32']:.2f}x fp32 |")
    data = bench.get("data_shapes") or {}
    if "pass_ms_median" in data:
        speed = f", {data['speedup_vs_fp32']:.3f}x fp32" if "speedup_vs_fp32" in data else ""
        lines.append(f"| {data['shapes']} | {data['sentences_per_s']:.1f} sentences/s, p50 "
                     f"{data['latency_ms_p50']:.2f} ms per batch{speed} |")
    lines += ["", f"Shapes: {bench.get('shapes', '')}. Baseline: {bench.get('baseline', 'none')}."]
    return lines


def write_report(run_dir: Path, report: Union[Report, dict[str, Any]]) -> Path:
    """report.json (through the typed Report, with schema_version) and REPORT.md."""
    typed = typed_report(report)
    write_report_json(run_dir, typed)
    path = Path(run_dir) / "REPORT.md"
    path.write_text(render_markdown(typed.to_dict()))
    return path
