"""Every run-level metric of the record, defined once (see DESIGN.md, "Words and metrics").

Inputs are per-example rows (dicts as stored in the record's ``examples``). Rates whose denominator is zero
are ``None`` (JSON null), never NaN.
"""

from __future__ import annotations

import math
import statistics


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if trials == 0:
        return None, None
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def is_valid_flip(b_base: float, b_defended: float) -> bool:
    """A valid flip: the behavior is present without the defense and absent with it."""
    return b_base > 0 and b_defended <= 0


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def recovery_budget_median(rows: list[dict]) -> float | None:
    """Median over valid flips of the smallest swept budget that recovered them.

    Never-recovered flips count as above the largest budget tried; if the median lands there it is ``None``.
    """
    budgets = sorted(r["recovery_budget"] if r["recovery_budget"] is not None else math.inf
                     for r in rows if r["valid_flip"])
    if not budgets:
        return None
    median = statistics.median(budgets)
    return None if math.isinf(median) else median


def summarize(rows: list[dict], side_effect: float | None, defense_edit_rel: float | None,
              replay: dict[str, float | None]) -> tuple[dict, dict]:
    """``(counts, metrics)`` for one run from its per-example rows.

    - suppression rate = valid flips / examples with ``b_base > 0``
    - recovery rate = recovered / valid flips (Wilson 95% interval); robust suppression = suppression x (1 - recovery)
    - drift, reactivation, perturbation size, C1 change: means over valid flips (C1: the maximum)
    - jacobian residual drift (mode jacobian): mean over valid flips of ``||J P v|| / ||J v||``, what the
      cross-site projector leaves of the first-order drift, with the exact Jacobian (null for other modes, with no
      later defended site, or where the model or defense has no second derivative to compute it with)
    - zero-reactivation recovery = valid flips recovered without any inactive defended entry turning on,
      over valid flips (recovery that cannot be blamed on reactivating the defended features)
    """
    base = [r for r in rows if r["b_base"] > 0]
    flips = [r for r in rows if r["valid_flip"]]
    recovered = [r for r in flips if r["recovered"]]
    suppression = _ratio(len(flips), len(base))
    recovery = _ratio(len(recovered), len(flips))
    low, high = wilson_interval(len(recovered), len(flips))
    robust = suppression * (1 - recovery) if suppression is not None and recovery is not None else (
        suppression if suppression is not None and not flips else None)
    c1 = [r["c1_change"] for r in flips if r.get("c1_change") is not None]
    counts = {"examples": len(rows), "base_behavior": len(base), "valid_flips": len(flips), "recovered": len(recovered)}
    metrics = {
        "suppression_rate": suppression,
        "recovery_rate": recovery,
        "recovery_ci_low": low,
        "recovery_ci_high": high,
        "robust_suppression": robust,
        "recovery_budget_median": recovery_budget_median(rows),
        "drift_abs": _mean(r["drift_abs"] for r in flips),
        "drift_rel": _mean(r["drift_rel"] for r in flips),
        "reactivation": _mean(r["reactivation"] for r in flips),
        "zero_reactivation_recovery": _ratio(sum(1 for r in recovered if not r["reactivation"]), len(flips)),
        "delta_rel_norm": _mean(r["delta_rel"] for r in flips),
        "c1_max_preact_change": max(c1) if c1 else None,
        "jacobian_residual_drift": _mean(r.get("jacobian_residual_drift") for r in flips),
        "side_effect": side_effect,
        "defense_edit_rel": defense_edit_rel,
        "residual_replay_recovery": replay.get("residual"),
        "latent_replay_recovery": replay.get("latent"),
    }
    return counts, metrics


def budget_curve(rows: list[dict], eps_sweep) -> list[dict]:
    """Recovery against budget: one entry per swept relative budget ``eps_k``, in ascending order.

    recovered at ``eps_k`` = valid flips whose recovery budget is ``<= eps_k``; the sweep warm-starts each budget
    from the previous one's ``delta``, so the count is non-decreasing and its last entry is the run's recovered
    count. ``recovery_rate`` = that count over the valid flips (null without valid flips).
    """
    flips = [r for r in rows if r["valid_flip"]]
    budgets = [r["recovery_budget"] for r in flips if r["recovered"] and r["recovery_budget"] is not None]
    curve = []
    for eps in sorted(eps_sweep):
        got = sum(1 for b in budgets if b <= eps)
        curve.append({"eps_rel": float(eps), "recovered": got, "recovery_rate": _ratio(got, len(flips))})
    return curve
