"""What eva_bench builds itself (the vision backbone, the RL expert datasets, the pretrained decision transformer):
how a build is pinned so that it is bit-identical on the same kind of machine, how an artifact is named (its
SHA-256), and how the current cache compares with the committed manifest ``results/artifacts.json``.

    with pinned_threads(BUILD_THREADS):     # a build's floating-point sums do not depend on the core count
        ...
    verdicts(current)                      # {"vit_tiny_fmnist backbone": "matches committed", ...}

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
    """The committed manifest: ``{"artifacts": {name: {"key", "hash", "hash_of", "threads", "machine"}}}``."""
    return json.loads(Path(path).read_text())


def verdicts(current: dict[str, str], manifest: dict | None = None, modules=("vision", "rl")) -> dict[str, str]:
    """Per artifact of the manifest (of ``modules``): "matches committed", "differs from committed (<ours> vs
    <committed>)" or "not built" (``current`` maps artifact names to the hashes of what the cache holds now)."""
    committed = (manifest or load_manifest())["artifacts"]
    out = {}
    for name, entry in committed.items():
        if entry["module"] not in modules:
            continue
        ours = current.get(name)
        if ours is None:
            out[name] = "not built"
        elif ours == entry["hash"]:
            out[name] = f"{entry['hash_of']} matches committed"
        else:
            out[name] = f"{entry['hash_of']} differs from committed ({ours[:12]} vs {entry['hash'][:12]})"
    return out


# --- the CPU defaults' artifacts in the current cache -------------------------------------------------------------


def _compose(config_name: str, experiment: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=[f"experiment={experiment}"], return_hydra_config=True)


def cpu_default_artifacts() -> dict[str, dict]:
    """What the cache (``$EVA_BENCH_CACHE``) holds now of vision_cpu's backbone and rl_cpu's datasets and checkpoint,
    as manifest entries; nothing is built, a missing artifact is left out."""
    from omegaconf import OmegaConf

    from tasks.rl import data as rl_data
    from tasks.rl import pretrain as rl_pretrain
    from tasks.vision import models as vision_models

    out = {}
    vision = _compose("vision", "vision_cpu")
    load = OmegaConf.to_container(vision.model.load, resolve=True)
    spec = vision_models.backbone_spec(load["architecture"], load["pretrain"], load["threads"])
    folder = vision_models.backbone_folder(load["name"], spec)
    meta = vision_models._valid_cache(folder)
    if meta is not None:
        out[f"{load['name']} backbone"] = {"module": "vision", "key": folder.name, "hash": meta["sha256"], "hash_of": "sha256 of weights.pt",
                                           "threads": meta["threads"], "machine": meta["machine"]}

    rl = _compose("rl", "rl_cpu")
    finetune_tasks = str(rl.hydra.sweeper.params["task.finetune"]).split(",")
    for task in [*rl.task.pretrain_tasks, *finetune_tasks]:
        data_spec = rl_pretrain.expert_spec(rl, task)
        if rl_data._finished(rl_data.datasets_root() / data_spec.dataset_id, data_spec):
            out[f"{task} dataset"] = {"module": "rl", "key": data_spec.dataset_id,
                                      "hash": dataset_content_hash(rl_data.expert_dataset(data_spec)),
                                      "hash_of": "content sha256 (episodes' arrays)", "threads": None,
                                      "machine": machine()}
    checkpoint = rl_pretrain.checkpoint_folder(rl)
    if (checkpoint / "meta.json").exists():
        meta = json.loads((checkpoint / "meta.json").read_text())
        out[f"{rl.model.name} checkpoint"] = {"module": "rl", "key": checkpoint.name, "hash": sha256_file(checkpoint / "model.safetensors"),
                                              "hash_of": "sha256 of model.safetensors", "threads": meta["threads"],
                                              "machine": meta["machine"]}
    return out


def main(argv=None) -> None:
    """``python -m eva_bench.artifacts [vision|rl ...]``: each committed artifact's verdict against the current
    cache (``make reproduce-vision`` and ``reproduce-rl`` print their module's)."""
    modules = tuple(argv if argv is not None else sys.argv[1:]) or ("vision", "rl")
    current = {name: entry["hash"] for name, entry in cpu_default_artifacts().items()}
    manifest = load_manifest()
    for name, verdict in verdicts(current, manifest, modules).items():
        print(f"{name}: {verdict}")
    here = machine()
    built_on = [e["machine"] for e in manifest["artifacts"].values() if e["module"] in modules]
    if any(m != here for m in built_on):
        named = sorted({f"{m['cpu']} ({', '.join(m['isa'])})" for m in built_on})
        print(f"note: the manifest was built on {'; '.join(named)}, this machine is {here['cpu']} "
              f"({', '.join(here['isa'])}): another kind of CPU may differ in the last bits")


if __name__ == "__main__":
    main()
