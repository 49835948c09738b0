"""Fresh records against the committed reference: did the sweep reproduce, run by run, cell by cell, sign by sign?

The committed records (``results/<experiment>/``) are the reference; ``make reproduce-*`` trains the same runs into
a results root outside git (``runs/`` by default) and ends with this comparison:

- per run (matched by record id, which hashes the config): every metric's absolute difference and a verdict:
  identical, within tolerance, differs, missing (in the reference, not rerun), failed (the fresh run failed or its
  record is unreadable) or no reference (a fresh config the reference has no record of);
- per table cell (task, model, rank, metric, method: the mean over seeds): now against committed;
- per method: its paired difference from random (same seeds, so same data order and calibration), now against
  committed, and whether the sign agrees.

    python -m eva_bench.reproduce --experiment language_cpu [--fresh runs] [--tolerance 1e-5] [--strict]

It prints one screen and writes ``<fresh>/<experiment>.reproduce.json``. ``--strict`` exits 1 when anything is not
identical or within tolerance. Promoting fresh records to the reference is a separate, explicit step
(``--promote``, see docs/records.md).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd

from .assets import REPO_ROOT
from .results import FINISHED, LR_ROW, check_record, read_record, write_record
from .tables import KEYS, aggregate, group_means, long_format

REFERENCE = REPO_ROOT / "results"  # the committed records
TOLERANCE = 1e-5  # largest absolute metric difference that still counts as reproduced
VERDICTS = ("identical", "within tolerance", "differs", "missing", "failed", "no reference")
BASELINE = "random"  # the paired comparisons' reference method


def record_files(root: Path, experiment: str) -> dict[str, Path]:
    """Every record of an experiment (its final runs and the tuned protocol's lr_search/ selection runs), keyed by
    its path under the experiment folder."""
    folder = Path(root) / experiment
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*.json"))} if folder.is_dir() else {}


def compared_values(record: dict) -> dict[str, float]:
    """What must reproduce: every metric (``*/n`` counts included), the tuned protocol's chosen lr and the final
    training loss."""
    values = dict(record.get("metrics") or {})
    if (record.get("protocol") or {}).get("selected_lr") is not None:
        values[LR_ROW] = record["protocol"]["selected_lr"]
    if (record.get("train") or {}).get("final_loss") is not None:
        values["train/final_loss"] = record["train"]["final_loss"]
    return values


def difference(now, committed) -> float:
    """|now - committed|; 0 when both are the same NaN or infinity, inf when only one is missing or non-finite."""
    if now is None or committed is None:
        return 0.0 if now is committed else math.inf
    now, committed = float(now), float(committed)
    if now == committed or (math.isnan(now) and math.isnan(committed)):
        return 0.0
    return abs(now - committed) if math.isfinite(now - committed) else math.inf


def compare_run(fresh: dict | None, reference: dict | None, tolerance: float) -> dict:
    """One run's verdict and per-metric differences (``fresh``/``reference``: the records, None when absent or
    unreadable)."""
    if fresh is None:
        return {"verdict": "missing", "metrics": {}}
    if fresh.get("status") not in FINISHED:
        error = (fresh.get("error") or "").strip().splitlines()
        return {"verdict": "failed", "error": error[-1] if error else fresh.get("status"), "metrics": {}}
    if reference is None:
        return {"verdict": "no reference", "metrics": {}}
    now, committed = compared_values(fresh), compared_values(reference)
    metrics = {
        name: {"now": now.get(name), "committed": committed.get(name),
               "abs_diff": difference(now.get(name), committed.get(name))}
        for name in sorted(set(now) | set(committed))
    }
    largest = max((m["abs_diff"] for m in metrics.values()), default=0.0)
    if fresh.get("status") != reference.get("status"):
        verdict = "differs"
    elif largest == 0:
        verdict = "identical"
    else:
        verdict = "within tolerance" if largest <= tolerance else "differs"
    out = {"verdict": verdict, "max_abs_diff": largest, "metrics": metrics}
    if fresh.get("status") != reference.get("status"):
        out["status"] = {"now": fresh.get("status"), "committed": reference.get("status")}
    return out


def compare_runs(fresh_root: Path, reference_root: Path, experiment: str, tolerance: float) -> dict[str, dict]:
    fresh, reference = record_files(fresh_root, experiment), record_files(reference_root, experiment)
    runs = {}
    for name in sorted(set(fresh) | set(reference)):
        now, problem = check_record(fresh[name]) if name in fresh else (None, None)
        if problem:  # a fresh record that cannot be trusted is a failed run
            runs[name] = {"verdict": "failed", "error": f"invalid record {fresh[name]}: {problem}", "metrics": {}}
            continue
        committed, problem = check_record(reference[name]) if name in reference else (None, None)
        runs[name] = compare_run(now, committed, tolerance)
        if problem:  # named, not silently compared with nothing
            runs[name]["reference_problem"] = f"invalid committed record {reference[name]}: {problem}"
    return runs


def hashes_named(node, path: str = "") -> dict[str, str]:
    """Every artifact hash a record names (a field with ``sha256`` in its name, outside the config and provenance):
    {"backbone.sha256": "549e...", ...}."""
    if not isinstance(node, dict):
        return {}
    out = {}
    for key, value in node.items():
        if path == "" and key in ("config", "provenance", "digest"):
            continue
        name = f"{path}.{key}" if path else str(key)
        if isinstance(value, dict):
            out.update(hashes_named(value, name))
        elif "sha256" in str(key) and isinstance(value, str):
            out[name] = value
    return out


def builds(root: Path, experiment: str) -> dict:
    """What an experiment's records ran on: their CPUs and, per artifact field, the hashes they name (sorted sets)."""
    cpus, artifacts = set(), {}
    for path in record_files(root, experiment).values():
        record = read_record(path)
        if not isinstance(record, dict):
            continue
        cpus.add(((record.get("provenance") or {}).get("hardware") or {}).get("cpu") or "not recorded")
        for name, value in hashes_named(record).items():
            artifacts.setdefault(name, set()).add(value)
    return {"cpu": sorted(cpus), "artifacts": {name: sorted(v) for name, v in sorted(artifacts.items())}}


