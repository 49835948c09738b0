"""A Hydra sweeper that launches only the runs still to do: hydra/sweeper=skip_finished (every eva_bench recipe's
default).

Hydra's basic sweeper hands every combination to the launcher, so rerunning a half-finished SLURM sweep would submit
hundreds of jobs that each wake up, find their finished record and exit. This one composes each run's config first,
asks the recipe where that run's record lives (its module's ``context(cfg)``, the same call the run itself makes) and
launches only the runs without a finished record: missing and failed ones. A run in flight elsewhere is launched
again and waits on its record's lock (eva_bench/recipe.py). ``force=true`` launches everything.

Hydra loads plugins only from the ``hydra_plugins`` package, hence this module's place; it imports eva_bench lazily
because Hydra imports every plugin on every start.
"""

from __future__ import annotations

import logging
import sys

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override
from omegaconf import open_dict

log = logging.getLogger(__name__)


class SkipFinishedSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        recipe = sys.modules[task_function.__module__]
        self.context = getattr(recipe, "context", None)
        if self.context is None:
            raise TypeError(f"hydra/sweeper=skip_finished: the recipe module {recipe.__name__} defines no "
                            "`context(cfg)` returning its run's RunContext (see tasks/language/train.py)")

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        every = BasicSweeper.split_arguments(overrides, None)[0]
        todo = [job for job in every if not self._finished(job)]
        log.info(f"{len(every) - len(todo)} of {len(every)} runs have a finished record: launching {len(todo)}")
        if not todo:
            return []
        return [list(chunk) for chunk in BasicSweeper.split_overrides_to_chunks(todo, max_batch_size)]

    def validate_batch_is_legal(self, batch) -> None:
        """Nothing to do: ``split_arguments`` already composed every run's config (Hydra's check would compose each
        launched run a second time)."""

    def _finished(self, job: list[str]) -> bool:
        from eva_bench import results

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(job))
        with open_dict(cfg):
            del cfg["hydra"]  # a run's config, as the job will see it (its hash never includes hydra)
        if cfg.get("force"):
            return False
        return results.is_finished(self.context(cfg).path)

