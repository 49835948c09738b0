"""The vision recipe on the real data: backbone pretraining smoke and its cache, every registered init on the tiny ViT
through the vision callbacks, a 2-step run writing a record, bad input, and the paper-scale configs offline."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from eva_bench.assets import MissingAssetError, OfflineHubError
from eva_bench.recipe import build
from eva_bench.init import INITS, Calibration, InitError, find_targets, initialize
from tasks.vision import models
from tasks.vision.train import calibration_batches, run, token_rows

CONF = Path(__file__).resolve().parent.parent / "conf"
ARCH = dict(image_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
PRETRAIN = dict(seed=0, epochs=1, batch_size=64, lr=2e-3, weight_decay=0.05, warmup_ratio=0.1, mean=[0.286],
                std=[0.353], limit=256)
TINY = [  # a 2-step run: 4 pretraining steps on 256 Fashion-MNIST images, 128 task images, batch 64, 1 epoch
    *(f"model.load.architecture.{k}={v}" for k, v in ARCH.items()),
    "model.load.pretrain.limit=256", "model.load.pretrain.epochs=1", "model.load.pretrain.batch_size=64",
    "task.load.train_size=128", "task.load.test_size=64", "optim.epochs=1", "optim.log_every=1",
    "calibration.batches=2", "calibration.batch_size=32",
]
TARGETS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$"


def compose_vision(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="vision", overrides=[*TINY, f"results_dir={tmp_path}", *overrides])


def test_backbone_pretraining_is_cached_and_a_corrupt_cache_is_rebuilt():
    first = models.pretrained_tiny_vit("smoke", ARCH, PRETRAIN)
    folder = Path(first.info["cache"])
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["fashion_mnist_test_accuracy"] > 10.0  # 4 steps already beat chance
    again = models.pretrained_tiny_vit("smoke", ARCH, PRETRAIN)
    assert json.loads((folder / "meta.json").read_text())["created"] == meta["created"]  # loaded, not retrained
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    (folder / "weights.pt").write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = models.pretrained_tiny_vit("smoke", ARCH, PRETRAIN)
    assert json.loads((folder / "meta.json").read_text())["created"] > meta["created"]
    assert rebuilt.model.patch_embed.proj.weight.shape == (32, 1, 4, 4)


@pytest.fixture(scope="module")
def vision_setup():
    torch.manual_seed(0)
    model = models.tiny_vit(**ARCH, num_classes=10)
    images, labels = torch.rand(96, 1, 28, 28), torch.randint(0, 10, (96,))
    cfg = type("Cal", (), {"batches": 3, "batch_size": 16})
    return model.state_dict(), images, labels, calibration_batches(images, labels, torch.arange(96), cfg, seed=0)


@pytest.mark.parametrize("method", sorted(INITS))
def test_every_registered_init_on_the_tiny_vit_through_the_vision_callbacks(method, vision_setup):
    state, images, labels, batches = vision_setup
    model = models.tiny_vit(**ARCH, num_classes=10)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        before = model(images[:8])
    calibration = Calibration(batches=batches, forward=lambda m, b: m(b["images"]),
                              loss=models.classification_loss, rows=lambda b: token_rows(model, b, True),
                              dataset_size=96)
    peft_model, report = initialize(model, method, rank=2, alpha=1, target_modules=TARGETS, calibration=calibration,
                                    lora={"bias": "all", "modules_to_save": ["head"]})
    assert set(report.ranks) == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                                  "mlp.fc2")}
    if report.function_preserved:
        with torch.no_grad():
            assert torch.allclose(peft_model(images[:8]), before, atol=1e-4)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("head" in n for n in trainable) and any(n.endswith("bias") and "lora" not in n for n in trainable)
    loss = models.classification_loss(peft_model, batches[0])
    loss.backward()
    assert torch.isfinite(loss)


def test_token_rows_drop_the_class_token_when_asked():
    model = models.tiny_vit(**ARCH, num_classes=10)
    batch = {"images": torch.zeros(3, 1, 28, 28)}
    assert token_rows(model, batch, True).shape == (3, 50) and bool(token_rows(model, batch, True).all())
    assert token_rows(model, batch, False)[:, 0].sum() == 0 and token_rows(model, batch, False)[:, 1:].all()


def test_two_step_recipe_run_writes_a_complete_record(tmp_path):
    record = run(compose_vision(tmp_path, "init=eva", "lora.r=2", "task.dataset=mnist_location"))
    assert record["status"] == "success" and record["train"]["optimizer_steps"] == 2
    assert record["run"]["task_group"] == "structured" and record["run"]["task"] == "mnist_location"
    assert record["metrics"]["test/n"] == 64 and 0 <= record["metrics"]["test/accuracy"] <= 100
    assert 1 <= record["init_report"]["calibration_batches"] <= 2
    written = json.loads(next(tmp_path.glob("dev/*.json")).read_text())
    assert written["run"]["init"] == "eva" and "provenance" in written
    weights = Path(written["backbone"]["cache"]) / "weights.pt"  # the record names the backbone build it used
    assert written["backbone"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_tuned_protocol_selects_on_val200_style_split(tmp_path):
    record = run(compose_vision(tmp_path, "protocol=tuned_vtab", "protocol.lr_grid=[1e-2,1e30]",
                                "protocol.validation_size=64", "optim.max_grad_norm=null"))
    assert record["status"] == "success" and record["protocol"]["selected_lr"] == 1e-2
    selections = [json.loads(p.read_text()) for p in tmp_path.glob("dev/lr_search/*.json")]
    assert {s["metrics"].get("validation/n") for s in selections if s["status"] == "success"} == {64}


@pytest.mark.parametrize("override,error,match", [
    ("lora.target_modules=.*proj", InitError, "patch_embed.proj"),
    ("lora.target_modules=.*nothing_here", InitError, "match no module"),
    ("model.load.architecture.image_size=32", ValueError, "backbone takes 32x32"),
])
def test_bad_input_is_a_clear_error_before_training(tmp_path, override, error, match):
    with pytest.raises(error, match=match):
        run(compose_vision(tmp_path, override))


@pytest.mark.parametrize("experiment,depth", [("paper_vtab_dinov2_g14", 40), ("paper_vtab_vit_b16", 12)])
def test_paper_scale_configs_compose_and_target_the_right_layers_without_weights(experiment, depth, tmp_path,
                                                                                 monkeypatch):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="vision", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.optim.epochs == 30 and cfg.optim.weight_decay == 0.05 and cfg.data.batch_size == 64
    assert list(cfg.protocol.lr_grid) == [2.5e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4] and cfg.protocol.validation_size == 200
    assert len(str(cfg.hydra.sweeper.params["task.dataset"]).split(",")) == 19
    architecture = models.architecture_only(cfg.model.load.name, cfg.model.load.image_size)
    targets = find_targets(architecture, cfg.lora.target_modules)
    assert len(targets) == 4 * depth and not any("patch_embed" in t for t in targets)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    with pytest.raises(OfflineHubError, match=cfg.model.load.name):
        models.from_timm_hub(cfg.model.load.name, cfg.model.load.image_size)


def test_a_timm_vit_saved_to_a_folder_loads_offline_and_trains(tmp_path, monkeypatch):
    """model=vit_local: the tiny backbone saved with timm's save_for_hf, loaded back from the folder with the hub
    off: the same weights and normalisation, and a run on it records the folder and the weights' SHA-256."""
    import timm
    from timm.models import save_for_hf

    source = build(compose_vision(tmp_path).model.load)
    # a user's folder: a registered timm architecture at the tiny sizes, holding the tiny backbone's weights
    mine = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1,
                             embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10, global_pool="token")
    mine.load_state_dict(source.model.state_dict())
    save_for_hf(mine, tmp_path / "my_vit", model_config={"pretrained_cfg": {"mean": source.mean, "std": source.std}},
                safe_serialization=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = [f"model.load.name={tmp_path / 'my_vit'}", "model.load.image_size=28", "model.load.resize=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="vision", overrides=[
            "model=vit_local", *local, *(o for o in TINY if not o.startswith("model.")), f"results_dir={tmp_path}",
            "init=eva", "lora.r=2", "task.dataset=mnist_location"])
    loaded = build(cfg.model.load)
    assert (loaded.mean, loaded.std, loaded.in_chans) == (source.mean, source.std, 1)
    for (name, a), (_, b) in zip(source.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    record = run(cfg)
    assert record["status"] == "success" and record["run"]["model"] == "vit_local"
    weights = tmp_path / "my_vit" / "model.safetensors"
    assert record["backbone"] == {"local_dir": str(tmp_path / "my_vit"),
                                  "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        missing = compose(config_name="vision", overrides=["model=vit_local", f"model.load.name={tmp_path}/nowhere",
                                                          "model.load.image_size=28"])
    with pytest.raises(MissingAssetError, match="no such directory"):
        build(missing.model.load)


def test_a_dataset_its_loader_does_not_have_fails_before_any_record(tmp_path):
    """dsprites_orientation is a hub VTAB task: the CPU default's loader does not have it (a failed record before)."""
    with pytest.raises(ValueError, match="unknown vision task 'dsprites_orientation' for tasks.vision.data.cpu_task"):
        run(compose_vision(tmp_path, "task.dataset=dsprites_orientation"))
    assert not any(tmp_path.rglob("*.json")) and not any(tmp_path.rglob("*.lock"))
