"""How many seeds and evaluation episodes an RL comparison needs, from the noise in committed records.

    python -m tasks.rl.power --experiment rl_cpu [--delta 0.1] [--half-width 0.05]

A run's success rate is the mean of its evaluation episodes (goal variations). Over a cell's seeds (one task, init
and rank) it varies for two reasons: the seed (init, data order, calibration) and the episodes. The episode part of
a run's variance is at most p(1 - p) / episodes (independent episodes); the rest is the seed's. The tables compare
the mean success over the held-out tasks, so both parts are pooled over tasks. The model and its two bounds are
written out in docs/rl-power.md.
"""

from __future__ import annotations

import argparse
import itertools
import math

import pandas as pd
from scipy import stats

from eva_bench import results, tables

METRIC = "rollout/success_rate"


def cell_noise(runs: pd.DataFrame, episodes: int) -> pd.DataFrame:
    """Per task, init and rank: mean success p, the variance over seeds, its binomial episode part at ``episodes``
    and the seed part left (never below 0)."""
    cells = runs.groupby(["task", "init", "rank"])[METRIC].agg(p="mean", seed_var="var", seeds="count").reset_index()
    cells["episode_var"] = cells.p * (1 - cells.p) / episodes
    cells["seed_part"] = (cells.seed_var - cells.episode_var).clip(lower=0)
    return cells


def paired_differences(runs: pd.DataFrame) -> pd.DataFrame:
    """Per rank, pair of inits and seed: the difference of their mean success over the held-out tasks."""
    per_seed = runs.groupby(["rank", "init", "seed"])[METRIC].mean().unstack("init")
    rows = []
    for a, b in itertools.combinations(sorted(per_seed.columns), 2):
        diff = (per_seed[a] - per_seed[b]).dropna()
        rows += [{"rank": rank, "pair": f"{a} - {b}", "seed": seed, "difference": d}
                 for (rank, seed), d in diff.items()]
    return pd.DataFrame(rows)


def half_width(variance: float, seeds: int) -> float:
    """95 % Student-t half-width of a mean over ``seeds`` values of this variance."""
    return stats.t.ppf(0.975, seeds - 1) * math.sqrt(variance / seeds)


def power(delta: float, variance: float, seeds: int) -> float:
    """Power of a two-sided paired t-test at 5 % to find a true difference ``delta`` over ``seeds`` pairs."""
    if variance <= 0:
        return 1.0
    df, ncp = seeds - 1, delta / math.sqrt(variance / seeds)
    crit = stats.t.ppf(0.975, df)
    found = float(stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp))
    return 1.0 if math.isnan(found) and ncp > crit else found  # scipy's nct gives NaN far out in the tail


def analyse(experiment: str, delta: float, target: float, seeds_grid, episodes_grid, results_dir=None) -> str:
    """The noise tables of an experiment. Its columns are the tables' (a variant such as ``eva use_dora=True`` is
    one); a pilot whose columns are all one init (``random``, ``random steps=300``) gets one analysis per column,
    since comparing its settings is not comparing inits."""
    runs = results.load(experiment, *([results_dir] if results_dir else []))
    runs = runs[runs.status == "success"]
    column = tables.method_names(runs)
    if runs["init"].nunique() == 1 and column.nunique() > 1:
        return "\n\n".join(analyse_runs(f"{experiment}, {name}", runs[column == name].assign(init=name), delta,
                                          target, seeds_grid, episodes_grid)
                           for name in tables.method_order(column.unique()))
    return analyse_runs(experiment, runs.assign(init=column), delta, target, seeds_grid, episodes_grid)


