"""Language benchmark: what the suite's machinery costs on top of plain PyTorch, on the language recipe's setup.

    python -m bench.language            # or: make bench  (about 2 minutes on 2 idle CPU cores)
    python -m bench.language --skip-loops   # only (b); --skip-eva: only (a)

Two measurements, each against a baseline timed in the same process, alternated with it to cancel drift:

(a) training loop throughput: ``eva_bench.train.fit`` vs a minimal hand-written loop (AdamW, forward, backward, clip,
    step, zero_grad) on the same model (stories260K + LoRA r=8 on every linear layer, ``random`` init; a fresh copy
    for every timed run) and the same pre-collated batches. Reported as tokens/s over non-padding tokens.
(b) EVA's cost: ``initialize(..., "eva")`` (and ``"eva_peft"``, PEFT's implementation, where registered) with the
    recipe's calibration (16 batches of 16), its on-disk statistics cache off, vs plain inference forward passes of
    the model without adapters over exactly the batches EVA ran (``forward_passes``; for PEFT that includes its
    extra hashing pass).

Prints a Markdown table and writes every figure, the settings and the machine to bench/results/language-<date>.json.
The setup mirrors the recipe's defaults (conf/language.yaml, conf/task/math.yaml, conf/optim/cpu.yaml,
conf/lora/default.yaml); only the number of training batches is cut, to keep the benchmark short.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import inspect
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import machine
from eva_bench.init import INITS, initialize
from eva_bench.train import OptimConfig, fit
from tasks.language import data as language_data
from tasks.language.models import stories260k
from tasks.language.train import calibration_batches, causal_lm_loss, lm_calibration

# The recipe's settings (see the config files named in the module docstring).
MAX_LENGTH = 384  # data.max_length
BATCH_SIZE = 16  # data.batch_size
TRAIN_LIMIT = 1024  # a seeded GSM8K train subset (the recipe trains on 512; the loop benchmark takes 40 batches)
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


class Timer:
    """Wall time of a ``with`` block, and the CPU time every *other* process used meanwhile.

    On a shared machine another busy process slows a run down (with 2 cores and 2 torch threads, badly: the threads
    wait for each other). /proc/stat counts all CPU time; subtracting this process's own leaves the others' share,
    so a skewed run is visible in the results instead of silently moving the median.
    """

    def __enter__(self):
        self._wall, self._own, self._busy = time.perf_counter(), time.process_time(), _busy_cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._wall
        own = time.process_time() - self._own
        others = max(0.0, _busy_cpu_seconds() - self._busy - own)
        self.others_share = others / (self.seconds * len(os.sched_getaffinity(0)))  # 0: nothing else ran
        return False


def _busy_cpu_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (/proc/stat: all fields but idle and iowait)."""
    with open("/proc/stat", encoding="utf-8") as fh:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fh.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


CONTENDED = 0.05  # a run during which other processes used more than this share of the CPUs counts as contended
RETRIES = 4  # a contended run is run again, at most this many times (the last attempt is kept either way)
IDLE_WAIT = 120.0  # before each timed run, wait at most this many seconds for the other processes to go quiet


