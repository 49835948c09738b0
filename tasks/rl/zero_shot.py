"""The pretrained decision transformer on the held-out tasks before any fine-tuning: how much headroom a task leaves.

    python -m tasks.rl.zero_shot experiment=rl_cw10_cpu_pilot [--seeds 0 1 2] [--json out.json] [--no-records]

For every ``task.finetune`` the experiment sweeps, it rolls out the cached pretrained checkpoint (built first if
missing, as a run would) with the rollouts a fine-tuning run of that seed makes: the same goal variations
(``evaluate.rollout``'s seeding), ``task.eval_episodes`` of them, conditioned on the same target return (the best
return in the task's expert data). Beside it, the expert data's own success: the share of its episodes that succeed
and when they first do. A fine-tuned run's success minus this number, seed by seed, is what fine-tuning
added. Prints a markdown table; where the experiment has records (``results/<experiment_name>/``), a second one puts
each task's fine-tuned success (mean and SD over seeds, per init and rank) beside its zero-shot success, and the gain
over the seeds both have. ``--json`` also writes per task and seed the success rate and episodes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from eva_bench import results, tables
from tasks.rl import data as rl_data
from tasks.rl import envs
from tasks.rl.evaluate import rollout
from tasks.rl.pretrain import expert_spec, pretrained

CONF = Path(__file__).resolve().parent.parent.parent / "conf"


def compose_rl(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="rl", overrides=overrides, return_hydra_config=True)


def swept_tasks(cfg: DictConfig) -> list[str]:
    """The held-out tasks an experiment sweeps (its ``task.finetune`` param), else the task's own one."""
    swept = (cfg.hydra.sweeper.get("params") or {}).get("task.finetune")
    return [t.strip() for t in str(swept).split(",")] if swept else [cfg.task.finetune]


def swept_seeds(cfg: DictConfig) -> list[int]:
    swept = (cfg.hydra.sweeper.get("params") or {}).get("seed")
    return [int(s) for s in str(swept).split(",")] if swept is not None else [int(cfg.seed)]


def zero_shot(cfg: DictConfig, tasks: list[str], seeds: list[int]) -> list[dict]:
    """One row per (task, seed): the pretrained policy's success rate and mean return over the run's rollouts."""
    torch.set_num_threads(int(cfg.threads or 1))
    rows = []
    for task in tasks:
        with open_dict(cfg):
            cfg.task.finetune = task  # the checkpoint's key does not depend on it: one model serves every task
        model, meta = pretrained(cfg)
        spec = expert_spec(cfg, task)
        episodes = rl_data.load_episodes(rl_data.dataset(spec), envs.make(task, spec.max_episode_steps))
        target_return = max(float(ep.rewards.sum()) for ep in episodes)  # as tasks/rl/train.py conditions
        # the demonstrations' own success: what imitating them can reach, and when their successes come
        firsts = [int(np.argmax(ep.successes)) + 1 for ep in episodes if ep.successes is not None and ep.successes.any()]
        expert = {"expert_success": len(firsts) / len(episodes),
                  "expert_first_success": [min(firsts), int(np.median(firsts)), max(firsts)] if firsts else None}
        for seed in seeds:
            out = rollout(model, task, normalizer=meta["normalizer"], context=cfg.model.context,
                          return_scale=cfg.task.return_scale, target_return=target_return,
                          episodes=cfg.task.eval_episodes, max_episode_steps=spec.max_episode_steps, seed=seed)
            rows.append({"task": task, "seed": seed, "success_rate": out["success_rate"], "return": out["return"],
                         "episodes": out["episodes"], "errors": out["errors"], "checkpoint": Path(meta["path"]).name,
                         **expert})
            print(f"{task} seed {seed}: zero-shot success {out['success_rate']:.2f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| task | expert data: success, first success at step (min, median, max) | zero-shot: "
             + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---|---|" + "---|" * (len(seeds) + 1)]
    for task in dict.fromkeys(r["task"] for r in rows):
        values = {r["seed"]: r["success_rate"] for r in rows if r["task"] == task}
        first = next(r for r in rows if r["task"] == task)
        steps = first.get("expert_first_success")
        expert = f"{first['expert_success']:.2f}, {steps}" if "expert_success" in first else ""
        lines.append(f"| {task} | {expert} | " + " | ".join(f"{values[s]:.2f}" for s in seeds)
                     + f" | {np.mean(list(values.values())):.2f} |")
    return "\n".join(lines)


def headroom(rows: list[dict], runs: pd.DataFrame) -> str:
    """Per task, init and rank: zero-shot success, fine-tuned success (mean ± SD over seeds, min-max), and the gain
    fine-tuning added, averaged over the seeds both have (same goals)."""
    zero = pd.DataFrame(rows).set_index(["task", "seed"])["success_rate"]
    runs = runs[runs.status == "success"]
    runs = runs.assign(init=tables.method_names(runs))  # the tables' columns: a variant (steps=300) is one
    lines = ["| task | init | rank | zero-shot | fine-tuned (mean ± SD, min-max) | gain | seeds |",
             "|---|---|---|---|---|---|---|"]
    for (task, init, rank), cell in runs.groupby(["task", "init", "rank"], sort=False):
        tuned = cell.set_index("seed")["rollout/success_rate"]
        both = [s for s in tuned.index if (task, s) in zero.index]
        gain = np.mean([tuned[s] - zero[task, s] for s in both]) if both else float("nan")
        start = zero[task].mean() if task in zero.index.get_level_values(0) else float("nan")
        lines.append(f"| {task} | {init} | {rank} | {start:.2f} | {tuned.mean():.2f} ± {tuned.std():.2f}, "
                     f"{tuned.min():.2f}-{tuned.max():.2f} | {gain:+.2f} | {len(tuned)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=rl_cw10_cpu_pilot")
    parser.add_argument("--seeds", type=int, nargs="+", help="rollout seeds (default: the experiment's seeds)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--no-records", action="store_true", help="leave out the fine-tuned records' table")
    args = parser.parse_args()
    cfg = compose_rl(args.overrides)
    tasks = swept_tasks(cfg)
    rows = zero_shot(cfg, tasks, args.seeds or swept_seeds(cfg))
    print(table(rows))
    runs = pd.DataFrame() if args.no_records else results.load(cfg.experiment_name, cfg.results_dir)
    if len(runs):
        order = {task: i for i, task in enumerate(tasks)}  # the sweep's task order (CW10's, for the CW10 pilot)
        runs = runs[runs.task.isin(order)].sort_values(["task", "init", "rank", "seed"],
                                                       key=lambda c: c.map(order) if c.name == "task" else c)
        print(f"\nFine-tuned records of {cfg.experiment_name} ({len(runs)} runs):\n")
        print(headroom(rows, runs))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
