"""A Hydra sweeper that launches only the runs still to do: hydra/sweeper=skip_finished (every eva_bench recipe's
default).

Hydra's basic sweeper hands every combination to the launcher, so rerunning a half-finished SLURM sweep would submit
hundreds of jobs that each wake up, find their finished record and exit. This one composes each run's config first,
asks the recipe where that run's record lives (its module's ``context(cfg)``, the same call the run itself makes) and
launches only the runs without a finished record: missing and failed ones. A run in flight elsewhere is launched
again and waits on its record's lock (eva_bench/recipe.py). ``force=true`` launches everything.

``grids`` makes a sweep the union of several grids, each crossed with ``params``: an ablation runs random once
and EVA at each rho, instead of crossing random with every rho (a grid's key replaces the same key of ``params``; the
command line narrows them all). A grid's own settings name its runs' ``variant`` (``rho=1.5``) in tables.

Before launching it prints a plan: runs to launch, runs already finished, and an estimated wall time from the
committed reference records' run times and the launcher's parallelism (``dry_run: true`` stops there). While the
sweep runs it watches the planned records and prints "k of N" with the elapsed time and an ETA as each one lands.

Hydra loads plugins only from the ``hydra_plugins`` package, hence this module's place; it imports eva_bench lazily
because Hydra imports every plugin on every start.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import CompactHydraException
from omegaconf import open_dict
from omegaconf.errors import InterpolationResolutionError

log = logging.getLogger(__name__)


class SkipFinishedSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 grids: list[dict[str, str]] | None = None, dry_run: bool = False, reference: str | None = None,
                 progress_every: float = 5.0) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(grid) for grid in grids or []]
        self.arguments: list[str] = []
        self.context = None
        self.dry_run = dry_run
        self.reference = reference
        self.progress_every = progress_every
        self.watcher: ProgressWatcher | None = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        if is_slurm(config.hydra.launcher):  # before super().setup instantiates the launcher (resolving partition)
            check_partition(config.hydra.launcher)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        recipe = sys.modules[task_function.__module__]
        self.context = getattr(recipe, "context", None)
        if self.context is None:
            raise TypeError(f"hydra/sweeper=skip_finished: the recipe module {recipe.__name__} defines no "
                            "`context(cfg)` returning its run's RunContext (see tasks/language/train.py)")

    def sweep(self, arguments: list[str]) -> Any:
        slurm = is_slurm(self.config.hydra.launcher)
        self.arguments = list(arguments)  # the command line's overrides, applied after a grid's
        try:
            return super().sweep(arguments)
        except Exception as error:
            # sbatch's refusal (a partition, gres or memory request the cluster cannot give) arrives as submitit's
            # FailedJobError under ~40 lines of traceback; its "sbatch: error:" lines are what the user must read
            if slurm and type(error).__name__ == "FailedJobError":
                raise SlurmError(f"sbatch refused the sweep: {sbatch_error(str(error))}") from error
            raise
        finally:
            if self.watcher is not None:
                self.watcher.stop()

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        every = self._every_job(overrides)
        contexts = [self._context(job) for job in every]
        todo = [(job, ctx) for job, ctx in zip(every, contexts) if ctx is not None]
        log.info(f"{len(every) - len(todo)} of {len(every)} runs have a finished record: launching {len(todo)}")
        self._log_plan(todo, contexts)
        if self.dry_run or not todo:
            return []
        self.watcher = ProgressWatcher([ctx.path for _, ctx in todo], self.progress_every)
        self.watcher.start()
        jobs = [job for job, _ in todo]
        return [list(chunk) for chunk in BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size)]

    def _every_job(self, overrides: list[Override]) -> list[list[str]]:
        """Every run of the sweep: the cross product of ``overrides`` (params, then the command line), or with
        ``grids`` the union of each grid's cross product. Jobs keep the first key outermost across grids (the
        experiments sweep seed first, so seed 0's selection runs go before the seeds that reuse them)."""
        if not self.grids:
            return BasicSweeper.split_arguments(overrides, None)[0]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        from_command_line = overrides[len(overrides) - len(self.arguments):] if self.arguments else []
        from_params = overrides[: len(overrides) - len(from_command_line)]
        jobs = []
        for grid in self.grids:
            from_grid = parser.parse_overrides([f"{key}={value}" for key, value in grid.items()])
            for job in BasicSweeper.split_arguments([*from_params, *from_grid, *from_command_line], None)[0]:
                job = job + variant_label(job, grid, self.params)
                if job not in jobs:  # grids that overlap (or a command line that narrows them) run a job once
                    jobs.append(job)
        first_seen = {}
        for job in jobs:
            first_seen.setdefault(job[0], len(first_seen))
        return sorted(jobs, key=lambda job: first_seen[job[0]])  # stable: each grid's order within a seed

    def validate_batch_is_legal(self, batch) -> None:
        """Nothing to do: ``split_arguments`` already composed every run's config (Hydra's check would compose each
        launched run a second time)."""

    def _context(self, job: list[str]):
        """The run's RunContext if it is to be launched, None when its finished record exists."""
        from eva_bench import results

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(job))
        with open_dict(cfg):
            del cfg["hydra"]  # a run's config, as the job will see it (its hash never includes hydra)
        ctx = self.context(cfg)
        record, problem = results.check_record(ctx.path)
        if problem not in (None, "missing"):  # the run moves it aside and redoes it (RunContext.finished)
            log.warning(f"invalid record {ctx.path}: {problem}; launching its run again")
        finished = record is not None and record["status"] in results.FINISHED
        return None if finished and not cfg.get("force") else ctx

    def _log_plan(self, todo: list, contexts: list) -> None:
        """The runs to launch (each, in a dry run), and the estimated wall time from the reference's run times."""
        if self.dry_run:
            for job, ctx in todo:
                log.info(f"would launch {ctx.path.stem}  ({' '.join(job)})")
        if todo:
            log.info(self._estimate([ctx for _, ctx in todo]))
        if self.dry_run:
            log.info("dry run: nothing launched")

    def _estimate(self, contexts: list) -> str:
        from eva_bench.reproduce import REFERENCE

        reference = Path(self.reference) if self.reference else REFERENCE
        estimate, where = plan_seconds(contexts, reference), contexts[0].path.parent
        if estimate["known"] == 0:
            return f"plan: {len(contexts)} runs into {where}; no reference record under {reference} to estimate from"
        untimed, selection = len(contexts) - estimate["known"], estimate["selection"]
        basis = [f"{estimate['known']} timed by their reference record"] + \
            ([f"{untimed} at their median"] if untimed else []) + \
            ([f"{selection} lr-selection runs still to do"] if selection else [])
        workers = self._parallelism(len(contexts))
        return (f"plan: {len(contexts)} runs into {where}, {workers} at a time ({self._launcher_name()}): about "
                f"{clock(estimate['seconds'] / workers)} wall, {clock(estimate['seconds'])} of run time "
                f"({', '.join(basis)}; from {reference} on {estimate['cpu']})")

    def _launcher_name(self) -> str:
        return str(self.config.hydra.launcher.get("_target_", "?")).rsplit(".", 1)[-1]

    def _parallelism(self, runs: int) -> int:
        """How many runs the launcher runs at once: joblib's n_jobs, SLURM's array_parallelism, every submitit-local
        job at once, one for Hydra's basic launcher."""
        launcher = self.config.hydra.launcher
        if launcher.get("n_jobs") is not None:
            n = int(launcher.n_jobs)
            return max(1, os.cpu_count() + 1 + n if n < 0 else n)  # joblib: -1 = every core
        if launcher.get("array_parallelism") is not None:
            return max(1, min(runs, int(launcher.array_parallelism)))
        if "LocalLauncher" in self._launcher_name():
            return runs
        return 1


