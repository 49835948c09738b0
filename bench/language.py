"""Language benchmark: what the suite's machinery costs on top of plain PyTorch, on the language recipe's setup.

    python -m bench.language            # or: make bench  (about 1-2 minutes on 2 CPU cores)

Two measurements, each against a baseline timed in the same process, alternated with it to cancel drift:

(a) training loop throughput: ``eva_bench.train.fit`` vs a minimal hand-written loop (AdamW, forward, backward, clip,
    step, zero_grad) on the same model (stories260K + LoRA r=8 on every linear layer, ``random`` init; a fresh copy
    for every timed run) and the same pre-collated batches. Reported as tokens/s over non-padding tokens.
(b) EVA's cost: ``initialize(..., "eva")`` with the recipe's calibration (16 batches of 16) vs plain inference
    forward passes of the model without adapters over exactly the batches EVA ran (its ``forward_passes``, which
    include PEFT's extra hashing pass).

Prints a Markdown table and writes every figure, the settings and the machine to bench/results/language-<date>.json.
The setup mirrors the recipe's defaults (conf/language.yaml, conf/task/math.yaml, conf/optim/cpu.yaml,
conf/lora/default.yaml); only the number of training batches is cut, to keep the benchmark short.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import torch

from eva_bench.init import Calibration, initialize
from eva_bench.train import OptimConfig, fit
from tasks.language import data as language_data
from tasks.language.models import stories260k
from tasks.language.train import calibration_batches, causal_lm_loss

# The recipe's settings (see the config files named in the module docstring).
MAX_LENGTH = 384  # data.max_length
BATCH_SIZE = 16  # data.batch_size
TRAIN_LIMIT = 1024  # task.train.limit: the seeded GSM8K train subset
CALIBRATION = SimpleNamespace(batches=16, batch_size=16)  # calibration.batches / calibration.batch_size
RANK, ALPHA, TARGETS = 8, 1, "all-linear"  # lora.r, lora.alpha, lora.target_modules
LORA = {"lora_dropout": 0.0, "use_dora": False, "use_rslora": False}  # the rest of conf/lora/default.yaml
OPTIM = OptimConfig(lr=5e-3, warmup_ratio=0.03, schedule="cosine", max_grad_norm=1.0, log_every=10)  # optim/cpu
SEED = 0

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------------------- data


def load_setup(train_batches: int):
    """The base model (no adapters), the training batches and the calibration batches, built as the recipe does."""
    torch.manual_seed(SEED)
    model, tokenizer = stories260k()
    model.config.use_cache = False  # the recipe trains and calibrates without a KV cache
    pad_id = tokenizer.pad_token_id
    examples = language_data.math_train(source="gsm8k", limit=TRAIN_LIMIT, seed=0)
    features = language_data.tokenize(examples, tokenizer, MAX_LENGTH)

    # training batches: the recipe's epoch-0 order for seed 0, collated once up front so both loops get the same tensors
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(SEED * 1000))
    needed = train_batches * BATCH_SIZE
    if needed > len(order):
        raise ValueError(f"{train_batches} batches of {BATCH_SIZE} need {needed} examples; only {len(order)} exist")
    train = [
        language_data.collate([features[j] for j in order[i : i + BATCH_SIZE]], pad_id)
        for i in range(0, needed, BATCH_SIZE)
    ]
    calibration = calibration_batches(features, CALIBRATION, pad_id, SEED)
    return model, train, calibration


def tokens(batches) -> int:
    """Non-padding tokens in a list of batches."""
    return int(sum(b["attention_mask"].sum() for b in batches))


def forward(model, batch):
    """The recipe's calibration forward: the model on one batch, no loss."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


# --------------------------------------------------------------------------------------------------------- (a) loops


def run_fit(model, batches) -> None:
    """The suite's loop, as the recipe calls it (one epoch over ``batches``)."""
    result = fit(model, lambda epoch: batches, causal_lm_loss, OPTIM, steps_per_epoch=len(batches))
    if result.status != "success":
        raise RuntimeError(f"fit did not finish: {result.status}")


