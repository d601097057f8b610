"""pareto.png of a sweep: the summary's two axes, the Pareto front, labels placed so they do not overlap."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, List, Sequence, Tuple

from compiler.commands.sweep.axes import COSINE, LATENCY, choose_axes, _measured, search_objectives
from compiler.commands.sweep.row import Row
from compiler.commands.sweep.tables import speed_note, varied_keys
from compiler.core.status import Status


def plot_pareto(rows: Sequence[Row], path: Path, title: str = "") -> Path:
    """The summary's two axes (choose_axes: same-run speed ratio or latency against embedding cosine; size
    against task-metric drop for a repair-budget sweep), Pareto front marked. A cosine axis is 1 - cosine on
    a log scale, labelled in cosine: 0.99, 0.999 and 0.9999 stay apart. A search's front is over all of its
    objectives, so its points are circled without the 2-D staircase."""
    import matplotlib

    matplotlib.use("Agg")  # no display: sweeps run headless
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    keys = varied_keys(rows)
    xa, ya = choose_axes(rows)
    pts = _measured(rows, (xa, ya))
    floor = 1e-7  # fp32 has cosine 1.0 exactly: 1 - cos = 0 has no place on a log axis
    log_y = ya is COSINE

    def X(r: Row) -> float:
        return xa.get(r)

    def Y(r: Row) -> float:
        return max(1 - ya.get(r), floor) if log_y else ya.get(r)

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    if not pts:
        ax.text(0.5, 0.5, f"no run finished with {xa.key} and {ya.key} numbers", ha="center", va="center",
                transform=ax.transAxes)
    for status, marker, color in ((Status.PASSED, "o", "tab:blue"), (Status.GATE_FAILED, "x", "tab:red")):
        sel = [r for r in pts if r.status == status]
        if sel:
            ax.scatter([X(r) for r in sel], [Y(r) for r in sel], marker=marker, color=color, s=45, label=status,
                       zorder=3)
    names = search_objectives(rows)
    front = sorted((r for r in pts if r.pareto), key=X)
    if front:
        if not names:  # the 2-D front's staircase: each step's corner is the point it is beaten from
            ax.step([X(r) for r in front], [Y(r) for r in front], where="pre" if xa.higher_is_better else "post",
                    color="tab:green", lw=1.5, zorder=2, label="Pareto front")
        ax.scatter([X(r) for r in front], [Y(r) for r in front], s=160, facecolors="none", edgecolors="tab:green",
                   lw=1.5, zorder=4, label=f"Pareto front over {', '.join(names)}" if names else None)
    label, legend_note = _plot_labeller(rows, keys)
    if pts:
        ys = [Y(r) for r in pts]
        if log_y:
            ax.set_yscale("log")
            ax.set_ylim(max(ys) * 4, min(ys) / 4)  # inverted: up = closer to fp32

            def as_cosine(y, _pos=None):  # tick at 1 - cos = y, labelled as the cosine with the digits it needs
                return f"{1 - y:.{max(1, math.ceil(round(-math.log10(y), 6)))}f}" if y > 0 else "1"

            ax.yaxis.set_major_formatter(FuncFormatter(as_cosine))
            # minor ticks (2..9 x 10^-k) get labels only when the plot spans less than ~1.5 decades
            few = math.log10(max(ys) * 4) - math.log10(min(ys) / 4) <= 1.6
            if few:
                ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
            ax.yaxis.set_minor_formatter(FuncFormatter(as_cosine) if few else NullFormatter())
        else:
            ax.margins(y=0.15)
        ax.margins(x=0.15)  # room for the labels of the rightmost points
        xs = [X(r) for r in pts]
        if xa is LATENCY and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        else:
            lo, hi = ax.get_xlim()
            ax.set_xlim(max(lo, 0.0), hi)  # the label margin must not invent negative latencies, sizes or ratios
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(xa.label)
    ax.set_ylabel(ya.label)
    title = title or f"qcompile sweep: {xa.key} vs {ya.key}"
    note = speed_note(rows, keys)  # runs without a same-run ratio are said on the plot, not silently left off
    ax.set_title("\n".join([title] + textwrap.wrap(note, 110)), fontsize=10 if not note else 8)
    if legend_note:
        fig.text(0.01, 0.01, legend_note, fontsize=7, color="dimgray")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    if pts:
        _place_labels(fig, ax, [(label(r), (X(r), Y(r))) for r in pts])
    fig.savefig(path, metadata={"Software": None})  # no matplotlib version stamp: same rows, same bytes
    plt.close(fig)
    return Path(path)


def _place_labels(fig, ax, labelled: Sequence[Tuple[str, Tuple[float, float]]]) -> None:
    """Greedy label placement (matplotlib has no label repulsion): each label takes the first of eight
    spots around its point that covers no placed label, no point and nothing outside the axes, else the
    spot that covers least."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = []
    for _, xy in labelled:
        px, py = ax.transData.transform(xy)
        dots.append(Bbox.from_extents(px - 4, py - 4, px + 4, py + 4))

    def area(b) -> float:
        return 0.0 if b is None else max(b.width, 0) * max(b.height, 0)

    spots = [(6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"), (-6, -4, "right", "top"),
             (0, 9, "center", "bottom"), (0, -9, "center", "top"), (9, 0, "left", "center"), (-9, 0, "right", "center")]
    placed: List[Any] = []
    for text, xy in sorted(labelled, key=lambda t: (t[1][0], t[1][1])):
        best = None
        for dx, dy, ha, va in spots:
            ann = ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=7)
            ann.set_in_layout(False)  # long labels must not shrink the axes
            box = ann.get_window_extent(renderer)
            cost = (sum(area(Bbox.intersection(box, o)) for o in placed + dots)
                    + area(box) - area(Bbox.intersection(box, frame)))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])


def _plot_labeller(rows: Sequence[Row], keys: Sequence[str]):
    """Point labels: recipe/target (when either varies) and the values of the varied overrides, the
    keys named once in a note under the plot (a calibration sweep: 'entropy, 64')."""
    names = [k.rsplit(".", 1)[-1] for k in keys]
    if len(set(names)) < len(names):
        names = list(keys)
    with_label = len({r.label for r in rows}) > 1 or not keys

    def label(r: Row) -> str:
        parts = ([r.label] if with_label else []) + [r.overrides.get(k, "-") for k in keys]
        if r.fallback_layers is not None:  # a repair search: what the budget cost
            parts.append(f"{r.fallback_layers} fallback")
        if r.artifact_mb is not None and "artifact_mb" in r.objectives:  # a search's third axis, off the plot
            parts.append(f"{r.artifact_mb:.1f} MB")
        return ", ".join(parts)

    note = ("points: " + ", ".join((["recipe/target"] if with_label else []) + names)) if keys else ""
    return label, note
