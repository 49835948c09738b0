"""The vision recipe: LoRA transfer of a pretrained ViT to one VTAB-1K-style task, one init method, one record.

    python -m tasks.vision.train init=eva lora.r=8 seed=0 task.dataset=mnist
    python -m tasks.vision.train -m experiment=vision_cpu      # every task x method x rank x seed

Reads top to bottom: skip if done -> (tuned protocol: choose the lr) -> seed -> build backbone and task -> new head
-> initialize -> train -> evaluate -> record.
"""

from __future__ import annotations

import math

import hydra
import torch
from omegaconf import DictConfig

from eva_bench import protocol
from eva_bench.checks import check_command_line
from eva_bench.init import Calibration
from eva_bench.recipe import (
    RunContext, build, calibration_draw, data_order, initialize_from_config, place, seed_everything,
)
from eva_bench.train import OptimConfig, fit
from tasks.vision.data import check_dataset, task_group
from tasks.vision.models import accuracy_and_nll, classification_loss


def context(cfg: DictConfig) -> RunContext:
    """This run's record: its keys and path (the sweeper asks too, to launch only unfinished runs); tables average
    within VTAB groups."""
    check_dataset(cfg.task.load)  # before any record: a dataset the task's loader does not have
    return RunContext.from_config(cfg, "vision", task=cfg.task.name, model=cfg.model.name,
                                  task_group=task_group(cfg.task.name))


def run(cfg: DictConfig) -> dict:
    ctx = context(cfg)
    if (record := ctx.existing_or_claim()) is not None:
        return record
    cfg, selection = protocol.prepare(cfg, ctx, run)  # tuned: selection runs first (recorded, reused)
    with ctx.recording(selection) as record:  # records the lr selection; pins torch's threads
        seed_everything(cfg.seed)

        # build: the pretrained backbone (cached) and the task's images, prepared for it (size, channels, norm)
        backbone = build(cfg.model.load)
        record.section("backbone", backbone.info)  # which weights: the cached build's SHA-256, or the hub id
        task = build(cfg.task.load)
        train_images, test_images = backbone.prepare(task.train_images), backbone.prepare(task.test_images)
        model = backbone.model
        model.reset_classifier(task.num_classes)  # a fresh linear head on the class token, seeded by cfg.seed
        model = place(model, cfg)  # on this rank's device (images stay on the CPU; each batch moves when used)
        # VTAB-1K: a selection run trains on 800 and is scored on 200 held-out training images; test never enters
        train_idx, validation_idx = protocol.split(cfg, list(range(len(train_images))))
        train_idx = torch.tensor(train_idx)
        batch_size = cfg.data.batch_size
        if len(train_idx) < batch_size:
            raise ValueError(f"{len(train_idx)} training images < data.batch_size {batch_size}")

        # initialize: the same seeded calibration batches for every data-driven method
        calibration = Calibration(
            batches=calibration_batches(train_images, task.train_labels, train_idx, cfg.calibration, cfg.seed),
            forward=lambda m, b: m(b["images"]),
            loss=classification_loss,
            rows=lambda b: token_rows(model, b, cfg.calibration.class_token),
            dataset_size=len(train_idx),
        )
        model, report = initialize_from_config(model, cfg, calibration)
        record.init(report)

        # train: the shared loop; every epoch reshuffles with a generator seeded by (seed, epoch)
        def epoch_batches(epoch: int):
            order = train_idx[torch.randperm(len(train_idx), generator=data_order(cfg.seed, epoch))]
            for i in range(0, len(order) - batch_size + 1, batch_size):  # drop the ragged last batch
                idx = order[i : i + batch_size]
                yield {"images": train_images[idx], "labels": task.train_labels[idx]}

        result = fit(
            model,
            epoch_batches,
            classification_loss,
            OptimConfig(**cfg.optim),
            steps_per_epoch=len(train_idx) // batch_size,
            batch_size=lambda b: len(b["labels"]),
            on_log=record.log_train,  # loss, lr and gradient norm to the tracker
        )
        record.train(result)
        if result.status == "diverged":
            return record.finish("diverged")

        if validation_idx:  # a selection run is scored on its validation split only
            idx = torch.tensor(validation_idx)
            scores = accuracy_and_nll(model, train_images[idx], task.train_labels[idx], cfg.data.eval_batch_size)
            record.metrics({protocol.VALIDATION_METRIC: scores["nll"], "validation/accuracy": scores["accuracy"],
                            "validation/n": len(idx)})
            return record.finish("success" if math.isfinite(scores["nll"]) else "diverged")

        # evaluate: the task's test split only
        scores = accuracy_and_nll(model, test_images, task.test_labels, cfg.data.eval_batch_size)
        record.metrics({"test/accuracy": scores["accuracy"], "test/nll": scores["nll"], "test/n": len(test_images)})
        return record.finish("success")


def calibration_batches(images, labels, train_idx, cfg, seed: int) -> list[dict]:
    """``cfg.batches`` batches drawn without replacement from the training split, seeded by ``seed``."""
    needed = min(cfg.batches * cfg.batch_size, len(train_idx))
    chosen = train_idx[torch.randperm(len(train_idx), generator=calibration_draw(seed))[:needed]]
    return [{"images": images[chosen[i : i + cfg.batch_size]], "labels": labels[chosen[i : i + cfg.batch_size]]}
            for i in range(0, len(chosen), cfg.batch_size)]


def token_rows(model, batch: dict, class_token: bool) -> torch.Tensor:
    """Which rows of a block's input count for the data-driven inits: every patch token, and the class (prefix)
    tokens too when ``class_token`` (EVA, Sec. 3: one row per image patch). Shape (batch, tokens)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    mask = torch.ones(len(batch["images"]), tokens, dtype=torch.bool)
    if not class_token:
        mask[:, : base.num_prefix_tokens] = False
    return mask


@hydra.main(config_path="../../conf", config_name="vision", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_command_line("vision")  # a misspelt key: its close match, before Hydra composes (eva_bench/checks.py)
    main()
