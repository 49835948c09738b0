"""Paired statistics for the tables: differences from random, intervals, verdicts, seeds needed, rliable aggregates."""

import math

import numpy as np
import pandas as pd
import pytest
from rliable import metrics as rly

from eva_bench import stats, tables

KEYS = tables.KEYS


def long_frame(metric: str, per_method: dict[str, list[float]], task: str = "t") -> pd.DataFrame:
    return pd.DataFrame([
        {"task": task, "model": "m", "rank": 2, "metric": metric, "method": method, "seed": seed, "value": v}
        for method, values in per_method.items() for seed, v in enumerate(values)
    ])


def one(paired: pd.DataFrame, method: str = "eva") -> pd.Series:
    return paired[paired["method"] == method].iloc[0]


def test_identical_methods_differ_by_nothing_and_are_not_marked():
    long = long_frame("boolq/choice_accuracy", {"random": [65.625] * 3, "eva": [65.625] * 3})
    row = one(tables.paired_with_random(long))
    assert row["diff"] == 0 and row["ci_low"] == 0 and row["ci_high"] == 0
    assert (row["boot_low"], row["boot_high"]) == (0, 0)
    assert row["verdict"] == stats.TIE and row["seeds_needed"] is None
    table, _ = tables.build_table(tables.aggregate(long), pd.DataFrame(columns=["eval", "metric", "method", "value"]),
                                  tables.paired_with_random(long))
    cells = " ".join(table.iloc[0][["random", "eva"]])
    assert "**" not in cells and "▲" not in cells and "▼" not in cells


def test_differences_that_cancel_in_floating_point_are_zero():
    # language_cpu, piqa/choice_accuracy, rank 2: the differences sum to 4.7e-15, not 0
    long = long_frame("x/accuracy", {"random": [39.285714285714285, 42.857142857142854, 57.14285714285714],
                                     "eva": [46.42857142857143] * 3})
    row = one(tables.paired_with_random(long))
    assert row["diff"] == 0 and row["verdict"] == stats.TIE and row["seeds_needed"] is None


def test_better_on_every_seed_by_a_wide_margin_is_marked_better_in_either_direction():
    acc = one(tables.paired_with_random(long_frame("x/accuracy", {"random": [50, 51, 52], "eva": [60, 61.5, 62]})))
    assert acc["diff"] == pytest.approx(10.1667, abs=1e-4) and acc["ci_low"] > 0 and acc["verdict"] == stats.BETTER
    nll = one(tables.paired_with_random(long_frame("x/nll", {"random": [3.4, 3.41, 3.42], "eva": [3.1, 3.12, 3.13]})))
    assert nll["ci_high"] < 0 and nll["verdict"] == stats.BETTER  # lower NLL is better
    worse = one(tables.paired_with_random(long_frame("x/nll", {"random": [3.1, 3.12, 3.13], "eva": [3.4, 3.41, 3.42]})))
    assert worse["verdict"] == stats.WORSE


def test_a_noisy_difference_is_not_marked_even_when_every_seed_agrees_in_sign():
    noisy = one(tables.paired_with_random(long_frame("x/accuracy", {"random": [0, 0, 0], "eva": [5, -4, 6]})))
    assert noisy["ci_low"] < 0 < noisy["ci_high"] and noisy["verdict"] == stats.TIE
    # all three positive but spread out: the 3-seed bootstrap is [min, max] and would mark it; the t-interval does not
    spread = one(tables.paired_with_random(long_frame("x/accuracy", {"random": [0, 0, 0], "eva": [1, 10, 20]})))
    assert spread["boot_low"] == pytest.approx(1) and spread["boot_high"] == pytest.approx(20)
    assert spread["ci_low"] < 0 and spread["verdict"] == stats.TIE


def test_only_seeds_both_methods_have_are_paired():
    long = long_frame("x/accuracy", {"random": [1, 2, 3], "eva": [11, 12]})  # eva lacks seed 2
    row = one(tables.paired_with_random(long))
    assert row["pairs"] == 2 and row["diff"] == 10


def test_t_interval_by_hand():
    low, high = stats.t_interval([1, 2, 3])  # mean 2, sd 1, t(.975, 2 df) = 4.3027
    assert low == pytest.approx(2 - 4.3027 / math.sqrt(3), abs=1e-3)
    assert high == pytest.approx(2 + 4.3027 / math.sqrt(3), abs=1e-3)
    assert all(math.isnan(b) for b in stats.t_interval([1.0]))


def test_a_bound_that_prints_as_zero_is_not_marked():
    assert stats.verdict(0.02, 3.1, lower_better=False) == stats.BETTER
    assert stats.verdict(0.02, 3.1, lower_better=False, tol=0.05) == stats.TIE
    assert stats.verdict(-0.2, -0.1, lower_better=True, tol=0.0005) == stats.BETTER
    assert stats.verdict(math.nan, math.nan, lower_better=False) == stats.TIE


def test_seeds_needed_by_hand():
    # normal n = ceil(2.8^2 * 1) = 8; t tables: n = 9 needs (2.306 + 0.889)^2 = 10.2 > 9, n = 10 needs
    # (2.262 + 0.883)^2 = 9.9 <= 10
    assert stats.seeds_needed(1.0, 1.0) == 10
    assert stats.seeds_needed(-1.0, 1.0) == 10  # the sign does not matter
    normal = math.ceil(2.8 ** 2 * 100)  # 784: with many seeds t is close to z
    assert normal <= stats.seeds_needed(1.0, 10.0) <= normal + 5
    assert stats.seeds_needed(10.0, 0.1) == 2  # at least 2
    assert stats.seeds_needed(1.0, 0.0) is None and stats.seeds_needed(0.0, 1.0) is None
    assert stats.seeds_needed(1e-9, 1.0) == stats.MAX_SEEDS


