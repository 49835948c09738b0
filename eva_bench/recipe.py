"""What every task recipe does around its own steps: find its record, skip if done, seed, record, track.

    ctx = RunContext.from_config(cfg, "language", task="math", model="stories260k")
    if (record := ctx.existing_or_claim()) is not None:
        return record
    with ctx.recording(selection) as record:
        ...; record.init(report); record.train(fit_result); record.metrics(metrics)
        return record.finish("success")

An exception inside ``recording()`` writes a ``failed`` record (with the traceback) and is re-raised, so a single
run exits non-zero and a Hydra sweep carries on with the next run and reports the failure at the end.

Concurrent jobs (a SLURM array, a requeued job next to its old self): ``existing_or_claim()`` takes the record's file
lock (``<record>.lock``) and holds it until the record is written, so a second job with the same run id waits there,
then skips the finished record (or reruns a failed one). The lock dies with its process: a killed job blocks nobody.
Under torchrun rank 0 holds the lock for the job while the other ranks wait with it (``locks.hold_for_job``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
import traceback
import weakref
from dataclasses import asdict, dataclass, field

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from . import assets, distributed, locks, results
from .checks import ConfigError, check_config, domain_problem
from .tracking import labels, make_tracker


log = logging.getLogger(__name__)

def build(spec, **kwargs):
    """``hydra.utils.call`` that lets our own errors through (a missing asset, an offline hub id) instead of
    wrapping them in Hydra's InstantiationException, so callers and tests see the real error type."""
    try:
        return hydra.utils.call(spec, **kwargs)
    except InstantiationException as error:
        if error.__cause__ is not None:
            raise error.__cause__ from None
        raise


def check_domain(cfg: DictConfig, domain: str) -> None:
    """Every task module composes options from the same config groups; a ``model``/``task`` option of another
    module (its ``domain:`` key; none means language) is a clear error before any work, not a crash later."""
    for group in ("model", "task"):
        problem = domain_problem(cfg, group, domain)  # names the option typed and lists the ones that fit
        if problem:
            raise ConfigError(problem + " (nothing was run)")


def initialize_from_config(model, cfg: DictConfig, calibration):
    """``eva_bench.init.initialize`` with the run's method (``cfg.init``: name and params) and adapter (``cfg.lora``):
    ``r``, ``alpha`` and ``target_modules``; every other ``lora`` key is a ``LoraConfig`` option shared by all methods
    (``dropout`` is PEFT's ``lora_dropout``). Under torchrun every rank builds the same global calibration batches."""
    from .init import initialize

    # each rank keeps its slice of every calibration batch (EVA and LoRA-DA combine the ranks' statistics: the union),
    # on the model's device
    device = next(model.parameters()).device
    calibration = dataclasses.replace(
        calibration, batches=[distributed.to_device(distributed.shard(b), device) for b in calibration.batches]
    )
    lora = OmegaConf.to_container(cfg.lora, resolve=True)
    rank, alpha, targets = lora.pop("r"), lora.pop("alpha"), lora.pop("target_modules")
    if "dropout" in lora:
        lora["lora_dropout"] = lora.pop("dropout")
    return initialize(model, cfg.init.name, rank=rank, alpha=alpha, target_modules=targets, calibration=calibration,
                      lora=lora, **cfg.init.params)


def place(model, cfg: DictConfig):
    """The built model on the run's device (``device``: auto = this rank's GPU when there is one, else CPU), with
    gradient checkpointing when the model config asks for it (``model.gradient_checkpointing``: 7B on one GPU)."""
    if cfg.model.get("gradient_checkpointing"):
        checkpoint_activations(model)
    return model.to(distributed.device(cfg.get("device")))


def checkpoint_activations(model) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (transformers' activation
    checkpointing): memory for a 7B model in bf16 on one GPU, at the cost of one more forward."""
    if not hasattr(model, "activation_checkpointing_enable"):
        raise ValueError(f"model.gradient_checkpointing: {type(model).__name__} is not a transformers model")
    model.activation_checkpointing_enable()
    model.enable_input_require_grads()  # reentrant checkpointing needs a grad-requiring input (frozen embeddings)


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU threads (a sweep of parallel 1-thread jobs beats oversubscribed 2-thread ones on tiny models)."""
    if threads:
        torch.set_num_threads(int(threads))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# The fairness contract: within a seed, every init method trains on the same data order and is initialized from the
