"""Records survive what users do to runs: a sweep killed at random points and rerun leaves only valid records, each
run trained once; any mix of config values gives a clear error before work or a valid record (never an unearned
success). Both slow: `make test-slow`."""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from eva_bench import results
from eva_bench.checks import ConfigError
from tests.test_language_recipe import TINY, compose_run

REPO = Path(__file__).resolve().parent.parent
SEEDS = 3


def _records(folder: Path) -> dict[str, dict]:
    """Every record file, each checked: a kill must never leave a partial or invalid one."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        record, problem = results.check_record(path)
        assert problem is None, f"{path}: {problem}"
        out[path.name] = record
    return out


@pytest.mark.slow
@pytest.mark.parametrize("killer", range(4))
def test_a_sweep_killed_at_random_points_then_rerun_trains_each_run_once(tmp_path, killer):
    cmd = [sys.executable, "-m", "tasks.language.train", "-m", *TINY, f"results_dir={tmp_path}", "task=math",
           f"seed={','.join(map(str, range(SEEDS)))}", "~task.evals.math", f"hydra.sweep.dir={tmp_path}/multirun"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    folder, finished_at = tmp_path / "dev", {}
    rng = random.Random(killer)
    for _ in range(3):  # three kills at random moments: startup, init, training, evaluation, the record's write
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(rng.uniform(2.0, 25.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for name, record in _records(folder).items():
            if record["status"] in results.FINISHED:  # once finished, never trained again nor rewritten
                assert finished_at.setdefault(name, record["finished_at"]) == record["finished_at"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    final = _records(folder)
    assert sorted(r["run"]["seed"] for r in final.values()) == list(range(SEEDS))
    assert all(r["status"] == "success" for r in final.values())
    assert all(final[name]["finished_at"] == done for name, done in finished_at.items())
    assert not list(folder.glob("*.tmp")) and not list(folder.glob("*.invalid-*"))  # nothing stale, nothing set aside
    assert f"{len(finished_at)} of {SEEDS} runs have a finished record" in out.stdout + out.stderr


VALUES = {  # key -> (valid values, invalid values)
    "seed": (st.integers(0, 3), st.one_of(st.integers(-2, -1), st.floats(0.1, 2.9))),
    "data.batch_size": (st.integers(1, 24), st.integers(-1, 0)),
    "task.train.limit": (st.integers(1, 48), st.integers(-1, 0)),  # null (all 7,473) is valid but slow
    "task.eval_limit": (st.one_of(st.none(), st.integers(1, 4)), st.integers(-1, 0)),
    "optim.lr": (st.one_of(st.floats(1e-5, 1e-1), st.just(1e3)), st.sampled_from([0.0, -1e-3, float("nan"), float("inf")])),
    "optim.max_grad_norm": (st.sampled_from(["null", 1.0]), st.just(0.0)),
    "lora.r": (st.integers(1, 4), st.integers(-1, 0)),
    "calibration.batches": (st.integers(1, 3), st.integers(-1, 0)),
}


@st.composite
def overrides(draw):
    """Every value valid but, in about half the cases, one: most cases run, the rest must fail before work."""
    broken = draw(st.integers(0, 2 * len(VALUES) - 1))
    out = {key: draw(bad if i == broken else good) for i, (key, (good, bad)) in enumerate(VALUES.items())}
    return {**out, "init": draw(st.sampled_from(["random", "eva", "lora_da"]))}


def _override(key: str, value) -> str:
    if key == "task.eval_limit" and value is None:
        return "task.eval_limit=4"  # null would score the whole test set: correct, but slow for a fuzz case
    return f"{key}={'null' if value is None else value}"


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides())
def test_any_config_gives_a_clear_error_before_work_or_a_valid_record(overrides):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run(Path(tmp), "task=math", "~task.evals.math", "task.evals.gsm8k.metrics=[nll]",
                          *(_override(k, v) for k, v in overrides.items()))
        from tasks.language.train import run

        try:
            run(cfg)
        except ConfigError:
            event("config error before work")
            assert not any(Path(tmp).rglob("*.json")), "a config error must come before any record"
            return
        except Exception:  # noqa: BLE001 - any other error must have left a failed record
            pass
        paths = list(Path(tmp).rglob("*.json"))
        assert len(paths) == 1
        record, problem = results.check_record(paths[0])
        assert problem is None, problem
        event(f"record: {record['status']}")
        if record["status"] == "success":  # earned: it trained and every metric is finite
            assert record["train"]["optimizer_steps"] >= 1
            assert all(isinstance(v, (int, float)) for v in record["metrics"].values())
        json.dumps(record, allow_nan=False)  # strict JSON