def run_plain(model, batches) -> None:
    """The baseline: the least a training loop can do, with the same optimizer settings as ``fit``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=OPTIM.lr, weight_decay=OPTIM.weight_decay, betas=OPTIM.betas)
    model.train()
    for batch in batches:
        loss = causal_lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIM.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def bench_loops(base, batches, repeats: int, warmup_batches: int) -> dict:
    """Median tokens/s of ``fit`` and of the plain loop, timed alternately (fit, plain, fit, plain, ...)."""
    torch.manual_seed(SEED)
    template, _ = initialize(copy.deepcopy(base), "random", rank=RANK, alpha=ALPHA, target_modules=TARGETS, lora=LORA)
    loops = {"fit": run_fit, "plain": run_plain}

    # warm-up: one short untimed run of each (allocator, kernels, lazy imports)
    for loop in loops.values():
        loop(copy.deepcopy(template), batches[:warmup_batches])

    n_tokens = tokens(batches)
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            model = copy.deepcopy(template)  # a fresh copy: every run starts from the same weights
            start = time.perf_counter()
            loop(model, batches)
            seconds[name].append(time.perf_counter() - start)

    out = {"batches": len(batches), "tokens_per_run": n_tokens, "repeats": repeats, "warmup_batches": warmup_batches}
    for name in loops:
        out[name] = {
            "seconds": seconds[name],
            "median_seconds": statistics.median(seconds[name]),
            "median_tokens_per_s": n_tokens / statistics.median(seconds[name]),
        }
    out["ratio_fit_over_plain"] = out["fit"]["median_tokens_per_s"] / out["plain"]["median_tokens_per_s"]
    return out


# --------------------------------------------------------------------------------------------------------- (b) EVA


def run_eva(base, batches) -> dict:
    """One EVA init on a fresh copy of the base model, with the recipe's Calibration.

    The forward callback is timed, so the EVA time splits into the hashing pass (PEFT's first forward), the SVD
    passes, and the rest (wrapping the model, rank allocation, writing the adapter weights).
    """
    pass_seconds: list[float] = []

    def timed_forward(model, batch):
        start = time.perf_counter()
        out = forward(model, batch)
        pass_seconds.append(time.perf_counter() - start)
        return out

    calibration = Calibration(  # as in tasks/language/train.py, but with the timed forward
        batches=batches,
        forward=timed_forward,
        loss=causal_lm_loss,
        rows=lambda b: b["attention_mask"],
        loss_rows=lambda b: b["labels"] != -100,
    )
    model = copy.deepcopy(base)
    _, report = initialize(
        model, "eva", rank=RANK, alpha=ALPHA, target_modules=TARGETS, calibration=calibration, lora=LORA
    )
    return {
        "seconds": report.seconds,
        "forward_passes": report.details["forward_passes"],
        "calibration_batches": report.calibration_batches,
        "unconverged_layers": len(report.details["unconverged_layers"]),
        "hash_pass_seconds": pass_seconds[0],
        "svd_passes_seconds": sum(pass_seconds[1:]),
        "other_seconds": report.seconds - sum(pass_seconds),
    }


def eva_pass_batches(batches, passes: int) -> list:
    """The batches EVA ran, in order: PEFT's hashing pass reads the first batch, then its loop starts over from it."""
    return [batches[0]] + [batches[i % len(batches)] for i in range(passes - 1)]


def run_forwards(base, batches) -> float:
    """Seconds for plain inference forward passes of the model without adapters."""
    base.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            forward(base, batch)
    return time.perf_counter() - start


def bench_eva(base, batches, repeats: int) -> dict:
    """Median EVA init time vs median time of the same forward passes without EVA, timed alternately."""
    run_forwards(base, batches[:1])  # warm-up of the inference path
    eva_runs, forward_seconds = [], []
    for _ in range(repeats):
        eva_runs.append(run_eva(base, batches))
        passes = eva_runs[-1]["forward_passes"]
        forward_seconds.append(run_forwards(base, eva_pass_batches(batches, passes)))

    passes = {r["forward_passes"] for r in eva_runs}
    if len(passes) != 1:
        raise RuntimeError(f"EVA ran a different number of passes across repeats: {sorted(passes)}")
    passes = passes.pop()
    eva_median = statistics.median(r["seconds"] for r in eva_runs)
    forward_median = statistics.median(forward_seconds)
    return {
        "calibration": {"batches": len(batches), "batch_size": CALIBRATION.batch_size, "tokens": tokens(batches)},
        "forward_passes": passes,
        "forward_pass_tokens": tokens(eva_pass_batches(batches, passes)),
        "repeats": repeats,
        "eva": eva_runs,
        "eva_median_seconds": eva_median,
        "forwards_seconds": forward_seconds,
        "forwards_median_seconds": forward_median,
        "ratio_eva_over_forwards": eva_median / forward_median,
    }


# --------------------------------------------------------------------------------------------------------- report


def machine() -> dict:
    """Where the figures were measured."""
    cpu = platform.processor() or "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def git(*args: str) -> str:
        try:  # --no-optional-locks: read-only, never refreshes the index
            return subprocess.run(
                ["git", "--no-optional-locks", *args], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def table(result: dict) -> str:
    loops, eva = result["training_loop"], result["eva_init"]
    fit_, plain = loops["fit"], loops["plain"]
    return "\n".join(
        [
            "| benchmark | measured | baseline (same run) | ratio |",
            "|---|---|---|---|",
            f"| training loop, {loops['batches']} batches x {BATCH_SIZE} (median of {loops['repeats']}) "
            f"| fit: {fit_['median_tokens_per_s']:,.0f} tokens/s ({fit_['median_seconds']:.2f} s) "
            f"| plain loop: {plain['median_tokens_per_s']:,.0f} tokens/s ({plain['median_seconds']:.2f} s) "
            f"| fit/plain = {loops['ratio_fit_over_plain']:.3f} |",
            f"| EVA init, {eva['calibration']['batches']} calibration batches x {eva['calibration']['batch_size']} "
            f"(median of {eva['repeats']}) "
            f"| EVA: {eva['eva_median_seconds']:.2f} s "
            f"| {eva['forward_passes']} plain forward passes: {eva['forwards_median_seconds']:.2f} s "
            f"| EVA/forwards = {eva['ratio_eva_over_forwards']:.2f} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-batches", type=int, default=40, help="training batches per timed loop run")
    parser.add_argument("--warmup-batches", type=int, default=5, help="batches of the untimed warm-up run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/language-<date>.json)")
    args = parser.parse_args()

    started = datetime.datetime.now()
    base, train, calib = load_setup(args.train_batches)
    result = {
        "benchmark": "language",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "setup": {
            "model": "stories260K",
            "data": f"GSM8K train, seeded subset of {TRAIN_LIMIT}",
            "max_length": MAX_LENGTH,
            "batch_size": BATCH_SIZE,
            "lora": {"r": RANK, "alpha": ALPHA, "target_modules": TARGETS, **LORA},
            "optim": dataclasses.asdict(OPTIM),
        },
        "training_loop": bench_loops(base, train, args.repeats, args.warmup_batches),
        "eva_init": bench_eva(base, calib, args.repeats),
    }
    result["total_seconds"] = (datetime.datetime.now() - started).total_seconds()

    m = result["machine"]
    print(f"\n{m['cpu']}, {m['usable_cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
          f"transformers {m['transformers']}, peft {m['peft']}, commit {m['git_commit'][:10]}\n")
    print(table(result))
    eva = result["eva_init"]
    best = min(eva["eva"], key=lambda r: abs(r["seconds"] - eva["eva_median_seconds"]))
    print(f"\nEVA time split (median run): hashing pass {best['hash_pass_seconds']:.2f} s, "
          f"{best['forward_passes'] - 1} SVD passes {best['svd_passes_seconds']:.2f} s, "
          f"rest {best['other_seconds']:.2f} s")

    out = args.out or RESULTS_DIR / f"language-{started:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out} ({result['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
