"""Sweeps beyond one process: hydra/launcher=local|slurm (submitit), the per-record lock, racing cache writers."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from eva_bench.recipe import RunContext
from tests.test_language_recipe import TINY

CONF = Path(__file__).resolve().parent.parent / "conf"
REPO = CONF.parent


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "EVA_BENCH_SLURM_PARTITION"}
    return {**env, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **extra}


def test_slurm_launcher_composes_with_every_knob_overridable():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="language", return_hydra_config=True,
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30"],
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.timeout_min == 30 and launcher.max_num_timeout > 0


def test_slurm_sweep_without_a_partition_fails_before_submitting(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.language.train", "-m", "hydra/launcher=slurm", "seed=0,1",
         f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/multirun"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "EVA_BENCH_SLURM_PARTITION" in proc.stderr
    assert "Traceback" not in proc.stderr  # one line says what to set (hydra_plugins/eva_bench_sweeper)
    assert not list(tmp_path.rglob("*.json")) and not (tmp_path / "multirun" / ".submitit").exists()


def _sweep(tmp_path, seeds: str = "0,1") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.language.train", "-m", "hydra/launcher=local", "task=math", "lora.r=2",
         f"seed={seeds}", *TINY, f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/multirun"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _records(tmp_path) -> dict:
    out = {}
    for path in (tmp_path / "dev").glob("*.json"):
        with open(path) as f:
            out[path.name] = json.load(f)
    return out


@pytest.mark.slow
def test_local_launcher_sweep_killed_then_rerun_completes_only_the_missing_runs(tmp_path):
    first = _sweep(tmp_path)
    while not _records(tmp_path) and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and its submitit jobs, mid-sweep
    first.wait()
    before = {name: r["finished_at"] for name, r in _records(tmp_path).items()}
    assert before, first.stdout.read()

    second = _sweep(tmp_path)
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log
    after = _records(tmp_path)
    assert len(after) == 2 and all(r["status"] == "success" for r in after.values())
    assert {r["run"]["seed"] for r in after.values()} == {0, 1}
    assert all(after[name]["finished_at"] == done for name, done in before.items())  # finished: skipped, kept


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_its_run_finishes(tmp_path):
    """The preemption signal (USR2, as SLURM sends it) mid-run: submitit checkpoints the Hydra job and requeues it,
    the interrupted run leaves a failed record, and the requeued job reruns it to a finished one."""
    sweep = _sweep(tmp_path, seeds="0")
    deadline = time.time() + 300
    while not list((tmp_path / "dev").glob("*.lock")) and sweep.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # the job holds its record's lock: it is running the run
    jobs = subprocess.run(["pgrep", "-f", f"submitit.core._submit.*{tmp_path}"], capture_output=True, text=True)
    assert jobs.stdout.split(), "no submitit job process found"
    for pid in jobs.stdout.split():
        os.kill(int(pid), signal.SIGUSR2)
    log = sweep.communicate(timeout=600)[0]
    assert sweep.returncode == 0, log[-4000:]
    records = _records(tmp_path)
    assert [r["status"] for r in records.values()] == ["success"]
    job_logs = "".join(p.read_text() for p in sorted((tmp_path / "multirun" / ".submitit").rglob("*_log.*")))
    assert "this job is preempted" in job_logs and "Requeued" in job_logs
    path = tmp_path / "dev" / next(iter(records))
    assert job_logs.index(f"failed: {path}") < job_logs.index(f"success: {path}")  # interrupted, then rerun


def test_a_second_job_with_the_same_run_id_waits_then_skips(tmp_path, capsys):
    path = tmp_path / "exp" / "math--m--eva--r2--s0--abc.json"
    run = {"experiment": "exp", "task": "math", "model": "m", "init": "eva", "rank": 2, "seed": 0, "config_hash": "abc"}
    running, waiting = (RunContext(config={}, run=run, path=path) for _ in range(2))
    assert running.existing_or_claim() is None  # the first job holds the record now
    answer = {}
    second = threading.Thread(target=lambda: answer.setdefault("finished", waiting.existing_or_claim() is not None))
    second.start()
    while "waiting" not in capsys.readouterr().out:
        time.sleep(0.05)  # the second job is blocked on the record's lock
    assert second.is_alive()
    with running.recording() as record:
        record.finish("success")
    second.join(timeout=60)
    assert answer == {"finished": True}  # it saw the finished record and skipped: one training, one record
    assert len(list(path.parent.glob("*.json"))) == 1


RACER = textwrap.dedent("""
    import sys, torch
    from tests.helpers import tiny_llama, token_batches, lm_calibration
    from eva_bench.init import initialize
    model, report = initialize(tiny_llama(), "eva", rank=2, alpha=4, target_modules=["q_proj", "v_proj"],
                               calibration=lm_calibration(token_batches(3)))
    torch.save({k: v for k, v in model.state_dict().items() if "lora_" in k}, sys.argv[1])
""")


@pytest.mark.slow
def test_two_processes_racing_to_build_one_cache_entry_leave_one_valid_entry(tmp_path):
    env = _env(EVA_BENCH_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / f"a{i}.pt")], cwd=REPO, env=env,
                               stderr=subprocess.PIPE, text=True) for i in range(2)]
    for racer in racers:
        assert racer.wait(timeout=300) == 0, racer.stderr.read()
    entries = list((tmp_path / "cache").rglob("*"))
    stored = [p for p in entries if p.suffix == ".pt"]
    assert len(stored) == 1 and not [p for p in entries if p.name.endswith(".tmp")]
    import torch

    assert set(torch.load(stored[0], weights_only=True)) == {"key", "value"}  # a whole, loadable entry
    a, b = (torch.load(tmp_path / f"a{i}.pt") for i in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
