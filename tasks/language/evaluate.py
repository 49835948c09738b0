"""Evaluation for the language task: answer extraction, generation accuracy, answer NLL, choice accuracy.

Extraction follows the conventions of the papers' evaluation scripts (MetaMath for GSM8K/MATH, LLM-Adapters for
commonsense) but is written small and documented here; the evaluation loops work with any Hugging Face causal LM
that returns ``.logits`` (plain or PEFT-wrapped).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from eva_bench import distributed
from tasks.language.data import Example, collate, gsm8k_final, prompt_ids, target_ids, tokenize

# ----------------------------------------------------------------------------------------------------------------
# GSM8K numbers
# ----------------------------------------------------------------------------------------------------------------

# A number: optional minus, digits with optional thousands commas, optional decimals. The look-behind makes a match
# start only at the beginning of a number, so "3-4" yields 3 and 4 (not -4) and "x2" yields nothing.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


def canonical_number(text: str) -> str | None:
    """``"1,080.50"`` -> ``"1080.5"``, ``"18.00"`` -> ``"18"``, ``"$5"`` -> ``"5"``; None if not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gsm8k_gold(answer_field: str) -> str:
    """The gold answer of a GSM8K row: the number after ``####``, commas removed, in canonical form."""
    final = gsm8k_final(answer_field)
    return canonical_number(final) or final


def extract_number(text: str) -> str | None:
    """The numeric answer in a model's output, canonical (see :func:`canonical_number`), or None.

    The first number after the last "The answer is" (MetaMathQA's closing phrase) if there is one; otherwise the last
    number in the text (a model that never learned the phrase usually ends on its result).
    """
    marks = list(_ANSWER_IS.finditer(text))
    if marks:
        found = _NUMBER.search(text, marks[-1].end())
        if found:
            return canonical_number(found.group())
    numbers = _NUMBER.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


def gsm8k_correct(text: str, example: Example) -> bool:
    """Scorer for :func:`generation_accuracy` on GSM8K."""
    pred = extract_number(text)
    return pred is not None and pred == canonical_number(example.answer)


# ----------------------------------------------------------------------------------------------------------------
# MATH answers
# ----------------------------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces; also ``\\boxed 5``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if not text.startswith("{", i):
        # "\boxed 5$": the argument runs to the next "$" or whitespace.
        return re.split(r"[\s$]", text[i:].lstrip(), maxsplit=1)[0] or None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced (e.g. a generation cut off inside the box)


def math_gold(example: Mapping[str, Any]) -> str:
    """The gold answer of a MATH row: its ``answer`` field when present (MATH-500), else the last ``\\boxed{}`` of its
    ``solution`` (the full MATH test set)."""
    if example.get("answer"):
        return str(example["answer"])
    boxed = last_boxed(example["solution"])
    if boxed is None:
        raise ValueError(f"MATH solution without \\boxed{{}}: {example['solution'][-80:]!r}")
    return boxed


def extract_math_answer(text: str) -> str | None:
    """A model's MATH answer: the last ``\\boxed{}`` if any, else what follows the last "The answer is" (to the end
    of that line), else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    marks = list(_ANSWER_IS.finditer(text))
    if not marks:
        return None
    answer = text[marks[-1].end():].lstrip(" :").split("\n", 1)[0].strip()
    return answer.rstrip(".").strip() or None


_UNIT_AT_END = re.compile(r"(?<=\S)\\(?:text|mbox|mathrm)\{[^{}]*\}$")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")


def normalize_math_answer(answer: str) -> str:
    """A modest normalisation of a MATH answer so that equivalent LaTeX spellings compare equal.

    Removes: whitespace, ``$``, ``\\left``/``\\right``, LaTeX thin spaces (``\\!``, ``\\,``, ...), degree marks
    (``^\\circ``), percent signs, a trailing unit in ``\\text{...}`` ("5\\text{ cm}" -> "5"), a leading short variable
    ("x=5" -> "5"), trailing periods and thousands commas ("1,000" -> "1000"). Rewrites ``\\dfrac``/``\\tfrac`` as
    ``\\frac``, ``\\frac12`` as ``\\frac{1}{2}``, ``\\sqrt2`` as ``\\sqrt{2}``, ``a/b`` as ``\\frac{a}{b}``, ".5" as
    "0.5", and unwraps a remaining ``\\text{X}`` to X. Anything deeper (symbolic equivalence) is out of scope.
    """
    s = answer.strip().replace("\n", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[!,;: ]", "", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    s = _UNIT_AT_END.sub("", s).strip()
    s = _TEXT_WRAP.sub(r"\1", s)
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if s.startswith("."):
        s = "0" + s
    s = s.replace("{.", "{0.")
    return s.rstrip(".")


def _as_number(s: str) -> float | None:
    """A normalised answer as a number when it is a plain number or a simple fraction, else None."""
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        return float(s)
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if m and float(m.group(3)) != 0:
        value = float(m.group(2)) / float(m.group(3))
        return -value if m.group(1) else value
    return None


def math_equal(pred: str | None, gold: str) -> bool:
    """True if ``pred`` matches ``gold`` after :func:`normalize_math_answer`, or both are plain numbers / simple
    fractions with the same value (``\\frac{1}{2}`` == ``0.5``)."""
    if pred is None:
        return False
    a, b = normalize_math_answer(pred), normalize_math_answer(gold)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y))


def math_correct(text: str, example: Example) -> bool:
    """Scorer for :func:`generation_accuracy` on MATH."""
    return math_equal(extract_math_answer(text), example.answer)


# ----------------------------------------------------------------------------------------------------------------
# Commonsense answers
# ----------------------------------------------------------------------------------------------------------------

# The option words each task's answer format asks for (as in LLM-Adapters' commonsense evaluation).
COMMONSENSE_OPTIONS = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
}


def _first_option(text: str, options: Sequence[str]) -> str:
    found = re.search("|".join(map(re.escape, options)), text, flags=re.IGNORECASE)
    return found.group().lower() if found else ""


def extract_commonsense_answer(task: str, text: str) -> str:
    """The first of the task's option words in ``text`` ("" if none), e.g. "the correct answer is answer3" ->
    "answer3". Like LLM-Adapters, the first occurrence wins, so a model that lists several options is judged by the
    first one it names."""
    if task not in COMMONSENSE_OPTIONS:
        raise ValueError(f"unknown commonsense task {task!r}; valid: {', '.join(COMMONSENSE_OPTIONS)}")
    return _first_option(text, COMMONSENSE_OPTIONS[task])


def commonsense_correct(text: str, example: Example) -> bool:
    """Scorer for :func:`generation_accuracy` on commonsense: the task comes from ``example.source``
    ("commonsense/<task>"); without one, the example's own choices are the options."""
    task = example.source.split("/", 1)[1] if example.source.startswith("commonsense/") else ""
    options = COMMONSENSE_OPTIONS.get(task, example.choices)
    pred = _first_option(text, options)
    return pred == example.answer.lower()


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
