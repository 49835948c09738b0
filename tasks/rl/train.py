"""The RL recipe: LoRA fine-tuning of a pretrained decision transformer on a held-out Meta-World task, one record.

    python -m tasks.rl.train init=eva lora.r=8 seed=0 task.finetune=hammer-v3
    python -m tasks.rl.train -m experiment=rl_cpu      # the CPU default's sweep

Reads top to bottom: skip if done -> (tuned protocol: choose the lr) -> build the pretrained DT -> seed -> the task's
expert data -> initialize -> train -> evaluate by rollouts -> record. The pretrained checkpoint (tasks/rl/pretrain.py)
is built by the first run that needs it, with its own seed, and shared by every method, rank and seed; the run seeds
after loading it, so a run's numbers do not depend on whether it built the checkpoint or found it cached.
"""

from __future__ import annotations

import math

import hydra
import torch
from omegaconf import DictConfig

from eva_bench import protocol
from eva_bench.artifacts import dataset_content_hash
from eva_bench.checks import check_command_line
from eva_bench.init import Calibration
from eva_bench.recipe import RunContext, calibration_draw, initialize_from_config, place, seed_everything
from eva_bench.train import OptimConfig, fit
from tasks.rl import data as rl_data
from tasks.rl import envs, models
from tasks.rl.evaluate import rollout
from tasks.rl.pretrain import expert_spec, pretrained, random_batches
from tasks.rl.sequences import SequenceDataset

VALIDATION_METRIC = "validation/action_mse"  # tuned protocol: action MSE on held-out expert episodes, lower is better


def context(cfg: DictConfig) -> RunContext:
    """This run's record: its keys and path (the sweeper asks too, to launch only unfinished runs); tables average
    over the held-out tasks of a task group."""
    return RunContext.from_config(cfg, "rl", task=cfg.task.finetune, model=cfg.model.name, task_group=cfg.task.name)


def run(cfg: DictConfig) -> dict:
    ctx = context(cfg)
    if (record := ctx.existing_or_claim()) is not None:
        return record
    cfg, selection = protocol.prepare(cfg, ctx, run, metric=VALIDATION_METRIC)  # tuned: selection runs first
    with ctx.recording(selection) as record:  # records the lr selection; pins torch's threads
        # build: the pretrained DT (cached by config hash) and the held-out task's expert data in its input convention
        model, meta = pretrained(cfg)
        model = place(model, cfg)  # on this rank's device
        seed_everything(cfg.seed)
        task = cfg.task.finetune
        spec = expert_spec(cfg, task)
        dataset = rl_data.dataset(spec)
        episodes = rl_data.load_episodes(dataset, envs.make(task, spec.max_episode_steps))
        # which builds: the checkpoint's weights and every dataset by content hash (a rebuild on another kind of CPU
        # can differ in the last bits, so records are comparable run to run only on the same artifacts)
        record.section("artifacts", {
            "checkpoint": {k: meta[k] for k in ("path", "weights_sha256", "threads", "machine")},
            "pretrain_datasets": meta["datasets"],
            "finetune_dataset": {"id": spec.dataset_id, "content_sha256": dataset_content_hash(dataset)},
        })
        # tuned protocol: a selection run trains on the episodes minus validation_size held-out ones, scored on those
        episodes, validation = protocol.split(cfg, episodes)
        windows = SequenceDataset(episodes, cfg.model.context, cfg.task.return_scale, normalizer=meta["normalizer"])
        target_return = max(float(ep.rewards.sum()) for ep in episodes)  # condition rollouts on the data's best

        # initialize: the same seeded calibration windows for every data-driven method
        draw = calibration_draw(cfg.seed)
        calibration = Calibration(
            batches=[windows.batch(torch.randint(len(windows), (cfg.calibration.batch_size,), generator=draw).tolist())
                     for _ in range(cfg.calibration.batches)],
            forward=models.forward,
            loss=models.action_loss,
            rows=models.token_rows,  # real timesteps' return, state and action tokens (padding masked)
            loss_rows=models.token_rows,
            dataset_size=len(windows),
        )
        model, report = initialize_from_config(model, cfg, calibration)
        record.init(report)

        # train: the shared loop on windows drawn with replacement, seeded by (seed, epoch)
        result = fit(
            model,
            random_batches(windows, cfg.data.batch_size, cfg.data.steps, cfg.seed),
            models.action_loss,
            OptimConfig(**cfg.optim),
            steps_per_epoch=cfg.data.steps,
            batch_size=lambda b: len(b["states"]),
            on_log=record.log_train,  # loss, lr and gradient norm to the tracker
        )
        record.train(result)
        if result.status == "diverged":
            return record.finish("diverged")

        if validation:  # a selection run is scored on its held-out episodes only; no rollouts
            held_out = SequenceDataset(validation, cfg.model.context, cfg.task.return_scale,
                                       normalizer=meta["normalizer"])
            mse = models.mean_action_loss(model, held_out)
            record.metrics({VALIDATION_METRIC: mse, "validation/n": len(validation),
                            "validation/windows": len(held_out)})
            return record.finish("success" if math.isfinite(mse) else "diverged")

        # evaluate: rollouts in the task's environment, on goal variations seeded apart from the data's
        out = rollout(model, task, normalizer=meta["normalizer"], context=cfg.model.context,
                      return_scale=cfg.task.return_scale, target_return=target_return,
                      episodes=cfg.task.eval_episodes, max_episode_steps=spec.max_episode_steps, seed=cfg.seed)
        record.metrics({
            "rollout/success_rate": out["success_rate"], "rollout/return": out["return"],
            "rollout/n": out["episodes"], "rollout/errors": out["errors"],
            # the pretrained policy on its own (MT) tasks, when the checkpoint says (a foreign one may not)
            **({"pretrain/success_rate": meta["success_rate"]} if "success_rate" in meta else {}),
        })
        record.section("rollout_errors", out["error_messages"])
        record.section("pretrain", {k: v for k, v in meta.items()
                                    if k not in ("normalizer", "state_mean", "state_std", "datasets", "path")})
        return record.finish("success")


@hydra.main(config_path="../../conf", config_name="rl", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_command_line("rl")  # a misspelt key: its close match, before Hydra composes (eva_bench/checks.py)
    main()
