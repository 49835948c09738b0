"""The RL power analysis (tasks/rl/power.py): its formulas against simulation, and its table on committed records."""

import numpy as np
import pytest
from scipy import stats

from tasks.rl import power


@pytest.mark.parametrize("delta,variance,seeds", [(0.1, 0.0092, 10), (0.1, 0.0092, 5), (0.05, 0.002, 8)])
def test_power_matches_simulated_paired_t_tests(delta, variance, seeds):
    rng = np.random.default_rng(0)
    diffs = rng.normal(delta, np.sqrt(variance), size=(20_000, seeds))
    rejected = stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05
    assert power.power(delta, variance, seeds) == pytest.approx(rejected.mean(), abs=0.015)


def test_half_width_is_the_student_t_interval():
    values = np.array([0.2, 0.5, 0.3, 0.4])
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert power.half_width(values.var(ddof=1), len(values)) == pytest.approx((high - low) / 2)


def test_the_analysis_of_the_committed_rl_cpu_records():
    text = power.analyse("rl_cpu", delta=0.1, target=0.05, seeds_grid=[3, 10], episodes_grid=[10])
    assert "72 runs, 3 held-out tasks, 10 episodes per run" in text
    assert "| 3 | 10 |" in text and "| 10 | 10 |" in text and "nan" not in text


def test_a_single_init_pilot_is_read_as_two_unpaired_runs(tmp_path):
    """A pilot runs one init (it must not look at which wins): no pair to difference, so the difference variance is
    twice the variance over seeds of that init's mean over tasks."""
    from eva_bench import results

    success = {"hammer-v3": [0.2, 0.4, 0.3], "stick-pull-v3": [0.6, 0.5, 0.9]}  # per seed
    for task, values in success.items():
        for seed, value in enumerate(values):
            run = {"experiment": "pilot", "task": task, "model": "dt_cpu", "init": "random", "rank": 8, "seed": seed,
                   "config_hash": task[:4]}
            results.write_record(tmp_path / "pilot" / f"{task}-{seed}.json", {
                "run": run, "status": "success", "config": {},
                "metrics": {"rollout/success_rate": value, "rollout/n": 20}})
    text = power.analyse("pilot", delta=0.1, target=0.05, seeds_grid=[3, 10], episodes_grid=[20],
                         results_dir=tmp_path)
    per_seed = np.mean(list(success.values()), axis=0)  # 0.4, 0.45, 0.6
    assert f"variance over seeds of the init's mean over tasks, {2 * per_seed.var(ddof=1):.4f} at 20 episodes" in text
    assert "6 runs, 2 held-out tasks, 20 episodes per run" in text and "| 10 | 20 |" in text and "nan" not in text


def test_a_pilot_with_a_variant_column_is_analysed_column_by_column(tmp_path):
    """random and "random steps=300" are two settings of one init, not two inits: each column is its own pilot, never
    mixed into one cell's seed variance and never differenced as a pair."""
    from eva_bench import results

    success = {None: [0.2, 0.4, 0.3], "steps=300": [0.6, 0.5, 0.9]}  # one task, per seed
    for variant, values in success.items():
        for seed, value in enumerate(values):
            run = {"experiment": "pilot", "task": "hammer-v3", "model": "dt_cpu", "init": "random", "rank": 8,
                   "seed": seed, "config_hash": str(variant)}
            results.write_record(tmp_path / "pilot" / f"{variant}-{seed}.json", {
                "run": run, "status": "success", "config": {"variant": variant},
                "metrics": {"rollout/success_rate": value, "rollout/n": 20}})
    text = power.analyse("pilot", delta=0.1, target=0.05, seeds_grid=[3], episodes_grid=[20], results_dir=tmp_path)
    sections = text.split("## ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["pilot, random: 3 runs, 1 held-out tasks, 20 episodes per run",
                                                     "pilot, random steps=300: 3 runs, 1 held-out tasks, 20 episodes "
                                                     "per run"]
    for section, values in zip(sections, success.values()):
        assert f"seeds of the init's mean over tasks, {2 * np.var(values, ddof=1):.4f} at 20" in section


def test_the_analysis_of_the_committed_cw10_pilot():
    """docs/rl-power.md's CW10 pilot numbers come from these records: one init, 10 tasks, 20 episodes per run."""
    text = power.analyse("rl_cw10_cpu_pilot", delta=0.1, target=0.05, seeds_grid=[3, 10], episodes_grid=[20])
    assert "30 runs, 10 held-out tasks, 20 episodes per run" in text and "One init only" in text
    assert "| 10 | 20 | 0.028 ✓ |" in text and "nan" not in text