# same calibration batches, so a difference between two methods' runs of one seed is the methods' (the tables pair
# seeds on this). Both come from generators of their own, apart from the global RNG the model build consumes.
def data_order(seed: int, epoch: int) -> torch.Generator:
    """The generator of a seed's data order in one epoch."""
    return torch.Generator().manual_seed(seed * 1000 + epoch)


def calibration_draw(seed: int) -> torch.Generator:
    """The generator of a seed's calibration batches (offset so that it never equals a data order's)."""
    return torch.Generator().manual_seed(10_007 + seed)


@dataclass
class RunContext:
    config: dict  # the resolved run config
    run: dict  # the keys a table groups by: experiment, task, model, init, rank, seed, config_hash
    path: object  # the record's path

    @classmethod
    def from_config(cls, cfg: DictConfig, domain: str, *, task: str, model: str, init: str | None = None,
                    rank: int | None = None, **keys) -> RunContext:
        """The record of a ``domain`` recipe's run (``check_domain``: another module's option is an error here).
        ``init``/``rank`` name a record that is not the config's init (scoring: "base" or a saved adapter's);
        ``keys``: further run keys tables group by (vision: ``task_group``, to average within VTAB groups).
        Under torchrun this process first joins the job's process group."""
        check_domain(cfg, domain)
        config = OmegaConf.to_container(cfg, resolve=True)
        check_config(config)  # before any work: a sweep fails at its plan, before launching a run
        distributed.setup()
        run = {
            "experiment": cfg.experiment_name,
            "task": task,
            "model": model,
            "init": init or cfg.init.name,
            "rank": int(cfg.lora.r if rank is None else rank),
            "seed": int(cfg.seed),
            "config_hash": results.config_hash(config),
            **keys,
        }
        run_id = results.run_id(task, model, run["init"], run["rank"], cfg.seed, config)
        return cls(config=config, run=run, path=results.record_path(cfg.results_dir, cfg.experiment_name, run_id))

    def existing_or_claim(self) -> dict | None:
        """The finished record when one exists; otherwise None, and this job now holds the record's lock until the
        record is written (a job running the same record elsewhere is waited for first). Under torchrun every rank
        calls it and rank 0 decides for all: only it locks and writes the record (``locks.hold_for_job``)."""
        self._claim()
        done = False
        if distributed.rank() == 0:
            record, problem = results.check_record(self.path)
            if problem not in (None, "missing"):  # unreadable, malformed or edited: redone, the bad file kept aside
                results.set_aside(self.path, problem)
            done = record is not None and record["status"] in results.FINISHED and not self.config.get("force")
        done = distributed.from_rank0(done)
        if not done:
            return None
        if distributed.rank() == 0:
            print(f"skip (finished record exists): {self.path}")
        self._release()
        return self.existing()

    def _claim(self) -> None:
        if getattr(self, "_claimed", False):
            return
        waiting = f"waiting: another job is running {self.path.stem}"
        handle = locks.hold_for_job(self.path.with_suffix(".lock"), waiting=waiting)  # None on ranks other than 0
        self._lock, self._claimed = handle, True
        if handle is not None:
            weakref.finalize(self, handle.close)  # a recipe that fails before recording() still lets the lock go

    def _release(self) -> None:
        handle, self._lock, self._claimed = getattr(self, "_lock", None), None, False
        if handle is not None:
            handle.close()  # closing the file releases the lock

    def existing(self) -> dict:
        return results.read_record(self.path)

    @contextlib.contextmanager
    def recording(self, selection: dict | None = None):
        """The run's record, written when the block ends (``failed`` with the traceback if it raises). It holds the
        tuned protocol's lr ``selection`` (None under the fixed protocol); torch's threads are pinned to the run's
        ``threads`` for the block."""
        self._claim()  # no-op after existing_or_claim(); a recipe that never asked still gets the record to itself
        leader = distributed.rank() == 0  # the other ranks of a torchrun job neither lock, log nor write
        logger = dict(self.config.get("logger") or {}) if leader else {}
        kind = logger.pop("kind", "none")
        tags = logger.pop("tags", ())
        grouping = labels(self.run, self.config, tags) if kind == "wandb" else {}  # W&B's group, job type and tags
        tracker = make_tracker(kind, name=self.path.stem, config=self.config, **grouping, **logger)
        set_threads(self.config.get("threads"))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with assets.files_read() as data:  # the data files this run reads, named with their SHA-256 in its record
            record = Recorder(self, tracker, data=data)
            record.protocol(selection)
            try:
                yield record
            except BaseException as error:
                record.fail(error)
                raise
            finally:
                self._release()


