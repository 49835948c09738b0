"""What many tests build: a tiny Llama, token batches with padding and a prompt, and their calibration. Through the
library's own ``Calibration.for_hf``, so library tests never import a task recipe."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eva_bench.init import Calibration


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


def lm_calibration(batches: list[dict], dataset_size: int | None = None) -> Calibration:
    """A causal LM's calibration: its forward, its loss, real tokens as rows, answer tokens as loss rows."""
    return Calibration.for_hf(batches, dataset_size=dataset_size)
