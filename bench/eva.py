"""EVA's cost: eva_bench's ``eva`` and PEFT's (``eva_peft``) against the plain forward passes they consume.

    .venv/bin/python -m bench.eva                 # both configurations, 3 interleaved repeats (~2 min on 2 cores)
    .venv/bin/python -m bench.eva --repeats 1 --only vit

EVA's floor is the forward passes over the calibration batches it consumes (Paischer et al., arXiv 2410.07170v5
Sec. 3: one pass per minibatch until the components converge). For each configuration and repeat this times, in one
process and alternating the order between repeats so that machine contention hits every side alike:
- eva.py's ``eva`` (cache off; labelled "eva (eva.py)", whatever the registry maps "eva" to) and ``eva_peft``, each
  from a fresh copy of the base model, ``initialize`` included (wrapping);
- the plain forwards of the base model (``torch.no_grad``, eval mode) over exactly the batches each one consumed:
  ``eva``'s ``forward_passes`` batches; ``eva_peft``'s calibration batches plus its extra hashing pass on batch 0.
Reported: median seconds, and the median over repeats of each method's time / its forwards' time, measured back to
back. Also: ``eva`` served from the init-statistics cache, and the cost of the cache key (fingerprints).

Configurations (as the task that asked for this benchmark specified them):
(a) ``vit``: timm ViT-tiny (random init), img 32, patch 4, 10 classes; targets every block's qkv/proj/fc1/fc2; r = 4,
    rho = 2; ``--vit-batches`` (16) seeded batches of 32 random images;
(b) ``stories260k``: the language recipe's model and calibration (tasks/language/train.py, conf/language.yaml): 16
    batches of 16 GSM8K training examples, max length 384, rows = non-padding tokens; all-linear, r = 8, rho = 2.
Prints a Markdown table and writes every figure, the settings and the machine to bench/results/eva-<date>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import machine
from eva_bench.init import INITS, Calibration, InitMethod, initialize
from eva_bench.init import cache as stats_cache
from eva_bench.init import eva as fast_eva

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# eva.py's EVA under its own name here, whatever the registry maps "eva" to; timed with the cache off
FAST = "eva (eva.py)"
INITS.setdefault(FAST, InitMethod(fast_eva.eva, needs=("batches", "forward")))
METHODS = {FAST: {"cache": False}, "eva_peft": {}}


# --------------------------------------------------------------------------------------------------------- setups


def vit_setup(batches: int) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
    g = torch.Generator().manual_seed(0)
    # (images, labels): random labels give the gradient-based inits (bench.init) a loss; EVA uses the images only
    data = [(torch.randn(32, 3, 32, 32, generator=g), torch.randint(10, (32,), generator=g)) for _ in range(batches)]
    return {
        "model": model.eval(),
        "calibration": Calibration(
            batches=data,
            forward=lambda m, b: m(b[0]),
            loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
        ),
        "rank": 4,
        "targets": r".*blocks.*(qkv|proj|fc1|fc2)$",
        "describe": f"timm ViT-tiny (random init, img 32, patch 4), {batches} batches of 32 random images, r=4, rho=2",
    }


def stories260k_setup() -> dict:
    from tasks.language import data as language_data
    from tasks.language.models import stories260k
    from tasks.language.train import calibration_batches, lm_calibration

    model, tokenizer = stories260k()
    model.config.use_cache = False  # as the recipe calibrates
    examples = language_data.math_train(source="gsm8k", limit=512, seed=0)  # conf/task/math.yaml
    features = language_data.tokenize(examples, tokenizer, 384)  # data.max_length
    batches = calibration_batches(features, SimpleNamespace(batches=16, batch_size=16), tokenizer.pad_token_id, 0)
    return {
        "model": model.eval(),
        "calibration": lm_calibration(batches),
        "rank": 8,
        "targets": "all-linear",
        "describe": "stories260K, 16 batches of 16 GSM8K train examples (max length 384), all-linear, r=8, rho=2",
    }


# --------------------------------------------------------------------------------------------------------- timing


def time_method(setup: dict, method: str) -> tuple[float, dict]:
    model = copy.deepcopy(setup["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged-layer warnings: the figures say how many
        start = time.perf_counter()
        _, report = initialize(
            model, method, rank=setup["rank"], alpha=1, target_modules=setup["targets"],
            calibration=setup["calibration"], rho=2.0, **METHODS[method],
        )
        seconds = time.perf_counter() - start
    return seconds, {
        "calibration_batches": report.calibration_batches,
        "forward_passes": report.details["forward_passes"],
        "unconverged_layers": len(report.details["unconverged_layers"]),
        "ranks": report.ranks,
    }


def consumed_batches(setup: dict, method: str, report: dict) -> list:
    batches = list(setup["calibration"].batches)
    if method == "eva_peft":  # PEFT's hashing pass on the first batch, then one pass per calibration batch
        return batches[:1] + batches[: report["calibration_batches"]]
    return batches[: report["forward_passes"]]


def time_forwards(setup: dict, batches: list) -> float:
    model, forward = setup["model"], setup["calibration"].forward
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            forward(model, batch)
    return time.perf_counter() - start


def bench(setup: dict, repeats: int) -> dict:
    time_forwards(setup, list(setup["calibration"].batches)[:2])  # warm-up: allocator, kernels, lazy imports
    runs = {m: [] for m in METHODS}
    for repeat in range(repeats):
        order = list(METHODS) if repeat % 2 == 0 else list(reversed(METHODS))
        for method in order:
            seconds, report = time_method(setup, method)
            batches = consumed_batches(setup, method, report)
            forwards = time_forwards(setup, batches)
            runs[method].append({"seconds": seconds, "forwards_seconds": forwards, **report})
            print(f"  {method:13s} {seconds:7.2f} s, its {len(batches)} forwards {forwards:6.2f} s", flush=True)
    out = {}
    for method, rs in runs.items():
        out[method] = {
            "median_seconds": statistics.median(r["seconds"] for r in rs),
            "median_forwards_seconds": statistics.median(r["forwards_seconds"] for r in rs),
            "median_ratio_to_forwards": statistics.median(r["seconds"] / r["forwards_seconds"] for r in rs),
            "calibration_batches": rs[0]["calibration_batches"],
            "forward_passes": rs[0]["forward_passes"],
            "unconverged_layers": rs[0]["unconverged_layers"],
            "runs": [{k: v for k, v in r.items() if k != "ranks"} for r in rs],
        }
    out["same_ranks"] = runs[FAST][0]["ranks"] == runs["eva_peft"][0]["ranks"]
    out["eva_peft_over_eva"] = statistics.median(
        p["seconds"] / e["seconds"] for p, e in zip(runs["eva_peft"], runs[FAST])
    )
    out["cache"] = bench_cache(setup)
    return out


def bench_cache(setup: dict) -> dict:
    """``eva`` with the cache: the key's cost, a miss (compute + store) and a hit (replay), in a scratch cache."""
    calibration = setup["calibration"]
    start = time.perf_counter()
    stats_cache.model_fingerprint(setup["model"])
    model_fp = time.perf_counter() - start
    start = time.perf_counter()
    stats_cache.data_fingerprint({"batches": list(calibration.batches), "masks": [calibration.mask(b) for b in
                                                                                   calibration.batches]})
    data_fp = time.perf_counter() - start
    old = os.environ.get("EVA_BENCH_CACHE")
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["EVA_BENCH_CACHE"] = scratch
        try:
            seconds = {}
            for attempt in ("miss", "hit"):
                model = copy.deepcopy(setup["model"])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    start = time.perf_counter()
                    _, report = initialize(
                        model, FAST, rank=setup["rank"], alpha=1, target_modules=setup["targets"],
                        calibration=calibration, rho=2.0,
                    )
                    seconds[attempt] = time.perf_counter() - start
                assert report.details["cache"] == attempt, report.details["cache"]
            entry_bytes = sum(p.stat().st_size for p in Path(scratch).rglob("*.pt"))
        finally:
            if old is None:
                os.environ.pop("EVA_BENCH_CACHE")
            else:
                os.environ["EVA_BENCH_CACHE"] = old
    return {
        "model_fingerprint_seconds": model_fp,
        "calibration_fingerprint_seconds": data_fp,
        "miss_seconds": seconds["miss"],
        "hit_seconds": seconds["hit"],
        "entry_bytes": entry_bytes,
    }


