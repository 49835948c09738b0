"""The RL experiments compose under conf/rl.yaml with every sweep point; the paper config holds the paper's numbers;
the CW10 experiments plan the runs (and variant columns) they say."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from eva_bench import tables
from eva_bench.init import INITS
from hydra_plugins.eva_bench_sweeper.skip_finished_sweeper import SkipFinishedSweeper
from tasks.rl import envs

CONF = Path(__file__).resolve().parent.parent / "conf"
RL_EXPERIMENTS = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml") if f.stem.startswith(("rl_", "paper_rl_")))


def compose_rl(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="rl", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("experiment", RL_EXPERIMENTS)
def test_every_rl_sweep_point_composes_with_rl_options(experiment):
    cfg = compose_rl([f"experiment={experiment}"])
    assert cfg.experiment_name == experiment and cfg.model.domain == "rl" and cfg.task.domain == "rl"
    params = cfg.hydra.sweeper.params
    grids = cfg.hydra.sweeper.get("grids") or []
    inits = [str(source.init) for source in (params, *grids) if "init" in source]
    assert inits, "the sweep names its inits in params or in its grids"
    for init in ",".join(inits).split(","):
        assert init in INITS
    for task in str(params["task.finetune"]).split(","):
        envs.check_task(task)
        assert task not in cfg.task.pretrain_tasks  # held out
    for task in cfg.task.pretrain_tasks:
        envs.check_task(task)


def test_paper_rl_config_is_the_papers_protocol():
    cfg = compose_rl(["experiment=paper_rl_cw10"])
    m = cfg.model
    assert (m.layers, m.heads, m.hidden, m.context, m.dropout) == (4, 8, 512, 50, 0.2)
    assert cfg.optim.lr == 1e-4 and cfg.optim.max_grad_norm == 0.25 and cfg.data.batch_size == 128
    assert len(str(cfg.hydra.sweeper.params["task.finetune"]).split(",")) == 10
    assert len(cfg.task.pretrain_tasks) == 40 and str(cfg.hydra.sweeper.params["lora.r"]) == "2,4,8,16"


def test_language_options_carry_no_domain_key():
    for group in ("model", "task"):
        for f in (CONF / group).glob("*.yaml"):
            text = f.read_text()
            assert ("domain: rl" in text) == (f.stem.startswith(("dt_", "mw_"))), f


CW10 = ["hammer-v3", "push-wall-v3", "faucet-close-v3", "push-back-v3", "stick-pull-v3", "handle-press-side-v3",
        "push-v3", "shelf-place-v3", "window-close-v3", "peg-unplug-side-v3"]  # Continual World's order


def planned(experiment: str) -> list[dict]:
    """The runs the sweeper plans for an experiment (params crossed with each grid, plus the variant label), as
    override dicts; the same code path as a dry run, without composing each run's config."""
    sweeper_cfg = OmegaConf.to_container(compose_rl([f"experiment={experiment}"]).hydra.sweeper)
    params = {key: str(value) for key, value in sweeper_cfg["params"].items()}
    # the planning method alone, on the state it reads (Hydra, not a test, instantiates sweepers)
    sweeper = SimpleNamespace(params=params, grids=[dict(g) for g in sweeper_cfg.get("grids") or []], arguments=[],
                              hydra_context=SimpleNamespace(config_loader=None))
    overrides = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    return [dict(o.split("=", 1) for o in job) for job in SkipFinishedSweeper._every_job(sweeper, overrides)]


def columns(runs: list[dict]) -> Counter:
    """How many runs each tables column gets (variant labels as tables.method_name spells them)."""
    return Counter(tables.method_name(run["init"], run.get("variant", "").strip("'") or None) for run in runs)


def test_paper_rl_cw10_runs_eva_dora_as_a_variant_of_eva_only():
    runs = planned("paper_rl_cw10")
    assert columns(runs) == {"random": 120, "eva": 120, "eva use_dora=True": 120}  # 10 tasks x 4 ranks x 3 seeds
    assert all(run.get("lora.use_dora", "False") == str("variant" in run) for run in runs)


def test_every_paper_rl_method_is_a_column_the_paper_experiment_fills():
    paper = pd.read_csv(tables.PAPER_DIR / "eva_v5_rl.csv")
    assert set(paper["method"]) == set(columns(planned("paper_rl_cw10")))
    assert paper.set_index("method")["value"].to_dict() == {"random": 0.86, "eva": 0.90, "eva use_dora=True": 0.94}


def test_cw10_cpu_task_holds_out_all_of_cw10():
    cfg = compose_rl(["task=mw_cw10_cpu"])
    assert len(cfg.task.pretrain_tasks) == 10 == len(set(cfg.task.pretrain_tasks))
    assert not set(cfg.task.pretrain_tasks) & set(CW10)  # push-v3 is a CW10 task: not pretrained on here
    paper = compose_rl(["task=mw_mt40_cw10"]).task.pretrain_tasks
    assert set(cfg.task.pretrain_tasks) <= set(paper)  # MT40 tasks, as the paper's split


def test_rl_cw10_cpu_plans_the_power_analysis_design():
    cfg = compose_rl(["experiment=rl_cw10_cpu"])
    assert cfg.task.name == "mw_cw10_cpu" and cfg.task.eval_episodes == 20 and cfg.optim.lr == 3e-3
    assert cfg.protocol.name == "fixed" and cfg.paper.table == "eva_v5_rl"
    runs = planned("rl_cw10_cpu")
    assert columns(runs) == {"random": 100, "eva": 100, "eva use_dora=True": 100}  # 10 tasks x 10 seeds each
    seed0 = [run["task.finetune"] for run in runs[:30] if run["init"] == "random"]
    assert seed0 == CW10 and {run["lora.r"] for run in runs} == {"8"}  # Continual World's task order
    assert [run["seed"] for run in runs] == [str(s) for s in range(10) for _ in range(30)]  # seed outermost
    paper = pd.read_csv(tables.PAPER_DIR / "eva_v5_rl.csv")
    assert set(paper["method"]) == set(columns(runs))  # every paper number lands beside one of our columns


def test_rl_cw10_cpu_pilot_is_random_only_on_three_seeds():
    runs = planned("rl_cw10_cpu_pilot")
    assert columns(runs) == {"random": 30}
    assert {run["task.finetune"] for run in runs} == set(CW10) and {run["seed"] for run in runs} == {"0", "1", "2"}
    assert compose_rl(["experiment=rl_cw10_cpu_pilot"]).task.eval_episodes == 20


@pytest.mark.slow
def test_rl_cw10_cpu_dry_run_plans_300_runs_with_the_dora_variant(tmp_path):
    """The real dry run (composing each of the 300 configs: about 2 minutes on a loaded 2-core machine)."""
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "tasks.rl.train", "-m", "experiment=rl_cw10_cpu",
                           f"results_dir={tmp_path}", "hydra.sweeper.dry_run=true",
                           f"hydra.sweep.dir={tmp_path}/multirun"],
                          cwd=repo, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True,
                          timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "0 of 300 runs have a finished record: launching 300" in log
    launched = [line.split("would launch ")[1] for line in log.splitlines() if "would launch" in line]
    assert len({line.split()[0] for line in launched}) == 300  # every run its own id
    assert sum("variant='use_dora=True'" in line for line in launched) == 100
    assert all(("lora.use_dora=True" in line) == ("variant=" in line) for line in launched)
