"""Speed benchmarks of the suite's own machinery, each measured against a plain baseline in the same run.

    make bench                    # the five below, one after another (bench/README.md: what each took)
    python -m bench.language      # the training loop vs plain PyTorch; EVA vs its forward passes (stories260K)
    python -m bench.eva           # eva_bench's EVA vs PEFT's, each vs its forwards (ViT-tiny, stories260K); the cache
    python -m bench.init          # every registered init: seconds and peak memory vs a training step and its forwards
    python -m bench.rl            # the decision-transformer LoRA loop vs a plain PyTorch loop
    python -m bench.vision        # the vision loop vs a plain loop; the backbone build time (--cold: rebuilt)

See bench/README.md for what is measured, why, and the figures measured so far.
"""

import os
import platform
import subprocess
from importlib.metadata import version

import torch


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
        "timm": version("timm"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def save(name: str, result: dict) -> None:
    """Print a benchmark's figures and write them, with the machine, to bench/results/<name>-<date>.json."""
    import datetime
    import json
    from pathlib import Path

    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    out = Path(__file__).resolve().parent / "results" / f"{name}-{datetime.date.today()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({**result, "machine": result.get("machine") or machine()}, indent=2) + "\n",
                   encoding="utf-8")
    print(f"wrote {out}")
