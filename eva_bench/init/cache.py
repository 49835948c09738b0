"""On-disk cache for expensive init statistics (EVA components; later LoRA-DA factors and gradients).

    key = make_key("eva", model=model_fingerprint(model), calibration=data_fingerprint(batches), params={...})
    value = StatsCache().load(key, "k16")      # None: never computed, or the file was unreadable
    StatsCache().save(key, value, "k16")

A key holds everything the statistics depend on, so a hit is never stale:
- the model: the class, its config (when it has one) and *every* parameter and buffer (names, shapes, dtypes,
  bytes). Not only the target layers': a layer's inputs depend on every weight upstream of it (embedding, norms,
  layers that are not adapted). Cost: one pass over the weights at ~0.5 GB/s (SHA-256 on this machine's CPU) plus the
  device-to-host copy: milliseconds for stories260K (1 MB), about 30 s for a 7B model in bf16 (13.5 GB);
- the calibration data: the bytes of every tensor in the batches, recursively through dicts, lists and tuples (and
  whatever the method adds, e.g. the row masks the task's callbacks produce: callbacks are code and are not hashed);
- the method name and the statistic's own parameters;
- versions: torch, peft and ``FORMAT_VERSION`` (bump it whenever a statistic's computation changes).

``variant`` names entries that share a key but differ in size (EVA: how many components were computed), so a method
can look for a larger entry that serves a smaller request. Writes are atomic (temporary file + rename: a killed run
never leaves a half-written entry under the real name); a file that cannot be read, or whose stored key does not
match, is deleted and reported as a miss, so the caller recomputes it. What EVA stores here, and how a run replays
it: eva_replay.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from torch import nn

from eva_bench import assets

FORMAT_VERSION = 2  # bump when any cached statistic's computation or layout changes


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's class, config and every parameter and buffer (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):  # HF models: rope, eps, attention settings change the forward without any weight
        public = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        _update(h, tensor)
    return h.hexdigest()


def data_fingerprint(obj: Any) -> str:
    """SHA-256 of a nest of tensors, arrays, dicts, lists, tuples, dataclasses and scalars (TypeError otherwise)."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def make_key(method: str, *, model: str, calibration: str, params: Mapping[str, Any]) -> dict:
    """The full key of an entry: what it was computed from, with which parameters and library versions."""
    return {
        "method": method,
        "model": model,
        "calibration": calibration,
        "params": dict(params),
        "versions": {"format": FORMAT_VERSION, "torch": torch.__version__, "peft": peft.__version__},
    }


class StatsCache:
    """Entries under ``root`` (default ``assets.cache_dir() / "init_stats"``), one file per (key, variant)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else assets.cache_dir() / "init_stats"

    def path(self, key: dict, variant: str = "") -> Path:
        return self.root / f"{key['method']}-{_digest(key)}-{variant}.pt"

    def variants(self, key: dict) -> list[str]:
        """The variants stored for ``key`` (file names only; an entry may still turn out unreadable)."""
        prefix = f"{key['method']}-{_digest(key)}-"
        return sorted(p.name[len(prefix) : -len(".pt")] for p in self.root.glob(f"{prefix}*.pt"))

    def load(self, key: dict, variant: str = "") -> Any | None:
        """The stored value, or None when missing; an unreadable or mismatched file is deleted (a miss, recomputed)."""
        path = self.path(key, variant)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or entry.get("key") != _canonical(key):
                raise ValueError("stored key does not match")  # a truncated/foreign file, or a digest collision
            return entry["value"]
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - any unreadable entry is only a miss
            warnings.warn(f"init-statistics cache: ignoring unreadable entry {path.name} ({err}); recomputing")
            path.unlink(missing_ok=True)
            return None

    def save(self, key: dict, value: Any, variant: str = "") -> Path:
        """Write atomically: a temporary file in the same directory, then a rename over the final name."""
        path = self.path(key, variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            torch.save({"key": _canonical(key), "value": value}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def _digest(key: dict) -> str:
    return hashlib.sha256(_canonical(key).encode()).hexdigest()[:32]


def _update(h, obj: Any) -> None:
    """Feed ``obj`` into the hash ``h``, tagging every node with its type and size so that different nests of the
    same bytes (a list of two tensors vs one tensor of both) never collide."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        if t.device.type != "meta":
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, np.ndarray):
        h.update(f"array:{obj.dtype}:{obj.shape}:".encode())
        h.update(np.ascontiguousarray(obj).data)
    elif isinstance(obj, Mapping):
        h.update(f"dict:{len(obj)}:".encode())
        for k in sorted(obj, key=str):  # insertion order is not part of the data
            _update(h, str(k))
            _update(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}:{len(obj)}:".encode())
        for item in obj:
            _update(h, item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"dataclass:{type(obj).__qualname__}:".encode())
        _update(h, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"cannot fingerprint a {type(obj).__name__} (supported: tensors, arrays, dicts, lists, ...)")
