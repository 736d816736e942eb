"""The quality-against-NFE plot of every evaluation (2-D and images): one panel per metric, the student at each
NFE and the teacher's sampler cut short on a log2 NFE axis, the full teacher as a dashed floor line.

    plot_frontier([FrontierPanel("FD / the full teacher's", {("student", 1): 1.08, ("teacher", 9): 1.26}, floor=1.0)],
                  "frontier.png", teacher_nfe=35)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class FrontierPanel:
    """One metric: ``values`` maps (model, nfe) -> value, model 'student' or 'teacher' (its sampler cut short);
    ``floor`` is the full teacher's value (None: none drawn); ``log``: a log value axis when the values span 10x."""
    title: str
    values: dict
    floor: Optional[float] = None
    ylabel: str = ""
    log: bool = True


def log_scale_if_wide(ax, values, ratio: float = 10.0) -> bool:
    """A log y axis when the positive ``values`` plotted span at least ``ratio`` (a teacher cut short can be 50
    times its full sampler's SWD), else linear: a log axis over a narrow range only spreads odd tick labels."""
    pos = [float(v) for v in values if v is not None and float(v) > 0]
    wide = bool(pos) and max(pos) >= ratio * min(pos)
    if wide:
        ax.set_yscale("log")
    return wide


def plot_frontier(panels: list[FrontierPanel], path, teacher_nfe: Optional[int] = None, title: str = "",
                  teacher_label: str = "teacher (sampler cut short)", floor_label: str = "teacher") -> str:
    """Draw ``panels`` side by side into ``path`` (PNG; returns it). ``teacher_nfe``: the full teacher's NFE, marked
    on the floor line and among the ticks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 4.5 * len(panels)), 4), squeeze=False)
    fig.subplots_adjust(wspace=0.3)
    if title:
        fig.suptitle(title, y=1.03)
    for ax, panel in zip(axes[0], panels):
        for who, label, style in (("student", "student", dict(color="tab:blue", marker="o")),
                                  ("teacher", teacher_label, dict(color="tab:orange", marker="s"))):
            pts = sorted((nfe, v) for (w, nfe), v in panel.values.items() if w == who)
            if pts:
                ax.plot(*zip(*pts), label=label, **style)
                for x, y in pts:
                    ax.annotate(f"{y:.4g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        if panel.floor is not None:
            ax.axhline(panel.floor, color="grey", linestyle="--", linewidth=1,
                       label=floor_label + (f" ({teacher_nfe} NFE)" if teacher_nfe else ""))
            if teacher_nfe:
                ax.plot([teacher_nfe], [panel.floor], color="grey", marker="*", markersize=9)
        nfes = sorted({nfe for _, nfe in panel.values} | ({teacher_nfe} if teacher_nfe else set()))
        ax.set_xscale("log", base=2)
        ax.set_xticks(nfes)
        ax.set_xticklabels([str(v) for v in nfes])
        ax.set(xlabel="network evaluations (NFE)", ylabel=panel.ylabel, title=panel.title)
        ax.margins(x=0.1, y=0.15)             # room for the value labels above the points
        if panel.log:
            log_scale_if_wide(ax, [*panel.values.values(), panel.floor])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)
