"""What eva_bench builds itself (the vision backbone, the RL expert datasets, the pretrained decision transformer):
how a build is pinned so that it is bit-identical on the same kind of machine, how an artifact is named (its
SHA-256), and how the current cache compares with the committed manifest ``results/artifacts.json``.

    with pinned_threads(BUILD_THREADS):     # a build's floating-point sums do not depend on the core count
        ...
    verdicts(experiment_artifacts("rl", "rl_cw10_cpu"))  # {"mw_cw10_cpu hammer-v3 dataset": "... matches ...", ...}

Why threads are pinned: torch splits a reduction (a bias or LayerNorm gradient, a matmul) into one chunk per thread,
so the same build with 1 and 2 threads differs in the last bits, and fine-tuning amplifies that. With a fixed count
the chunks are fixed (measured: 2-thread builds were identical with and without other processes loading the CPU).
One thread, not all cores: while another process runs, 2 threads on 2 cores slowed the backbone's pretraining
about tenfold (1.1 instead of 11 steps/s), one thread does not wait on a descheduled partner. Why the machine is recorded: the CPU's instruction set picks other kernels (AVX-512 vs AVX2 in torch and MKL),
which also changes the last bits, so a hash can only match a build on the same kind of CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from .assets import REPO_ROOT

BUILD_THREADS = 1  # torch threads of every build, whatever the machine's cores or a run's `threads`
MANIFEST = REPO_ROOT / "results" / "artifacts.json"  # the committed hashes of the CPU defaults' artifacts
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")  # CPU features that change which kernels run


@contextlib.contextmanager
def pinned_threads(threads: int):
    """torch's intra-op threads set to ``threads`` for the block, then restored (a sweep job keeps its own)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine() -> dict:
    """The CPU a build ran on: its model name and the instruction-set features that select kernels."""
    model, flags = "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags]}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dataset_content_hash(minari_dataset) -> str:
    """SHA-256 over a Minari dataset's episodes (id, seed, observations, actions, rewards, terminations,
    truncations, success flags, in episode order), not its files: the HDF5 files also hold metadata that need not
    repeat byte for byte (library versions, storage layout)."""
    digest = hashlib.sha256()
    for ep in minari_dataset.iterate_episodes():
        success = (ep.infos or {}).get("success")
        digest.update(json.dumps({"id": int(ep.id)}).encode())
        for array in (ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations, success):
            array = np.ascontiguousarray(np.asarray(array if array is not None else []))
            digest.update(f"{array.dtype.str}{array.shape}".encode())  # so equal bytes of other shapes differ
            digest.update(array.tobytes())
    return digest.hexdigest()


def load_manifest(path: Path = MANIFEST) -> dict:
    """The committed manifest: ``{"artifacts": {name: {"module", "key", "hash", "hash_of", "threads", "machine"}}}``."""
    return json.loads(Path(path).read_text())


def verdicts(current: dict[str, dict], manifest: dict | None = None) -> dict[str, str]:
    """Per artifact an experiment uses (``current``: name -> entry, its ``hash`` None when the cache lacks it):
    "matches committed", "differs from committed (<ours> vs <committed>)", "not built" or "not in the manifest".
    Entries are matched by ``key`` (what the cache names the build by), so experiments that share a build (rl_cpu
    and rl_cpu_tuned) share its manifest entry."""
    committed = {entry["key"]: entry for entry in (manifest or load_manifest())["artifacts"].values()}
    out = {}
    for name, entry in current.items():
        reference = committed.get(entry["key"])
        if entry["hash"] is None:
            out[name] = "not built"
        elif reference is None:
            out[name] = "not in the manifest"
        elif entry["hash"] == reference["hash"]:
            out[name] = f"{reference['hash_of']} matches committed"
        else:
            ours, theirs = entry["hash"][:12], reference["hash"][:12]
            out[name] = f"{reference['hash_of']} differs from committed ({ours} vs {theirs})"
    return out


# --- what an experiment's runs build, as the current cache holds it ------------------------------------------------

DEFAULT_EXPERIMENTS = {"vision": "vision_cpu", "rl": "rl_cpu"}  # the CPU defaults, checked when none is named


