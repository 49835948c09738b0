"""The pretrained decision transformer: trained once per config on the pretraining (MT) tasks' data, then cached.

    model, meta = pretrained(cfg)   # meta: state normaliser, return scale, success on the pretraining tasks

The checkpoint's key hashes everything that determines it (model sizes and pretraining schedule, the task list and
their data specs); it is built under a lock, so the runs of a sweep started together wait for one build and then
all load it. A build killed halfway leaves no ``meta.json`` and is redone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from eva_bench import distributed
from eva_bench.artifacts import BUILD_THREADS, dataset_content_hash, machine, pinned_threads, sha256_file
from eva_bench.assets import MissingAssetError, cache_dir, local_folder
from eva_bench.locks import exclusive
from eva_bench.recipe import data_order, seed_everything
from eva_bench.train import OptimConfig, fit
from tasks.rl import data as rl_data
from tasks.rl import envs, models
from tasks.rl.evaluate import rollout
from tasks.rl.sequences import SequenceDataset, StateNormalizer

FORMAT = 2  # bump when pretraining changes: every cached checkpoint is rebuilt (2: pinned threads, seeded after data)
PRETRAIN_SEED = 0  # one pretrained model serves every fine-tuning seed (the paper fine-tunes one checkpoint)


def expert_spec(cfg: DictConfig, task: str) -> rl_data.ExpertSpec:
    return rl_data.ExpertSpec(task=task, **OmegaConf.to_container(cfg.task.data, resolve=True))


def build_model(cfg: DictConfig) -> torch.nn.Module:
    env = envs.make(cfg.task.finetune, cfg.task.data.max_episode_steps)
    m = cfg.model
    return models.decision_transformer(
        state_dim=env.observation_space.shape[0], act_dim=env.action_space.shape[0], hidden=m.hidden,
        layers=m.layers, heads=m.heads, context=m.context, max_episode_steps=cfg.task.data.max_episode_steps,
        dropout=m.dropout,
    )


def checkpoint_key(cfg: DictConfig) -> str:
    what = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "tasks": list(cfg.task.pretrain_tasks),
        "data": OmegaConf.to_container(cfg.task.data, resolve=True),
        "return_scale": cfg.task.return_scale,
        "eval_episodes": cfg.task.pretrain_eval_episodes,
        "threads": BUILD_THREADS,
        "format": FORMAT,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]


def pretrained(cfg: DictConfig):
    """(model, meta): the cached pretrained DT for ``cfg``, trained first if missing, or the checkpoint folder the
    model config names (``model.checkpoint``: ``conf/model/dt_local.yaml``). ``meta["path"]`` is the checkpoint's
    folder; ``meta["weights_sha256"]`` names its weights, ``meta["datasets"]`` its data."""
    if cfg.model.get("checkpoint"):
        return local_checkpoint(cfg.model.checkpoint, envs.make(cfg.task.finetune, cfg.task.data.max_episode_steps))
    for task in [*cfg.task.pretrain_tasks, cfg.task.finetune]:
        envs.check_task(task)
    if cfg.task.finetune in cfg.task.pretrain_tasks:
        raise ValueError(f"fine-tuning task {cfg.task.finetune!r} is also a pretraining task: it must be held out")
    path = checkpoint_folder(cfg)
    with exclusive(path.with_suffix(".lock")):
        if not (path / "meta.json").exists():
            if path.exists():
                shutil.rmtree(path)  # a killed build
            with distributed.local():  # under torchrun one rank builds it alone while the others wait on the lock
                _pretrain(cfg, path)
    from transformers import DecisionTransformerModel

    meta = json.loads((path / "meta.json").read_text())
    meta["normalizer"] = StateNormalizer(np.asarray(meta["state_mean"]), np.asarray(meta["state_std"]))
    meta["path"] = str(path)
    return DecisionTransformerModel.from_pretrained(path), meta


def local_checkpoint(name: str, env):
    """(model, meta) from a checkpoint folder: a decision transformer's ``save_pretrained`` files and the
    ``meta.json`` eva_bench writes beside them (the state normaliser it was trained with), e.g. a folder copied from
    another machine's ``<cache>/rl_pretrained/``. A folder that lacks them, or a model whose state or action size is
    not the task's, is an error here."""
    from transformers import DecisionTransformerModel

    folder = local_folder(name, key="model.checkpoint")
    if folder is None:
        raise MissingAssetError(f"model.checkpoint: no such directory: {name}")
    meta_file = folder / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if not {"state_mean", "state_std"} <= set(meta) or not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a decision-transformer checkpoint: it needs config.json and model weights "
                         f"(save_pretrained) and meta.json with the state_mean and state_std it was trained with")
    model = DecisionTransformerModel.from_pretrained(folder)
    sizes = (model.config.state_dim, model.config.act_dim)
    if sizes != (env.observation_space.shape[0], env.action_space.shape[0]):
        raise ValueError(f"{folder}: the model takes {sizes[0]} state and {sizes[1]} action dimensions; the task "
                         f"has {env.observation_space.shape[0]} and {env.action_space.shape[0]}")
    weights = folder / "model.safetensors"
    meta = {"weights_sha256": sha256_file(weights) if weights.is_file() else None, "threads": None, "machine": None,
            "datasets": {}, **meta, "path": str(folder)}
    meta["normalizer"] = StateNormalizer(np.asarray(meta["state_mean"]), np.asarray(meta["state_std"]))
    return model, meta