def build_differences(now: dict, committed: dict) -> list[str]:
    """One line per way the fresh runs' machine or artifacts differ from the reference's (the usual cause of a
    difference: a rebuilt artifact on another kind of CPU differs in the last bits; see eva_bench/artifacts.py)."""
    def short(values):
        return ", ".join(v[:12] for v in values) if values else "not recorded"

    lines = []
    if now["cpu"] != committed["cpu"]:
        lines.append(f"cpu: {', '.join(now['cpu'])} now, {', '.join(committed['cpu'])} committed")
    for name in sorted(set(now["artifacts"]) | set(committed["artifacts"])):
        a, b = now["artifacts"].get(name, []), committed["artifacts"].get(name, [])
        if a != b:
            lines.append(f"{name}: {short(a)} now, {short(b)} committed")
    return lines


def table_cells(root: Path, experiment: str) -> pd.DataFrame:
    """The tables' numbers for one results root: per (task, model, rank, metric, method) the mean over seeds, and
    the per-seed values (for the paired differences); task-group means included as their own tasks."""
    from .results import load_records

    records = load_records(root, experiment)
    if records.empty:
        return pd.DataFrame(columns=[*KEYS, "method", "seed", "value"])
    long = long_format(records)
    return pd.concat([long, group_means(long, records)], ignore_index=True)


