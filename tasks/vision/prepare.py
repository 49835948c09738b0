"""Build (or verify) an experiment's backbone before its sweep starts: the CPU default pretrains its ViT here, once,
instead of inside the first sweep job while the other waits on the lock. The build runs on
``eva_bench.artifacts.BUILD_THREADS`` torch threads wherever it runs, so both give the same bits.

    python -m tasks.vision.prepare experiment=vision_cpu
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eva_bench.recipe import build


@hydra.main(config_path="../../conf", config_name="vision", version_base="1.3")
def main(cfg: DictConfig) -> None:
    backbone = build(cfg.model.load)
    print(f"backbone {cfg.model.name} ready: {backbone.info}")


if __name__ == "__main__":
    main()