def checkpoint_folder(cfg: DictConfig) -> Path:
    """Where the pretrained DT of ``cfg`` is cached (``model.safetensors``, ``config.json``, ``meta.json``)."""
    return cache_dir() / "rl_pretrained" / f"{cfg.model.name}-{checkpoint_key(cfg)}"


def _pretrain(cfg: DictConfig, path: Path) -> None:
    specs = [expert_spec(cfg, t) for t in cfg.task.pretrain_tasks]
    datasets = rl_data.expert_datasets(specs, n_jobs=cfg.task.get("data_jobs", 1))
    # BUILD_THREADS torch threads whatever the calling run's own (a sweep job's 1, a single run's all cores): the
    # thread count changes the weights' last bits. Seeded after the data, which is loaded or built in this process.
    with pinned_threads(BUILD_THREADS):
        seed_everything(PRETRAIN_SEED)
        _pretrain_pinned(cfg, path, specs, datasets)


def _pretrain_pinned(cfg: DictConfig, path: Path, specs: list, datasets: list) -> None:
    episodes = [ep for d in datasets for ep in rl_data.load_episodes(d)]
    windows = SequenceDataset(episodes, cfg.model.context, cfg.task.return_scale)
    model = build_model(cfg).to(distributed.device(cfg.get("device")))  # paper scale: pretrain on the GPU
    schedule = cfg.model.pretrain
    print(f"pretraining the decision transformer on {len(specs)} tasks ({len(windows)} windows), {schedule.steps} steps")
    result = fit(
        model, random_batches(windows, schedule.batch_size, schedule.steps, PRETRAIN_SEED), models.action_loss,
        OptimConfig(**schedule.optim), steps_per_epoch=schedule.steps, batch_size=lambda b: len(b["states"]),
    )
    if result.status != "success":
        raise RuntimeError(f"pretraining diverged (final loss {result.final_loss}): lower model.pretrain.optim.lr")
    success = {}
    for spec, dataset in zip(specs, datasets):  # the pretrained policy on the tasks it was trained on
        target = max(float(ep.rewards.sum()) for ep in rl_data.load_episodes(dataset))
        out = rollout(model, spec.task, normalizer=windows.normalizer, context=cfg.model.context,
                      return_scale=cfg.task.return_scale, target_return=target,
                      episodes=cfg.task.pretrain_eval_episodes, max_episode_steps=spec.max_episode_steps)
        success[spec.task] = out["success_rate"]
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    meta = {
        "state_mean": windows.normalizer.mean.tolist(), "state_std": windows.normalizer.std.tolist(),
        "final_loss": result.final_loss, "steps": result.optimizer_steps, "seconds": result.seconds,
        "success": success, "success_rate": float(np.mean(list(success.values()))),
        "weights_sha256": sha256_file(tmp / "model.safetensors"), "threads": BUILD_THREADS, "machine": machine(),
        "datasets": {spec.task: {"id": spec.dataset_id, "content_sha256": dataset_content_hash(d)}
                     for spec, d in zip(specs, datasets)},
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    tmp.rename(path)  # complete or absent


def random_batches(windows: SequenceDataset, batch_size: int, steps: int, seed: int):
    """``batches(epoch)`` for ``fit``: ``steps`` batches of windows drawn with replacement, seeded by (seed, epoch)."""

    def batches(epoch: int):
        g = data_order(seed, epoch)
        for _ in range(steps):
            yield windows.batch(torch.randint(len(windows), (batch_size,), generator=g).tolist())

    return batches
