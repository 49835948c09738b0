"""The language recipe: LoRA instruction tuning of a causal LM, one init method, one record.

    python -m tasks.language.train init=eva lora.r=8 seed=0
    python -m tasks.language.train -m experiment=language_cpu      # a whole table's sweep

Reads top to bottom: skip if done -> (tuned protocol: choose the lr) -> seed -> build model and data -> initialize
-> train -> evaluate -> record.
"""

from __future__ import annotations

import math

import hydra
import torch
from omegaconf import DictConfig

from eva_bench import protocol
from eva_bench.adapters import save_adapter
from eva_bench.checks import check_command_line
from eva_bench.init import Calibration
from eva_bench.recipe import (
    RunContext, build, calibration_draw, data_order, initialize_from_config, place, seed_everything,
)
from eva_bench.train import OptimConfig, fit
from tasks.language import answers
from tasks.language import data as language_data
from tasks.language import evaluate as language_eval


def context(cfg: DictConfig) -> RunContext:
    """This run's record: its keys and path (the sweeper asks too, to launch only unfinished runs)."""
    return RunContext.from_config(cfg, "language", task=cfg.task.name, model=cfg.model.name)


def run(cfg: DictConfig) -> dict:
    ctx = context(cfg)
    if (record := ctx.existing_or_claim()) is not None:
        return record
    cfg, selection = protocol.prepare(cfg, ctx, run)  # tuned: selection runs first (recorded, reused)
    with ctx.recording(selection) as record:  # records the lr selection; pins torch's threads
        seed_everything(cfg.seed)

        # build: the pretrained model and the tokenized training split
        model, tokenizer = build(cfg.model.load)
        model = place(model, cfg)  # on this rank's device; gradient checkpointing if the model config asks
        model.config.use_cache = False  # training: no KV cache
        pad_id = tokenizer.pad_token_id
        # a selection run holds out a validation split of the training data; test data never enters selection
        train_examples, validation = protocol.split(cfg, build(cfg.task.train))
        features = language_data.tokenize(train_examples, tokenizer, cfg.data.max_length)
        batch_size = cfg.data.batch_size
        if len(features) < batch_size:  # before any work: an init and an evaluation of an untrained adapter
            raise language_data.DataError(f"{len(features)} training examples fit max_length, fewer than one batch "
                                          f"of data.batch_size={batch_size}: nothing to train on")
        eval_sets = read_evals(cfg.task.evals)  # now, so a bad test file or scorer fails the run before it trains

        # initialize: the same seeded calibration batches for every data-driven method
        pool = calibration_pool(cfg, features, validation, tokenizer, model.get_input_embeddings().num_embeddings)
        calibration = lm_calibration(calibration_batches(pool, cfg.calibration, pad_id, cfg.seed), len(features))
        model, report = initialize_from_config(model, cfg, calibration)
        record.init(report)

        # train: the shared loop; every epoch reshuffles with a generator seeded by (seed, epoch)
        def epoch_batches(epoch: int):
            order = torch.randperm(len(features), generator=data_order(cfg.seed, epoch))
            for i in range(0, len(order) - batch_size + 1, batch_size):  # drop the ragged last batch
                yield language_data.collate([features[j] for j in order[i : i + batch_size]], pad_id)

        result = fit(
            model,
            epoch_batches,
            causal_lm_loss,
            OptimConfig(**cfg.optim),
            steps_per_epoch=len(features) // batch_size,
            on_log=record.log_train,  # loss, lr and gradient norm to the tracker
        )
        record.train(result)
        if result.status == "diverged":
            return record.finish("diverged")

        model.config.use_cache = True
        if validation:  # a selection run is scored on its validation split only
            nll = language_eval.answer_nll(model, tokenizer, validation, cfg.data.max_length, cfg.data.eval_batch_size)
            record.metrics({protocol.VALIDATION_METRIC: nll["nll"], "validation/n": len(validation)})
            return record.finish("success" if math.isfinite(nll["nll"]) else "diverged")  # NaN weights: no score

        if cfg.get("save_adapter"):
            save_adapter(model, ctx.path.with_suffix(".adapter"), base_weights_modified=report.base_weights_modified,
                         run=ctx.run)
        # evaluate: every eval of the task config, on held-out test data only
        record.metrics(evaluate_task(model, tokenizer, eval_sets, cfg))
        return record.finish("success")


def read_evals(evals) -> dict:
    """Every eval set of a task config, read, with its scorer checked: a bad file or scorer name fails here."""
    eval_sets = {}
    for name, spec in evals.items():
        eval_sets[name] = build(spec.data)
        if not eval_sets[name]:
            raise language_data.DataError(f"eval {name!r}: its data ({spec.data}) has no examples")
        if "accuracy" in spec.metrics:
            answers.scorer(spec.scorer)
    return eval_sets