def variant_label(job: list[str], grid: dict, params: dict) -> list[str]:
    """The override naming a grid's job in tables and figures (``variant='rho=1.5'``): the grid's own settings but
    its init (the column already says it), as ``leaf=value``; none when the grid sets ``variant`` or adds nothing."""
    own = [key for key in grid if key not in params and key not in ("init", "variant")]
    if "variant" in grid or not own:
        return []
    values = dict(override.split("=", 1) for override in job)
    label = " ".join(f"{key.rsplit('.', 1)[-1]}={values[key]}" for key in own)
    return [f"variant='{label}'"]


class SlurmError(CompactHydraException):
    """A SLURM sweep that cannot be submitted: Hydra prints its message alone, without a traceback."""


def is_slurm(launcher) -> bool:
    return str(launcher.get("_target_", "")).endswith(".SlurmLauncher")


def check_partition(launcher) -> None:
    """Stop a SLURM sweep before any run is composed or submitted when its partition is unset or, where ``sinfo``
    is installed, not one of the cluster's partitions (SLURM accepts a comma-separated list: each is checked)."""
    try:
        partition = launcher.partition
    except InterpolationResolutionError:  # slurm.yaml's default, ${oc.env:EVA_BENCH_SLURM_PARTITION}, is unset
        partition = None
    if not partition:
        raise SlurmError("hydra/launcher=slurm needs a partition: hydra.launcher.partition=<name> (make: "
                         "PARTITION=<name>) or EVA_BENCH_SLURM_PARTITION; nothing was submitted")
    if shutil.which("sinfo") is None:
        return  # not on a SLURM machine: sbatch's own refusal is shortened in sweep()
    answer = subprocess.run(["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True, timeout=60)
    if answer.returncode != 0:
        raise SlurmError(f"sinfo failed, so the partition {partition!r} could not be checked: "
                         f"{sbatch_error(answer.stderr) or 'exit ' + str(answer.returncode)}; nothing was submitted")
    known = sorted(set(answer.stdout.split()))
    unknown = [name for name in str(partition).split(",") if name not in known]
    if unknown:
        raise SlurmError(f"SLURM partition {', '.join(map(repr, unknown))} does not exist on this cluster (sinfo "
                         f"lists: {', '.join(known) or 'none'}); nothing was submitted")


def sbatch_error(stderr: str) -> str:
    """The line that says why a SLURM command refused: its last "error:" line, else its last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [""])[-1]


def plan_seconds(contexts: list, reference: Path) -> dict:
    """Run time of the planned runs: each run's reference record's ``seconds`` (same run id), the median of those
    for runs without one, plus the tuned protocol's reference selection runs that the fresh folder still lacks."""
    from eva_bench import results

    timed, cpus = [], set()
    for ctx in contexts:
        record = results.read_record(reference / ctx.path.parent.name / ctx.path.name)
        if isinstance(record, dict) and isinstance(record.get("seconds"), (int, float)):
            timed.append(record["seconds"])
            cpus.add(((record.get("provenance") or {}).get("hardware") or {}).get("cpu"))
    selection = []
    for ctx in contexts:
        for path in sorted((reference / ctx.path.parent.name / "lr_search").glob("*.json")):
            if not (ctx.path.parent / "lr_search" / path.name).exists():
                record = results.read_record(path)
                if isinstance(record, dict) and isinstance(record.get("seconds"), (int, float)):
                    selection.append((path.name, record["seconds"]))
        break  # every run shares its experiment's lr_search folder
    median = statistics.median(timed) if timed else 0.0
    seconds = sum(timed) + median * (len(contexts) - len(timed)) + sum(s for _, s in selection)
    return {"seconds": seconds, "known": len(timed), "selection": len(selection),
            "cpu": ", ".join(sorted(c for c in cpus if c)) or "an unnamed machine"}


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class ProgressWatcher:
    """Watches the planned records from the sweep's process, whatever the launcher (joblib workers, SLURM jobs on
    other nodes sharing the file system): "k of N" with elapsed time and ETA each time a record lands."""

    def __init__(self, paths: list[Path], every: float) -> None:
        self.paths, self.every = list(paths), every
        self.started = time.time()
        self.done: dict[Path, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sweep-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every + 1)
        self.poll()  # the last records, landed since the previous poll

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self) -> None:
        from eva_bench import results

        for path in self.paths:
            if path in self.done:
                continue
            try:
                if path.stat().st_mtime < self.started:  # force=true: the old record, not yet rewritten
                    continue
            except FileNotFoundError:
                continue
            record = results.read_record(path)
            if not isinstance(record, dict) or record.get("status") is None:
                continue
            self.done[path] = record["status"]
            k, n, elapsed = len(self.done), len(self.paths), time.time() - self.started
            failed = sum(s == "failed" for s in self.done.values())
            eta = "" if k == n else f", ETA {clock(elapsed / k * (n - k))}"
            log.info(f"[{k} of {n}] {record['status']}: {path.stem}  (elapsed {clock(elapsed)}{eta}"
                     + (f"; {failed} failed" if failed else "") + ")")
