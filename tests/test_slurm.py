"""The SLURM path: launcher profiles, one-line refusals and named sweeps without a cluster (fast), then the whole
path on a real single-node SLURM that cluster/slurm-single-node.sh installs and starts (slow): an array sweep through
`make reproduce-language`, reruns that submit only what is missing, and a USR2 preemption that is requeued."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from eva_bench import reproduce
from tests.test_language_recipe import TINY

CONF = Path(__file__).resolve().parent.parent / "conf"
REPO = CONF.parent
SCRIPT = REPO / "cluster" / "slurm-single-node.sh"
NAME = "slurm_test"  # the named sweep's experiment_name: its records go to <results>/slurm_test/


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "EVA_BENCH_SLURM_PARTITION"}
    return {**env, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
            **extra}


def _sbatch_script(launcher: str, tmp_path, monkeypatch) -> str:
    """The sbatch script hydra-submitit-launcher would submit for this launcher profile, built the way its launch()
    builds it (init keys to the executor, the queue's common keys unprefixed, the rest as slurm_<key>). Only the
    text is built, nothing submitted: submitit's "is srun on PATH" probe is told yes, so this runs off a cluster too
    (CI's fresh machine has no SLURM; the slow test below submits for real)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="language", return_hydra_config=True, overrides=[
            "experiment=language_cpu", f"hydra/launcher={launcher}", "hydra.launcher.partition=cpu",
            f"hydra.sweep.dir={tmp_path}"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith(".SlurmLauncher")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    common = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in common else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("true", "uid")


def test_slurm_cpu_profile_asks_a_cpu_partition_for_no_gpu_one_core_and_a_few_gb(tmp_path, monkeypatch):
    cpu, gpu = _sbatch_script("slurm_cpu", tmp_path, monkeypatch), _sbatch_script("slurm", tmp_path, monkeypatch)
    assert "--gpus-per-node=1" in gpu  # what a CPU-only partition refuses
    assert "gpu" not in cpu.lower() and "gres" not in cpu
    assert "--cpus-per-task=1\n" in cpu and "--mem=4GB\n" in cpu and "--partition=cpu\n" in cpu
    assert "--signal=USR2@120" in cpu  # preemption and time limits still reach submitit


def _make_n(*assignments) -> str:
    proc = subprocess.run(["make", "-n", "-C", str(REPO), "reproduce-language", *assignments],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_reproduce_tabulates_and_compares_the_folder_a_named_sweep_writes():
    named = _make_n("RUNS=/tmp/fresh", "LAUNCH=slurm_cpu", "ARGS=experiment_name=mine seed=0")
    assert "hydra/launcher=slurm_cpu" in named and "experiment_name=mine" in named
    assert "eva_bench.tables --results /tmp/fresh --experiment mine " in named
    assert "eva_bench.reproduce --experiment mine --fresh /tmp/fresh" in named
    plain = _make_n("RUNS=/tmp/fresh")
    assert "--experiment language_cpu " in plain and "experiment_name" not in plain


def test_reproduce_of_a_sweep_nobody_committed_says_no_reference(tmp_path, capsys):
    committed = sorted((reproduce.REFERENCE / "language_cpu").glob("math--*--r2--s0--*.json"))[:2]
    assert committed
    (tmp_path / "mine").mkdir()
    for path in committed:
        shutil.copy(path, tmp_path / "mine" / path.name)
    assert reproduce.main(["--experiment", "mine", "--fresh", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no reference:") and "2 fresh records" in out
    assert reproduce.main(["--experiment", "mine", "--fresh", str(tmp_path), "--strict"]) == 1  # nothing verified


# ---- a real SLURM ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def partition(tmp_path_factory):
    """A running single-node cluster's default partition. The fixture script starts only daemons that are not
    running; `stop` ends only those (its state folder is this test's own), by their pids."""
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "EVA_BENCH_SLURM_STATE": str(state)}
    start = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=1200)
    if start.returncode == 77:  # the script says why (not root; no SLURM and no apt-get)
        pytest.skip(f"no single-node SLURM here: {start.stderr.strip()}")
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        listed = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout
        default = [p[:-1] for p in listed.split() if p.endswith("*")]
        assert default, f"no default partition: {listed}"
        yield default[0]
    finally:
        stop = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stdout + stop.stderr


def _sweep_args(tmp_path, sweep: str, *overrides) -> list[str]:
    # hydra.sweep.dir per step: each step's submitit folders (one per array task: <job>_<task>) are its own
    return ["task=math", "lora.r=2", *TINY, f"experiment_name={NAME}", f"hydra.sweep.dir={tmp_path}/{sweep}",
            *overrides]


def _jobs(tmp_path, sweep: str) -> list[str]:
    """The SLURM job ids a step's sweep submitted, from its submitit folders: <array>_<task> for an array (beside
    <array>, its sbatch script), <job> for a sweep of one run (submitted as a plain job). Pickles and the sbatch
    script of a submission sbatch refused lie there too."""
    folder = tmp_path / sweep / ".submitit"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    tasks = [n for n in names if re.fullmatch(r"\d+_\d+", n)]
    arrays = {n.split("_")[0] for n in tasks}
    return sorted(tasks + [n for n in names if n.isdigit() and n not in arrays])


def _states(job: str) -> list[str]:
    """Every state sacct recorded for a job, one per try (--duplicates: a requeued job's earlier tries too)."""
    out = subprocess.run(["sacct", "-j", job, "--duplicates", "-X", "-n", "-P", "-o", "State"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def _final_states(job: str) -> list[str]:
    """The job's states once SLURM has ended it: the sweep returns when submitit reads the job's result, a moment
    before the job ends and sacct records it."""
    deadline = time.time() + 120
    while (states := _states(job))[-1:] in (["RUNNING"], ["COMPLETING"], ["PENDING"]) and time.time() < deadline:
        time.sleep(1)
    return states


def _records(tmp_path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted((tmp_path / NAME).glob("*.json"))}


def _make(tmp_path, partition, sweep: str, *overrides) -> subprocess.CompletedProcess:
    args = " ".join(_sweep_args(tmp_path, sweep, *overrides))
    return subprocess.run(["make", "-C", str(REPO), "reproduce-language", "LAUNCH=slurm_cpu",
                           f"PARTITION={partition}", f"RUNS={tmp_path}", f"ARGS={args}"],
                          env=_env(), capture_output=True, text=True, timeout=900)


def _cancel_ours(tmp_path):
    """Jobs this test submitted and left queued or running (only after a failure): cancelled by id."""
    ours = [job for sweep in tmp_path.iterdir() if sweep.is_dir() for job in _jobs(tmp_path, sweep.name)]
    if ours:
        subprocess.run(["scancel", *ours], capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_sweep_on_a_real_slurm_reruns_only_what_is_missing_and_survives_preemption(tmp_path, partition):
    try:
        _on_slurm(tmp_path, partition)
    finally:
        _cancel_ours(tmp_path)


def _on_slurm(tmp_path, partition):
    train = [sys.executable, "-m", "tasks.language.train", "-m", "experiment=language_cpu", f"results_dir={tmp_path}"]

    # refused before submission, in one line each: a partition the cluster lacks, a GPU on a CPU partition
    for overrides, why in [(["hydra.launcher.partition=no_such_partition"], "does not exist on this cluster"),
                           ([f"hydra.launcher.partition={partition}", "hydra.launcher.gpus_per_node=1"],
                            "sbatch refused the sweep: sbatch: error: Invalid generic resource")]:
        bad = subprocess.run([*train, "hydra/launcher=slurm_cpu", *overrides, *_sweep_args(tmp_path, "bad", "seed=0")],
                             cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert bad.returncode != 0 and why in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-3000:]
        assert not _jobs(tmp_path, "bad") and not _records(tmp_path)

    # a 2-run array through make, named: records, the named sweep's table, "no reference"
    first = _make(tmp_path, partition, "first", "init=random,eva", "seed=0")
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-4000:]
    assert "0 of 2 runs have a finished record: launching 2" in log
    records = _records(tmp_path)
    assert len(records) == 2 and {r["status"] for r in records.values()} == {"success"}, log[-4000:]
    jobs = _jobs(tmp_path, "first")
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs}) == 1  # one array, two tasks
    assert all(_final_states(job) == ["COMPLETED"] for job in jobs)
    table = tmp_path / "tables" / f"{NAME}.md"
    assert f"wrote {table}" in log and "eva" in table.read_text()
    assert "no reference:" in log

    # the same sweep again: every record finished, nothing submitted, nothing rewritten
    again = _make(tmp_path, partition, "again", "init=random,eva", "seed=0")
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "2 of 2 runs have a finished record: launching 0" in again.stdout + again.stderr
    assert not _jobs(tmp_path, "again") and _records(tmp_path) == records

    # one record gone: exactly one job runs, and writes it again
    gone = next(name for name in records if "--eva--" in name)
    (tmp_path / NAME / gone).unlink()
    one = subprocess.run([*train, "hydra/launcher=slurm_cpu", f"hydra.launcher.partition={partition}",
                          *_sweep_args(tmp_path, "one", "init=random,eva", "seed=0")],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    assert "1 of 2 runs have a finished record: launching 1" in one.stdout + one.stderr
    assert len(_jobs(tmp_path, "one")) == 1 and _final_states(_jobs(tmp_path, "one")[0]) == ["COMPLETED"]
    again = _records(tmp_path)
    assert again[gone]["status"] == "success" and again[gone]["metrics"] == records[gone]["metrics"]

    # preemption: USR2 (what SLURM sends to preempt, and before the time limit) while the run trains. submitit
    # requeues the job; the interrupted run leaves a failed record; the requeued try reruns it to a finished one.
    # SLURM holds a requeued job ~2 min (BeginTime) before it starts again.
    run = _sweep_args(tmp_path, "preempt", "init=random", "seed=1", "task.train.limit=160")
    sweep = subprocess.Popen([*train, "hydra/launcher=slurm_cpu", f"hydra.launcher.partition={partition}", *run],
                             cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    plain = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and sweep.poll() is None and not list((tmp_path / NAME).glob("*--s1--*.lock")):
            time.sleep(0.2)  # the job holds the new run's record lock: it is in the run
        [job] = _jobs(tmp_path, "preempt")
        assert _states(job) == ["RUNNING"], _states(job)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        # while SLURM holds the requeued job: the same run, uninterrupted, in this process's own launcher
        plain = subprocess.Popen([*train, f"results_dir={tmp_path}/plain", "hydra/launcher=basic", *run],
                                 cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = sweep.communicate(timeout=900)[0]
        plain_log = plain.communicate(timeout=900)[0]
    finally:
        for proc in (sweep, plain):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert sweep.returncode == 0, log[-4000:]
    assert plain.returncode == 0, plain_log[-4000:]
    [path] = (tmp_path / NAME).glob("*--s1--*.json")
    requeued, uninterrupted = (json.loads(p.read_text()) for p in (path, tmp_path / "plain" / NAME / path.name))
    assert requeued["status"] == uninterrupted["status"] == "success"
    assert requeued["metrics"] == uninterrupted["metrics"]  # restarted from the beginning: the same run
    assert requeued["train"]["final_loss"] == uninterrupted["train"]["final_loss"]
    assert _final_states(job) == ["REQUEUED", "COMPLETED"]
    job_log = "".join(p.read_text() for p in sorted((tmp_path / "preempt" / ".submitit").rglob("*_log.*")))
    assert "this job is preempted" in job_log and f"Requeued job {job}" in job_log
    assert job_log.index(f"failed: {path}") < job_log.index(f"success: {path}")  # interrupted, then rerun
    assert not re.search(r"\S", subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout)
