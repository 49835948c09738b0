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
    "push-v3 dataset": {"key": "eva_bench/metaworld/push-v3-abc-v0", "hash": "b" * 64,
                        "hash_of": "content sha256 (episodes' arrays)", "threads": None, "machine": {"cpu": "x", "isa": []},
                        "module": "rl"},
}}


def test_verdicts_name_a_match_a_differing_hash_and_a_missing_build():
    out = artifacts.verdicts({"vit backbone": "a" * 64, "push-v3 dataset": "c" * 64}, MANIFEST)
    assert out["vit backbone"] == "sha256 of weights.pt matches committed"
    assert out["push-v3 dataset"].startswith("content sha256 (episodes' arrays) differs from committed (cccc")
    assert artifacts.verdicts({}, MANIFEST) == {"vit backbone": "not built", "push-v3 dataset": "not built"}
    assert list(artifacts.verdicts({}, MANIFEST, modules=("rl",))) == ["push-v3 dataset"]  # make reproduce-rl's


def test_committed_manifest_lists_the_cpu_defaults_artifacts():
    committed = artifacts.load_manifest()["artifacts"]
    assert "vit_tiny_fmnist backbone" in committed and "dt_cpu checkpoint" in committed
    assert sum(name.endswith(" dataset") for name in committed) == 13  # 10 pretraining + 3 held-out tasks
    assert all(len(entry["hash"]) == 64 for entry in committed.values())


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
