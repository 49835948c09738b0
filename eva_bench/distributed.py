"""Data parallelism across processes (``torchrun`` / ``accelerate launch``): a few helpers, no-ops in one process.

Every helper returns its input untouched unless a ``torch.distributed`` process group is initialized with more than
one rank, so single-process code paths (and their numbers) never change. A recipe joins the group the launcher
describes (``setup``, called by ``RunContext.from_config``):

    torchrun --nproc_per_node 2 -m tasks.language.train init=eva ...   # one run, its batches split over 2 ranks

Rank 0 speaks for the job: it alone takes the record's lock and writes the record; the other ranks follow it
through the collectives (eva_bench/recipe.py). Inside ``local()`` the helpers act as in one process: what one rank
builds on its own for everyone (a pretrained checkpoint, under a file lock the other ranks wait on).

Conventions: rank 0 is the reference; reductions are sums (callers divide by a summed count, so a rank with fewer
rows weighs in exactly as in one process seeing every rank's data); tensors are reduced on their own device.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn


_local = False  # inside local(): this process works on its own


def setup() -> None:
    """Join the process group that torchrun / accelerate describe in the environment (WORLD_SIZE > 1): NCCL with this
    rank's GPU, else gloo. Nothing in one process, or when a group already exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def device(setting: str | None = "auto") -> torch.device:
    """Where this process trains: ``auto`` (or None) is its GPU (under torchrun: LOCAL_RANK's) when there is one,
    else the CPU; anything else is a torch device string (``cpu``, ``cuda:1``)."""
    if setting not in (None, "auto"):
        return torch.device(setting)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_distributed() -> bool:
    """True inside a process group of more than one rank (and not inside ``local()``)."""
    return not _local and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def local():
    """Work this process does on its own inside a group: the helpers (and so ``fit``: no DDP) act as in one process.
    For artifacts one rank builds under a file lock while the others wait on the lock (no collective may run)."""
    global _local
    before, _local = _local, True
    try:
        yield
    finally:
        _local = before


def from_rank0(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (every rank must call this; the others' ``flag`` is ignored)."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(bool(flag))], dtype=torch.int64, device=_scalar_device())
    dist.broadcast(value, src=0)
    return bool(value.item())


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over ranks (the tensor itself in one process)."""
    if not is_distributed():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def sum_int(value: int) -> int:
    """The sum of an integer over ranks."""
    if not is_distributed():
        return value
    return int(sum_tensor(torch.tensor([value], dtype=torch.int64, device=_scalar_device())).item())


def same_everywhere(value: int, what: str) -> None:
    """Raise on every rank (never hang in a later collective) unless all ranks hold the same integer ``value``."""
    if not is_distributed():
        return
    both = torch.tensor([value, -value], dtype=torch.int64, device=_scalar_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if both[0].item() != -both[1].item():
        raise ValueError(f"{what} differs between ranks (from {-both[1].item()} to {both[0].item()}); every rank "
                         "must supply the same number")


def _scalar_device() -> torch.device:
    """Where small bookkeeping tensors travel: NCCL only moves CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cat_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` (n_rank x d, n may differ) concatenated in rank order: what one process holding all the
    ranks' data would have. Padded to the longest for the all-gather, then trimmed."""
    if not is_distributed():
        return rows
    counts = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device))
    counts = [int(c.item()) for c in counts]
    longest = max(counts)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, counts)])


def spread(items: Sequence, compute: Callable[[list], list]) -> list:
    """``compute(items)`` (one result per item, in order) with the items spread over the ranks: each rank computes
    every world_size-th item from its own rank on, and every rank gets all the results back in the items' order, so a
    caller reduces them exactly as one process would. For work without collectives inside (evaluation: generation,
    scoring, rollouts), which then costs each rank 1 / world_size of the time."""
    if not is_distributed():
        return list(compute(list(items)))
    mine = list(range(rank(), len(items), world_size()))
    results = list(compute([items[i] for i in mine]))
    if len(results) != len(mine):
        raise ValueError(f"spread: compute returned {len(results)} results for {len(mine)} items")
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, (mine, results))
    out: list = [None] * len(items)
    for indices, values in gathered:
        for i, value in zip(indices, values):
            out[i] = value
    return out


def broadcast_trainable(model: nn.Module) -> None:
    """Copy rank 0's trainable parameters (the adapters) to every rank, so all ranks start bit-identical."""
    if not is_distributed():
        return
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)


def shard(batch: Any) -> Any:
    """This rank's slice of a global batch: every tensor split along its first (example) dimension, through dicts,
    lists and tuples; anything else is passed through. The world size must divide the batch."""
    if not is_distributed():
        return batch
    ranks = world_size()

    def slice_of(tensor: torch.Tensor) -> torch.Tensor:
        n = tensor.shape[0]
        if n % ranks:
            raise ValueError(
                f"a batch of {n} examples cannot be split over {ranks} processes: choose a batch size that the "
                "world size divides (the per-process batch is batch_size / world_size)"
            )
        per = n // ranks
        return tensor[rank() * per : (rank() + 1) * per]

    return map_tensors(batch, slice_of)


def to_device(batch: Any, target: torch.device) -> Any:
    """``batch`` with every tensor on ``target`` (the batch itself when they are there already)."""
    return map_tensors(batch, lambda t: t if t.device == target else t.to(target, non_blocking=True))


def map_tensors(batch: Any, fn) -> Any:
    """``fn`` applied to every tensor of ``batch``, through dicts, lists, tuples and namedtuples."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return type(batch)({k: map_tensors(v, fn) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch
