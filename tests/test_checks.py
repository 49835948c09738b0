"""Config values are checked before any work: each bad value of issue 21 is one clear error naming its key, a sweep
with one bad value launches nothing, and every committed experiment passes."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from eva_bench.checks import ConfigError, check_config, problems
from eva_bench.recipe import RunContext

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def composed(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def module_of(experiment: str) -> str:
    return "vision" if "vision" in experiment or "vtab" in experiment else "rl" if "rl" in experiment else "language"


@pytest.mark.parametrize("override, key", [
    ("seed=1.5", "seed=1.5"),
    ("seed=-1", "seed=-1"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("task.train.limit=0", "task.train.limit=0"),
    ("task.eval_limit=0", "task.eval_limit=0"),
    ("optim.lr=0", "optim.lr=0"),
    ("optim.lr=nan", "optim.lr=nan"),
    ("lora.r=0", "lora.r=0"),
    ("optim.warmup_ratio=1.0", "optim.warmup_ratio=1.0"),
    ("calibration.batches=0", "calibration.batches=0"),
    ("optim.epochs=true", "optim.epochs=True"),
])
def test_each_bad_value_is_named_before_the_record_is_located(tmp_path, override, key):
    cfg = composed("language", [override, f"results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="nothing was run") as error:
        RunContext.from_config(cfg, "language", task="math", model="stories260k")
    assert key in str(error.value)
    assert not any(tmp_path.iterdir())  # no record, no lock


def test_every_broken_rule_is_named_at_once():
    cfg = composed("language", ["seed=1.5", "data.batch_size=0"])
    assert [p.split(":")[0] for p in problems(cfg)] == ["seed=1.5", "data.batch_size=0"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_committed_experiment_passes(experiment):
    check_config(composed(module_of(experiment), [f"experiment={experiment}"]))


def test_a_sweep_with_one_bad_value_launches_nothing(tmp_path):
    cmd = [sys.executable, "-m", "tasks.language.train", "-m", "seed=0,1.5", f"results_dir={tmp_path}/runs",
           f"hydra.sweep.dir={tmp_path}/multirun"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "seed=1.5: must be an integer >= 0" in done.stderr
    assert not (tmp_path / "runs").exists()
