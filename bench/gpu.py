"""The language task's LoRA training and EVA / LoRA-DA init at a realistic size, on one GPU (< 10 min).

    .venv/bin/python -m bench.gpu                 # a ~1B-class Llama (TinyLlama-1.1B's shape), random weights, bf16
    .venv/bin/python -m bench.gpu --smoke         # a tiny Llama on the CPU: checks the script, measures nothing

The model is built from its config (no download): 22 layers, hidden 2048, MLP 5632, 32 heads (4 KV heads), 32k
vocabulary, random weights in bf16; LoRA r=16 on q/k/v/o/gate/up/down as conf/lora/default.yaml; sequences of 512
random tokens (timing does not depend on the values). Reported: LoRA training tokens/s (AdamW through
eva_bench.train.fit, micro-batch 8, after 2 warm-up steps) with and without gradient checkpointing, peak memory, and
EVA's and LoRA-DA's init seconds and peak memory on 8 calibration batches of 8 x 512 tokens, against one forward
pass over those batches. Writes bench/results/gpu-<date>.json. Without CUDA (and without --smoke): a clear refusal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench import machine
from eva_bench.init import initialize
from eva_bench.recipe import checkpoint_activations
from eva_bench.train import OptimConfig, fit
from tasks.language.train import lm_calibration

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # TinyLlama-1.1B's shape
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)


def build(size: dict, device, dtype):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**size)).to(device=device, dtype=dtype)
    model.config.use_cache = False
    return model


def token_batches(n: int, batch: int, seq: int, vocab: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_training(size, device, dtype, batches, checkpointing: bool) -> dict:
    model = build(size, device, dtype)
    if checkpointing:
        checkpoint_activations(model)  # as the recipe does for model.gradient_checkpointing: true
    model, _ = initialize(model, "random", rank=16, alpha=32, target_modules=TARGETS,
                          calibration=lm_calibration(batches[:1]))
    loss = lambda m, b: m(**b).loss  # noqa: E731
    fit(model, lambda e: iter(batches[:2]), loss, OptimConfig(lr=1e-4, log_every=100), steps_per_epoch=2)  # warm-up
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    result = fit(model, lambda e: iter(batches), loss, OptimConfig(lr=1e-4, log_every=100),
                 steps_per_epoch=len(batches))
    sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(b["input_ids"].numel() for b in batches)
    out = {"tokens_per_s": tokens / seconds, "seconds": seconds, "peak_gb": peak_gb(device), "status": result.status}
    del model
    return out


def time_init(size, device, dtype, batches, method: str, params: dict) -> dict:
    model = build(size, device, dtype)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    sync(device)
    forwards = time.perf_counter() - start
    reset_peak(device)
    start = time.perf_counter()
    _, report = initialize(model, method, rank=16, alpha=32, target_modules=TARGETS,
                           calibration=lm_calibration(batches), **params)
    sync(device)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "forwards_seconds": forwards, "ratio_to_forwards": seconds / forwards,
           "peak_gb": peak_gb(device), "calibration_batches": report.calibration_batches}
    del model
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny Llama on the CPU (checks the script only)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench.gpu: no CUDA device. This benchmark measures a 1B-class model on a GPU; on a CPU run "
                 "`python -m bench.gpu --smoke` to check the script, and bench.language / bench.init for CPU figures.")
    device = torch.device("cuda" if not args.smoke else "cpu")
    size, dtype = (TINY, torch.float32) if args.smoke else (ONE_B, torch.bfloat16)
    batch, seq, steps = (2, 16, 3) if args.smoke else (8, 512, 20)
    vocab = size["vocab_size"]
    train = token_batches(steps, batch, seq, vocab, device)
    calib = token_batches(8 if not args.smoke else 2, batch, seq, vocab, device)

    figures = {
        "machine": machine(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "model": {**size, "dtype": str(dtype), "lora_r": 16, "targets": TARGETS},
        "batch": batch, "seq": seq,
        "train": time_training(size, device, dtype, train, checkpointing=False),
        "train_checkpointing": time_training(size, device, dtype, train, checkpointing=True),
        "init": {
            "eva": time_init(size, device, dtype, calib, "eva", {"cache": False}),
            "lora_da": time_init(size, device, dtype, calib, "lora_da", {"n_g": None, "n_F": None}),
        },
    }
    print(json.dumps(figures, indent=1, default=str))
    if not args.smoke:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"gpu-{datetime.date.today()}.json"
        path.write_text(json.dumps(figures, indent=1, default=str))
        print(f"written: {path}")


if __name__ == "__main__":
    main()
