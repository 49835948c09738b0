"""Learning-rate protocols: how a method's learning rate is chosen before its seeds are run and tested.

- ``fixed`` (no ``protocol`` key, or ``name: fixed``): every method trains at the one shared ``optim.lr``. The
  EVA paper's main tables, and the CPU defaults.
- ``tuned``: per method x rank, a *selection run* trains at each learning rate of ``lr_grid`` on the training
  split minus a seeded validation split of ``validation_size`` examples, and is scored on that validation split
  only (a recipe's validation metric, lower is better: answer NLL for language, cross-entropy for vision, held-out
  episodes' action MSE for RL); the lr with the best score is then run over the seeds on the whole training
  split and evaluated on test. Test data never reaches selection. The EVA paper grid-searched lr per method
  (arXiv 2410.07170v5, App. B: language around 5e-4; VTAB {2.5e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4} on train800/val200).

Selection runs are ordinary recipe runs with ``protocol.stage = validation``, recorded (and skipped when finished)
under ``<experiment>/lr_search/``: every seed of a method x rank reuses them, and a killed sweep keeps them. The
final record holds the whole grid's validation scores and the chosen lr (``protocol`` in the record; the tables'
``lr*`` row).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from .locks import exclusive_for_job

VALIDATION_METRIC = "validation/nll"  # the default selection metric: NLL on the validation split; lower is better
LR_SEARCH = "lr_search"  # selection runs' folder under the experiment's, and their W&B job type


def is_tuned(cfg: DictConfig) -> bool:
    protocol = cfg.get("protocol")
    name = protocol.get("name", "fixed") if protocol else "fixed"
    if name not in ("fixed", "tuned"):
        raise ValueError(f"unknown protocol {name!r}; valid: fixed, tuned")
    return name == "tuned"


def stage(cfg: DictConfig) -> str:
    """``final`` (the run that is tested) or ``validation`` (a selection run)."""
    return cfg.protocol.get("stage", "final") if is_tuned(cfg) else "final"


def check(cfg: DictConfig, train_size: int | None = None) -> None:
    """Bad protocol settings fail before any training."""
    if not is_tuned(cfg):
        return
    grid = list(cfg.protocol.lr_grid or [])
    bad = any(not isinstance(lr, (int, float)) or not lr > 0 or math.isinf(lr) for lr in grid)
    if stage(cfg) == "final" and (not grid or bad):  # a selection run has no grid: it runs at its own optim.lr
        raise ValueError(f"protocol.lr_grid must be a non-empty list of positive learning rates (got {grid})")
    size = cfg.protocol.validation_size
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"protocol.validation_size must be a positive number of examples (got {size})")
    if train_size is not None and size >= train_size:
        raise ValueError(
            f"protocol.validation_size={size} leaves no training data: the training split has {train_size} examples"
        )


def split(cfg: DictConfig, examples: Sequence[Any]) -> tuple[list, list]:
    """(train, validation): a selection run holds out ``validation_size`` seeded examples; a final run trains on all."""
    check(cfg, len(examples))
    if stage(cfg) != "validation":
        return list(examples), []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.protocol.split_seed)).tolist()
    held = set(order[: cfg.protocol.validation_size])
    train = [e for i, e in enumerate(examples) if i not in held]
    validation = [examples[i] for i in sorted(held)]
    return train, validation


def selection_config(cfg: DictConfig, lr: float) -> DictConfig:
    """The selection run of ``cfg``'s method x rank at ``lr``. Its config (and so its record id) holds its own lr but
    not the grid: widening the grid reuses the selection runs already done."""
    sel = cfg.copy()
    with open_dict(sel):
        sel.protocol.stage = "validation"
        sel.protocol.lr_grid = None
        sel.optim.lr = float(lr)
        sel.seed = cfg.protocol.selection_seed
        sel.experiment_name = f"{cfg.experiment_name}/{LR_SEARCH}"
        sel.force = False  # force reruns the final run, not a finished selection
    return sel


def select_lr(cfg: DictConfig, run: Callable[[DictConfig], dict], lock: Path | None = None,
              metric: str = VALIDATION_METRIC) -> dict:
    """Run (or reuse) the selection runs of ``cfg``'s method x rank; the grid's scores and the chosen lr.

    ``lock``: a file shared by every seed of this method x rank (``lock_path``): a run that finds another one
    selecting waits, then reuses its records instead of training the same selection runs at the same time.
    ``metric``: the selection runs' validation metric (lower is better). A diverged selection run scores +inf; if
    every lr diverged there is nothing to choose and that is an error.
    """
    scores = {}
    with exclusive_for_job(lock) if lock is not None else contextlib.nullcontext():
        for lr in cfg.protocol.lr_grid:
            record = run(selection_config(cfg, lr))
            value = record.get("metrics", {}).get(metric) if record.get("status") == "success" else None
            scores[float(lr)] = math.inf if value is None or not math.isfinite(value) else float(value)
    best = min(scores, key=lambda lr: (scores[lr], lr))  # ties: the smaller lr
    if math.isinf(scores[best]):
        raise RuntimeError(f"protocol tuned: every learning rate of {sorted(scores)} diverged in selection")
    at_edge = len(scores) > 1 and best in (min(scores), max(scores))
    if at_edge:
        warnings.warn(f"protocol tuned: the chosen lr {best:g} is at the edge of the grid {sorted(scores)}; the best "
                      "lr may lie outside it (widen protocol.lr_grid)", stacklevel=2)
    return {
        "name": "tuned",
        "metric": metric,
        "validation_size": cfg.protocol.validation_size,
        "grid": {str(lr): (None if math.isinf(v) else v) for lr, v in scores.items()},
        "selected_lr": best,
        "at_grid_edge": at_edge,  # the optimum may lie outside the grid
    }


def lock_path(record_path: Path, run: dict) -> Path:
    """The selection lock of a final run's method x rank: its record id without the seed, under lr_search/."""
    name = f"{run['task']}--{run['model']}--{run['init']}--r{run['rank']}--{run['config_hash']}.lock"
    return Path(record_path).parent / LR_SEARCH / name


def prepare(cfg: DictConfig, ctx, run: Callable[[DictConfig], dict],
            metric: str = VALIDATION_METRIC) -> tuple[DictConfig, dict | None]:
    """What a recipe does before it trains: check the protocol, and under ``tuned`` let a final run first run (or
    reuse) its selection runs through ``run`` and take the lr with the lowest ``metric``. Returns the config to train
    with and the selection (None under ``fixed`` and for a selection run itself)."""
    check(cfg)
    if not (is_tuned(cfg) and stage(cfg) == "final"):
        return cfg, None
    selection = select_lr(cfg, run, lock=lock_path(ctx.path, ctx.run), metric=metric)  # torchrun: rank 0 locks
    return with_lr(cfg, selection["selected_lr"]), selection


def with_lr(cfg: DictConfig, lr: float) -> DictConfig:
    out = cfg.copy()
    with open_dict(out):
        out.optim.lr = float(lr)
    return out


__all__ = [
    "LR_SEARCH", "VALIDATION_METRIC", "check", "is_tuned", "lock_path", "prepare", "select_lr", "selection_config",
    "split", "stage", "with_lr",
]