def wait_for_idle(limit: float = IDLE_WAIT) -> None:
    """Sleep until the machine's CPUs are idle for 2 s (nothing else running), or ``limit`` seconds have passed."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = _busy_cpu_seconds()
        time.sleep(2.0)
        if (_busy_cpu_seconds() - before) / (2.0 * len(os.sched_getaffinity(0))) <= CONTENDED:
            return


def until_clean(label: str, run, retried: list):
    """``run()``, run again while other processes skewed it; counts retries in ``retried``.

    ``run`` returns a Timer or a dict with ``seconds`` and ``others_cpu_share``.
    """

    def seconds(result):
        return result.seconds if isinstance(result, Timer) else result["seconds"]

    def share(result):
        return result.others_share if isinstance(result, Timer) else result["others_cpu_share"]

    for attempt in range(RETRIES + 1):
        wait_for_idle()
        result = run()
        print(f"  {label}: {seconds(result):.2f} s, other processes used {share(result):.0%} of the CPUs", flush=True)
        if share(result) <= CONTENDED:
            break
        if attempt < RETRIES:
            retried.append(share(result))
    return result


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
    def timed(loop) -> Timer:
        model = copy.deepcopy(template)  # a fresh copy: every run starts from the same weights
        with Timer() as timer:
            loop(model, batches)
        return timer

    timers: dict[str, list[Timer]] = {name: [] for name in loops}
    retried: list[float] = []
    for _ in range(repeats):
        for name, loop in loops.items():
            timers[name].append(until_clean(name, lambda: timed(loop), retried))

    out = {
        "batches": len(batches),
        "tokens_per_run": n_tokens,
        "repeats": repeats,
        "warmup_batches": warmup_batches,
        "discarded_contended_runs": len(retried),
    }
    for name in loops:
        seconds = [t.seconds for t in timers[name]]
        out[name] = {
            "seconds": seconds,
            "others_cpu_share": [round(t.others_share, 3) for t in timers[name]],
            "median_seconds": statistics.median(seconds),
            "median_tokens_per_s": n_tokens / statistics.median(seconds),
        }
    out["ratio_fit_over_plain"] = out["fit"]["median_tokens_per_s"] / out["plain"]["median_tokens_per_s"]
    return out


# --------------------------------------------------------------------------------------------------------- (b) EVA


def run_eva(base, batches, method: str) -> dict:
    """One EVA init (``method``: "eva" or "eva_peft") on a fresh copy of the base model, with the recipe's Calibration.

    The forward callback is timed and records which batch it ran, so the baseline can replay exactly those passes
    and the EVA time splits into: the first pass (PEFT's hashing pass for ``eva_peft``), the other passes (forward
    plus the statistics the hooks gather), and the rest (wrapping the model, rank allocation, writing A).
    """
    # a batch is known by its input_ids storage: PEFT re-wraps each batch dict (moving it to the model's device)
    index = {b["input_ids"].data_ptr(): i for i, b in enumerate(batches)}
    pass_seconds: list[float] = []
    pass_batches: list[int] = []  # calibration batch index of every forward EVA ran

    def timed_forward(model, batch):
        start = time.perf_counter()
        out = forward(model, batch)
        pass_seconds.append(time.perf_counter() - start)
        pass_batches.append(index[batch["input_ids"].data_ptr()])
        return out

    calibration = dataclasses.replace(lm_calibration(batches), forward=timed_forward)  # the recipe's, forward timed
    # an on-disk statistics cache would skip the forwards on a repeat: measure the computation, not the cache
    accepted = inspect.signature(INITS[method].apply).parameters
    params = {"cache": False} if "cache" in accepted else {}
    model = copy.deepcopy(base)
    with Timer() as timer:
        _, report = initialize(
            model, method, rank=RANK, alpha=ALPHA, target_modules=TARGETS, calibration=calibration, lora=LORA, **params
        )
    if len(pass_seconds) != report.details["forward_passes"]:
        reported = report.details["forward_passes"]
        raise RuntimeError(f"{method}: timed {len(pass_seconds)} forwards, but the report says {reported}")
    return {
        "seconds": report.seconds,
        "others_cpu_share": round(timer.others_share, 3),
        "forward_passes": report.details["forward_passes"],
        "calibration_batches": report.calibration_batches,
        "unconverged_layers": len(report.details["unconverged_layers"]),
        "pass_batches": pass_batches,
        "first_pass_seconds": pass_seconds[0],
        "other_passes_seconds": sum(pass_seconds[1:]),
        "rest_seconds": report.seconds - sum(pass_seconds),
    }


def run_forwards(base, batches) -> Timer:
    """Plain inference forward passes of the model without adapters, timed."""
    base.eval()
    with Timer() as timer, torch.inference_mode():
        for batch in batches:
            forward(base, batch)
    return timer


def bench_eva(base, batches, methods: list[str], repeats: int) -> dict:
    """Per EVA method: median init time vs median time of the same forward passes without EVA, timed alternately."""
    run_forwards(base, batches[:1])  # warm-up of the inference path
    runs = {m: {"eva": [], "forwards": []} for m in methods}
    retried: list[float] = []
    for _ in range(repeats):
        for method in methods:
            run = until_clean(method, lambda: run_eva(base, batches, method), retried)
            runs[method]["eva"].append(run)
            passes = [batches[i] for i in run["pass_batches"]]
            timer = until_clean(f"{method} forwards", lambda: run_forwards(base, passes), retried)
            runs[method]["forwards"].append(timer)

    out = {
        "calibration": {"batches": len(batches), "batch_size": CALIBRATION.batch_size, "tokens": tokens(batches)},
        "repeats": repeats,
        "discarded_contended_runs": len(retried),
    }
    for method, r in runs.items():
        sequences = {tuple(run["pass_batches"]) for run in r["eva"]}
        if len(sequences) != 1:
            raise RuntimeError(f"{method} ran different batches across repeats")
        passes = list(sequences.pop())
        eva_median = statistics.median(run["seconds"] for run in r["eva"])
        forwards_seconds = [t.seconds for t in r["forwards"]]
        forwards_median = statistics.median(forwards_seconds)
        out[method] = {
            "forward_passes": len(passes),
            "forward_pass_tokens": tokens([batches[i] for i in passes]),
            "runs": r["eva"],
            "median_seconds": eva_median,
            "forwards_seconds": forwards_seconds,
            "forwards_others_cpu_share": [round(t.others_share, 3) for t in r["forwards"]],
            "forwards_median_seconds": forwards_median,
            "ratio_over_forwards": eva_median / forwards_median,
        }
    return out


# --------------------------------------------------------------------------------------------------------- report


def table(result: dict) -> str:
    rows = ["| benchmark | measured | baseline (same run) | ratio |", "|---|---|---|---|"]
    loops = result.get("training_loop")
    if loops:
        fit_, plain = loops["fit"], loops["plain"]
        rows.append(
            f"| training loop, {loops['batches']} batches x {BATCH_SIZE} (median of {loops['repeats']}) "
            f"| fit: {fit_['median_tokens_per_s']:,.0f} tokens/s ({fit_['median_seconds']:.2f} s) "
            f"| plain loop: {plain['median_tokens_per_s']:,.0f} tokens/s ({plain['median_seconds']:.2f} s) "
            f"| fit/plain = {loops['ratio_fit_over_plain']:.3f} |"
        )
    eva = result.get("eva_init")
    for method in (m for m, e in (eva or {}).items() if isinstance(e, dict) and "runs" in e):
        e = eva[method]
        rows.append(
            f"| init `{method}`, {eva['calibration']['batches']} calibration batches x "
            f"{eva['calibration']['batch_size']} (median of {eva['repeats']}) "
            f"| {e['median_seconds']:.2f} s "
            f"| the same {e['forward_passes']} forward passes, no adapters: {e['forwards_median_seconds']:.2f} s "
            f"| {method}/forwards = {e['ratio_over_forwards']:.2f} |"
        )
    return "\n".join(rows)


def _all_shares(result: dict) -> list[float]:
    """Every timed run's share of the CPUs used by other processes."""
    shares = []
    for name in ("fit", "plain"):
        shares += result.get("training_loop", {}).get(name, {}).get("others_cpu_share", [])
    for e in result.get("eva_init", {}).values():
        if isinstance(e, dict) and "runs" in e:
            shares += [r["others_cpu_share"] for r in e["runs"]] + e["forwards_others_cpu_share"]
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-batches", type=int, default=40, help="training batches per timed loop run")
    parser.add_argument("--warmup-batches", type=int, default=5, help="batches of the untimed warm-up run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--skip-loops", action="store_true", help="skip benchmark (a), the training loop")
    parser.add_argument("--skip-eva", action="store_true", help="skip benchmark (b), the EVA init")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/language-<date>.json)")
    args = parser.parse_args()
    # the EVA implementations registered: ours ("eva") and, where present, PEFT's as reference ("eva_peft")
    eva_methods = [m for m in ("eva", "eva_peft") if m in INITS]

    started = datetime.datetime.now()
    load_before = os.getloadavg()  # another busy process on the machine shows up here (and in spread run times)
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
    }
    if not args.skip_loops:
        result["training_loop"] = bench_loops(base, train, args.repeats, args.warmup_batches)
    if not args.skip_eva:
        result["eva_init"] = bench_eva(base, calib, eva_methods, args.repeats)
    result["total_seconds"] = (datetime.datetime.now() - started).total_seconds()
    result["machine"]["load_average_1m"] = {"start": load_before[0], "end": os.getloadavg()[0]}

    shares = _all_shares(result)
    contended = sum(v > CONTENDED for v in shares)
    result["contended_runs"] = {"count": contended, "of": len(shares), "threshold_others_cpu_share": CONTENDED}
    out = args.out or RESULTS_DIR / f"language-{started:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    m = result["machine"]
    print(f"\n{m['cpu']}, {m['usable_cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
          f"transformers {m['transformers']}, peft {m['peft']}, commit {m['git_commit'][:10]}"
          f"{' (+ uncommitted changes)' if m['git_dirty'] else ''}; 1-min load average "
          f"{m['load_average_1m']['start']:.2f} at start, {m['load_average_1m']['end']:.2f} at end "
          "(other busy processes skew the figures)\n")
    print(table(result))
    discarded = sum(result.get(part, {}).get("discarded_contended_runs", 0) for part in ("training_loop", "eva_init"))
    if discarded:
        print(f"\n{discarded} timed run(s) were contended by other processes and run again (not counted).")
    if contended:
        print(f"\nWARNING: other processes used > {CONTENDED:.0%} of the CPUs during {contended} of {len(shares)} "
              f"kept runs (max {max(shares):.0%}) even after {RETRIES} retries; the figures are skewed, "
              "rerun on an idle machine.")
    for method in eva_methods if "eva_init" in result else []:
        e = result["eva_init"][method]
        run = min(e["runs"], key=lambda r: abs(r["seconds"] - e["median_seconds"]))  # the median run
        print(f"{method} time split (median run): first pass {run['first_pass_seconds']:.2f} s, "
              f"{run['forward_passes'] - 1} more passes {run['other_passes_seconds']:.2f} s, "
              f"rest {run['rest_seconds']:.2f} s")

    print(f"\nwrote {out} ({result['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
