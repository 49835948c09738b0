"""One plain training loop for every task and every init: the same optimizer code whatever initialised the adapters.

AdamW over the trainable parameters, linear warmup then cosine (or constant) schedule, gradient accumulation and
clipping. A non-finite loss ends the run as ``diverged`` instead of training on garbage. Throughput matters (a
benchmark runs thousands of these): no host sync per step beyond what clipping needs, loss read back only when logged.

Under ``torchrun`` / ``accelerate launch`` (a process group of more than one rank) the same loop runs data-parallel:
every rank iterates the same global batches (the task's seeded order), takes its slice (eva_bench/distributed.py:
``shard``; the world size must divide the batch), and DDP averages the gradients, starting from rank 0's adapters.
Logged losses are averaged over ranks, so every rank sees the same curve and stops (or diverges) at the same step.
In one process nothing of this runs: the loop is the plain one.

For 7B models on one GPU: the model in bf16 (``model.load.dtype``), gradient checkpointing
(``model.gradient_checkpointing``: ``recipe.checkpoint_activations`` before PEFT wraps the model, so checkpointed
blocks see a grad-requiring input), and the paper's effective batch through ``grad_accumulation`` (e.g. micro-batch
4 x 8 = 32). See docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    lr: float  # peak learning rate
    epochs: float = 1.0  # passes over the training batches (fractions allowed)
    weight_decay: float = 0.0  # AdamW weight decay (EVA paper: 0 for language)
    warmup_ratio: float = 0.0  # share of optimizer steps spent warming up linearly from 0
    schedule: str = "cosine"  # "cosine" or "constant" after warmup
    grad_accumulation: int = 1  # batches per optimizer step (effective batch = batch size x this)
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None disables
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    log_every: int = 10  # optimizer steps between loss read-backs


@dataclass
class FitResult:
    status: str  # "success" or "diverged"
    optimizer_steps: int
    seconds: float
    examples: int  # training examples seen
    curve: list[tuple[int, float]] = field(default_factory=list)  # (optimizer step, mean loss since last log)
    final_loss: float | None = None


class Diverged(RuntimeError):
    pass


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    if schedule not in {"cosine", "constant"}:
        raise ValueError(f"unknown schedule {schedule!r}; valid: cosine, constant")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def fit(
    model: nn.Module,
    batches: Callable[[int], Iterable[Any]],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    optim: OptimConfig,
    *,
    steps_per_epoch: int,
    batch_size: Callable[[Any], int] = lambda batch: len(batch["input_ids"]),
    on_log: Callable[[int, float, dict], None] | None = None,
) -> FitResult:
    """Train the trainable parameters of ``model``.

    ``batches(epoch)`` yields that epoch's batches (the task decides shuffling, seeded by epoch);
    ``steps_per_epoch`` is the number of batches per epoch, so the schedule is known up front. Batches may live on
    the CPU: each is moved to the trainable parameters' device as it is used. Every ``log_every`` optimizer steps
    ``on_log(step, mean loss since the last call, {"lr": the step's lr, "grad_norm": its norm before clipping})``
    (no ``grad_norm`` when clipping is off: the norm is not computed then).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit: the model has no trainable parameters")
    if steps_per_epoch < 1:
        raise ValueError(f"fit: steps_per_epoch={steps_per_epoch}: no full batch to train on (fewer training "
                         "examples than one batch)")
    device = params[0].device
    total_batches = max(1, round(optim.epochs * steps_per_epoch))
    total_steps = math.ceil(total_batches / optim.grad_accumulation)
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, round(optim.warmup_ratio * total_steps), optim.schedule)
    )

    trained = _data_parallel(model, params)  # the model itself in one process
    model.train()
    result = FitResult(status="success", optimizer_steps=0, seconds=0.0, examples=0)
    running, running_n, seen = 0.0, 0, 0  # running: a device tensor once a loss arrives
    start = time.perf_counter()
    console = contextlib.ExitStack()  # the progress bar and its console redirection, when there is one
    bar = _progress_bar(total_steps, console)
    try:
        for epoch in range(math.ceil(optim.epochs)):
            for batch in batches(epoch):
                if seen == total_batches:
                    break
                step_ends = (seen + 1) % optim.grad_accumulation == 0 or seen + 1 == total_batches
                with _synchronized(trained, step_ends):
                    loss = loss_fn(trained, distributed.to_device(distributed.shard(batch), device))
                    (loss / optim.grad_accumulation).backward()
                running = running + loss.detach().float()  # stays on device: no sync per step
                running_n += 1
                seen += 1
                result.examples += batch_size(batch)
                if seen % optim.grad_accumulation and seen != total_batches:
                    continue
                if optim.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
                    if not torch.isfinite(norm):
                        raise Diverged(f"non-finite gradient norm at step {result.optimizer_steps}")
                optimizer.step()
                lr = scheduler.get_last_lr()[0]  # the step just taken's lr, for the progress line
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.optimizer_steps += 1
                if bar is not None:
                    bar.update()
                if result.optimizer_steps % optim.log_every == 0 or seen == total_batches:
                    mean = float(distributed.sum_tensor(running / running_n)) / distributed.world_size()
                    if not math.isfinite(mean):
                        raise Diverged(f"loss is {mean} at step {result.optimizer_steps}")
                    result.curve.append((result.optimizer_steps, mean))
                    result.final_loss = mean
                    details = {"lr": lr}
                    if optim.max_grad_norm is not None:  # read back only on logged steps, as the loss
                        details["grad_norm"] = float(norm)
                    if bar is not None:
                        bar.set_postfix_str(f"loss {mean:.4f}  lr {lr:.2e}", refresh=False)
                    if on_log is not None:
                        on_log(result.optimizer_steps, mean, details)
                    if distributed.rank() == 0:
                        elapsed = time.perf_counter() - start
                        left = elapsed / result.optimizer_steps * (total_steps - result.optimizer_steps)
                        clipped = f"  grad-norm {details['grad_norm']:.3g}" if "grad_norm" in details else ""
                        log.info(f"step {result.optimizer_steps}/{total_steps}  loss {mean:.4f}  lr {lr:.2e}{clipped}"
                                 f"  {elapsed:.0f} s, ETA {left:.0f} s")
                    running, running_n = 0.0, 0
    except Diverged as error:
        result.status = "diverged"
        result.curve.append((result.optimizer_steps, float("nan")))
        result.final_loss = float("nan")
        log.warning(f"fit: run diverged: {error}")
    finally:
        console.close()
        result.seconds = time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return result


def _progress_bar(total_steps: int, console: contextlib.ExitStack):
    """A bar over optimizer steps (loss, lr and ETA), closed with ``console``, when a person watches a terminal; None
    in a log file, a sweep worker or another rank, where the step lines every ``log_every`` are the progress."""
    if distributed.rank() != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    console.enter_context(logging_redirect_tqdm())  # the step lines print above the bar instead of through it
    return console.enter_context(tqdm(total=total_steps, unit="step", desc="training", leave=False,
                                      dynamic_ncols=True))


def _data_parallel(model: nn.Module, params: list[nn.Parameter]) -> nn.Module:
    """DDP around ``model`` inside a process group (its constructor broadcasts rank 0's parameters); else ``model``."""
    if not distributed.is_distributed():
        return model
    device = params[0].device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _synchronized(trained: nn.Module, step_ends: bool):
    """Gradient all-reduce only on the micro-batch that ends an optimizer step (DDP's ``no_sync`` on the others:
    the accumulated sum is the same, with one reduction per step instead of one per micro-batch)."""
    if isinstance(trained, DistributedDataParallel) and not step_ends:
        return trained.no_sync()
    return contextlib.nullcontext()
