"""Paired comparisons with a baseline and their uncertainty, for the tables (issue 16).

Seeds are paired by construction (same data order, same calibration batches), so each method is compared with the
baseline seed by seed: the differences' mean, a 95 % Student-t interval, and how many seeds a difference of that size
would need. Across the tasks of a group: rliable's interquartile mean (IQM) and probability of improvement (PoI) with
stratified-bootstrap intervals. Every random draw comes from a fixed seed, so the tables are byte-reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.stats
from rliable import metrics as rly  # rliable.library (its bootstrap) imports arch<8, which breaks on pandas 3: not used

LEVEL = 0.95
Z_ALPHA, Z_POWER = 1.96, 0.84  # two-sided 95 % and 80 % power, the usual normal-approximation constants
RESAMPLES = 10_000
SEED = 0  # every bootstrap starts from this seed: same records, same tables, byte for byte
MAX_SEEDS = 1_000_000  # seeds_needed's cap: past it, no practical number of seeds (and the CSV keeps an integer)
BETTER, WORSE, TIE = 1, -1, 0


def lower_is_better(metric: str) -> bool:
    return metric.endswith(("nll", "loss", "mse", "errors"))


def t_interval(diffs) -> tuple[float, float]:
    """95 % Student-t interval of the mean; NaN below two values. Exact for normal differences, and honest with 3
    seeds, where a percentile bootstrap collapses to the range of the differences."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return math.nan, math.nan
    half = t_half_width(d.std(ddof=1), len(d))
    return float(d.mean() - half), float(d.mean() + half)


def t_half_width(sd, n):
    """Half-width of the 95 % Student-t interval of a mean of ``n`` values with standard deviation ``sd`` (arrays
    too; NaN below two values)."""
    n = np.asarray(n, dtype=float)
    return scipy.stats.t.ppf(0.5 + LEVEL / 2, n - 1) * np.asarray(sd, dtype=float) / np.sqrt(n)


def bootstrap_interval(diffs, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean over seeds. With n seeds there are only n^n resamples: for 3
    it is about [min, max] of the differences, too narrow (kept in the CSV for reference, not used for markers)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [50 - LEVEL * 50, 50 + LEVEL * 50])
    return float(low), float(high)


def seeds_needed(mean: float, sd: float) -> int | None:
    """Seeds a paired difference of this mean and spread needs to exclude 0 at 95 % with 80 % power; None where it
    is undefined (no spread, no difference). The normal approximation n = ((1.96 + 0.84) sd / |mean|)², then grown
    until n >= ((t_.975 + t_.80, n - 1 df) sd / |mean|)²: the tables' intervals are t-intervals, and with few seeds
    the normal n alone says "2" for differences that 3 seeds cannot resolve."""
    if not (sd > 0) or mean == 0 or math.isnan(mean):
        return None
    ratio = (sd / abs(mean)) ** 2
    n = max(2, math.ceil((Z_ALPHA + Z_POWER) ** 2 * ratio))
    while n < MAX_SEEDS and n < (scipy.stats.t.ppf(0.975, n - 1) + scipy.stats.t.ppf(0.80, n - 1)) ** 2 * ratio:
        n += 1  # a few steps: t approaches z fast
    return min(n, MAX_SEEDS)


def verdict(low: float, high: float, lower_better: bool, tol: float = 0.0) -> int:
    """BETTER or WORSE only when the interval excludes 0 (by more than ``tol``: a bound that prints as 0 is 0);
    TIE otherwise, including a missing interval."""
    if math.isnan(low) or math.isnan(high):
        return TIE
    if low > tol:
        return WORSE if lower_better else BETTER
    if high < -tol:
        return BETTER if lower_better else WORSE
    return TIE


def paired(method: pd.Series, base: pd.Series) -> dict:
    """``method`` - ``base`` on the seeds both have (both indexed by seed): the paired summary of one comparison."""
    shared = method.index.intersection(base.index)
    d = (method.loc[shared] - base.loc[shared]).to_numpy(dtype=float)
    mean = float(d.mean()) if len(d) else math.nan
    if len(d) and abs(mean) <= 1e-9 * np.abs(d).max():  # rounding residue of differences that cancel: no difference
        mean = 0.0
    sd = float(d.std(ddof=1)) if len(d) > 1 else math.nan
    low, high = t_interval(d)
    boot_low, boot_high = bootstrap_interval(d)
    return {"diff": mean, "diff_sd": sd, "pairs": len(d), "ci_low": low, "ci_high": high,
            "boot_low": boot_low, "boot_high": boot_high, "seeds_needed": seeds_needed(mean, sd)}


