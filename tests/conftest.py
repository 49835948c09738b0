import os
from pathlib import Path

# Offline by default (an accidental hub call would hang ~30 s) and W&B never online from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("EVA_BENCH_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

import pytest  # noqa: E402

from tests.helpers import lm_calibration, tiny_llama, token_batches  # noqa: E402


@pytest.fixture(autouse=True)
def private_init_cache(tmp_path_factory, monkeypatch):
    """Init statistics are cached under a per-test directory, never the repository's .cache (a test must not
    depend on, or leave, entries another run wrote)."""
    monkeypatch.setenv("EVA_BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def calibration():
    return lm_calibration(token_batches())
