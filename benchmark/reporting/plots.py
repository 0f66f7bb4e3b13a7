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


def _legend(ax) -> None:
    """The panel's legend below it (the series carry their evidence, n valid flips), if it has series."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline: no XML prolog or doctype


def _panels(title: str):
    fig, axes = plt.subplots(1, len(SUITES), figsize=(4.2 * len(SUITES), 4.6), squeeze=False, sharey=True)
    fig.suptitle(title)
    return fig, dict(zip(SUITES, axes[0]))


def budget_curves(standing: list[Standing]) -> str | None:
    """Robust suppression against the attacker's budget, per suite: each defense's ranked record."""
    if not any(s.cells for s in standing):
        return None
    look = styles(standing)
    with plt.rc_context(RC):
        fig, axes = _panels("Robust suppression against the attack budget (constrained attack, per suite)")
        for suite, ax in axes.items():
            for s in _top(standing, suite):
                xs, ys = zip(*s.cells[suite].score.curve)
                ax.plot(xs, ys, label=f"{s.defense} (n={s.cells[suite].flips})", markersize=3, **look[s.defense])
            ax.axvline(HEADLINE_BUDGET, color="grey", linewidth=0.8)
            ax.set(title=suite, xscale="log", ylim=(-0.03, 1.03), xlabel="budget ||delta|| / ||h|| per position")
            _legend(ax)
        axes[SUITES[0]].set_ylabel("robust suppression (share of examples with base behavior)")
        return _svg(fig)


def side_effect_plane(standing: list[Standing]) -> str | None:
    """Suppression (hollow) and robust suppression over the budget range (filled) against the side effect, per
    suite, with the side-effect cap."""
    if not any(s.cells for s in standing):
        return None
    look = styles(standing)
    with plt.rc_context(RC):
        fig, axes = _panels("Suppression against side effect (hollow: without attack; filled: robust, area over budget)")
        for suite, ax in axes.items():
            for s in _top(standing, suite):
                c = s.cells[suite]
                x = max(c.side_effect or 0.0, 1e-4)  # log axis: a KL of exactly 0 sits at its left edge
                st = look[s.defense]
                ax.plot([x, x], [c.record["metrics"]["suppression_rate"], c.score.auc], color=st["color"],
                        linestyle=st["linestyle"], linewidth=0.8)
                ax.plot([x], [c.record["metrics"]["suppression_rate"]], marker=st["marker"], color=st["color"],
                        markerfacecolor="none", linestyle="none")
                ax.plot([x], [c.score.auc], marker=st["marker"], color=st["color"], linestyle="none",
                        label=f"{s.defense} (n={c.flips})")
            ax.axvline(SIDE_EFFECT_CAP, color="grey", linewidth=0.8, linestyle="--")
            ax.set(title=suite, xscale="log", ylim=(-0.03, 1.03), xlabel="next-token KL on control text (nats)")
            _legend(ax)
        axes[SUITES[0]].set_ylabel("share of examples with base behavior")
        return _svg(fig)


def figures(standing: list[Standing]) -> list[str]:
    """Every figure of one model's standings, as inline SVG."""
    return [f for f in (budget_curves(standing), side_effect_plane(standing)) if f is not None]