def analyse_runs(title: str, runs: pd.DataFrame, delta: float, target: float, seeds_grid, episodes_grid) -> str:
    """The noise tables of these runs, whose ``init`` is their column."""
    episodes = int(runs["rollout/n"].iloc[0])
    tasks = sorted(runs.task.unique())
    cells = cell_noise(runs, episodes)
    lines = [f"## {title}: {len(runs)} runs, {len(tasks)} held-out tasks, {episodes} episodes per run", "",
             "| task | success (min-max over cells) | SD over seeds | of which episodes (binomial) | seeds |",
             "|---|---|---|---|---|"]
    for task, group in cells.groupby("task"):
        lines.append(f"| {task} | {group.p.min():.2f}-{group.p.max():.2f} | {math.sqrt(group.seed_var.mean()):.3f} "
                     f"| {math.sqrt(group.episode_var.mean()):.3f} | {int(group.seeds.max())} |")

    # a method's mean over tasks: per-task variances add, divided by T^2
    t2 = len(tasks) ** 2
    by_task = cells.groupby("task")[["seed_part", "p"]].mean()
    seed_var = float(by_task.seed_part.sum() / t2)
    bernoulli = float((by_task.p * (1 - by_task.p)).sum() / t2)  # times 1/episodes

    # a paired difference of two methods: observed at `episodes`; bound 1 keeps all of it as seed noise (it never
    # shrinks with more episodes), bound 2 takes the binomial part of both methods out first (independent episodes)
    diffs = paired_differences(runs)
    if len(diffs):
        observed = float(diffs.groupby(["rank", "pair"]).difference.var().mean())
        measured = (f"Paired differences of two inits (per rank, same seeds): observed variance {observed:.4f} at "
                    f"{episodes} episodes ({len(diffs)} differences, {diffs.groupby(['rank', 'pair']).ngroups} "
                    f"pairs x ranks)")
    else:  # one init (a pilot that must not compare inits): no pair to difference, so two unpaired runs' variance
        per_seed = runs.groupby(["rank", "init", "seed"])[METRIC].mean()
        observed = 2 * float(per_seed.groupby(["rank", "init"]).var().mean())
        measured = (f"One init only, so no paired difference: its variance is taken as twice the variance over "
                    f"seeds of the init's mean over tasks, {observed:.4f} at {episodes} episodes (two independent "
                    f"runs; pairing two inits on seeds and goals lowers it when their runs correlate positively)")
    episode_part = 2 * bernoulli / episodes
    seed_only = max(observed - episode_part, 0.0)
    lines += ["", f"Mean success over the {len(tasks)} tasks: seed variance {seed_var:.4f}, episode variance "
              f"{bernoulli:.3f} / episodes. {measured}, of which at most {episode_part:.4f} from episodes.", "",
              f"| seeds | episodes | 95 % half-width of a method's mean | power for a difference of {delta} "
              f"(all seed noise - independent episodes) |", "|---|---|---|---|"]
    for s, e in itertools.product(seeds_grid, episodes_grid):
        width = half_width(seed_var + bernoulli / e, s)
        low = power(delta, observed, s)  # nothing gained from more episodes
        high = power(delta, seed_only + 2 * bernoulli / e, s)
        mark = " ✓" if width <= target and low >= 0.8 else ""
        lines.append(f"| {s} | {e} | {width:.3f}{mark} | {low:.2f} - {high:.2f} |")
    lines += ["", f"✓: half-width ≤ {target} and power ≥ 0.8 even if every bit of the observed difference noise is "
              f"seed noise."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", action="append", help="committed RL experiment(s) (default: rl_cpu); one "
                        "with a single init (a pilot) is read as two unpaired runs")
    parser.add_argument("--delta", type=float, default=0.1, help="difference in mean success to detect")
    parser.add_argument("--half-width", type=float, default=0.05, help="largest 95 %% half-width wanted")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 10, 20, 30])
    parser.add_argument("--episodes", type=int, nargs="+", default=[10, 20, 50])
    args = parser.parse_args()
    for name in args.experiment or ["rl_cpu"]:
        print(analyse(name, args.delta, args.half_width, args.seeds, args.episodes), end="\n\n")


if __name__ == "__main__":
    main()
