"""EVA's statistics cache (``cache=True``): each input group's state after every batch, stored and replayed.

cache.py is the generic store (keys, fingerprints, one file per entry); this module is what EVA puts in it and how
a run reads it back. An entry holds each group's state after every batch it was offered, keyed by the model, the
batches and their row masks, the target layers, ``label_mask``, the batch cap and ``exact_pca``, and named by k. A
run is *replayed* from an entry: EVA's loop runs on the stored states instead of forward passes, with its own tau,
budget (r) and whitening/scaling. If the replay needs a batch the stored run did not give a group (it had stopped or
paused that group), the entry cannot say what would have happened: a miss (``Miss``), and the statistics are
recomputed and stored. Truncated PCA is served only by an entry of the same k, ``exact_pca`` by any k' >= k, so a
hit returns what a fresh computation returns (why: docs/methods.md, EVA, "Derivations").
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch

from . import cache as stats_cache
from .eva_pca import Group, State

def cache_key(model, batches, masks, targets, label_mask, cap, exact_pca) -> dict | None:
    try:
        return stats_cache.make_key(
            "eva",
            model=stats_cache.model_fingerprint(model),
            calibration=stats_cache.data_fingerprint({"batches": batches, "masks": masks}),
            params={"targets": targets, "label_mask": label_mask, "max_batches": cap, "exact_pca": exact_pca},
        )
    except TypeError as err:  # a batch type the fingerprint does not know: run uncached rather than fail
        warnings.warn(f"EVA: statistics not cached ({err})", stacklevel=4)
        return None


def replay(key: dict, k: int, exact_pca: bool, calibrate: Callable):
    """(feed, ranks, batches used) from the first stored entry that can replay this run; (None, None, 0) if none.

    ``calibrate(feed)``: EVA's loop on a feed, returning (ranks, batches used); it raises ``Miss`` where the entry
    falls short.
    """
    store = stats_cache.StatsCache()
    sizes = sorted(int(v[1:]) for v in store.variants(key) if re.fullmatch(r"k\d+", v))
    for size in sizes:
        if not (size == k or (exact_pca and size > k)):  # which entries may serve: module doc
            continue
        entry = store.load(key, f"k{size}")
        if entry is None:
            continue
        try:
            feed = Replay(entry, k)
            ranks, used = calibrate(feed)
        except Miss:
            continue
        except (KeyError, IndexError, TypeError) as err:  # a layout this code does not read: recompute it
            warnings.warn(f"EVA: ignoring a cache entry of another layout ({err!r}); recomputing", stacklevel=4)
            continue
        return feed, ranks, used
    return None, None, 0


def save(key: dict, groups: list[Group], k: int) -> None:
    """Store the groups' histories (recorded by a run from forward passes) under ``key``, as the entry for k."""
    stats_cache.StatsCache().save(key, to_entry(groups, k), f"k{k}")


class Miss(Exception):
    """A replayed run needs a batch the cached run did not give that group."""


class Replay:
    """Feeds the loop from a cached entry: each group's stored state after each batch it was offered, first k kept."""

    def __init__(self, entry: dict, k: int):
        self.k = k
        self.passes = 0  # no forward pass
        self.groups = [Group(list(names)) for names in entry["groups"]]
        self.stored = [_unpack(history, k) for history in entry["histories"]]
        self.position = [0] * len(self.groups)
        self.index = {id(g): j for j, g in enumerate(self.groups)}

    def __call__(self, i: int, active: list[Group] | None) -> None:
        for g in self.groups if active is None else active:
            j = self.index[id(g)]
            stored, p = self.stored[j], self.position[j]
            if p >= len(stored) or stored[p][0] != i:  # the stored run did not offer batch i to this group
                raise Miss
            _, rows, state = stored[p]
            if state is None and rows >= self.k:  # the stored run skipped rows that this (smaller) k would use
                raise Miss
            if state is not None:
                g.state = state
            self.position[j] = p + 1


def to_entry(groups: list[Group], k: int) -> dict:
    """A cache entry: the groups and, per group, its history (states stacked into tensors)."""
    histories = []
    for g in groups:
        states = [s for _, _, s in g.history if s is not None]
        nan = torch.full((k,), float("nan"))
        histories.append(
            {
                "batches": [i for i, _, _ in g.history],
                "rows": [n for _, n, _ in g.history],
                "has_state": [s is not None for _, _, s in g.history],
                "components": _stack([s.components for s in states]),
                "singular_values": _stack([s.singular_values for s in states]),
                "ratios": _stack([s.ratios for s in states]),
                "cosines": _stack([nan if s.cosines is None else s.cosines for s in states]),
            }
        )
    return {"k": k, "groups": [list(g.names) for g in groups], "histories": histories}


def _unpack(history: dict, k: int) -> list[tuple[int, int, State | None]]:
    out, j = [], 0
    for i, rows, has_state in zip(history["batches"], history["rows"], history["has_state"]):
        state = None
        if has_state:
            cos = history["cosines"][j]
            state = State(
                history["components"][j], history["singular_values"][j], history["ratios"][j],
                None if bool(cos.isnan().all()) else cos,
            ).head(k)
            j += 1
        out.append((i, rows, state))
    return out


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors) if tensors else torch.empty(0)


def to_cpu(state: State) -> State:
    cos = None if state.cosines is None else state.cosines.cpu()
    return State(state.components.cpu(), state.singular_values.cpu(), state.ratios.cpu(), cos)
