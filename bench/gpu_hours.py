"""Expected GPU-hours of the paper-scale language tables: an estimate from the experiment configs, not a measurement.

    .venv/bin/python -m bench.gpu_hours                 # A100 bf16 at an assumed 35 % of its peak
    .venv/bin/python -m bench.gpu_hours --measured bench/results/gpu-<date>.json   # bench.gpu's achieved rate

For each conf/experiment/paper_{math,commonsense}_*.yaml: runs = the product of its sweep's values; training FLOPs
per run = 6 x parameters x padded training tokens (LoRA: forward 2N, the recomputed forward of gradient checkpointing
2N, backward through the frozen weights to the activations 2N; the frozen weights get no gradient); evaluation = the
teacher-forced scoring (2N per token) plus greedy generation, bounded above by every batch running its whole
``max_new_tokens`` at an assumed seconds per decode step. Tokens per example come from local stand-ins read through
the asset resolver (GSM8K train for MetaMathQA, the staged commonsense train sets for commonsense_170k; the real test
sets for evaluation) at an assumed characters per token; padding from seeded random batches of those lengths.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from eva_bench.recipe import build
from tasks.language import data as language_data

CONF = Path(__file__).resolve().parent.parent / "conf"
PARAMETERS = {"llama2-7b": 6.74e9, "llama3.1-8b": 8.03e9, "mistral-7b": 7.25e9}  # the models' published sizes
TRAIN_EXAMPLES = {"metamathqa": 395_000, "commonsense_170k": 170_420}  # rows of the paper's training sets
STAND_IN = {  # local data of the same kind, for tokens per example (MetaMathQA also holds longer MATH rewrites)
    "metamathqa": lambda: language_data.math_train("gsm8k"),
    "commonsense_170k": lambda: language_data.commonsense_train(source="local"),
}
CHARS_PER_TOKEN = 3.5  # assumed for Llama/Mistral tokenizers on this English text with digits (no tokenizer offline)
A100_BF16_PEAK = 312e12  # FLOP/s, dense bf16 tensor cores
ASSUMED_MFU = 0.35  # share of peak that HF + PEFT LoRA training reaches at micro-batch 4 x 512 (assumed)
DECODE_STEP_SECONDS = 0.03  # one greedy decode step of a 7B model at batch 16 in transformers' generate (assumed)


def tokens(example, max_length: int) -> int:
    """Prompt (the instruction template included) and target, in assumed tokens, truncated as training does."""
    return min(max_length, math.ceil(len(example.prompt + " " + example.target) / CHARS_PER_TOKEN))


def padded_factor(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Padded tokens / real tokens when random batches are padded to their longest example (the recipe's collate)."""
    order = lengths[:]
    random.Random(seed).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return sum(max(b) * len(b) for b in batches) / sum(sum(b) for b in batches)


def estimate(experiment: str, flops_per_second: float) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="language", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    sweep = cfg.hydra.sweeper.params or {}
    runs = math.prod(len(str(values).split(",")) for values in sweep.values())
    n = PARAMETERS[cfg.model.name]
    source, max_length = cfg.task.train.source, cfg.data.max_length
    lengths = [tokens(ex, max_length) for ex in STAND_IN[source]()]
    per_example = sum(lengths) / len(lengths) * padded_factor(lengths, cfg.data.batch_size)
    train_tokens = TRAIN_EXAMPLES[source] * per_example * cfg.optim.epochs
    train_seconds = 6 * n * train_tokens / flops_per_second

    eval_seconds = 0.0
    for name, spec in cfg.task.evals.items():
        examples = build(OmegaConf.merge(spec.data, {"limit": None}))
        passes = [("nll" in spec.metrics) + ("choice_accuracy" in spec.metrics) * len(ex.choices or []) for ex in examples]
        scored = sum(tokens(ex, max_length) * k for ex, k in zip(examples, passes))  # teacher-forced tokens
        eval_seconds += 2 * n * scored / flops_per_second
        if "accuracy" in spec.metrics:
            batches = math.ceil(len(examples) / cfg.data.eval_batch_size)
            eval_seconds += batches * spec.max_new_tokens * DECODE_STEP_SECONDS
    return {"experiment": experiment, "model": cfg.model.name, "runs": runs,
            "train_tokens_per_run": train_tokens, "train_hours_per_run": train_seconds / 3600,
            "eval_hours_per_run": eval_seconds / 3600,
            "table_gpu_hours": runs * (train_seconds + eval_seconds) / 3600}


def measured_rate(path: Path) -> float:
    """Achieved training FLOP/s from bench.gpu's record: its checkpointed LoRA tokens/s x 6 x the model's size."""
    figures = json.loads(Path(path).read_text())
    from transformers import LlamaConfig, LlamaForCausalLM

    size = {k: v for k, v in figures["model"].items() if k not in ("dtype", "lora_r", "targets")}
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**size)).parameters())
    return figures["train_checkpointing"]["tokens_per_s"] * 6 * n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", type=Path, help="a bench/results/gpu-*.json from `make bench-gpu`")
    args = parser.parse_args(argv)
    rate = measured_rate(args.measured) if args.measured else ASSUMED_MFU * A100_BF16_PEAK
    print(f"training rate: {rate / 1e12:.0f} TFLOP/s "
          f"({'measured: ' + str(args.measured) if args.measured else f'assumed {ASSUMED_MFU:.0%} of an A100'})")
    print("| experiment | runs | train tokens / run | train h / run | eval h / run (upper bound) | table GPU-h |")
    print("|---|---|---|---|---|---|")
    experiments = sorted(p.stem for p in (CONF / "experiment").glob("paper_*.yaml")
                         if p.stem.startswith(("paper_math_", "paper_commonsense_")))
    total = 0.0
    for experiment in experiments:
        e = estimate(experiment, rate)
        total += e["table_gpu_hours"]
        print(f"| {experiment} | {e['runs']} | {e['train_tokens_per_run'] / 1e6:.0f} M | {e['train_hours_per_run']:.1f} "
              f"| {e['eval_hours_per_run']:.1f} | {e['table_gpu_hours']:.0f} |")
    print(f"| all language tables | | | | | {total:.0f} |")


if __name__ == "__main__":
    main()
