import math

import pytest

from benchmark.metrics import recovery_budget_median, summarize, wilson_interval


def test_wilson_interval_known_value():
    # 23 of 24: the paper's refusal figure; reference values from the closed-form Wilson score interval
    low, high = wilson_interval(23, 24)
    assert low == pytest.approx(0.7976, abs=1e-4)
    assert high == pytest.approx(0.9926, abs=1e-4)
    assert wilson_interval(0, 0) == (None, None)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)


def _row(valid, recovered, budget=None, b_base=1.0):
    return {"b_base": b_base, "valid_flip": valid, "recovered": recovered, "recovery_budget": budget,
            "drift_abs": 0.0 if valid else None, "drift_rel": 0.0 if valid else None, "reactivation": 0.0 if valid else None,
            "delta_rel": 0.1 if valid else None, "c1_change": 0.0 if valid else None}


def test_recovery_budget_median_counts_unrecovered_as_above_the_sweep():
    rows = [_row(True, True, 0.02), _row(True, True, 0.05), _row(True, False)]
    assert recovery_budget_median(rows) == 0.05
    rows = [_row(True, True, 0.02), _row(True, False), _row(True, False)]
    assert recovery_budget_median(rows) is None


def test_summary_rates():
    rows = [_row(True, True, 0.02)] * 3 + [_row(True, False)] + [_row(False, False)] * 4 + [_row(False, False, b_base=-1.0)]
    counts, m = summarize(rows, 0.1, 0.2, {})
    assert counts == {"examples": 9, "base_behavior": 8, "valid_flips": 4, "recovered": 3}
    assert m["suppression_rate"] == 0.5
    assert m["recovery_rate"] == 0.75
    assert m["robust_suppression"] == pytest.approx(0.125)
    assert m["residual_replay_recovery"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in m.values())
