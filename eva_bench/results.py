"""The run record: one immutable JSON file per run, written atomically, with the provenance to trust it.

Path: ``<results_dir>/<experiment>/<task>--<model>--<init>--r<rank>--s<seed>--<config hash>.json``. The hash covers
every setting that changes the result (not ``seed``, ``force``, logging or paths), so a changed config never
overwrites or masquerades as an old result. A sweep restarted after a kill skips every finished run (success or
diverged: both are results) and reruns failed or missing ones; a write is a rename, so a kill leaves no half file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import resource
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import pandas as pd

from . import distributed
from .assets import REPO_ROOT

SCHEMA = 1
FINISHED = ("success", "diverged")
PACKAGES = ("torch", "transformers", "peft", "timm", "accelerate", "hydra-core", "minari", "metaworld", "wandb")
LR_ROW = "lr*"  # the learning rate the tuned protocol selected, shown as a table row
IGNORED_FOR_HASH = ("seed", "force", "logger", "results_dir", "hydra", "threads", "device")  # bookkeeping, not the result


def config_hash(config: dict) -> str:
    """Short hash of the settings that determine a run's result (everything but seed and bookkeeping)."""
    relevant = {k: v for k, v in config.items() if k not in IGNORED_FOR_HASH}
    if (relevant.get("protocol") or {}).get("name", "fixed") == "fixed":  # the default: records from before
        relevant.pop("protocol", None)  # protocols existed keep their ids
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_id(task: str, model: str, init: str, rank: int, seed: int, config: dict) -> str:
    return f"{task}--{model}--{init}--r{rank}--s{seed}--{config_hash(config)}"


def record_path(results_dir: str | Path, experiment: str, run: str) -> Path:
    return Path(results_dir) / experiment / f"{run}.json"


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_finished(path: Path) -> bool:
    record = read_record(path)
    return record is not None and record.get("status") in FINISHED


def write_record(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"schema": SCHEMA, **record}, f, indent=1, sort_keys=False, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def provenance() -> dict:
    """Package versions, git commit, hardware: what a reader needs to trust or redo a record."""
    import torch

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "packages": packages,
        "python": platform.python_version(),
        "git": _git(),
        "hardware": {
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "processes": distributed.world_size(),  # a torchrun job's ranks (data parallel), else 1
        },
        "host": platform.node(),
    }


def peak_memory_bytes() -> dict:
    """Peak memory so far: GPU allocator peak when on a GPU, else the process's peak resident set size."""
    import torch

    out = {"process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["gpu_peak_allocated"] = torch.cuda.max_memory_allocated()
    return out


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _git() -> dict:
    def git(*args):
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_records(results_dir: str | Path, experiment: str | None = None) -> pd.DataFrame:
    """Every record under ``results_dir`` (or one experiment) as one row: keys, status and ``metric.*`` columns."""
    root = Path(results_dir)
    paths = sorted((root / experiment).glob("*.json") if experiment else root.glob("*/*.json"))
    rows = []
    for path in paths:
        record = read_record(path)
        if record is None or "run" not in record:
            continue
        row = {**record["run"], "status": record["status"], "finished_at": record.get("finished_at"), "path": str(path)}
        row.update({f"metric.{k}": v for k, v in (record.get("metrics") or {}).items()})
        if (record.get("protocol") or {}).get("selected_lr") is not None:  # tuned protocol: the tables' lr* row
            row[f"metric.{LR_ROW}"] = record["protocol"]["selected_lr"]
        rows.append(row)
    return pd.DataFrame(rows)
