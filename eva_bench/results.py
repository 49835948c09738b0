"""The run record: one immutable JSON file per run, written atomically, with the provenance to trust it.

Path: ``<results_dir>/<experiment>/<task>--<model>--<init>--r<rank>--s<seed>--<config hash>.json``. The hash covers
the whole run config but ``IGNORED_FOR_HASH`` (seed, which the name carries, and bookkeeping: force, logging, paths,
threads, device, save_adapter, a variant's label), so a changed config never overwrites or masquerades as an old
result. The experiment name is in the config, so it is in the hash: a run is identified within its experiment, and the same settings in two
experiments (language_cpu and language_cpu_controls share their random runs) have two ids; compare them by config.
A key added later is hashed only away from its old default, and a moved value as it was spelled (``ADDED_LATER``,
``MOVED``), so committed records keep their ids. A sweep restarted after a kill skips every finished run (success or
diverged: both are results) and reruns failed or missing ones; a write is a rename, so a kill leaves no half file.

Every record is strict JSON (a non-finite number is written as null and its place listed under ``non_finite``) and
carries ``digest``, the SHA-256 of its own content: ``check_record`` names a record that cannot be read, does not
have the schema's keys, or was edited after it was written (not security: it catches hand edits and partial
writes). Readers (the sweeper, the recipes, tables, the reproduce comparison) treat such a record as unfinished and
name it; a run that rewrites it first moves the bad file aside (``<name>.json.invalid-<time>``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import pandas as pd

from . import distributed
from .assets import REPO_ROOT

SCHEMA = 2  # 2: strict JSON and a digest of the content (1: neither; still read, not verifiable)
FINISHED = ("success", "diverged")
STATUSES = ("success", "diverged", "failed")
RUN_KEYS = {"experiment": str, "task": str, "model": str, "init": str, "rank": int, "seed": int, "config_hash": str}
RECORD_MODE = 0o644  # teammates on a shared cluster read each other's records
PACKAGES = ("torch", "transformers", "peft", "timm", "accelerate", "hydra-core", "minari", "metaworld", "wandb")
LR_ROW = "lr*"  # the learning rate the tuned protocol selected, shown as a table row
IGNORED_FOR_HASH = (  # bookkeeping, not the result (variant: a label; the settings it names are hashed themselves)
    "seed", "force", "logger", "results_dir", "hydra", "threads", "device", "save_adapter", "variant")
ADDED_LATER = {  # keys added after records were committed: at this value they are left out of the hash, so those
    ("calibration", "source"): None,  # records keep their ids
    ("model", "domain"): "language",
    ("task", "domain"): "language",
}
MOVED = {  # a value's spelling now -> the one committed ids were hashed with (a move that changes no result)
    f"tasks.language.answers.{scorer}": f"tasks.language.evaluate.{scorer}"
    for scorer in ("gsm8k_correct", "math_correct", "commonsense_correct")
}


def config_hash(config: dict) -> str:
    """Short hash of the run config but seed and bookkeeping (``IGNORED_FOR_HASH``); the experiment name is in it."""
    relevant = {k: v for k, v in config.items() if k not in IGNORED_FOR_HASH}
    for (section, key), default in ADDED_LATER.items():
        block = relevant.get(section)
        if isinstance(block, dict) and key in block and block[key] == default:
            relevant[section] = {k: v for k, v in block.items() if k != key}
    if (relevant.get("protocol") or {}).get("name", "fixed") == "fixed":  # the default: records from before
        relevant.pop("protocol", None)  # protocols existed keep their ids
    return hashlib.sha256(json.dumps(_as_before(relevant), sort_keys=True, default=str).encode()).hexdigest()[:8]


def _as_before(node):
    if isinstance(node, dict):
        return {k: _as_before(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_as_before(v) for v in node]
    return MOVED.get(node, node) if isinstance(node, str) else node


def run_id(task: str, model: str, init: str, rank: int, seed: int, config: dict) -> str:
    return f"{task}--{model}--{init}--r{rank}--s{seed}--{config_hash(config)}"


def record_path(results_dir: str | Path, experiment: str, run: str) -> Path:
    return Path(results_dir) / experiment / f"{run}.json"


def read_record(path: Path) -> dict | None:
    """The record at ``path`` if it exists and is valid (``check_record``); None otherwise."""
    record, _ = check_record(path)
    return record


def check_record(path: Path) -> tuple[dict | None, str | None]:
    """(record, None) for a valid record; (None, why) for a missing, unreadable, malformed or edited one."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, "missing"
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        return None, f"unreadable ({error})"
    problem = record_problem(record)
    return (None, problem) if problem else (record, None)


def record_problem(record) -> str | None:
    """What is wrong with a loaded record (None: nothing): its top-level shape, run keys, status, metrics, digest."""
    if not isinstance(record, dict):
        return f"not a record (a JSON {type(record).__name__})"
    run = record.get("run")
    if not isinstance(run, dict):
        return "no run keys"
    wrong = [k for k, kind in RUN_KEYS.items() if not isinstance(run.get(k), kind) or isinstance(run.get(k), bool)]
    if wrong:
        return f"run keys missing or of the wrong type: {', '.join(wrong)}"
    if record.get("status") not in STATUSES:
        return f"status {record.get('status')!r} is not one of {', '.join(STATUSES)}"
    metrics = record.get("metrics")
    if metrics is None and record["status"] != "success":
        metrics = {}
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) or v is None for v in metrics.values()):
        return "metrics is not a mapping of numbers"
    if record["status"] == "success" and not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                  for v in metrics.values()):
        return "a success with a missing or non-finite metric"
    if record.get("schema", 1) >= 2:
        try:
            if record.get("digest") != digest(record):
                return "edited after it was written (its digest does not match its content)"
        except ValueError:
            return "not strict JSON (NaN or infinity)"
    return None


