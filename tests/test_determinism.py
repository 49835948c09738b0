"""Builds are bit-identical: the vision backbone and the RL data and checkpoint built twice, in two caches, with the
caller's torch threads changed in between, have the same hashes; the manifest comparison reports a differing hash."""

import torch
from hydra import compose, initialize_config_dir
import pytest

from eva_bench import artifacts
from eva_bench.assets import REPO_ROOT

MANIFEST = {"artifacts": {
    "vit backbone": {"key": "vit-abc", "hash": "a" * 64, "hash_of": "sha256 of weights.pt", "threads": 2,
                     "machine": {"cpu": "x", "isa": []}, "module": "vision"},
    "mw push-v3 dataset": {"key": "eva_bench/metaworld/push-v3-abc-v0", "hash": "b" * 64,
                           "hash_of": "content sha256 (episodes' arrays)", "threads": None,
                           "machine": {"cpu": "x", "isa": []}, "module": "rl"},
}}


def current(key, digest):
    return {"key": key, "hash": digest}


def test_verdicts_match_by_key_and_name_a_match_a_difference_a_missing_build_and_an_unlisted_one():
    out = artifacts.verdicts({"backbone": current("vit-abc", "a" * 64),
                              "push": current("eva_bench/metaworld/push-v3-abc-v0", "c" * 64),
                              "unbuilt": current("vit-abc", None),
                              "new": current("eva_bench/metaworld/push-v3-other-v0", "d" * 64)}, MANIFEST)
    assert out["backbone"] == "sha256 of weights.pt matches committed"
    assert out["push"].startswith("content sha256 (episodes' arrays) differs from committed (cccc")
    assert out["unbuilt"] == "not built"
    assert out["new"] == "not in the manifest"


def test_committed_manifest_lists_every_cpu_experiments_artifacts():
    committed = artifacts.load_manifest()["artifacts"]
    assert all(len(entry["hash"]) == 64 for entry in committed.values())
    keys = {entry["key"] for entry in committed.values()}
    for module, experiment in [("vision", "vision_cpu"), ("rl", "rl_cpu"), ("rl", "rl_cpu_tuned"), ("rl", "rl_cw10_cpu")]:
        uses = artifacts.experiment_artifacts(module, experiment)  # composes only: nothing is built
        assert {entry["key"] for entry in uses.values()} <= keys, experiment
    assert len(artifacts.experiment_artifacts("rl", "rl_cpu")) == 14  # 10 pretraining + 3 held-out tasks, checkpoint
    assert len(artifacts.experiment_artifacts("rl", "rl_cw10_cpu")) == 21  # 10 + 10 CW10 tasks, checkpoint


def test_main_refuses_an_unknown_module_before_any_work():
    with pytest.raises(SystemExit, match="usage"):
        artifacts.main(["language"])


def test_pinned_threads_restores_the_callers_count():
    before = torch.get_num_threads()
    with artifacts.pinned_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def build_twice(monkeypatch, tmp_path, build):
    """``build()`` in two fresh caches, the caller's torch threads at 2 (prepare on 2 cores), then at 1 (a sweep
    job's): a build that used the caller's threads would differ."""
    before = torch.get_num_threads()
    try:
        builds = []
        for threads, cache in ((2, "first"), (1, "second")):
            torch.set_num_threads(threads)
            monkeypatch.setenv("EVA_BENCH_CACHE", str(tmp_path / cache))
            builds.append(build())
    finally:
        torch.set_num_threads(before)
    return builds


@pytest.mark.slow
def test_backbone_pretraining_is_bit_identical(monkeypatch, tmp_path):
    from tasks.vision import models

    arch = dict(image_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    pretrain = dict(seed=0, epochs=1, batch_size=64, lr=2e-3, weight_decay=0.05, warmup_ratio=0.05, mean=[0.286],
                    std=[0.353], limit=1024)
    first, second = build_twice(monkeypatch, tmp_path, lambda: models.pretrained_tiny_vit("det", arch, pretrain).info)
    assert first["threads"] == second["threads"] == artifacts.BUILD_THREADS
    assert first["sha256"] == second["sha256"]


@pytest.mark.slow
def test_rl_data_and_pretraining_are_bit_identical(monkeypatch, tmp_path):
    from tasks.rl.pretrain import pretrained

    tiny = ["task.pretrain_tasks=[reach-v3,push-v3]", "task.data.episodes=3", "task.data.max_episode_steps=20",
            "task.data_jobs=2", "task.pretrain_eval_episodes=1", "model.hidden=16", "model.layers=1", "model.heads=2",
            "model.context=4", "model.pretrain.steps=20", "model.pretrain.batch_size=16"]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="rl", overrides=tiny)
    first, second = build_twice(monkeypatch, tmp_path, lambda: pretrained(cfg)[1])
    assert first["datasets"] == second["datasets"]  # content hashes of both tasks' episodes
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["threads"] == artifacts.BUILD_THREADS
    entries = artifacts.experiment_artifacts("rl", "rl_cpu", tiny)  # what the manifest check reads from the cache
    assert entries["mw_cpu dt_cpu checkpoint"]["hash"] == second["weights_sha256"]
    assert entries["mw_cpu push-v3 dataset"]["hash"] == second["datasets"]["push-v3"]["content_sha256"]
    assert entries["mw_cpu faucet-close-v3 dataset"]["hash"] is None  # a held-out task this build did not generate
