"""The RL experiments compose under conf/rl.yaml with every sweep point; the paper config holds the paper's numbers."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from eva_bench.init import INITS
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
    for init in str(params.init).split(","):
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
