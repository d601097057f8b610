"""What a repair search leaves behind: sensitivity.json and sensitivity.png (the chosen layers marked), layers.yaml
(every quantized layer's format), the REPORT.md section (the budget and where it came from, which constraint
decided the map, the path) and the one line an unmet budget exits with."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compiler.repair.result import RepairResult

log = logging.getLogger("qcompile")


def write_outputs(run_dir: Path, result: RepairResult) -> dict[str, str]:
    """sensitivity.json and sensitivity.png (chosen layers marked): records of the search, like report.json."""
    run_dir = Path(run_dir)
    (run_dir / "sensitivity.json").write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    out = {"sensitivity": "sensitivity.json"}
    try:
        _plot(run_dir / "sensitivity.png", result)
        out["plot"] = "sensitivity.png"
    except (ImportError, RuntimeError, ValueError, OSError) as e:  # no plot must not fail a build with its numbers
        log.warning("sensitivity.png not written: %s", e)
    return out


def write_layers_yaml(run_dir: Path, roles: dict[str, str], primary: dict[str, str], layer_map: dict[str, str]) -> Path:
    """layers.yaml: every quantized layer (forward order) with its role and format; the same bytes whether the
    map was searched or replayed, so a rebuild reproduces it."""
    lines = ["# per-layer precision of this build (recipe.repair.layers holds the fallbacks and replays them)"]
    for name in [n for n in roles if n in primary or n in layer_map]:
        fmt = layer_map.get(name, primary.get(name))
        lines.append(f"{name}: {{role: {roles.get(name) or 'other'}, format: {fmt}}}")
    path = Path(run_dir) / "layers.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plot(path: Path, result: RepairResult) -> None:
    # matplotlib only here: optional and slow to import; without it the build keeps its numbers (write_outputs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [x["name"] for x in result.layers]
    vals = [x["gain"] if x["gain"] is not None else 0.0 for x in result.layers]
    colors = ["tab:red" if n in result.chosen else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 4.5))
    ax.bar(range(len(names)), vals, color=colors)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.removeprefix("inner.") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel(f"{result.metric_name} gain with the layer in {result.fallback}")
    ax.set_title("no layer measured alone: the all-quantized build met the budget" if result.sensitivity_skipped
                 else f"per-layer sensitivity (red: fell back to {result.fallback}; unmeasured layers at 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)




def report_markdown(result: RepairResult) -> str:
    """The REPORT.md section: the budget and its source, which constraint decided the map, fallen-back layers, the
    metric after each search step, size before / after."""
    probes = result.curve
    first = probes[0]
    final = next((p for p in reversed(probes) if p.fallback_layers == len(result.chosen)), probes[-1])
    conditions = [f"- {c.label()}" for c in result.conditions]
    out = ["", "## Repair (per-layer mixed precision)", "",
           result.budget.note(result.metric_name), "",
           (f"Budget: {result.metric_name} drop <= {result.max_drop:g}; fallback {result.fallback}; "
            f"{len(result.chosen)} of {result.total} quantized layers fell back "
            f"(at most {result.allowed} allowed); strategy {result.strategy}, "
            f"{len(result.probes)} search points measured."), "",
           *(["Gate thresholds the map must also meet (measured on the ranking rows):", *conditions, ""]
             if conditions else []),
           result.decided_sentence(), "",
           "| layers in fallback | change | " + result.metric_name + " | drop | weight bytes | unmet |",
           "|---|---|---|---|---|---|"]
    for p in probes:
        unmet = ", ".join("budget" if n == "metric" else n for n in p.unmet) or "-"
        out.append(f"| {p.fallback_layers} | {p.change} | {p.metric:.5f} | {p.drop:.5f} | {p.weight_bytes} | {unmet} |")
    out += ["", (f"Linear weights: {first.weight_bytes} bytes all {result.primary_format} -> "
                 f"{final.weight_bytes} bytes with the fallbacks."), "",
            *([f"No per-layer sensitivity: {result.sensitivity_skipped}.", ""] if result.sensitivity_skipped else []),
            "| layer | role | proxy error | measured gain | format |", "|---|---|---|---|---|"]
    for x in result.layers:
        fmt = result.fallback if x["name"] in result.chosen else result.primary_format
        gain = "-" if x["gain"] is None else f"{x['gain']:.5f}"
        proxy = "-" if x["proxy_error"] is None else f"{x['proxy_error']:.4f}"
        out.append(f"| {x['name']} | {x['role'] or 'other'} | {proxy} | {gain} | {fmt} |")
    return "\n".join(out) + "\n"


# after a training step, a map given by hand is trained on (compiler/pipeline.py): measured on MiniLM, 8 FP8 layers
# so reached the cosine the train-first search needed 20 for (docs/repair.md)
AFTER_TRAINING_FIX = ("; or give the first layers of the search in sensitivity.json as recipe.repair.layers with "
                      "recipe.repair.enabled=false: the training then runs on that map, which needed fewer layers "
                      "(docs/repair.md)")


def unmet_message(result: RepairResult, after_training: bool = False) -> str:
    """The one line an unmet repair exits with: what it would take, the best point within the allowed layers (and,
    where a training ran before the search, the map-first alternative)."""
    within = [p for p in result.curve if p.fallback_layers <= result.allowed]
    best = min(within, key=lambda p: (len(p.unmet), p.drop))
    need = result.needed
    frac = result.fraction
    head = (f"budget met with {need} of {result.total} layers in {result.fallback}; "
            f"max_fallback_fraction={frac:g} allows {result.allowed}" if need else
            f"budget not met even with all {result.total} layers in {result.fallback}")
    gates = [result.label(n) for n in best.unmet if n != "metric"]
    # 6 significant digits: a tight budget (1e-6) beside a 5-decimal drop read "drop 0.00000 > 1e-06"
    return (f"{head} (best within it: {result.metric_name} {best.metric:.6g}, drop {best.drop:.6g} "
            f"{'>' if 'metric' in best.unmet else '<='} {result.budget.key} {result.max_drop:g} with "
            f"{best.fallback_layers} layers{'; unmet: ' + '; '.join(gates) if gates else ''}) -- "
            + (f"raise recipe.repair.max_fallback_fraction to {need / result.total:.2f}" if need else
               "use a wider fallback (fp32) or a looser budget") + (AFTER_TRAINING_FIX if after_training else ""))