def _compose(config_name: str, experiment: str, overrides=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=[f"experiment={experiment}", *overrides],
                       return_hydra_config=True)


def vision_artifacts(cfg) -> dict[str, dict]:
    """The backbone a vision experiment fine-tunes (``hash`` None when the cache lacks it)."""
    from omegaconf import OmegaConf

    from tasks.vision import models as vision_models

    load = OmegaConf.to_container(cfg.model.load, resolve=True)
    spec = vision_models.backbone_spec(load["architecture"], load["pretrain"], load["threads"])
    folder = vision_models.backbone_folder(load["name"], spec)
    meta = vision_models._valid_cache(folder) or {}
    return {f"{load['name']} backbone": {"module": "vision", "key": folder.name, "hash": meta.get("sha256"),
                                         "hash_of": "sha256 of weights.pt", "threads": meta.get("threads"),
                                         "machine": meta.get("machine")}}


def rl_artifacts(cfg) -> dict[str, dict]:
    """The expert datasets (pretraining and swept fine-tuning tasks) and the pretrained checkpoint an RL experiment
    uses, named after its task split (``hash`` None when the cache lacks one)."""
    from tasks.rl import data as rl_data
    from tasks.rl import pretrain as rl_pretrain

    split, here = cfg.task.name, machine()
    finetune = str(cfg.hydra.sweeper.params.get("task.finetune", cfg.task.finetune)).split(",")
    out = {}
    for task in dict.fromkeys([*cfg.task.pretrain_tasks, *finetune]):
        spec = rl_pretrain.expert_spec(cfg, task)
        built = rl_data._finished(rl_data.datasets_root() / spec.dataset_id, spec)
        out[f"{split} {task} dataset"] = {
            "module": "rl", "key": spec.dataset_id,
            "hash": dataset_content_hash(rl_data.expert_dataset(spec)) if built else None,
            "hash_of": "content sha256 (episodes' arrays)", "threads": None, "machine": here if built else None}
    checkpoint = rl_pretrain.checkpoint_folder(cfg)
    meta = json.loads((checkpoint / "meta.json").read_text()) if (checkpoint / "meta.json").exists() else {}
    out[f"{split} {cfg.model.name} checkpoint"] = {
        "module": "rl", "key": checkpoint.name,
        "hash": sha256_file(checkpoint / "model.safetensors") if meta else None,
        "hash_of": "sha256 of model.safetensors", "threads": meta.get("threads"), "machine": meta.get("machine")}
    return out


MODULE_ARTIFACTS = {"vision": vision_artifacts, "rl": rl_artifacts}  # module -> what its experiments build


def experiment_artifacts(module: str, experiment: str | None = None, overrides=()) -> dict[str, dict]:
    """What ``experiment`` (default: the module's CPU default) builds, as manifest entries of the current cache
    (``$EVA_BENCH_CACHE``); nothing is built."""
    cfg = _compose(module, experiment or DEFAULT_EXPERIMENTS[module], overrides)
    return MODULE_ARTIFACTS[module](cfg)


def main(argv=None) -> None:
    """``python -m eva_bench.artifacts vision|rl [EXPERIMENT]``: the verdict of each artifact the experiment uses
    (default: the module's CPU default) against the committed manifest; ``make reproduce-vision`` and
    ``reproduce-rl`` print it last."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in MODULE_ARTIFACTS or len(argv) > 2:
        sys.exit("usage: python -m eva_bench.artifacts vision|rl [EXPERIMENT]")
    current = experiment_artifacts(*argv)
    manifest = load_manifest()
    for name, verdict in verdicts(current, manifest).items():
        print(f"{name}: {verdict}")
    keys = {entry["key"] for entry in current.values()}
    here = machine()
    built_on = [e["machine"] for e in manifest["artifacts"].values() if e["key"] in keys]
    if any(m != here for m in built_on):
        named = sorted({f"{m['cpu']} ({', '.join(m['isa'])})" for m in built_on})
        print(f"note: the manifest was built on {'; '.join(named)}, this machine is {here['cpu']} "
              f"({', '.join(here['isa'])}): another kind of CPU may differ in the last bits")


if __name__ == "__main__":
    main()
