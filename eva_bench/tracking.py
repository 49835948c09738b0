"""Experiment tracking through W&B, never fatal: a W&B failure prints a warning and the run goes on untracked.

Without ``WANDB_API_KEY`` (or with ``WANDB_MODE=offline``) runs are logged offline under ``wandb/`` and can be
synced later with ``wandb sync``.

What a W&B user finds (``labels``): runs grouped by experiment (the tuned protocol's selection runs included), job
type ``train`` or ``lr_search`` (a selection run), and ``key:value`` tags for init, rank, task, model, protocol and
seed; per logged step the training loss, learning rate and gradient norm; each eval metric once; the init's
per-layer ranks (and EVA's explained variance) as a table, with only a few numbers of it in the summary.
"""

from __future__ import annotations

import os
import warnings


class Tracker:
    """A no-op tracker: the default (``logger=none``) and what a failing W&B degrades to."""

    def log(self, metrics: dict, step: int | None = None) -> None: ...

    def summary(self, values: dict) -> None: ...

    def table(self, key: str, columns: list[str], rows: list[list]) -> None: ...

    def finish(self, status: str) -> None: ...


def labels(run: dict, config: dict, tags=()) -> dict:
    """W&B's group, job type and tags of a run (``run``: the record's run keys; ``tags``: the user's own, from
    ``logger.tags``). A selection run's experiment is ``<experiment>/lr_search``: it joins its experiment's group
    as job type ``lr_search``, so a group holds one experiment's final and selection runs side by side."""
    from .protocol import LR_SEARCH

    protocol = config.get("protocol") or {}
    selection = protocol.get("stage") == "validation"
    group = run["experiment"].removesuffix(f"/{LR_SEARCH}") if selection else run["experiment"]
    keys = {"init": run["init"], "rank": run["rank"], "task": run["task"], "model": run["model"],
            "protocol": protocol.get("name", "fixed"), "seed": run["seed"]}
    return {"group": group, "job_type": LR_SEARCH if selection else "train",
            "tags": [f"{k}:{v}"[:64] for k, v in keys.items()] + list(tags or ())}  # W&B caps a tag at 64 characters


class WandbTracker(Tracker):
    def __init__(self, *, project: str, group: str, name: str, config: dict, tags=(), entity: str | None = None,
                 job_type: str | None = None):
        self.run = None
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.run = wandb.init(
                project=project, entity=entity, group=group, job_type=job_type, name=name, config=config,
                tags=list(tags), mode=mode, reinit="finish_previous",
            )
        except Exception as error:  # noqa: BLE001 - tracking must never kill a run
            self._fail("init", error)

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            self._fail(what, error)

    def _fail(self, what: str, error: Exception) -> None:
        warnings.warn(f"W&B {what} failed ({type(error).__name__}: {error}); continuing without W&B", stacklevel=3)
        self.run = None

    def log(self, metrics, step=None):
        self._call("log", lambda: self.run.log(metrics, step=step))

    def summary(self, values):
        self._call("summary", lambda: self.run.summary.update(values))

    def table(self, key, columns, rows):
        def log_table():
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

        self._call("table", log_table)

    def finish(self, status):
        self._call("finish", lambda: self.run.finish(exit_code=0 if status != "failed" else 1))


def make_tracker(kind: str, **kwargs) -> Tracker:
    """``kind`` from ``conf/logger/``: "none" (records only) or "wandb"."""
    if kind in (None, "none"):
        return Tracker()
    if kind == "wandb":
        return WandbTracker(**kwargs)
    raise ValueError(f"unknown logger {kind!r}; valid: none, wandb")