def paired_differences(long: pd.DataFrame, keys: list[str], baseline: str, tol=lambda metric: 0.0) -> pd.DataFrame:
    """Per ``keys`` (the last is the metric) and method (long format: keys, method, seed, value): the paired
    comparison with ``baseline`` and its verdict; ``tol(metric)``: how far from 0 a bound must be to count."""
    rows = []
    for key, group in long.groupby(keys, sort=True):
        by_method = {m: g.set_index("seed")["value"] for m, g in group.groupby("method")}
        if baseline not in by_method:
            continue
        for method, values in by_method.items():
            if method == baseline:
                continue
            row = {**dict(zip(keys, key)), "method": method, **paired(values, by_method[baseline])}
            metric = str(key[-1])
            row["verdict"] = verdict(row["ci_low"], row["ci_high"], lower_is_better(metric), tol(metric))
            rows.append(row)
    columns = [*keys, "method", "diff", "diff_sd", "pairs", "ci_low", "ci_high", "boot_low", "boot_high",
               "seeds_needed", "verdict"]
    return pd.DataFrame(rows, columns=columns)


def _stratified(n_runs: int, n_tasks: int, resamples: int, seed: int) -> np.ndarray:
    # rliable's stratified bootstrap: each task's runs resampled on their own, tasks kept (rows drawn per column)
    return np.random.default_rng(seed).integers(0, n_runs, size=(resamples, n_runs, n_tasks))


def _take(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return scores[rows, np.arange(scores.shape[1])]  # (resamples, runs, tasks)


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [50 - LEVEL * 50, 50 + LEVEL * 50])
    return float(low), float(high)


def iqm_interval(scores: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float, float]:
    """rliable's IQM of a (runs x tasks) score matrix and its 95 % stratified-bootstrap interval."""
    rows = _stratified(*scores.shape, resamples, seed)
    # aggregate_iqm is scipy's 25 % trimmed mean over all cells; one call per resample is too slow, so vectorized
    boot = scipy.stats.trim_mean(_take(scores, rows).reshape(resamples, -1), 0.25, axis=1)
    return (float(rly.aggregate_iqm(scores)), *_percentiles(boot))


def poi_batch(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """rliable's probability of improvement for a batch of (..., runs, tasks) pairs: per task P(X > Y) + P(X = Y)/2
    over all run pairs (the Mann-Whitney U / (n m)), averaged over tasks."""
    greater = (x[..., :, None, :] > y[..., None, :, :]).mean(axis=(-3, -2))
    equal = (x[..., :, None, :] == y[..., None, :, :]).mean(axis=(-3, -2))
    return (greater + equal / 2).mean(axis=-1)


def poi_interval(x: np.ndarray, y: np.ndarray, resamples: int = RESAMPLES,
                 seed: int = SEED) -> tuple[float, float, float]:
    """P(X improves on Y) for (runs x tasks) matrices whose rows are the same seeds, and its 95 % interval. The
    bootstrap draws the same seeds for both (paired: a seed's data order and calibration are shared)."""
    rows = _stratified(*x.shape, resamples, seed)
    boot = poi_batch(_take(x, rows), _take(y, rows))
    return (float(rly.probability_of_improvement(x, y)), *_percentiles(boot))


def aggregates(scores: pd.DataFrame, keys: list[str], baseline: str, tol: float = 0.0) -> pd.DataFrame:
    """Per ``keys`` (the last is the metric) and method, over a group's tasks (long format: keys, unit, method,
    seed, value; ``unit`` is the group's task): IQM with its interval and, against ``baseline``, PoI with its
    interval and verdict (its interval excludes 0.5 by more than ``tol``). Only seeds that have every task of the
    group count."""
    rows = []
    for key, group in scores.groupby(keys, sort=True):
        sign = -1.0 if lower_is_better(str(key[-1])) else 1.0  # PoI asks "better than": negate lower-is-better
        units = sorted(group["unit"].unique())
        matrices = {}
        for method, g in group.groupby("method"):
            matrix = g.pivot_table(index="seed", columns="unit", values="value").reindex(columns=units).dropna()
            if len(matrix):
                matrices[method] = matrix  # (seeds x tasks): rliable's (runs x tasks) score matrix
        for method, matrix in matrices.items():
            iqm, low, high = iqm_interval(matrix.to_numpy())
            row = {**dict(zip(keys, key)), "method": method, "tasks": len(units), "seeds": len(matrix),
                   "iqm": iqm, "iqm_low": low, "iqm_high": high}
            base = matrices.get(baseline)
            shared = matrix.index.intersection(base.index) if base is not None else []
            if method != baseline and len(shared):
                poi, p_low, p_high = poi_interval(sign * matrix.loc[shared].to_numpy(),
                                                  sign * base.loc[shared].to_numpy())
                row.update(poi=poi, poi_low=p_low, poi_high=p_high,
                           verdict=verdict(p_low - 0.5, p_high - 0.5, lower_better=False, tol=tol))
            rows.append(row)
    columns = [*keys, "method", "tasks", "seeds", "iqm", "iqm_low", "iqm_high", "poi", "poi_low", "poi_high",
               "verdict"]
    return pd.DataFrame(rows, columns=columns)
