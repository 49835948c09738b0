"""Where the language recipe's calibration batches come from (``calibration=...``), on the real stories260K and GSM8K:
the training split by default, another data set without the validation split, or random token ids of the same
shapes; and the sweeper's grids that run such ablations beside random."""

import json
import os
import subprocess
import sys

import pytest
from omegaconf import open_dict

from eva_bench import protocol, results
from eva_bench.recipe import build
from tasks.language import data as language_data
from tasks.language.train import calibration_pool, run
from tests.test_language_recipe import REPO, TINY, compose_run


def pool_and_split(cfg):
    """The calibration pool of ``cfg`` and the training features and validation split the recipe would have."""
    model, tokenizer = build(cfg.model.load)
    train, validation = protocol.split(cfg, build(cfg.task.train))
    features = language_data.tokenize(train, tokenizer, cfg.data.max_length)
    vocab = model.get_input_embeddings().num_embeddings
    return calibration_pool(cfg, features, validation, tokenizer, vocab), features, validation, vocab


def as_selection_run(cfg):
    with open_dict(cfg):
        cfg.protocol = {"name": "tuned", "stage": "validation", "lr_grid": None, "validation_size": 8,
                        "split_seed": 0, "selection_seed": 0}
    return cfg


def test_the_default_pool_is_the_training_split(tmp_path):
    pool, features, _, _ = pool_and_split(compose_run(tmp_path, "task=math"))
    assert pool is features


@pytest.mark.parametrize("stage", ["final", "validation"])
def test_a_source_naming_the_training_data_gives_the_training_split_less_the_validation_split(tmp_path, stage):
    cfg = compose_run(tmp_path, "task=math", "calibration=math", "calibration.source.limit=40")
    if stage == "validation":
        cfg = as_selection_run(cfg)
    pool, features, validation, _ = pool_and_split(cfg)
    assert pool == features and len(validation) == (8 if stage == "validation" else 0)


def test_another_source_never_holds_a_validation_example(tmp_path):
    """calibration=gsm8k_2000 contains the math task's 40 examples; in a selection run its 8 held out are removed."""
    cfg = as_selection_run(compose_run(tmp_path, "task=math", "calibration=gsm8k_2000", "calibration.source.limit=200"))
    _, tokenizer = build(cfg.model.load)
    pool, _, validation, _ = pool_and_split(cfg)
    held_out = language_data.tokenize(validation, tokenizer, cfg.data.max_length)
    every = language_data.tokenize(build(cfg.calibration.source), tokenizer, cfg.data.max_length)
    assert all(feature in every for feature in held_out)  # the source has them ...
    assert not any(feature in pool for feature in held_out) and len(pool) == len(every) - len(held_out)  # ... the pool not


def test_random_tokens_keep_each_example_s_shape_and_answer_rows(tmp_path):
    cfg = compose_run(tmp_path, "task=math", "calibration=random_tokens")
    pool, features, _, vocab = pool_and_split(cfg)
    again, _, _, _ = pool_and_split(cfg)
    assert pool == again  # seeded
    assert [len(p["input_ids"]) for p in pool] == [len(f["input_ids"]) for f in features]
    for fake, real in zip(pool, features):
        assert [label == -100 for label in fake["labels"]] == [label == -100 for label in real["labels"]]
        assert [i for i, label in zip(fake["input_ids"], fake["labels"]) if label != -100] == \
            [label for label in fake["labels"] if label != -100]  # the answer rows' labels are their own ids
    ids = [i for p in pool for i in p["input_ids"]]
    assert 0 <= min(ids) and max(ids) < vocab and len(set(ids)) > vocab // 2  # spread over the vocabulary
    same = sum(a == b for p, f in zip(pool, features) for a, b in zip(p["input_ids"], f["input_ids"]))
    assert same < 0.05 * len(ids)  # no content of the task left


def test_eva_trains_on_another_task_s_calibration_and_records_its_source(tmp_path):
    record = run(compose_run(tmp_path, "task=math", "init=eva", "lora.r=2", "calibration=commonsense"))
    assert record["status"] == "success" and record["init_report"]["calibration_batches"] >= 1
    assert record["config"]["calibration"]["source"]["_target_"].endswith("commonsense_train")


def test_too_little_calibration_data_fails_before_the_init(tmp_path):
    with pytest.raises(ValueError, match=r"calibration.batches=9 of batch_size=8 needs 72 examples; its source has"):
        run(compose_run(tmp_path, "task=math", "init=eva", "calibration.batches=9"))
    record = json.loads(next(tmp_path.glob("dev/*.json")).read_text())
    assert record["status"] == "failed" and not record.get("train")


def test_the_default_source_leaves_committed_ids_alone():
    config = {"experiment_name": "x", "calibration": {"batches": 16, "batch_size": 16}}
    with_default = {**config, "calibration": {**config["calibration"], "source": None}}
    with_other = {**config, "calibration": {**config["calibration"], "source": "random_tokens"}}
    assert results.config_hash(with_default) == results.config_hash(config) != results.config_hash(with_other)


def test_grids_plan_their_union_seed_outermost_with_variants(tmp_path):
    """random once, EVA at two rho values, a grid overlapping the first (run once), and a command line that
    narrows the seeds: the planned runs, their order and their variant labels."""
    grids = "[{init:random},{init:eva,init.params.rho:'1,3'},{init:'random'}]"
    cmd = [sys.executable, "-m", "tasks.language.train", "-m", *TINY, f"results_dir={tmp_path}/runs", "task=math",
           "hydra.sweeper.params={seed:'0,1,2'}", "seed=0,1",
           f"hydra.sweeper.grids={grids}", "hydra.sweeper.dry_run=true",
           f"hydra.sweep.dir={tmp_path}/multirun"]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True,
                          text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    planned = [line.split("would launch ")[1] for line in log.splitlines() if "would launch" in line]
    names = [p.split()[0].split("--")[2] + "/" + p.split()[0].split("--")[4] for p in planned]
    assert names == ["random/s0", "eva/s0", "eva/s0", "random/s1", "eva/s1", "eva/s1"]
    assert [p.split("variant=")[1].rstrip(")") if "variant=" in p else None for p in planned] == \
        [None, "'rho=1'", "'rho=3'"] * 2
    assert len({p.split()[0] for p in planned}) == 6  # each rho is its own run id
