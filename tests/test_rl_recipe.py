"""The RL recipe end to end: a tiny pretraining (in the per-test cache), a 2-step fine-tune, a 1-episode rollout."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tasks.rl.train import run

CONF = Path(__file__).resolve().parent.parent / "conf"
TINY = [  # 2 pretraining tasks x 2 short episodes, 2 pretraining and 2 fine-tuning steps, one rollout
    "task.pretrain_tasks=[reach-v3,push-v3]", "task.finetune=window-close-v3", "task.data.episodes=2",
    "task.data.max_episode_steps=12", "task.data_jobs=1", "task.eval_episodes=1", "task.pretrain_eval_episodes=1",
    "model.hidden=16", "model.layers=1", "model.heads=2", "model.context=4", "model.pretrain.steps=2",
    "model.pretrain.batch_size=8", "data.steps=2", "data.batch_size=8", "calibration.batches=2",
    "calibration.batch_size=8", "optim.log_every=1",
]


def compose_run(tmp_path, *overrides, tiny=TINY):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="rl", overrides=[*tiny, f"results_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("init", ["random", "eva"])
def test_two_step_run_writes_a_record(tmp_path, init, capsys):
    record = run(compose_run(tmp_path, f"init={init}", "lora.r=2"))
    assert record["status"] == "success" and record["train"]["optimizer_steps"] == 2
    assert record["metrics"]["rollout/n"] == 1 and 0 <= record["metrics"]["rollout/success_rate"] <= 1
    assert set(record["pretrain"]["success"]) == {"reach-v3", "push-v3"}
    assert record["init_report"]["method"] == init and len(record["init_report"]["ranks"]) == 4
    written = json.loads(next(tmp_path.glob("dev/*.json")).read_text())
    assert written["run"]["task"] == "window-close-v3" and written["run"]["model"] == "dt_cpu"
    again = run(compose_run(tmp_path, f"init={init}", "lora.r=2", "seed=1"))  # the checkpoint is reused
    assert again["status"] == "success" and capsys.readouterr().out.count("pretraining the decision") == 1


def test_tuned_protocol_selects_on_held_out_episodes_without_rollouts(tmp_path):
    tiny = [o for o in TINY if not o.startswith("task.data.episodes")] + ["task.data.episodes=4"]
    record = run(compose_run(tmp_path, "protocol=tuned_rl", "protocol.lr_grid=[1e-2,1e30]",
                             "protocol.validation_size=1", "optim.max_grad_norm=null", tiny=tiny))
    assert record["status"] == "success" and record["protocol"]["selected_lr"] == 1e-2
    assert record["protocol"]["metric"] == "validation/action_mse" and record["metrics"]["rollout/n"] == 1
    selections = [json.loads(p.read_text()) for p in tmp_path.glob("dev/lr_search/*.json")]
    scored = [s for s in selections if s["status"] == "success"]
    assert len(selections) == 2 and len(scored) == 1  # lr 1e30 diverges; 1e-2 is scored on 1 of 4 episodes
    assert scored[0]["metrics"]["validation/n"] == 1 and "rollout/n" not in scored[0]["metrics"]
    assert record["protocol"]["grid"]["0.01"] == scored[0]["metrics"]["validation/action_mse"]


def test_a_validation_split_as_large_as_the_data_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="validation_size=2 leaves no training data"):
        run(compose_run(tmp_path, "protocol=tuned_rl", "protocol.validation_size=2"))


def test_language_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="model=stories260k is a language option; the rl recipe needs an rl model, "
                                         "one of: dt_cpu, dt_local, dt_paper"):
        run(compose_run(tmp_path, "model=stories260k", tiny=[]))


def test_a_held_out_task_that_is_also_pretrained_on_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="also a pretraining task"):
        run(compose_run(tmp_path, "task.finetune=push-v3"))


def test_a_checkpoint_folder_trains_exactly_as_the_cached_pretraining(tmp_path):
    """model=dt_local: the cached pretrained checkpoint copied to a folder of one's own gives the same run."""
    import shutil

    cached = run(compose_run(tmp_path / "cached", "init=eva", "lora.r=2"))
    folder = shutil.copytree(cached["artifacts"]["checkpoint"]["path"], tmp_path / "my_dt")
    not_model = [o for o in TINY if not o.startswith("model.")]
    local = run(compose_run(tmp_path / "local", "model=dt_local", f"model.checkpoint={folder}", "model.context=4",
                            "init=eva", "lora.r=2", tiny=not_model))
    assert local["status"] == "success" and local["run"]["model"] == "dt_local"
    assert local["artifacts"]["checkpoint"]["path"] == str(folder)
    assert local["artifacts"]["checkpoint"]["weights_sha256"] == cached["artifacts"]["checkpoint"]["weights_sha256"]
    assert local["metrics"] == cached["metrics"] and local["train"]["curve"] == cached["train"]["curve"]
    (folder / "meta.json").unlink()
    with pytest.raises(ValueError, match="is not a decision-transformer checkpoint"):
        run(compose_run(tmp_path / "bad", "model=dt_local", f"model.checkpoint={folder}", "model.context=4",
                        tiny=not_model))