@dataclass
class Recorder:
    ctx: RunContext
    tracker: object
    data: set = field(default_factory=set)  # the data files read (assets.files_read)
    started_at: str = field(default_factory=results.now)
    start: float = field(default_factory=time.perf_counter)
    body: dict = field(default_factory=dict)

    def section(self, name: str, value) -> None:
        """A top-level section of the record beyond the shared ones (vision: ``backbone``; RL: ``artifacts``)."""
        self.body[name] = value

    def log_train(self, step: int, loss: float, details: dict) -> None:
        """``fit``'s ``on_log``: the loss since the last log line, the step's lr and gradient norm."""
        self.tracker.log({"train/loss": loss, **{f"train/{k}": v for k, v in details.items()}}, step)

    def init(self, report) -> None:
        ranks = [r for r in (report.ranks or {}).values() if isinstance(r, (int, float))]
        spread = {"rank_min": min(ranks), "rank_mean": sum(ranks) / len(ranks), "rank_max": max(ranks)} if ranks else {}
        shape = (f"ranks {spread['rank_min']}/{spread['rank_mean']:.1f}/{spread['rank_max']} (min/mean/max) over "
                 f"{len(ranks)} layers") if ranks else "no adapted layers"
        log.info(f"init {report.method}: {shape}, {report.calibration_batches} calibration batches, "
                 f"{report.seconds:.1f} s")
        self.body["init_report"] = report.to_dict()
        self.body["trainable_parameters"] = report.trainable_parameters
        # the per-layer detail as a table, a few numbers of it in the summary (the report has a leaf per layer)
        explained = (report.details or {}).get("explained_variance") or {}
        rows = [[layer, rank, (report.scalings or {}).get(layer), explained.get(layer)]
                for layer, rank in (report.ranks or {}).items()]
        self.tracker.table("init/layers", ["layer", "rank", "scaling", "explained_variance"], rows)
        self.tracker.summary({"init/method": report.method, "init/seconds": report.seconds,
                              **{f"init/{k}": v for k, v in spread.items()}})

    def protocol(self, selection: dict | None) -> None:
        """The tuned protocol's lr selection (grid scores, chosen lr); nothing under the fixed protocol."""
        if selection is not None:
            self.body["protocol"] = selection
            self.tracker.summary({"protocol": selection})

    def train(self, result) -> None:
        info = asdict(result)
        info["examples_per_second"] = result.examples / result.seconds if result.seconds else None
        self.body["train"] = info

    def metrics(self, metrics: dict) -> None:
        self.body["metrics"] = metrics
        steps = (self.body.get("train") or {}).get("optimizer_steps")  # beside the last training step's row
        self.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, steps)  # W&B's summary takes them from here

    def finish(self, status: str, error: str | None = None) -> dict:
        status, error = self._earned(status, error)
        if distributed.rank() != 0:  # rank 0 writes the job's record; the others skip its provenance
            return {"run": self.ctx.run, "status": status, "error": error, "metrics": self.body.pop("metrics", {})}
        record = {
            "run": self.ctx.run,
            "status": status,
            "error": error,
            "metrics": self.body.pop("metrics", {}),
            **self.body,
            "config": self.ctx.config,
            "seconds": time.perf_counter() - self.start,
            "peak_memory": results.peak_memory_bytes(),
            "provenance": {**results.provenance(), "data": assets.file_hashes(self.data)},
            "started_at": self.started_at,
            "finished_at": results.now(),
        }
        results.write_record(self.ctx.path, record)
        self.tracker.summary({"status": status})  # the metrics are there already, logged once as eval/<name>
        self.tracker.finish(status)
        rounded = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record["metrics"].items())
        log.info(f"{status}: {self.ctx.path}" + (f"\n  {rounded}" if rounded else ""))
        return record

    def _earned(self, status: str, error: str | None) -> tuple[str, str | None]:
        """A success must be earned: at least one optimizer step when the run trained, finite metrics."""
        if status != "success":
            return status, error
        if (self.body.get("train") or {}).get("optimizer_steps") == 0:
            return "failed", "no optimizer step was taken (fewer training examples than one batch?)"
        metrics = self.body.get("metrics") or {}
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values()):
            return "diverged", None  # NaN or inf weights or scores: a result, not a success
        return status, error

    def fail(self, error: BaseException) -> None:
        message = "".join(traceback.format_exception(error))
        with contextlib.suppress(Exception):  # never mask the original error
            self.finish("failed", error=message)
