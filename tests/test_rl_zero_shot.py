"""tasks/rl/zero_shot.py: the pretrained policy's rollouts are the ones a fine-tuning run of the same seed makes."""

import pytest

from tasks.rl import zero_shot
from tasks.rl.train import run
from tests.test_rl_recipe import TINY, compose_run

CW10 = ["hammer-v3", "push-wall-v3", "faucet-close-v3", "push-back-v3", "stick-pull-v3", "handle-press-side-v3",
        "push-v3", "shelf-place-v3", "window-close-v3", "peg-unplug-side-v3"]


def test_zero_shot_matches_a_run_that_changes_nothing(tmp_path):
    """random init (B = 0) trained at lr 1e-30 (B stays ~1e-30, below float32 resolution: lr 0 is refused) is the
    pretrained policy: its rollouts (goals and target return included) must score exactly what zero_shot reports for
    that seed; another seed draws other goals."""
    tiny = [o for o in TINY if not o.startswith("task.eval_episodes")] + ["task.eval_episodes=3"]
    record = run(compose_run(tmp_path, "init=random", "lora.r=2", "optim.lr=1e-30", "seed=1", tiny=tiny))
    rows = zero_shot.zero_shot(compose_run(tmp_path, tiny=tiny), ["window-close-v3"], [1, 2])
    assert [r["seed"] for r in rows] == [1, 2] and rows[0]["episodes"] == 3
    assert rows[0]["success_rate"] == record["metrics"]["rollout/success_rate"]
    assert rows[0]["return"] == pytest.approx(record["metrics"]["rollout/return"], rel=1e-9)
    assert rows[1]["return"] != rows[0]["return"]
    assert 0 <= rows[0]["expert_success"] <= 1 and rows[0]["expert_success"] == rows[1]["expert_success"]
    assert zero_shot.table(rows).splitlines()[2].startswith(f"| window-close-v3 | {rows[0]['expert_success']:.2f}, ")


def test_the_pilot_s_tasks_and_seeds_come_from_its_sweep():
    cfg = zero_shot.compose_rl(["experiment=rl_cw10_cpu_pilot"])
    assert zero_shot.swept_tasks(cfg) == CW10 and zero_shot.swept_seeds(cfg) == [0, 1, 2]
    assert zero_shot.swept_tasks(zero_shot.compose_rl([])) == ["window-close-v3"]  # no sweep: the task's own


def test_headroom_pairs_fine_tuned_seeds_with_their_zero_shot_goals():
    import pandas as pd

    rows = [{"task": "hammer-v3", "seed": s, "success_rate": v} for s, v in ((0, 0.0), (1, 0.1), (2, 0.2))]
    runs = pd.DataFrame({"task": "hammer-v3", "init": "random", "rank": 8, "seed": [0, 1, 2], "status": "success",
                         "rollout/success_rate": [0.5, 0.3, 0.4]})
    line = zero_shot.headroom(rows, runs).splitlines()[2]
    assert line == "| hammer-v3 | random | 8 | 0.10 | 0.40 ± 0.10, 0.30-0.50 | +0.30 | 3 |"  # gains .5, .2, .2
    failed = runs.assign(status=["success", "success", "failed"])  # a failed run is in no mean
    assert "| 0.40 ± 0.14, 0.30-0.50 | +0.35 | 2 |" in zero_shot.headroom(rows, failed)
    # a variant of the init (a longer budget) is a row of its own, as in the tables
    longer = pd.concat([runs.assign(variant=None), runs.assign(variant="steps=300", **{"rollout/success_rate": 0.9})])
    lines = zero_shot.headroom(rows, longer).splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["random", "random steps=300"]
    assert lines[1].endswith("| 0.90 ± 0.00, 0.90-0.90 | +0.80 | 3 |")