def digest(record: dict) -> str:
    """SHA-256 of a record's content (all but the digest itself), as canonical JSON."""
    content = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, allow_nan=False).encode()).hexdigest()


def is_finished(path: Path) -> bool:
    record = read_record(path)
    return record is not None and record.get("status") in FINISHED


def set_aside(path: Path, why: str) -> Path | None:
    """Move an invalid record out of the way before its run is redone (never silently overwritten)."""
    path = Path(path)
    if not path.exists():
        return None
    aside = path.with_name(f"{path.name}.invalid-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    warnings.warn(f"record {path} is invalid ({why}): moved to {aside.name}; the run is redone", stacklevel=2)
    return aside


def strict_json(value, where: str = "", found: list | None = None):
    """``value`` with every non-finite float replaced by None (JSON has no NaN); their places go into ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(where)
        return None
    if isinstance(value, dict):
        return {k: strict_json(v, f"{where}.{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


def write_record(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` atomically (temp file in the same directory, fsync, rename), as strict JSON
    with its digest; a stale temp file of a killed writer is removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.stem}.*.tmp"):  # the caller holds the record's lock: no live writer
        stale.unlink(missing_ok=True)
    content = {k: v for k, v in record.items() if k not in ("schema", "digest", "non_finite")}  # ours to set
    plain = json.loads(json.dumps({"schema": SCHEMA, **content}, default=_jsonable))  # tuples, arrays -> JSON
    non_finite: list[str] = []
    plain = strict_json(plain, found=non_finite)
    if non_finite:
        plain["non_finite"] = non_finite
    plain["digest"] = digest(plain)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        os.fchmod(fd, RECORD_MODE)
        with os.fdopen(fd, "w") as f:
            json.dump(plain, f, indent=1, sort_keys=False, allow_nan=False)
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


def load(experiment: str, results_dir: str | Path = REPO_ROOT / "results") -> pd.DataFrame:
    """One experiment's runs as a DataFrame for your own analysis, one row per valid record:

        >>> runs = eva_bench.results.load("language_cpu")
        >>> runs[runs.task == "math"].groupby(["rank", "init"])["gsm8k/nll"].agg(["mean", "std"])

    Columns: the run keys (task, model, init, rank, seed, ...), ``variant`` (a sweep grid's label, e.g. ``rho=2``;
    None for the plain init), ``status``, ``lr`` (the lr it trained at: the tuned
    protocol's choice or ``optim.lr``), ``protocol``, every metric under its own name, the init report's summary
    (``init_seconds``, ``adapted_layers``, ``mean_rank``) and training's (``optimizer_steps``, ``final_loss``,
    ``train_seconds``), the run's wall time ``seconds`` and the record's ``path``. Invalid records are left out and
    named, as in ``load_records``."""
    rows, invalid = [], []
    for path, record in _valid_records(sorted((Path(results_dir) / experiment).glob("*.json")), invalid):
        protocol, init, train = record.get("protocol") or {}, record.get("init_report") or {}, record.get("train") or {}
        ranks = [r for r in (init.get("ranks") or {}).values() if isinstance(r, (int, float))]
        rows.append({
            **record["run"], "variant": (record.get("config") or {}).get("variant"), "status": record["status"],
            "lr": protocol.get("selected_lr") or ((record.get("config") or {}).get("optim") or {}).get("lr"),
            "protocol": protocol.get("name", "fixed"),
            **(record.get("metrics") or {}),
            "init_seconds": init.get("seconds"), "adapted_layers": len(ranks) or None,
            "mean_rank": sum(ranks) / len(ranks) if ranks else None,
            "optimizer_steps": train.get("optimizer_steps"), "final_loss": train.get("final_loss"),
            "train_seconds": train.get("seconds"), "seconds": record.get("seconds"), "path": str(path),
        })
    return _frame(rows, invalid)


def load_records(results_dir: str | Path, experiment: str | None = None) -> pd.DataFrame:
    """Every valid record under ``results_dir`` (or one experiment) as one row: keys, status and ``metric.*``
    columns. Invalid records are left out, named in a warning and listed in ``frame.attrs["invalid"]``."""
    root = Path(results_dir)
    paths = sorted((root / experiment).glob("*.json") if experiment else root.glob("*/*.json"))
    rows, invalid = [], []
    for path, record in _valid_records(paths, invalid):
        row = {**record["run"], "status": record["status"], "finished_at": record.get("finished_at"), "path": str(path),
               "variant": (record.get("config") or {}).get("variant")}
        row.update({f"metric.{k}": v for k, v in (record.get("metrics") or {}).items()})
        if (record.get("protocol") or {}).get("selected_lr") is not None:  # tuned protocol: the tables' lr* row
            row[f"metric.{LR_ROW}"] = record["protocol"]["selected_lr"]
        rows.append(row)
    return _frame(rows, invalid)


def _valid_records(paths, invalid: list):
    """(path, record) for each valid record; each invalid one is appended to ``invalid`` as (path, problem)."""
    for path in paths:
        record, problem = check_record(path)
        if record is None:
            invalid.append((str(path), problem))
        else:
            yield path, record


def _frame(rows: list[dict], invalid: list) -> pd.DataFrame:
    """The rows as a DataFrame; invalid records named in a warning and listed in ``frame.attrs["invalid"]``."""
    for path, problem in invalid:
        warnings.warn(f"invalid record left out: {path}: {problem}", stacklevel=3)
    frame = pd.DataFrame(rows)
    frame.attrs["invalid"] = invalid
    return frame
