"""The leaderboard page's figures, drawn with matplotlib as SVG text (the same records give the same bytes).

Every figure has one panel per suite, at most :data:`MAX_SERIES` defenses per panel (the best ranked in that
suite; the others are in the tables), a colour-blind-safe palette (Okabe-Ito) with a line style per colour cycle,
and axes labelled with their units. A defense keeps its colour and style in every panel and figure.
"""

from __future__ import annotations

import io
from itertools import product

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmark.running.metrics import HEADLINE_BUDGET, SIDE_EFFECT_CAP  # noqa: E402
from benchmark.reporting.ranking import SUITES, Standing  # noqa: E402

MAX_SERIES = 8
#: Okabe & Ito (2008), "Color universal design": distinguishable with every common colour-vision deficiency
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#000000", "#F0E442")
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")

RC = {"svg.hashsalt": "sae-recovery-benchmark", "svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10,
      "axes.grid": True, "grid.alpha": 0.3}


def styles(standing: list[Standing]) -> dict[str, dict]:
    """One colour, line style and marker per defense, in rank order (colours first, then styles)."""
    combos = list(product(LINE_STYLES, OKABE_ITO))
    return {s.defense: {"color": c, "linestyle": ls, "marker": MARKERS[LINE_STYLES.index(ls)]}
            for s, (ls, c) in zip(standing, combos * (1 + len(standing) // len(combos)))}


def _top(standing: list[Standing], suite: str) -> list[Standing]:
    """The defenses with a cell with valid flips in ``suite``, best area there first, at most :data:`MAX_SERIES`."""
    have = [s for s in standing if suite in s.cells and s.cells[suite].flips]
    return sorted(have, key=lambda s: (-s.cells[suite].score.auc, s.defense))[:MAX_SERIES]


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline: no XML prolog or doctype


def _figure(standing: list[Standing], title: str, ylabel: str, xlabel: str, draw) -> str | None:
    """One panel per suite: ``draw(ax, suite, defense standing, its cell, its style)`` for each of the suite's top
    defenses; a log x axis, a shared rate y axis, the legend below each panel. None without any cell."""
    if not any(s.cells for s in standing):
        return None
    look = styles(standing)
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, len(SUITES), figsize=(4.2 * len(SUITES), 4.6), squeeze=False, sharey=True)
        fig.suptitle(title)
        for suite, ax in zip(SUITES, axes[0]):
            for s in _top(standing, suite):
                draw(ax, s.cells[suite], look[s.defense], f"{s.defense} (n={s.cells[suite].flips})")
            ax.set(title=suite, xscale="log", ylim=(-0.03, 1.03), xlabel=xlabel)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
        axes[0][0].set_ylabel(ylabel)
        return _svg(fig)


def budget_curves(standing: list[Standing]) -> str | None:
    """Robust suppression against the attacker's budget, per suite: each defense's ranked cell."""
    def draw(ax, cell, style, label):
        xs, ys = zip(*cell.score.curve)
        ax.plot(xs, ys, label=label, markersize=3, **style)
        ax.axvline(HEADLINE_BUDGET, color="grey", linewidth=0.8)

    return _figure(standing, "Robust suppression against the attack budget (feature-preserving attacks, per suite)",
                   "robust suppression (share of examples with base behavior)", "budget ||delta|| / ||h|| per position",
                   draw)


def side_effect_plane(standing: list[Standing]) -> str | None:
    """Suppression (hollow) and robust suppression over the budget range (filled) against the side effect, per
    suite, with the side-effect cap."""
    def draw(ax, cell, style, label):
        x = max(cell.side_effect or 0.0, 1e-4)  # log axis: a KL of exactly 0 sits at its left edge
        supp = cell.record["metrics"]["suppression_rate"]
        ax.plot([x, x], [supp, cell.score.auc], color=style["color"], linestyle=style["linestyle"], linewidth=0.8)
        ax.plot([x], [supp], marker=style["marker"], color=style["color"], markerfacecolor="none", linestyle="none")
        ax.plot([x], [cell.score.auc], marker=style["marker"], color=style["color"], linestyle="none", label=label)
        ax.axvline(SIDE_EFFECT_CAP, color="grey", linewidth=0.8, linestyle="--")

    return _figure(standing, "Suppression against side effect (hollow: without attack; filled: robust, area over budget)",
                   "share of examples with base behavior", "next-token KL on control text (nats)", draw)


def figures(standing: list[Standing]) -> list[str]:
    """Every figure of one model's standings, as inline SVG."""
    return [f for f in (budget_curves(standing), side_effect_plane(standing)) if f is not None]
