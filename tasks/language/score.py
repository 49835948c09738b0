"""Score a model without training: the pretrained model, or a saved adapter on it, on a task's evals. One record,
written as a training run writes its own (``init`` is "base", or the saved run's init and rank).

    python -m tasks.language.score task=commonsense                           # the base model
    python -m tasks.language.score task=math adapter=runs/dev/<run>.adapter   # a run saved with save_adapter=true
    python -m tasks.language.score model=hf model.load.name=/path/to/saved_llama task=math_file

Reads top to bottom: skip if done -> seed -> build the model (and its adapter) and the eval sets -> evaluate -> record.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eva_bench import adapters
from eva_bench.checks import check_command_line
from eva_bench.recipe import RunContext, build, place, seed_everything
from tasks.language.train import evaluate_task, read_evals


def context(cfg: DictConfig) -> RunContext:
    """The score's record: a base model's is ``<task>--<model>--base--r0--...``; an adapter's carries the init and
    rank of the run that saved it (its path enters the config hash, so two adapters never share a record)."""
    saved = adapters.about(cfg.adapter).get("run", {}) if cfg.adapter else {}
    init = saved.get("init", "adapter") if cfg.adapter else "base"
    return RunContext.from_config(cfg, "language", task=cfg.task.name, model=cfg.model.name, init=init,
                                  rank=saved.get("rank", 0))


def run(cfg: DictConfig) -> dict:
    ctx = context(cfg)
    if (record := ctx.existing_or_claim()) is not None:
        return record
    with ctx.recording() as record:
        seed_everything(cfg.seed)  # scoring is greedy and deterministic; seeded all the same, as every run is
        eval_sets = read_evals(cfg.task.evals)  # before the model: a bad file or scorer fails first
        model, tokenizer = build(cfg.model.load)
        if cfg.adapter:
            model = adapters.load_adapter(model, cfg.adapter)
            record.section("adapter", {"path": str(cfg.adapter), **adapters.about(cfg.adapter)})
        model = place(model, cfg)
        model.config.use_cache = True
        record.metrics(evaluate_task(model, tokenizer, eval_sets, cfg))
        return record.finish("success")


@hydra.main(config_path="../../conf", config_name="language_score", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_command_line("language")  # a misspelt key: its close match, before Hydra composes (eva_bench/checks.py)
    main()
