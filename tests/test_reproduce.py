"""The reproduce comparison: fresh records against the committed reference, run by run, cell by cell, sign by sign;
and the sweep's plan (dry run, ETA) before any work."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eva_bench import reproduce, results

REPO = Path(__file__).resolve().parent.parent
NLL = {  # (init, rank) -> per-seed gsm8k/nll; EVA below random at r = 2, above it at r = 8
    ("random", 2): [2.90, 2.92, 2.94],
    ("eva", 2): [2.80, 2.81, 2.85],
    ("random", 8): [2.70, 2.72, 2.74],
    ("eva", 8): [2.75, 2.76, 2.77],
}


def write_experiment(root: Path) -> dict[str, Path]:
    paths = {}
    for (init, rank), seeds in NLL.items():
        for seed, nll in enumerate(seeds):
            run = {"experiment": "demo", "task": "math", "model": "tiny", "init": init, "rank": rank, "seed": seed,
                   "config_hash": f"h{rank}"}
            name = f"math--tiny--{init}--r{rank}--s{seed}--h{rank}"
            paths[name] = root / "demo" / f"{name}.json"
            results.write_record(paths[name], {
                "run": run, "status": "success", "metrics": {"gsm8k/n": 64, "gsm8k/nll": nll},
                "train": {"final_loss": nll - 1}, "config": {}, "finished_at": f"2026-01-0{seed + 1}"})
    return paths


@pytest.fixture
def roots(tmp_path):
    reference, fresh = tmp_path / "reference", tmp_path / "runs"
    write_experiment(reference)
    shutil.copytree(reference, fresh)
    return reference, fresh


def doctor(path: Path, **metrics) -> None:
    """A fresh run that measured other values: rewritten as a valid record (a hand edit breaks its digest)."""
    record = json.loads(path.read_text())
    record["metrics"].update(metrics)
    results.write_record(path, record)


def test_identical_records_reproduce_and_strict_passes(roots, capsys):
    reference, fresh = roots
    report = reproduce.compare("demo", fresh, reference)
    assert report["counts"]["identical"] == 12 and report["reproduced"]
    assert all(c["abs_diff"] == 0 for c in report["cells"]) and len(report["cells"]) == 4  # 2 ranks x 2 methods
    assert len(report["signs"]) == 2 and all(s["sign_agrees"] for s in report["signs"])
    assert reproduce.main(["--experiment", "demo", "--fresh", str(fresh), "--reference", str(reference),
                           "--strict"]) == 0
    out = capsys.readouterr().out
    assert "reproduced 12/12 runs: 12 identical" in out and "REPRODUCED" in out
    written = json.loads((fresh / "demo.reproduce.json").read_text())
    assert written["counts"]["identical"] == 12


def test_a_doctored_record_differs_and_strict_mode_exits_non_zero(roots, capsys):
    reference, fresh = roots
    doctor(fresh / "demo" / "math--tiny--eva--r2--s1--h2.json", **{"gsm8k/nll": 2.81 + 1e-3})
    doctor(fresh / "demo" / "math--tiny--eva--r2--s2--h2.json", **{"gsm8k/nll": 2.85 + 1e-7})
    report = reproduce.compare("demo", fresh, reference)
    run = report["runs"]["math--tiny--eva--r2--s1--h2.json"]
    assert run["verdict"] == "differs" and run["metrics"]["gsm8k/nll"]["abs_diff"] == pytest.approx(1e-3)
    assert report["runs"]["math--tiny--eva--r2--s2--h2.json"]["verdict"] == "within tolerance"
    assert report["counts"] == {"identical": 10, "within tolerance": 1, "differs": 1, "missing": 0, "failed": 0,
                                "no reference": 0}
    cell = next(c for c in report["cells"] if c["method"] == "eva" and c["rank"] == 2 and c["metric"] == "gsm8k/nll")
    assert not cell["agrees"] and cell["abs_diff"] == pytest.approx((1e-3 + 1e-7) / 3)
    assert not report["reproduced"]
    args = ["--experiment", "demo", "--fresh", str(fresh), "--reference", str(reference)]
    assert reproduce.main(args) == 0  # not strict: the report, exit 0
    assert reproduce.main([*args, "--strict"]) == 1
    out = capsys.readouterr().out
    assert "differs: math--tiny--eva--r2--s1--h2.json  (gsm8k/nll: 2.811 now, 2.81 committed)" in out
    assert "NOT REPRODUCED" in out


def test_missing_failed_unreadable_and_unreferenced_runs_are_named(roots):
    reference, fresh = roots
    (fresh / "demo" / "math--tiny--random--r8--s0--h8.json").unlink()
    failed = fresh / "demo" / "math--tiny--random--r8--s1--h8.json"
    record = json.loads(failed.read_text())
    results.write_record(failed, {**record, "status": "failed", "error": "Traceback ...\nValueError: boom",
                                  "metrics": {}})
    (fresh / "demo" / "math--tiny--random--r8--s2--h8.json").write_text("{x")
    extra = json.loads((fresh / "demo" / "math--tiny--eva--r8--s0--h8.json").read_text())
    results.write_record(fresh / "demo" / "math--tiny--eva--r8--s0--other.json", extra)
    runs = reproduce.compare("demo", fresh, reference)["runs"]
    assert runs["math--tiny--random--r8--s0--h8.json"]["verdict"] == "missing"
    assert runs["math--tiny--random--r8--s1--h8.json"] == {"verdict": "failed", "error": "ValueError: boom",
                                                           "metrics": {}}
    assert runs["math--tiny--random--r8--s2--h8.json"]["verdict"] == "failed"
    assert "unreadable" in runs["math--tiny--random--r8--s2--h8.json"]["error"]
    assert runs["math--tiny--eva--r8--s0--other.json"]["verdict"] == "no reference"


def test_a_flipped_paired_difference_is_reported(roots, capsys):
    reference, fresh = roots
    for seed, nll in enumerate([2.60, 2.61, 2.62]):  # EVA r = 8 now below random (committed: above)
        doctor(fresh / "demo" / f"math--tiny--eva--r8--s{seed}--h8.json", **{"gsm8k/nll": nll})
    report = reproduce.compare("demo", fresh, reference)
    flipped = [s for s in report["signs"] if not s["sign_agrees"]]
    assert [(s["method"], s["rank"], s["metric"]) for s in flipped] == [("eva", 8, "gsm8k/nll")]
    assert flipped[0]["diff_now"] == pytest.approx(-0.11) and flipped[0]["diff_committed"] == pytest.approx(0.04)
    print(reproduce.summary(report))
    assert "sign changed: eva - random, math r8 gsm8k/nll" in capsys.readouterr().out


def test_promote_copies_finished_fresh_records_only(roots):
    reference, fresh = roots
    doctor(fresh / "demo" / "math--tiny--eva--r2--s0--h2.json", **{"gsm8k/nll": 1.0})
    failed = fresh / "demo" / "math--tiny--eva--r2--s1--h2.json"
    results.write_record(failed, {**json.loads(failed.read_text()), "status": "failed"})
    copied = reproduce.promote("demo", fresh, reference)
    assert [p.name for p in copied] == ["math--tiny--eva--r2--s0--h2.json"]
    assert json.loads(copied[0].read_text())["metrics"]["gsm8k/nll"] == 1.0
    assert json.loads((reference / "demo" / failed.name).read_text())["status"] == "success"


def test_dry_run_plans_with_an_eta_and_launches_nothing(tmp_path):
    """The sweep's plan: how many runs, the wall time estimated from the reference records' run times and the
    launcher's parallelism; nothing is written."""
    from tests.test_language_recipe import TINY

    runs, reference = tmp_path / "runs", tmp_path / "reference"
    cmd = [sys.executable, "-m", "tasks.language.train", "-m", *TINY, f"results_dir={runs}", "task=math",
           "seed=0,1,2", "hydra/launcher=joblib_cpu", f"hydra.sweep.dir={tmp_path}/multirun",
           "hydra.sweeper.dry_run=true", f"hydra.sweeper.reference={reference}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-3000:]
    assert "0 of 3 runs have a finished record: launching 3" in log and log.count("would launch math--") == 3
    assert "no reference record under" in log and "dry run: nothing launched" in log
    assert not runs.exists()

    # reference records for two of the three run ids (30 s and 50 s): the third is estimated at their median
    for line in log.splitlines():
        if "would launch" in line and "--s2--" not in line:
            name = line.split("would launch ")[1].split()[0]
            seconds = 30.0 if "--s0--" in name else 50.0
            task, model, init, rank, seed, config_hash = name.split("--")
            run = {"experiment": "dev", "task": task, "model": model, "init": init, "rank": int(rank[1:]),
                   "seed": int(seed[1:]), "config_hash": config_hash}
            results.write_record(reference / "dev" / f"{name}.json",
                                 {"run": run, "status": "success", "metrics": {}, "seconds": seconds})
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    # 30 + 50 + 40 = 120 s of run time, two jobs at a time: 1:00 wall
    assert "plan: 3 runs into" in log, log[-3000:]
    assert "2 at a time (JoblibLauncher): about 1:00 wall, 2:00 of run time" in log
    assert "2 timed by their reference record, 1 at their median" in log and "dry run: nothing launched" in log
    assert not runs.exists()


def test_edited_records_are_named_on_both_sides(roots, capsys):
    reference, fresh = roots
    fresh_path = fresh / "demo" / "math--tiny--eva--r2--s0--h2.json"
    fresh_path.write_text(fresh_path.read_text().replace('"gsm8k/nll": 2.8', '"gsm8k/nll": 2.7'))
    committed = reference / "demo" / "math--tiny--random--r2--s0--h2.json"
    committed.write_text(committed.read_text().replace('"gsm8k/nll": 2.9', '"gsm8k/nll": 2.5'))
    with pytest.warns(UserWarning, match="invalid record left out"):
        report = reproduce.compare("demo", fresh, reference)
    edited = report["runs"]["math--tiny--eva--r2--s0--h2.json"]
    assert edited["verdict"] == "failed" and "edited after it was written" in edited["error"]
    unreferenced = report["runs"]["math--tiny--random--r2--s0--h2.json"]
    assert unreferenced["verdict"] == "no reference" and "invalid committed record" in unreferenced["reference_problem"]
    print(reproduce.summary(report))
    out = capsys.readouterr().out
    assert "failed: math--tiny--eva--r2--s0--h2.json  (invalid record" in out
    assert "no reference: math--tiny--random--r2--s0--h2.json  (invalid committed record" in out


def test_another_cpu_and_rebuilt_artifact_are_named(roots, capsys):
    """A difference that comes with another CPU kind or another artifact hash says so on the screen."""
    reference, fresh = roots
    for path in (fresh / "demo").glob("*.json"):
        record = json.loads(path.read_text())
        record["provenance"] = {"hardware": {"cpu": "Intel Xeon"}}
        record["backbone"] = {"sha256": "549e216f" + "0" * 56}
        results.write_record(path, record)
    report = reproduce.compare("demo", fresh, reference)
    assert report["reproduced"]  # the metrics still agree; the note explains, it does not judge
    assert report["builds"]["differences"] == ["cpu: Intel Xeon now, not recorded committed",
                                               "backbone.sha256: 549e216f0000 now, not recorded committed"]
    assert "built differently" in reproduce.summary(report)
    identical = reproduce.compare("demo", reference, reference)
    assert identical["builds"]["differences"] == [] and "built differently" not in reproduce.summary(identical)
