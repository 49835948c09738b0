"""Backbones for the vision task: timm ViTs with a fresh linear head on the class token.

- ``pretrained_tiny_vit``: the CPU default. No pretrained ViT can be had offline, so eva_bench pretrains its own
  (timm's ``VisionTransformer``, 28x28 grayscale input, patch 4) on Fashion-MNIST's 60k training images, once. The
  weights are cached under ``<cache>/backbones/<name>-<config hash>/`` with their SHA-256 and the recorded test
  accuracy; a cached file whose hash does not match is rebuilt, never used, and concurrent runs build it once (a lock).
- ``from_timm_hub``: paper scale (DINOv2 ViT-g/14, ViT-B/16) with pretrained weights from the hub, or any timm
  ViT saved to a local folder (``conf/model/vit_local.yaml``).

Both return a :class:`Backbone`: the model plus how images must be prepared for it (size, channels, normalisation).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from eva_bench import distributed
from eva_bench.artifacts import BUILD_THREADS, machine, pinned_threads, sha256_file
from eva_bench.assets import cache_dir, local_folder, require_hub
from eva_bench.locks import exclusive
from eva_bench.train import OptimConfig, fit
from tasks.vision import data as vision_data

CACHE_VERSION = 2  # bump when the pretraining code changes what a cached backbone contains (2: pinned threads)


@dataclass
class Backbone:
    model: nn.Module  # a timm VisionTransformer (its head is replaced per downstream task)
    image_size: int  # the input side it takes
    in_chans: int  # input channels it takes
    mean: tuple[float, ...]  # per-channel normalisation it was pretrained with
    std: tuple[float, ...]
    resize: bool = False  # resize task images to image_size (hub backbones); False: a size mismatch is an error
    info: dict | None = None  # provenance: pretraining accuracy, cache path, hub id

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Task images (N, C, H, W) in [0, 1] -> the backbone's input; a size/channel mismatch is a clear error."""
        if images.shape[1] != self.in_chans:
            if images.shape[1] == 1 and self.in_chans == 3:
                images = images.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"images have {images.shape[1]} channels; the backbone takes {self.in_chans}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            if not self.resize:
                raise ValueError(
                    f"images are {tuple(images.shape[-2:])} but the backbone takes {self.image_size}x"
                    f"{self.image_size}; use a backbone built for this size or set model.load.resize=true"
                )
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False).clamp(0, 1)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images - mean) / std


def tiny_vit(image_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
             mlp_ratio: float, num_classes: int) -> nn.Module:
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=image_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, global_pool="token",  # head on the class token
    )


def pretrained_tiny_vit(name: str, architecture: dict, pretrain: dict, threads: int | None = None) -> Backbone:
    """The CPU default's backbone, pretrained on Fashion-MNIST train (cached by the hash of this config).
    ``threads``: torch threads of the build (None: ``BUILD_THREADS``); part of the cache key, since the thread count
    changes the weights' last bits (eva_bench/artifacts.py)."""
    spec = backbone_spec(architecture, pretrain, threads)
    folder = backbone_folder(name, spec)
    with exclusive(folder.with_suffix(".lock")):  # many runs may start together: one builds, the others wait
        meta = _valid_cache(folder)
        if meta is None:
            with distributed.local():  # under torchrun one rank builds it alone while the others wait on the lock
                meta = _pretrain(folder, spec)
    model = tiny_vit(**architecture, num_classes=10)
    model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    # the weights' SHA-256 names the build: a build on another kind of CPU can differ in the last bits (other
    # kernels), and fine-tuning amplifies that, so records are comparable run to run only on one build
    kept = ("sha256", "fashion_mnist_test_accuracy", "pretrain_seconds", "threads", "machine")
    info = {"cache": str(folder), **{k: meta[k] for k in kept}}
    return Backbone(model.eval(), architecture["image_size"], architecture["in_chans"], tuple(pretrain["mean"]),
                    tuple(pretrain["std"]), info=info)


def backbone_spec(architecture: dict, pretrain: dict, threads: int | None = None) -> dict:
    """Everything that determines a built backbone: its cache key."""
    return {"version": CACHE_VERSION, "architecture": dict(architecture), "pretrain": dict(pretrain),
            "threads": int(threads or BUILD_THREADS)}


