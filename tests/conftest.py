import os
from pathlib import Path

# Offline by default (an accidental hub call would hang ~30 s) and W&B never online from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("EVA_BENCH_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tasks.language.train import lm_calibration  # noqa: E402,F401 (the tests' calibration: the language recipe's)


@pytest.fixture(autouse=True)
def private_init_cache(tmp_path_factory, monkeypatch):
    """Init statistics are cached under a per-test directory, never the repository's .cache (a test must not
    depend on, or leave, entries another run wrote)."""
    monkeypatch.setenv("EVA_BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def token_batches(n: int = 6, batch: int = 4, length: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length // 2 :] = 0  # one padded row, so masking is exercised
        labels = ids.clone()
        labels[:, : length // 4] = -100  # a "prompt" that label masking removes
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def calibration():
    return lm_calibration(token_batches())