def evaluate_task(model, tokenizer, eval_sets: dict, cfg: DictConfig) -> dict:
    """Every eval of the task config on its test examples that fit the model, and the averages when asked."""
    metrics = {}
    for name, spec in cfg.task.evals.items():
        examples = fitting(eval_sets[name], tokenizer, model, spec, cfg.data.max_length)
        metrics[f"{name}/n"] = len(examples)
        metrics.update({f"{name}/{k}": v for k, v in evaluate(model, tokenizer, examples, spec, cfg.data).items()})
    if cfg.task.average:
        metrics.update(averages(metrics))
    return metrics


def causal_lm_loss(model, batch) -> torch.Tensor:
    """Mean token cross-entropy on answer tokens (prompt and padding labels are -100)."""
    return model(**batch).loss


def lm_calibration(batches: list[dict], dataset_size: int | None = None) -> Calibration:
    """How the initializer sees a causal LM's batches: the forward pass, the training loss, and which positions are
    rows of the layer-input statistics."""
    return Calibration(
        batches=batches,
        forward=lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
        loss=causal_lm_loss,
        rows=lambda b: b["attention_mask"],  # every real token (the paper did not mask prompts)
        loss_rows=lambda b: b["labels"] != -100,  # answer tokens only, for label masking
        dataset_size=dataset_size,
    )


def calibration_pool(cfg: DictConfig, features: list[dict], validation: list, tokenizer, vocab_size: int) -> list[dict]:
    """The features calibration batches are drawn from (``calibration.source``): the training split (null), the
    training split's shapes with random token ids (random_tokens), or another data config's examples, less any of
    the validation split's (selection never sees its validation data, not even through an init)."""
    source = cfg.calibration.get("source")
    if source is None:
        return features
    if source == "random_tokens":
        return language_data.random_token_features(features, vocab_size, calibration_draw(cfg.seed))
    held_out = {(e.prompt, e.target) for e in validation}
    examples = [e for e in build(source) if (e.prompt, e.target) not in held_out]
    return language_data.tokenize(examples, tokenizer, cfg.data.max_length)


def calibration_batches(features, cfg, pad_id: int, seed: int) -> list[dict]:
    """``cfg.batches`` batches drawn without replacement from the training split by a generator seeded by ``seed``."""
    needed = cfg.batches * cfg.batch_size
    if len(features) < needed:  # before the init: fewer batches would quietly change what the method sees
        raise language_data.DataError(f"calibration.batches={cfg.batches} of batch_size={cfg.batch_size} needs "
                                      f"{needed} examples; its source has {len(features)}")
    order = torch.randperm(len(features), generator=calibration_draw(seed))[:needed]
    chosen = [features[i] for i in order]
    return [language_data.collate(chosen[i : i + cfg.batch_size], pad_id) for i in range(0, len(chosen), cfg.batch_size)]


def evaluate(model, tokenizer, examples, spec, data_cfg) -> dict:
    """The metrics an eval spec lists, named as in the tables."""
    out = {}
    for metric in spec.metrics:
        if metric == "nll":
            res = language_eval.answer_nll(model, tokenizer, examples, data_cfg.max_length, data_cfg.eval_batch_size)
            out["nll"] = res["nll"]
        elif metric == "accuracy":
            score = answers.scorer(spec.scorer)
            res = language_eval.generation_accuracy(
                model, tokenizer, examples, score, spec.max_new_tokens, data_cfg.eval_batch_size
            )
            out["accuracy"] = 100 * res["accuracy"]
        elif metric == "choice_accuracy":
            out["choice_accuracy"] = 100 * language_eval.choice_accuracy(
                model, tokenizer, examples, data_cfg.eval_batch_size
            )["accuracy"]
        else:
            raise ValueError(f"unknown metric {metric!r}; valid: nll, accuracy, choice_accuracy")
    return out


def fitting(examples, tokenizer, model, spec, max_length: int) -> list:
    """The test examples every metric can score within the model's trained context: the prompt shorter than
    ``max_length`` and prompt + generation budget within ``max_position_embeddings``. The filter depends only on the
    tokenizer and config, so every method is evaluated on the same examples."""
    budget = min(max_length, model.config.max_position_embeddings - spec.get("max_new_tokens", 0))
    kept = [ex for ex in examples if len(language_data.prompt_ids(tokenizer, ex.prompt)) < budget]
    if not kept:
        raise ValueError(f"no test example fits in {budget} prompt tokens; raise data.max_length or lower max_new_tokens")
    return kept


def averages(metrics: dict) -> dict:
    by_metric: dict[str, list[float]] = {}
    for key, value in metrics.items():
        if key.endswith("/n"):
            continue
        by_metric.setdefault(key.split("/", 1)[1], []).append(value)
    return {f"avg/{m}": sum(v) / len(v) for m, v in by_metric.items()}


@hydra.main(config_path="../../conf", config_name="language", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_command_line("language")  # a misspelt key: its close match, before Hydra composes (eva_bench/checks.py)
    main()
