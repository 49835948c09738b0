"""Every registered init method's cost: seconds and peak memory, against one training step and against the forward
passes over the calibration batches it consumed.

    .venv/bin/python -m bench.init                      # both configurations, every method (~5 min on 2 cores)
    .venv/bin/python -m bench.init --only vit --methods eva,eva_peft,lora_da

Each (configuration, method) runs in a fresh process, so its peak resident memory is its own: the process builds the
configuration (bench.eva's ViT-tiny and stories260K setups, the same models and calibration batches), notes its
high-water mark, then times, in this order,
- ``initialize(model, method, ...)`` on the base model with the method's parameters from conf/init/<method>.yaml
  (EVA's statistics cache off), and the high-water mark after it: ``peak_mb`` is the increase, the memory the init
  needed beyond the model and data (CPU: ``ru_maxrss``; CUDA: ``max_memory_allocated``);
- the plain forward passes (no adapters, ``torch.no_grad``) over the calibration batches the method consumed
  (``report.calibration_batches``; 0 for data-free methods);
- one training step (forward, backward, AdamW step) of the initialized model on calibration batch 0, median of 3
  after a warm-up step.
Reported: the init's seconds, / one training step, / its forwards; peak memory. A method that fails on a
configuration is listed with its error (not every PEFT method supports every layer type). Figures in bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench import machine
from bench.eva import FAST, RESULTS_DIR, stories260k_setup, vit_setup
from eva_bench.init import INITS, initialize

CONF = Path(__file__).resolve().parents[1] / "conf"
SETUPS = {"vit": lambda: vit_setup(16), "stories260k": stories260k_setup}


def method_params(method: str) -> dict:
    """The suite's parameters for ``method`` as a run composes them (conf/init/<method>.yaml and the files it builds
    on, e.g. the controls on eva.yaml), EVA's cache off: a benchmark times work."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        params = OmegaConf.to_container(compose(config_name="language", overrides=[f"init={method}"]).init.params)
    if "cache" in params:
        params["cache"] = False
    return params


def high_water_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: kilobytes


def measure(setup_name: str, method: str) -> dict:
    """One (configuration, method) in this process; see the module doc."""
    setup = SETUPS[setup_name]()
    model, calibration = setup["model"], setup["calibration"]
    device = next(model.parameters()).device
    kwargs = dict(rank=setup["rank"], alpha=1, target_modules=setup["targets"], calibration=calibration)
    with torch.no_grad():  # warm-up: allocator, kernels, lazy imports
        calibration.forward(model, calibration.batches[0])
    before = high_water_mb(device)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged layers, reused batches: the init report says
        start = time.perf_counter()
        peft_model, report = initialize(copy.deepcopy(model), method, **kwargs, **method_params(method))
        seconds = time.perf_counter() - start
    peak = high_water_mb(device) - before

    consumed = list(calibration.batches[: report.calibration_batches])
    start = time.perf_counter()
    with torch.no_grad():
        for batch in consumed:
            calibration.forward(model, batch)
    forwards = time.perf_counter() - start

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    peft_model.train()
    steps = []
    for _ in range(4):
        start = time.perf_counter()
        calibration.loss(peft_model, calibration.batches[0]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - start)
    step = statistics.median(steps[1:])
    return {
        "seconds": seconds,
        "peak_mb": peak,
        "calibration_batches": report.calibration_batches,
        "forwards_seconds": forwards,
        "train_step_seconds": step,
        "per_train_step": seconds / step,
        "per_forwards": seconds / forwards if consumed else None,
        "base_weights_modified": report.base_weights_modified,
    }


def run_isolated(setup_name: str, method: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.init", "--worker", setup_name, method], capture_output=True, text=True
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = [
        "| configuration | method | batches | seconds | / training step | / its forwards | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, per_method in results.items():
        for method, r in per_method.items():
            if "error" in r:
                lines.append(f"| {name} | {method} | failed: {r['error']} | | | | |")
                continue
            per_fw = "-" if r["per_forwards"] is None else f"{r['per_forwards']:.2f}"
            lines.append(
                f"| {name} | {method} | {r['calibration_batches']} | {r['seconds']:.2f} | {r['per_train_step']:.1f} | "
                f"{per_fw} | {r['peak_mb']:.0f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SETUPS), default=None)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--worker", nargs=2, metavar=("SETUP", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(*args.worker)))
        return {}

    methods = args.methods.split(",") if args.methods else [m for m in INITS if m != FAST]  # FAST: bench.eva's alias
    started = time.perf_counter()
    results = {}
    for name in SETUPS:
        if args.only and name != args.only:
            continue
        results[name] = {}
        for method in methods:
            results[name][method] = run_isolated(name, method)
            print(f"{name:12s} {method:10s} {results[name][method]}", flush=True)
    print()
    print(table(results))
    record = {
        "benchmark": "init",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "results": results,
        "total_seconds": time.perf_counter() - started,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"init-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")
    return record


if __name__ == "__main__":
    main()
