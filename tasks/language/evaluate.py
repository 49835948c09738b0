"""Evaluation loops for the language task: generation accuracy, answer NLL, choice accuracy. They work with any
Hugging Face causal LM that returns ``.logits`` (plain or PEFT-wrapped). Reading and comparing answers lives in
``tasks.language.answers``; its scorers are re-exported here because the task configs name them by these paths
(and a config's text enters its runs' ids).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from eva_bench import distributed
from tasks.language.data import Example, collate, prompt_ids, target_ids, tokenize

# ----------------------------------------------------------------------------------------------------------------
# Evaluation loops
# ----------------------------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    # Llama tokenizers have no pad token; eos is the usual stand-in. It never leaks into scores: padding is masked
    # by the attention mask and by labels = -100.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


class _EvalMode:
    """Put the model in eval mode (no dropout) for the block and restore its previous mode afterwards."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.inference_mode()
def generation_accuracy(
    model,
    tokenizer,
    examples: Sequence[Example],
    score: Callable[[str, Example], bool],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    keep_outputs: bool = False,
) -> dict[str, Any]:
    """Greedy-decode each prompt and count the outputs ``score(text, example)`` accepts.

    Prompts are left-padded by hand (same ids as :func:`~tasks.language.data.prompt_ids`, so generation is
    conditioned exactly as training was; the tokenizer's padding side is never touched), batches are formed from
    prompts of similar length to waste little compute on padding, and only the new tokens are decoded. Under
    torchrun each rank generates its share of the examples (:func:`eva_bench.distributed.spread`).
    Returns ``{"accuracy", "n"}`` (plus ``"outputs"`` in the examples' order when ``keep_outputs``).
    """
    def generate(share):
        return _greedy(model, tokenizer, share, max_new_tokens, batch_size)

    with _EvalMode(model):
        outputs = distributed.spread(examples, generate)
    correct = sum(bool(score(text, example)) for text, example in zip(outputs, examples))
    result: dict[str, Any] = {"accuracy": correct / len(examples) if examples else 0.0, "n": len(examples)}
    if keep_outputs:
        result["outputs"] = outputs
    return result


def _greedy(model, tokenizer, examples: Sequence[Example], max_new_tokens: int, batch_size: int) -> list[str]:
    """Each example's greedy continuation of its prompt (new tokens only, decoded), in the examples' order."""
    device, pad_id = _device(model), _pad_id(tokenizer)
    ids = [prompt_ids(tokenizer, ex.prompt) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(ids[i]))
    outputs: list[str] = [""] * len(examples)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, width - len(ids[i]):] = torch.tensor(ids[i])
            attention_mask[r, width - len(ids[i]):] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        for i, text in zip(rows, tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)):
            outputs[i] = text
    return outputs


def _target_logprobs(model, features: Sequence[dict], pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    """For each feature, (sum of log p(label token | preceding tokens) over its labelled positions, their count)."""
    device = _device(model)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(features)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate([features[i] for i in rows], pad_id)
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        logits = model(**inputs).logits
        # Position t predicts token t+1; float32 so a bf16 model's scores are not rounded.
        labels = batch["labels"][:, 1:].to(device)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        mask = labels != -100
        sums, counts = (-nll * mask).sum(1), mask.sum(1)
        for r, i in enumerate(rows):
            results[i] = (sums[r].item(), int(counts[r].item()))
    return results


def _scores(model, features: Sequence[dict], pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    """:func:`_target_logprobs` of every feature, each rank scoring its share under torchrun."""
    return distributed.spread(features, lambda share: _target_logprobs(model, share, pad_id, batch_size))


@torch.inference_mode()
def answer_nll(
    model, tokenizer, examples: Sequence[Example], max_length: int = 512, batch_size: int = 16
) -> dict[str, Any]:
    """Mean negative log-likelihood per target token (target + eos) given the prompt, by teacher forcing.

    Unlike accuracy it is informative even for a tiny model that never gets an answer right, so it still ranks
    initialisation methods. Returns ``{"nll", "tokens", "n"}``; examples whose prompt fills ``max_length`` are
    dropped (as in training, see :func:`~tasks.language.data.tokenize`) and not counted in ``n``.
    """
    features = tokenize(examples, tokenizer, max_length)
    with _EvalMode(model):
        scores = _scores(model, features, _pad_id(tokenizer), batch_size)
    total = sum(s for s, _ in scores)
    tokens = sum(c for _, c in scores)
    return {"nll": -total / tokens if tokens else float("nan"), "tokens": tokens, "n": len(features)}


def choice_target(example: Example, choice: str) -> str:
    """The response the model would write had it picked ``choice``: the gold target with its final answer swapped,
    e.g. "the correct answer is answer3" -> "the correct answer is answer1"."""
    if not example.target.endswith(example.answer):
        raise ValueError(f"target {example.target!r} does not end with the answer {example.answer!r}")
    return example.target[: len(example.target) - len(example.answer)] + choice


@torch.inference_mode()
def choice_accuracy(model, tokenizer, examples: Sequence[Example], batch_size: int = 16) -> dict[str, Any]:
    """Multiple-choice accuracy by likelihood: score each choice's full response (:func:`choice_target`, plus eos)
    by its summed log-likelihood given the prompt and predict the argmax (ties go to the first choice).

    Summed, not length-normalised: the candidates differ only in the option word, which is one or two tokens.
    No truncation is applied (commonsense prompts are short), so every example is scored. Returns
    ``{"accuracy", "n"}``.
    """
    features, owner = [], []
    for k, ex in enumerate(examples):
        if not ex.choices:
            raise ValueError(f"example {k} ({ex.source or 'no source'}) has no choices")
        p = prompt_ids(tokenizer, ex.prompt)
        for choice in ex.choices:
            t = target_ids(tokenizer, choice_target(ex, choice))
            features.append({"input_ids": p + t, "labels": [-100] * len(p) + t})
            owner.append(k)
    with _EvalMode(model):
        scores = _scores(model, features, _pad_id(tokenizer), batch_size)
    best: dict[int, tuple[float, int]] = {}  # example -> (best score, index of its choice)
    seen: dict[int, int] = {}
    for k, (s, _) in zip(owner, scores):
        j = seen.get(k, 0)
        seen[k] = j + 1
        if k not in best or s > best[k][0]:
            best[k] = (s, j)
    correct = sum(examples[k].choices[j] == examples[k].answer for k, (_, j) in best.items())
    return {"accuracy": correct / len(examples) if examples else 0.0, "n": len(examples)}
