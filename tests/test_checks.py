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
    ("calibration.source=random", "calibration.source='random'"),  # random_tokens, null or a data config
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


@pytest.mark.parametrize("override, message", [
    ("+lora.rank=4", "unknown key lora.rank: did you mean lora.r?"),  # rank: too short for difflib, r starts it
    ("+lora.lora_alpha=2", "unknown key lora.lora_alpha: did you mean lora.alpha?"),  # PEFT's name, ours differs
    ("+optim.lrr=1e-3", "unknown key optim.lrr: did you mean optim.lr?"),
    ("+seeed=1", "unknown key seeed: did you mean seed?"),
])
def test_an_unknown_key_fails_with_its_close_match_before_any_record(tmp_path, override, message):
    from tasks.language.train import run

    with pytest.raises(ConfigError, match="nothing was run") as error:
        run(composed("language", [override, f"results_dir={tmp_path}"]))
    assert message in str(error.value)
    assert not any(tmp_path.iterdir())  # no record, no lock


def test_an_init_parameter_is_checked_against_the_chosen_method():
    assert problems(composed("language", ["init=eva", "+init.params.rhoo=1"])) == [
        "unknown key init.params.rhoo: did you mean init.params.rho?"]
    assert problems(composed("language", ["init=random", "+init.params.rho=1"]))  # EVA's, not random's


@pytest.mark.parametrize("override", [
    "+model.gradient_checkpointing=true",  # defined by the 7B model configs
    "+lora.bias=all",  # a LoraConfig option the recipe passes through
    "+init.params.max_batches=2",  # with init=eva below: one of its parameters
])
def test_keys_defined_elsewhere_pass(override):
    assert problems(composed("language", ["init=eva", override])) == []


def test_eval_sets_take_any_name_and_their_specs_are_checked():
    """task.evals is keyed by names a task file chooses (tests/test_language_sets.py adds one by YAML alone); what
    each holds is checked against what conf/'s eval sets hold."""
    assert problems(composed("language", ["+task.evals.mine={data: {}, metrics: [nll], scorer: number}"])) == []
    assert problems(composed("language", ["+task.evals.gsm8k.scorr=number"])) == [
        "unknown key task.evals.gsm8k.scorr: did you mean task.evals.gsm8k.scorer?"]


def test_another_recipes_key_is_unknown():
    """data.steps is the RL recipe's (conf/rl.yaml): on the vision recipe it would be ignored, so it is an error."""
    assert problems(composed("rl", ["data.steps=5"])) == []
    assert problems(composed("vision", ["+data.steps=5"])) == [
        "unknown key data.steps (valid here: batch_size, eval_batch_size)"]


def test_a_misspelt_key_on_the_command_line_gets_the_close_match(tmp_path):
    """Without ``+`` Hydra would refuse the key and advise appending it; the recipe answers first."""
    cmd = [sys.executable, "-m", "tasks.language.train", "lora.rank=4", f"results_dir={tmp_path}/runs"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "unknown key lora.rank: did you mean lora.r?" in done.stderr and "+lora.rank" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_check_command_line_leaves_valid_and_appended_keys_to_hydra(capsys):
    from eva_bench.checks import check_command_line

    check_command_line("language", ["-m", "experiment=language_cpu", "lora.r=2,8", "init=eva", "init.params.rho=1",
                                    "+lora.bias=all", "hydra/launcher=local", "hydra.sweeper.dry_run=true",
                                    "model.load.revision=main", "model=hf", "protocol=tuned"])
    with pytest.raises(SystemExit):
        check_command_line("language", ["optim.lrr=1", "seeed=2"])
    assert capsys.readouterr().err.splitlines()[:2] == ["unknown key optim.lrr: did you mean optim.lr?",
                                                        "unknown key seeed: did you mean seed?"]


def test_another_modules_option_is_named_with_the_valid_ones(tmp_path):
    from tasks.language.train import run

    with pytest.raises(ConfigError) as error:
        run(composed("language", ["model=vit_tiny_fmnist", f"results_dir={tmp_path}"]))
    assert ("model=vit_tiny_fmnist is a vision option; the language recipe needs a language model, one of: hf, "
            "llama2_7b, llama31_8b, mistral_7b, stories260k, stories260k_mistral") in str(error.value)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="task=vtab_cpu is a vision option; the rl recipe needs an rl task, one "
                                          "of: mw_cpu, mw_cw10_cpu, mw_mt40_cw10"):
        RunContext.from_config(composed("rl", ["task=vtab_cpu"]), "rl", task="x", model="y")
