"""The vision task's data on the real files: shapes, label counts, split sizes, no train/test overlap, the
structured tasks' labels, and clear errors for unknown tasks and missing data."""

import hashlib

import pytest
import torch

from eva_bench.assets import MissingAssetError, OfflineHubError
from tasks.vision import data


def fingerprints(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1((img * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest() for img in images}


def test_fashion_mnist_from_its_debian_files():
    train_images, train_labels = data.fashion_mnist("train")
    test_images, test_labels = data.fashion_mnist("test")
    assert train_images.shape == (60000, 1, 28, 28) and test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train_labels).tolist() == [6000] * 10 and torch.bincount(test_labels).tolist() == [1000] * 10
    assert 0 <= float(train_images.min()) and float(train_images.max()) == 1.0


def test_mnist_sources_are_disjoint_train_and_test_sets():
    train, train_labels = data.mnist_train_5k()
    test, test_labels = data.mnist_test()
    assert train.shape == (5000, 1, 28, 28) and torch.bincount(train_labels).tolist() == [500] * 10
    assert test.shape == (10000, 1, 28, 28) and len(torch.bincount(test_labels)) == 10
    assert not fingerprints(train) & fingerprints(test)  # the structured tasks rely on it too


@pytest.mark.parametrize("name", list(data.CPU_TASKS))
def test_every_cpu_task_is_vtab_1k_shaped(name):
    task = data.cpu_task(name, test_size=500)
    assert task.group == data.CPU_TASKS[name] == data.task_group(name)
    assert task.train_images.shape == (1000, 1, 28, 28) and len(task.test_images) == 500
    counts = torch.bincount(task.train_labels, minlength=task.num_classes)
    assert len(counts) == task.num_classes and int(counts.min()) > 1000 / task.num_classes / 2  # every class present
    assert float(task.train_images.min()) >= 0 and float(task.train_images.max()) <= 1
    again = data.cpu_task(name, test_size=500)  # seeded: every run sees the same images
    assert torch.equal(again.train_images, task.train_images) and torch.equal(again.test_labels, task.test_labels)


def test_natural_tasks_never_test_on_training_images():
    for name in ("mnist", "digits"):
        task = data.cpu_task(name, test_size=None)
        assert not fingerprints(task.train_images) & fingerprints(task.test_images), name
    digits = data.cpu_task("digits", test_size=None)
    assert len(digits.train_images) + len(digits.test_images) == 1797


def test_location_labels_are_the_cell_of_the_digit_centre():
    pool = torch.ones(4, 1, 28, 28)  # a digit that fills its box: its bounding box is where it was placed
    images, labels = data.location_task(pool, 200, torch.Generator().manual_seed(0))
    for image, label in zip(images, labels.tolist()):
        rows, cols = image[0].nonzero(as_tuple=True)
        centre_row, centre_col = (int(rows.min()) + 7), (int(cols.min()) + 7)
        assert image[0].sum() == 14 * 14
        assert (centre_row * 3 // 28) * 3 + centre_col * 3 // 28 == label


def test_count_labels_are_the_number_of_digits():
    pool = torch.ones(4, 1, 28, 28)
    images, labels = data.count_task(pool, 100, torch.Generator().manual_seed(0))
    for image, label in zip(images, labels.tolist()):
        assert round(float(image.sum()) / (12 * 12)) == label + 1


def test_orientation_rotates_real_digits():
    digits, _ = data.mnist_test()
    sample = digits[:8]
    assert torch.allclose(data.rotate(sample, torch.zeros(8)), sample, atol=1e-5)
    quarter = data.rotate(sample, torch.full((8,), 90.0))
    error = min(float((quarter - torch.rot90(sample, k, dims=(2, 3))).abs().mean()) for k in (1, 3))
    assert error < 0.01  # a quarter turn is a quarter turn (up to interpolation at the border)
    assert float((quarter - sample).abs().mean()) > 0.05


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match="mnist_count"):
        data.cpu_task("cifar10")
    with pytest.raises(ValueError, match="dtd"):
        data.task_group("imagenet")


def test_missing_mnist_names_the_file(tmp_path, monkeypatch):
    data.mnist_test()  # read and cached once per process, by path: a data root without it must still fail
    monkeypatch.setenv("EVA_BENCH_DATA", str(tmp_path))
    with pytest.raises(MissingAssetError, match="t10k-images"):
        data.mnist_test()


def test_hub_vtab_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    with pytest.raises(OfflineHubError, match="clip-benchmark/wds_vtab-dtd"):
        data.vtab_task("dtd", image_size=224)
    assert len(data.VTAB) == 19 and {g for _, g in data.VTAB.values()} == {"natural", "specialized", "structured"}
