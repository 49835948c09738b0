"""Every config file composes; every experiment's sweep composes; paper-scale configs validate without a download."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from eva_bench.init import INITS
from eva_bench.recipe import check_domain

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "base"))  # base/: shared
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml"))


def compose_language(overrides=(), primary="language"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=primary, overrides=list(overrides), return_hydra_config=True)


def primary_of(experiment: str) -> str:
    """The primary config an experiment belongs to, by its name (vision_*, paper_vtab_*, rl_*, paper_rl_*)."""
    if experiment.startswith(("vision_", "paper_vtab_")):
        return "vision"
    if experiment.startswith(("rl_", "paper_rl_")):
        return "rl"
    return "language"


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes(group, option):
    cfg = compose_language([f"{group}={option}"])
    assert cfg[group] is not None


def test_init_configs_match_the_registry():
    names = {f.stem for f in (CONF / "init").glob("*.yaml")}
    assert names == set(INITS)
    for name in names:
        assert compose_language([f"init={name}"]).init.name == name


def sweep_points(cfg):
    """The overrides of the first and last point of an experiment's sweep (glob(...) expanded over its group)."""
    params = cfg.hydra.sweeper.params or {}
    first, last = [], []
    for key, spec in params.items():
        if str(spec).startswith("glob("):
            choices = sorted(f.stem for f in (CONF / key).glob("*.yaml"))
            excluded = re.findall(r"exclude=\[?([\w,]+)\]?", str(spec))
            choices = [c for c in choices if not excluded or c not in excluded[0].split(",")]
        else:
            choices = [c.strip() for c in str(spec).split(",")]
        first.append(f"{key}={choices[0]}")
        last.append(f"{key}={choices[-1]}")
    return first, last


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_and_its_sweep_composes(experiment):
    primary = primary_of(experiment)
    cfg = compose_language([f"experiment={experiment}"], primary)
    assert cfg.experiment_name == experiment  # names line up: conf/experiment/X -> results/X
    for point in sweep_points(cfg):
        composed = compose_language([f"experiment={experiment}", *point], primary)
        assert composed.init.name in INITS
        assert composed.lora.r >= 1


PAPER = [e for e in EXPERIMENTS if e.startswith("paper_") and primary_of(e) == "language"]


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_experiments_pin_hub_revisions(experiment):
    cfg = compose_language([f"experiment={experiment}"])
    assert cfg.model.load._target_ == "tasks.language.models.from_hub"
    assert re.fullmatch(r"[0-9a-f]{40}", cfg.model.load.revision)
    assert cfg.lora.r == 16 and cfg.lora.alpha == 1 and cfg.optim.lr == 5e-4  # EVA v5 language protocol
    assert cfg.data.batch_size * cfg.optim.grad_accumulation == 32
    assert str(cfg.hydra.sweeper.params.seed) == "0,10,101"


@pytest.mark.parametrize("primary,foreign", [("language", "model=vit_tiny_fmnist"), ("vision", "model=stories260k"),
                                             ("rl", "task=vtab_cpu"), ("language", "task=mw_cpu")])
def test_a_recipe_rejects_another_task_modules_options(primary, foreign):
    check_domain(compose_language([], primary), primary)  # its own defaults pass
    with pytest.raises(ValueError, match=f"the {primary} recipe needs"):
        check_domain(compose_language([foreign], primary), primary)


@pytest.mark.parametrize("group", ["model", "task"])
def test_every_model_and_task_option_says_its_domain(group):
    """A missing ``domain:`` is an error, not "language": each option declares it, itself or through its base."""
    from eva_bench.checks import group_options

    assert all(option.get("domain") in ("language", "vision", "rl") for option in group_options(group).values())


def test_an_option_without_a_domain_is_refused_by_name(tmp_path):
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "mine.yaml").write_text("name: mine\nevals: {}\naverage: false\n")
    cfg = compose_language(["task=mine", f"hydra.searchpath=[file://{tmp_path}]"])
    with pytest.raises(ValueError, match="the 'mine' option declares no domain: add a `domain:` key"):
        check_domain(cfg, "language")


@pytest.mark.parametrize("domain,own,foreign", [
    ("language", ["model: hf,", "stories260k", "optim: language_cpu, language_paper", "calibration: "],
     ["vit_b16", "dt_cpu", "vision_cpu", "tuned_rl", "mw_cpu"]),
    ("vision", ["vit_b16", "lora: vit", "task: vtab, vtab_cpu", "protocol: fixed, tuned, tuned_vtab"],
     ["stories260k", "dt_cpu", "language_cpu", "tuned_language_paper", "calibration: "]),
    ("rl", ["model: dt_cpu, dt_local, dt_paper", "rl_cpu_tuned", "init: ailora,"], ["vit_tiny_fmnist", "math", "vtab"]),
])
def test_a_recipe_s_help_lists_its_own_options_only(domain, own, foreign):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", f"tasks.{domain}.train", "--help"], cwd=CONF.parent,
                          capture_output=True, text=True, timeout=120)
    options = done.stdout.split("== Config ==")[0]
    assert done.returncode == 0 and f"== Options of the {domain} recipe" in options, done.stdout + done.stderr
    assert all(text in options for text in own) and not any(text in options for text in foreign)


def test_the_shared_run_block_is_in_every_recipe_and_not_repeated():
    """conf/base/run.yaml's keys reach all three recipes' configs, and no primary config defines them again."""
    import yaml

    shared = yaml.safe_load((CONF / "base" / "run.yaml").read_text())
    for primary in ("language", "vision", "rl"):
        own = yaml.safe_load((CONF / f"{primary}.yaml").read_text())
        assert "base/run" in own["defaults"] and not set(shared) & set(own), primary
        cfg = compose_language(primary=primary)
        assert all(key in cfg for key in shared if key != "hydra") and cfg.hydra.job.chdir is False
