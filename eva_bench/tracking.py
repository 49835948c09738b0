"""Experiment tracking through W&B, never fatal: a W&B failure prints a warning and the run goes on untracked.

Without ``WANDB_API_KEY`` (or with ``WANDB_MODE=offline``) runs are logged offline under ``wandb/`` and can be
synced later with ``wandb sync``.
"""

from __future__ import annotations

import os
import warnings


class Tracker:
    """A no-op tracker: the default (``logger=none``) and what a failing W&B degrades to."""

    def log(self, metrics: dict, step: int | None = None) -> None: ...

    def summary(self, values: dict) -> None: ...

    def finish(self, status: str) -> None: ...


class WandbTracker(Tracker):
    def __init__(self, *, project: str, group: str, name: str, config: dict, tags=(), entity: str | None = None):
        self.run = None
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.run = wandb.init(
                project=project, entity=entity, group=group, name=name, config=config, tags=list(tags),
                mode=mode, reinit="finish_previous",
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

    def finish(self, status):
        self._call("finish", lambda: self.run.finish(exit_code=0 if status != "failed" else 1))


def make_tracker(kind: str, **kwargs) -> Tracker:
    """``kind`` from ``conf/logger/``: "none" (records only) or "wandb"."""
    if kind in (None, "none"):
        return Tracker()
    if kind == "wandb":
        return WandbTracker(**kwargs)
    raise ValueError(f"unknown logger {kind!r}; valid: none, wandb")