def backbone_folder(name: str, spec: dict) -> Path:
    """Where the backbone of ``spec`` (version, architecture, pretrain, threads) is cached."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / "backbones" / f"{name}-{digest}"


def _valid_cache(folder: Path) -> dict | None:
    """The cached backbone's metadata if its weights are intact; None (with a warning if corrupt) otherwise."""
    weights, meta_path = folder / "weights.pt", folder / "meta.json"
    if not (weights.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta["sha256"] == sha256_file(weights):
            return meta
    except (json.JSONDecodeError, KeyError):
        pass
    warnings.warn(f"cached backbone {folder} is corrupt (hash mismatch); rebuilding it", stacklevel=2)
    return None


def _pretrain(folder: Path, spec: dict) -> dict:
    """Supervised pretraining on Fashion-MNIST train with the shared loop, on ``spec["threads"]`` torch threads
    whatever the caller's (a sweep job's 1, prepare's all cores); test accuracy recorded beside it."""
    with pinned_threads(spec["threads"]):
        return _pretrain_pinned(folder, spec)


def _pretrain_pinned(folder: Path, spec: dict) -> dict:
    from tqdm import tqdm

    arch, cfg = spec["architecture"], spec["pretrain"]
    torch.manual_seed(cfg["seed"])
    model = tiny_vit(**arch, num_classes=10)
    backbone = Backbone(model, arch["image_size"], arch["in_chans"], tuple(cfg["mean"]), tuple(cfg["std"]))
    limit = cfg.get("limit") or None  # a slice of train and test (tests: the pretraining smoke)
    images, labels = vision_data.fashion_mnist("train")
    images, labels = backbone.prepare(images[:limit]), labels[:limit]  # an architecture it cannot take: error here
    batch = cfg["batch_size"]
    steps = len(images) // batch

    def epoch_batches(epoch: int):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch))
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            yield {"images": images[idx], "labels": labels[idx]}

    optim = OptimConfig(lr=cfg["lr"], epochs=cfg["epochs"], weight_decay=cfg["weight_decay"],
                        warmup_ratio=cfg["warmup_ratio"], log_every=10)
    total = math.ceil(cfg["epochs"] * steps)
    print(f"pretraining {folder.name} on Fashion-MNIST ({len(images)} images, {cfg['epochs']} epochs, {total} steps)")
    with tqdm(total=total, unit="step", desc="backbone pretraining", mininterval=5) as bar:
        def progress(step: int, loss: float, details: dict) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}")

        result = fit(model, epoch_batches, classification_loss, optim, steps_per_epoch=steps,
                     batch_size=lambda b: len(b["labels"]), on_log=progress)
    if result.status != "success":
        raise RuntimeError(f"backbone pretraining diverged (lr {cfg['lr']}); lower model.load.pretrain.lr")
    test_images, test_labels = vision_data.fashion_mnist("test")
    accuracy = accuracy_and_nll(model, backbone.prepare(test_images[:limit]), test_labels[:limit])["accuracy"]
    print(f"pretrained backbone: Fashion-MNIST test accuracy {accuracy:.2f} % in {result.seconds:.0f} s")

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "weights.pt.tmp"
    torch.save(model.state_dict(), tmp)
    tmp.replace(folder / "weights.pt")
    meta = {
        **spec, "sha256": sha256_file(folder / "weights.pt"), "machine": machine(),
        "fashion_mnist_test_accuracy": accuracy,
        "pretrain_seconds": result.seconds, "pretrain_final_loss": result.final_loss, "created": time.time(),
        "images_per_second": result.examples / result.seconds if result.seconds else None,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def from_timm_hub(name: str, image_size: int, revision: str | None = None, resize: bool = True) -> Backbone:
    """A pretrained timm ViT from the hub (``timm/<name>``), or from a local folder (timm's ``save_for_hf`` output:
    ``config.json`` and ``model.safetensors``), at ``image_size``. Offline and not cached: a clear error before any
    work. ``revision`` pins the hub commit (timm's ``hf_hub_id@revision``)."""
    folder = local_folder(name)
    if folder is not None:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True, img_size=image_size)
        weights = next((folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()), None)
        info = {"local_dir": str(folder), "sha256": sha256_file(weights) if weights else None}
    else:
        hub_id = f"timm/{name}"
        require_hub(hub_id, revision)
        overlay = {"hf_hub_id": f"{hub_id}@{revision}" if revision else hub_id}
        model = timm.create_model(name, pretrained=True, img_size=image_size, pretrained_cfg_overlay=overlay)
        info = {"hub_id": hub_id, "revision": revision}
    cfg = model.pretrained_cfg
    return Backbone(model.eval(), image_size, cfg.get("input_size", (3,))[0], tuple(cfg["mean"]), tuple(cfg["std"]),
                    resize=resize, info=info)


def architecture_only(name: str, image_size: int) -> nn.Module:
    """A hub (or local folder's) backbone's architecture on the meta device (no weights, no memory): what config
    checks need."""
    folder = local_folder(name)
    with torch.device("meta"):
        return timm.create_model(f"local-dir:{folder}" if folder else name, pretrained=False, img_size=image_size)


def classification_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["images"]), batch["labels"])


@torch.no_grad()
def accuracy_and_nll(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> dict:
    """Top-1 accuracy (%) and mean cross-entropy (nats) over prepared images (each rank scores its share under
    torchrun)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def score(start: int) -> tuple[int, float]:  # one batch: (correct, summed cross-entropy)
        logits = model(images[start : start + batch_size].to(device)).float()
        target = labels[start : start + batch_size].to(device)
        return int((logits.argmax(-1) == target).sum()), float(F.cross_entropy(logits, target, reduction="sum"))

    # each rank scores every world-size-th batch; the sums run in batch order, as in one process
    batches = distributed.spread(range(0, len(images), batch_size), lambda starts: [score(i) for i in starts])
    model.train(was_training)
    correct, nll = sum(c for c, _ in batches), sum(n for _, n in batches)
    return {"accuracy": 100.0 * correct / len(images), "nll": nll / len(images)}