def compare_cells(now: pd.DataFrame, committed: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """Per table cell: the mean over seeds, now and committed, and their absolute difference."""
    cells = aggregate(now)[[*KEYS, "method", "mean", "n"]].merge(
        aggregate(committed)[[*KEYS, "method", "mean", "n"]], on=[*KEYS, "method"], how="outer",
        suffixes=("_now", "_committed"))
    cells["abs_diff"] = [difference(a, b) for a, b in zip(cells["mean_now"], cells["mean_committed"])]
    cells["agrees"] = cells["abs_diff"] <= tolerance
    return cells


def paired_differences(long: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Per (task, model, rank, metric, method): the mean over shared seeds of method - baseline, seed by seed."""
    if long.empty or baseline not in set(long["method"]):
        return pd.DataFrame(columns=[*KEYS, "method", "diff", "seeds"])
    values = long[long["metric"] != LR_ROW]
    base = values[values["method"] == baseline].rename(columns={"value": "base"}).drop(columns="method")
    paired = values[values["method"] != baseline].merge(base, on=[*KEYS, "seed"])
    paired["diff"] = paired["value"] - paired["base"]
    return paired.groupby([*KEYS, "method"]).agg(diff=("diff", "mean"), seeds=("seed", "nunique")).reset_index()


def sign(value: float, tolerance: float) -> int:
    return 0 if abs(value) <= tolerance else (1 if value > 0 else -1)


def compare_signs(now: pd.DataFrame, committed: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """Each method's paired difference from random, now and committed, and whether its sign (+, -, or 0 within
    tolerance) agrees."""
    signs = paired_differences(now).merge(paired_differences(committed), on=[*KEYS, "method"], how="outer",
                                          suffixes=("_now", "_committed"))
    signs["sign_agrees"] = [
        not (math.isnan(a) or math.isnan(b)) and sign(a, tolerance) == sign(b, tolerance)
        for a, b in zip(signs["diff_now"].astype(float), signs["diff_committed"].astype(float))
    ]
    return signs


def compare(experiment: str, fresh_root: Path, reference_root: Path = REFERENCE, tolerance: float = TOLERANCE) -> dict:
    """The whole comparison of one experiment, as the JSON report holds it."""
    runs = compare_runs(fresh_root, reference_root, experiment, tolerance)
    now, committed = table_cells(fresh_root, experiment), table_cells(reference_root, experiment)
    cells, signs = compare_cells(now, committed, tolerance), compare_signs(now, committed, tolerance)
    counts = {v: sum(r["verdict"] == v for r in runs.values()) for v in VERDICTS}
    built = {"now": builds(fresh_root, experiment), "committed": builds(reference_root, experiment)}
    every_run = bool(runs) and counts["identical"] + counts["within tolerance"] == len(runs)
    return {
        "experiment": experiment,
        "fresh": str(Path(fresh_root) / experiment),
        "reference": str(Path(reference_root) / experiment),
        "tolerance": tolerance,
        "counts": counts,
        "reproduced": every_run and bool(cells["agrees"].all()) and bool(signs["sign_agrees"].all()),
        "builds": {**built, "differences": build_differences(built["now"], built["committed"])},
        "runs": runs,
        "cells": _records(cells),
        "signs": _records(signs),
    }


def _records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))  # NaN -> null, numpy -> plain numbers


def summary(report: dict, limit: int = 8) -> str:
    """The screen printed after a reproduce sweep."""
    counts, runs, tol = report["counts"], report["runs"], report["tolerance"]
    parts = [f"{n} {v}" + (f" {tol:g}" if v == "within tolerance" else "") for v, n in counts.items() if n]
    largest = max(((r["max_abs_diff"], name) for name, r in runs.items() if "max_abs_diff" in r), default=(0, ""))
    lines = [
        f"reproduce {report['experiment']}: {report['fresh']} against the committed {report['reference']}",
        f"reproduced {counts['identical'] + counts['within tolerance']}/{len(runs)} runs: {', '.join(parts) or 'none'}"
        + (f"; largest metric difference {largest[0]:.2g} ({largest[1]})" if largest[0] else ""),
    ]
    cells, signs = report["cells"], report["signs"]
    # a cell on one side only has an infinite difference, which the JSON report holds as null
    worst_cell = max((math.inf if c["abs_diff"] is None else c["abs_diff"] for c in cells), default=0.0)
    lines.append(f"table cells: {sum(c['agrees'] for c in cells)}/{len(cells)} within {tol:g} of committed"
                 + (f" (largest difference {worst_cell:.2g})" if worst_cell else ""))
    methods = sorted({s["method"] for s in signs})
    lines.append(f"method - {BASELINE} (paired by seed): {sum(s['sign_agrees'] for s in signs)}/{len(signs)} "
                 f"differences keep their sign ({', '.join(methods) or 'no paired methods'})")
    problems = [(name, r) for name, r in runs.items() if r["verdict"] not in ("identical", "within tolerance")]
    for name, r in problems[:limit]:
        detail = r.get("error") or ""
        if r["verdict"] == "differs":
            worst = max(r["metrics"].items(), key=lambda kv: kv[1]["abs_diff"])
            detail = f"{worst[0]}: {worst[1]['now']} now, {worst[1]['committed']} committed"
            if "status" in r:
                detail = f"status {r['status']['now']} now, {r['status']['committed']} committed"
        detail = r.get("reference_problem") or detail
        lines.append(f"  {r['verdict']}: {name}" + (f"  ({detail})" if detail else ""))
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more (see the report)")
    for s in [s for s in signs if not s["sign_agrees"]][:limit]:
        lines.append(f"  sign changed: {s['method']} - {BASELINE}, {s['task']} r{s['rank']} {s['metric']}: "
                     f"{s['diff_now']} now, {s['diff_committed']} committed")
    differences = report.get("builds", {}).get("differences", [])
    if differences:
        lines.append("built differently (a rebuilt artifact or another kind of CPU changes the last bits):")
        lines.extend(f"  {line}" for line in differences)
    lines.append("REPRODUCED" if report["reproduced"] else "NOT REPRODUCED")
    return "\n".join(lines)


def promote(experiment: str, fresh_root: Path, reference_root: Path = REFERENCE) -> list[Path]:
    """Copy the fresh records of an experiment over the reference (new and changed records; the reference keeps
    records that were not rerun). Then regenerate its tables and commit them with the records."""
    copied = []
    for name, path in record_files(fresh_root, experiment).items():
        record = read_record(path)
        if not isinstance(record, dict) or record.get("status") not in FINISHED:
            continue  # a failed or unreadable run never replaces a reference record
        target = Path(reference_root) / experiment / name
        if not target.exists() or target.read_bytes() != path.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied.append(target)
    return copied


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="the experiment (its folder under both roots)")
    parser.add_argument("--fresh", type=Path, default=Path("runs"), help="the fresh records' root (default: runs)")
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="the committed records' root")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest absolute metric difference")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every run and cell reproduced")
    parser.add_argument("--promote", action="store_true",
                        help="copy the fresh finished records into the reference (then regenerate the tables)")
    args = parser.parse_args(argv)
    if args.promote:
        copied = promote(args.experiment, args.fresh, args.reference)
        print(f"promoted {len(copied)} records of {args.experiment} into {args.reference / args.experiment}")
        return 0
    if not (args.fresh / args.experiment).is_dir():
        print(f"no fresh records: {args.fresh / args.experiment} does not exist", file=sys.stderr)
        return 1
    if not (args.reference / args.experiment).is_dir():  # a named sweep (experiment_name=...) nobody committed
        fresh = record_files(args.fresh, args.experiment)
        print(f"no reference: {args.reference / args.experiment} does not exist, so the {len(fresh)} fresh records in "
              f"{args.fresh / args.experiment} are not compared (make promote EXPERIMENT={args.experiment} would make "
              "them the reference)")
        return 1 if args.strict else 0
    report = compare(args.experiment, args.fresh, args.reference, args.tolerance)
    path = args.fresh / f"{args.experiment}.reproduce.json"
    write_record(path, report)
    print(summary(report))
    print(f"report: {path}")
    return 1 if args.strict and not report["reproduced"] else 0


if __name__ == "__main__":
    sys.exit(main())