def test_bootstrap_is_reproducible_and_seeded():
    diffs = [0.3, -1.2, 2.5, 0.7, 1.1]
    assert stats.bootstrap_interval(diffs) == stats.bootstrap_interval(diffs)
    assert stats.bootstrap_interval(diffs) != stats.bootstrap_interval(diffs, seed=1)
    x, y = np.arange(12.0).reshape(3, 4), np.arange(12.0).reshape(3, 4)[::-1]
    assert stats.iqm_interval(x) == stats.iqm_interval(x) and stats.poi_interval(x, y) == stats.poi_interval(x, y)


def test_iqm_on_a_hand_checkable_matrix():
    scores = np.array([[1.0, 8.0], [2.0, 7.0], [3.0, 6.0], [4.0, 5.0]])  # (runs x tasks): 1..8
    iqm, low, high = stats.iqm_interval(scores)
    assert iqm == pytest.approx(4.5)  # drop 1, 2 and 7, 8: mean of 3, 4, 5, 6
    assert low <= iqm <= high
    assert stats.iqm_interval(np.full((3, 2), 7.0)) == (7.0, 7.0, 7.0)


def test_vectorized_bootstrap_statistics_match_rliable():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 4, size=(3, 5)).astype(float), rng.integers(0, 4, size=(3, 5)).astype(float)  # ties
    assert stats.poi_batch(x, y) == pytest.approx(rly.probability_of_improvement(x, y))
    rows = stats._stratified(3, 5, 20, seed=0)
    xs, ys = stats._take(x, rows), stats._take(y, rows)
    expected = [rly.probability_of_improvement(a, b) for a, b in zip(xs, ys)]
    assert stats.poi_batch(xs, ys) == pytest.approx(expected)
    assert stats.poi_batch(np.array([[2.0], [3.0]]), np.array([[1.0], [2.0]])) == pytest.approx(3.5 / 4)
    boot = stats.iqm_interval(x, resamples=20, seed=0)
    iqms = [rly.aggregate_iqm(a) for a in xs]
    assert boot[1] == pytest.approx(np.percentile(iqms, 2.5)) and boot[2] == pytest.approx(np.percentile(iqms, 97.5))


def group_frame(metric, per_method):
    """Scores of a 3-task group: per method, (seeds x tasks) rows of values."""
    return pd.DataFrame([
        {"group": "g", "model": "m", "rank": 2, "metric": metric, "unit": f"task{t}", "method": method, "seed": s,
         "value": v}
        for method, matrix in per_method.items() for s, row in enumerate(matrix) for t, v in enumerate(row)
    ])


def test_aggregates_respect_direction_and_leave_identical_methods_unmarked():
    random = [[1.0, 2.0, 3.0], [1.5, 2.5, 3.5], [1.2, 2.2, 3.2]]
    lower = [[v - 1 for v in row] for row in random]
    nll = stats.aggregates(group_frame("x/nll", {"random": random, "eva": lower, "same": random}),
                           tables.GROUP_KEYS, "random").set_index("method")
    assert nll.loc["eva", "poi"] > 0.5 and nll.loc["eva", "verdict"] == stats.BETTER  # lower NLL beats random
    assert nll.loc["same", "poi"] == 0.5 and (nll.loc["same", "poi_low"], nll.loc["same", "poi_high"]) == (0.5, 0.5)
    assert nll.loc["same", "verdict"] == stats.TIE and math.isnan(nll.loc["random", "poi"])
    assert nll.loc["eva", "tasks"] == 3 and nll.loc["eva", "seeds"] == 3
    acc = stats.aggregates(group_frame("x/accuracy", {"random": random, "eva": lower}), tables.GROUP_KEYS, "random")
    assert acc.set_index("method").loc["eva", "verdict"] == stats.WORSE  # lower accuracy loses


def test_group_scores_find_vtab_groups_and_averaged_eval_sets():
    long = pd.concat([
        long_frame("test/accuracy", {"random": [1, 2], "eva": [2, 3]}, task="digits"),
        long_frame("test/accuracy", {"random": [1, 2], "eva": [2, 3]}, task="mnist_count"),
        long_frame("boolq/accuracy", {"random": [1, 2]}, task="commonsense"),
        long_frame("piqa/accuracy", {"random": [1, 2]}, task="commonsense"),
        long_frame("avg/accuracy", {"random": [1, 2]}, task="commonsense"),
        long_frame("gsm8k/nll", {"random": [1, 2]}, task="math"),  # no avg/nll: not a set of evals
    ], ignore_index=True)
    records = pd.DataFrame({"task": ["digits", "mnist_count", "commonsense", "math"],
                            "task_group": ["natural", "structured", None, None]})
    scores = tables.group_scores(long, records)
    units = scores.groupby("group")["unit"].agg(lambda u: sorted(set(u))).to_dict()
    assert units == {"natural": ["digits"], "structured": ["mnist_count"], "all": ["digits", "mnist_count"],
                     "commonsense": ["boolq", "piqa"]}
    assert set(scores.loc[scores["group"] == "commonsense", "metric"]) == {"accuracy"}
