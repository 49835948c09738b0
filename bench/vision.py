"""Vision benchmarks: LoRA training of the CPU default's tiny ViT through the shared loop against a plain PyTorch loop
on the same model and batches (target >= 0.95x), and the backbone's cold-cache pretraining time.

    python -m bench.vision             # the pretraining figure is the cached backbone's own (timed when it was built)
    python -m bench.vision --cold      # pretrain again in a temporary cache and time it

Prints the figures and writes them with the machine to bench/results/vision-<date>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from bench import machine, save
from eva_bench.init import initialize
from eva_bench.recipe import build
from eva_bench.train import OptimConfig, fit
from tasks.vision import data
from tasks.vision.models import classification_loss

CONF = Path(__file__).resolve().parent.parent / "conf"
BATCH, STEPS, REPEATS = 64, 60, 5  # the recipe's batch; 60 steps = 4 epochs of 960 images; median of 5


def vision_config():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="vision", overrides=["experiment=vision_cpu"])


def training_rates(cfg) -> dict:
    backbone = build(cfg.model.load)
    task = data.cpu_task("mnist", test_size=10)
    images = backbone.prepare(task.train_images)
    model = backbone.model
    model.reset_classifier(task.num_classes)
    base, _ = initialize(model, "random", rank=8, alpha=1, target_modules=cfg.lora.target_modules,
                         lora={"bias": "all", "modules_to_save": ["head"]})
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        idx = torch.randint(len(images), (BATCH,), generator=g)
        batches.append({"images": images[idx], "labels": task.train_labels[idx]})
    optim = OptimConfig(**{**cfg.optim, "epochs": 1})

    def with_fit() -> float:
        m = copy.deepcopy(base)
        start = time.perf_counter()
        fit(m, lambda e: iter(batches), classification_loss, optim, steps_per_epoch=STEPS,
            batch_size=lambda b: len(b["labels"]))
        return time.perf_counter() - start

    def plain() -> float:  # forward, backward, clip, step, zero_grad: the minimum a LoRA loop does
        m = copy.deepcopy(base)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
        m.train()
        start = time.perf_counter()
        for batch in batches:
            classification_loss(m, batch).backward()
            torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    fit_times, plain_times = [], []
    for _ in range(REPEATS):  # alternated, so drift and contention hit both sides
        fit_times.append(with_fit())
        plain_times.append(plain())
    f, p = sorted(fit_times)[REPEATS // 2], sorted(plain_times)[REPEATS // 2]
    return {"fit_images_per_s": STEPS * BATCH / f, "plain_images_per_s": STEPS * BATCH / p, "fit_vs_plain": p / f,
            "fit_seconds": fit_times, "plain_seconds": plain_times}


def pretraining(cfg, cold: bool) -> dict:
    if cold:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["EVA_BENCH_CACHE"] = tmp
            start = time.perf_counter()
            backbone = build(cfg.model.load)
            wall = time.perf_counter() - start
            os.environ.pop("EVA_BENCH_CACHE")
    else:
        backbone, wall = build(cfg.model.load), None
    meta = json.loads((Path(backbone.info["cache"]) / "meta.json").read_text())
    return {"pretrain_seconds": meta["pretrain_seconds"], "wall_seconds_cold": wall,
            "pretrain_images_per_s": meta["images_per_second"],
            "fashion_mnist_test_accuracy": meta["fashion_mnist_test_accuracy"], "measured_cold_now": cold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="pretrain the backbone again in a temporary cache")
    args = parser.parse_args()
    cfg = vision_config()
    result = {"training": training_rates(cfg), "pretraining": pretraining(cfg, args.cold), "machine": machine(),
              "load_average": os.getloadavg()}
    save("vision", result)


if __name__ == "__main__":
    main()