# --------------------------------------------------------------------------------------------------------- report


def table(results: dict) -> str:
    lines = [
        "| configuration | method | batches | forwards | seconds | its forwards (s) | ratio | unconverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for method in METHODS:
            r = res[method]
            lines.append(
                f"| {name} | {method} | {r['calibration_batches']} | {r['forward_passes']} | {r['median_seconds']:.2f} "
                f"| {r['median_forwards_seconds']:.2f} | {r['median_ratio_to_forwards']:.2f} | "
                f"{r['unconverged_layers']} |"
            )
    lines.append("")
    for name, res in results.items():
        c = res["cache"]
        key_ms = (c["model_fingerprint_seconds"] * 1e3, c["calibration_fingerprint_seconds"] * 1e3)
        lines.append(
            f"- {name}: eva_peft / eva = {res['eva_peft_over_eva']:.1f}x; same rank allocation: {res['same_ranks']}; "
            f"cache miss {c['miss_seconds']:.2f} s, hit {c['hit_seconds']:.3f} s, entry {c['entry_bytes'] / 1e6:.1f} "
            f"MB, key {key_ms[0]:.0f} ms (model) + {key_ms[1]:.0f} ms (batches)"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vit-batches", type=int, default=16)
    parser.add_argument("--only", choices=["vit", "stories260k"], default=None)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    setups = {"vit": lambda: vit_setup(args.vit_batches), "stories260k": stories260k_setup}
    results, described = {}, {}
    for name, make in setups.items():
        if args.only and name != args.only:
            continue
        print(f"{name}:", flush=True)
        setup = make()
        described[name] = setup["describe"]
        results[name] = bench(setup, args.repeats)
    print()
    print(table(results))

    record = {
        "benchmark": "eva",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {**machine(), "load_average_before": load_before},
        "setup": {"repeats": args.repeats, "configurations": described, "eva_params": {"rho": 2.0, "tau": 0.99}},
        "results": results,
        "total_seconds": time.perf_counter() - started,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"eva-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {path}")
    return record


if __name__ == "__main__":
    main()
