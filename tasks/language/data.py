"""Data for the language task: math (GSM8K / MetaMathQA -> GSM8K, MATH) and commonsense reasoning.

Every loader returns a list of :class:`Example` already rendered with the Alpaca-style template used by MetaMathQA
and LLM-Adapters, so training, generation and likelihood scoring all see exactly the same prompt text.

Offline, the files come from the data root (see ``../shared/data/SOURCES.md``); hub sources (MetaMathQA,
commonsense_170k) are used only when asked for, and fail fast with a clear message when the hub is off.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from eva_bench.assets import asset, check_documented_rows, require_hub
from tasks.language.answers import GSM8K_FINAL, gsm8k_final, math_gold

log = logging.getLogger(__name__)

# The two Alpaca templates. MetaMathQA uses the first; LLM-Adapters uses the second when a row has a non-empty
# ``input`` (none of the staged commonsense rows do, but commonsense_170k may).
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)

METAMATHQA_ID = "meta-math/MetaMathQA"
COMMONSENSE_170K_ID = "zwhe99/commonsense_170k"

# The seven commonsense test sets staged offline (the paper's eight minus HellaSwag), in the paper's table order.
COMMONSENSE_TASKS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
# The commonsense sets that also have a staged train split (their concatenation is the offline training set).
COMMONSENSE_TRAIN_TASKS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")


@dataclass(frozen=True)
class Example:
    """One templated training / evaluation example.

    prompt:  the full templated prompt (ends with ``### Response:``); the model is conditioned on it.
    target:  the response text trained on and scored (without eos; :func:`tokenize` appends it).
    answer:  the gold answer compared against what is extracted from a generation.
    choices: for multiple choice, the option strings as the model writes them (e.g. ``answer1``); empty otherwise.
    source:  where it came from (``gsm8k``, ``math500``, ``commonsense/boolq``, ...); scorers use it.
    """

    prompt: str
    target: str
    answer: str
    choices: tuple[str, ...] = ()
    source: str = ""


def render_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for an instruction (and optional input)."""
    if input_text and input_text.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A data file that cannot give the task's examples; the message names the file and the row."""


def _read_rows(relpath: str) -> list[tuple[str, dict[str, Any]]]:
    """Every row of a JSON Lines file, a JSON list or a CSV file with a header, each with where it is (``<file>, line
    <n>`` / ``item <n>``): a line cut mid-way or a file that is not a list is an error naming the file and line.
    ``relpath``: under the data root, or an absolute (or ``~``) path."""
    path = asset(Path(relpath).expanduser())
    with open(path, encoding="utf-8", newline="") as fh:
        if path.suffix == ".csv":  # a header row names the fields
            reader = csv.DictReader(fh)
            rows = [(f"{path}, line {reader.line_num}", row) for row in reader]
        elif path.suffix == ".jsonl":
            rows = [(f"{path}, line {n}", _json_row(line, path, n)) for n, line in enumerate(fh, 1) if line.strip()]
        else:
            rows = [(f"{path}, item {n}", row) for n, row in enumerate(_json_list(fh, path), 1)]
    check_documented_rows(relpath, len(rows))
    return rows


def _json_row(line: str, path, n: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {n}: not a JSON row ({error.msg})") from None


def _json_list(fh, path) -> list:
    try:
        items = json.load(fh)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of rows, found a {type(items).__name__}")
    return items


def _examples(rows: list[tuple[str, dict[str, Any]]], make) -> list[Example]:
    """``make(row)`` for each row; a row without a field the task needs, or with one it cannot read, is an error
    naming its file and row."""
    out = []
    for where, row in rows:
        try:
            out.append(make(row))
        except KeyError as error:
            raise DataError(f"{where}: no field {error.args[0]!r} (the row has {', '.join(map(repr, row))})") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise DataError(f"{where}: {error}") from None
    return out


def _subset(items: list, limit: int | None, seed: int) -> list:
    """A seeded random subset of ``limit`` items, kept in the original order (so a small run is representative of
    the whole set rather than of its first rows, which are often sorted by topic)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _check_task(task: str, valid: Sequence[str]) -> None:
    if task not in valid:
        extra = " (HellaSwag is not staged offline)" if task.lower() == "hellaswag" else ""
        raise ValueError(f"unknown task {task!r}{extra}; valid: {', '.join(valid)}")


# ----------------------------------------------------------------------------------------------------------------
# Math
# ----------------------------------------------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^>]*>>")
def gsm8k_to_metamath(answer_field: str) -> str:
    """Rewrite a GSM8K solution in MetaMathQA's response style: drop the ``<<a*b=c>>`` calculator annotations and
    replace the final ``#### n`` with ``The answer is: n``, so GSM8K-trained and MetaMathQA-trained models end their
    answers the same way (and one extractor serves both)."""
    body = _CALCULATOR.sub("", answer_field)
    final = gsm8k_final(body)
    body = GSM8K_FINAL.sub("", body).rstrip()
    return f"{body}\nThe answer is: {final}"


def _gsm8k_example(row: dict[str, Any], source: str) -> Example:
    return Example(
        prompt=render_prompt(row["question"]),
        target=gsm8k_to_metamath(row["answer"]),
        answer=gsm8k_final(row["answer"]),
        source=source,
    )


def _metamath_answer(response: str) -> str:
    """MetaMathQA responses end with ``The answer is: X``."""
    head, sep, tail = response.rpartition("The answer is:")
    return tail.strip() if sep else ""


def math_train(source: str = "gsm8k", limit: int | None = None, seed: int = 0) -> list[Example]:
    """Math training examples.

    ``source="metamathqa"`` is the paper's set (MetaMathQA from the hub, fields ``query`` / ``response``);
    ``source="gsm8k"`` is the offline stand-in: the GSM8K train split rewritten in MetaMathQA's style. Never use
    LLM-Adapters' math_data.json here: it contains GSM8K test questions.
    """
    if source == "gsm8k":
        rows = _subset(_read_rows("gsm8k/train.jsonl"), limit, seed)
        return _examples(rows, lambda r: _gsm8k_example(r, "gsm8k_train"))
    if source == "metamathqa":
        require_hub(METAMATHQA_ID, repo_type="dataset")
        from datasets import load_dataset

        ds = load_dataset(METAMATHQA_ID, split="train")
        idx = _subset(list(range(len(ds))), limit, seed)
        rows = ds.select(idx) if len(idx) < len(ds) else ds
        return [
            Example(
                prompt=render_prompt(r["query"]),
                target=r["response"],
                answer=_metamath_answer(r["response"]),
                source="metamathqa",
            )
            for r in rows
        ]
    raise ValueError(f"unknown math source {source!r}; valid: gsm8k, metamathqa")


def gsm8k_test(limit: int | None = None, seed: int = 0) -> list[Example]:
    """The GSM8K test split (1,319 problems). ``target`` is the reference solution in MetaMathQA style (for
    :func:`~tasks.language.evaluate.answer_nll`), ``answer`` the number after ``####``."""
    rows = _subset(_read_rows("gsm8k/test.jsonl"), limit, seed)
    return _examples(rows, lambda r: _gsm8k_example(r, "gsm8k"))


def math_test(subset: str = "math500", limit: int | None = None, seed: int = 0) -> list[Example]:
    """MATH test problems: ``subset="math500"`` (the 500-problem subset with a given ``answer``) or ``"full"``
    (all 5,000; the answer is the last ``\\boxed{}`` of the solution). The target is the reference solution
    followed by ``The answer is: X``, the way MetaMathQA writes its MATH responses."""
    if subset == "math500":
        relpath, source = "math/math500.jsonl", "math500"
    elif subset == "full":
        relpath, source = "math/test.jsonl", "math"
    else:
        raise ValueError(f"unknown MATH subset {subset!r}; valid: math500, full")

    def example(row: dict[str, Any]) -> Example:
        gold = math_gold(row)
        return Example(prompt=render_prompt(row["problem"]), target=f"{row['solution'].rstrip()}\nThe answer is: {gold}",
                       answer=gold, source=source)

    return _examples(_subset(_read_rows(relpath), limit, seed), example)


# ----------------------------------------------------------------------------------------------------------------
# Commonsense
# ----------------------------------------------------------------------------------------------------------------

_ANSWER_FORMAT = re.compile(r"Answer format:\s*([\w/]+)")


def _commonsense_example(row: dict[str, Any], source: str) -> Example:
    # Each LLM-Adapters instruction ends with "Answer format: answer1/answer2/..." listing exactly the option words
    # the model should write; reading them per row handles ARC's occasional 3- and 5-option questions.
    match = _ANSWER_FORMAT.search(row["instruction"])
    choices = tuple(match.group(1).split("/")) if match else ()
    return Example(
        prompt=render_prompt(row["instruction"], row.get("input", "") or ""),
        target=row["output"],
        answer=row["answer"],
        choices=choices,
        source=source,
    )


def commonsense_train(
    tasks: Iterable[str] = COMMONSENSE_TRAIN_TASKS,
    source: str = "local",
    limit: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """Commonsense training examples.

    ``source="commonsense_170k"`` is the paper's set (all eight tasks mixed, from the hub; ``tasks`` is ignored);
    ``source="local"`` concatenates the staged train splits of ``tasks`` (boolq, ARC-Easy, ARC-Challenge,
    openbookqa: 17,754 rows). ``limit`` subsamples the concatenation, so task proportions are kept.
    """
    if source == "local":
        examples: list[Example] = []
        for task in tasks:
            _check_task(task, COMMONSENSE_TRAIN_TASKS)
            rows = _read_rows(f"commonsense/{task}/train.json")
            examples += _examples(rows, lambda r, source=f"commonsense/{task}": _commonsense_example(r, source))
        return _subset(examples, limit, seed)
    if source == "commonsense_170k":
        require_hub(COMMONSENSE_170K_ID, repo_type="dataset")
        from datasets import load_dataset

        ds = load_dataset(COMMONSENSE_170K_ID, split="train")
        idx = _subset(list(range(len(ds))), limit, seed)
        rows = ds.select(idx) if len(idx) < len(ds) else ds
        return [_commonsense_example(r, "commonsense_170k") for r in rows]
    raise ValueError(f"unknown commonsense source {source!r}; valid: local, commonsense_170k")


def commonsense_test(task: str, limit: int | None = None, seed: int = 0) -> list[Example]:
    """One of the seven staged commonsense test sets (:data:`COMMONSENSE_TASKS`)."""
    _check_task(task, COMMONSENSE_TASKS)
    rows = _subset(_read_rows(f"commonsense/{task}/test.json"), limit, seed)
    return _examples(rows, lambda r: _commonsense_example(r, f"commonsense/{task}"))


# ----------------------------------------------------------------------------------------------------------------
# Sets added by config
# ----------------------------------------------------------------------------------------------------------------


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _gold_choice(gold: Any, labels: Sequence[str], texts: Sequence[str]) -> str:
    """The label of the gold option: ``gold`` is a label ("B"), an option's text, or an index from 0 (a number, or
    digits when no option reads so: CSV cells are text)."""
    text = str(gold).strip()
    for label, option in zip(labels, texts):
        if text.casefold() in (label.casefold(), f"({label.casefold()})", str(option).strip().casefold()):
            return label
    if text.isdigit() and not isinstance(gold, bool):
        if int(text) < len(labels):
            return labels[int(text)]
        raise ValueError(f"gold index {text} is not one of the {len(labels)} options (indices count from 0)")
    raise ValueError(f"gold answer {text!r} is neither a label ({'/'.join(labels)}) nor an option's text")


def file_set(
    path: str,
    prompt: str,
    answer: str,
    target: str = "The answer is: {answer}",
    choices: str | Sequence[str] | None = None,
    options: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    source: str | None = None,
) -> list[Example]:
    """A data set from a JSON Lines, JSON (a list of rows) or CSV file, mapped by config (``conf/task/*_file.yaml``).

    ``prompt`` and ``target`` are ``str.format`` templates over a row's fields; the prompt is wrapped in the Alpaca
    template the models are trained with, and ``{answer}`` in the target is the gold answer. ``answer`` is the field
    holding the gold answer. Multiple choice, either way: ``choices`` names the field holding a row's list of option
    texts (or the list of fields holding them, e.g. CSV columns ``[A, B, C, D]``); the model answers with a letter,
    and ``{options}`` in the prompt is the lettered list. Or ``options`` lists what the model writes, the same for
    every row (e.g. ``[true, false]``). Either way the gold may be a label, an option's text or an index from 0.
    A row without a field the templates name is an error naming the file and row.
    """
    if choices is not None and options is not None:
        raise ValueError("file_set: give choices (option texts per row) or options (the same for every row), not both")
    if "answer" in _fields(prompt):
        raise ValueError(f"file_set: the prompt template {prompt!r} shows the answer")
    name = source or Path(path).stem

    def example(row: dict[str, Any]) -> Example:
        gold = row[answer]
        if choices is not None:
            texts = row[choices] if isinstance(choices, str) else [row[field] for field in choices]
            if not isinstance(texts, (list, tuple)) or len(texts) < 2:
                raise ValueError(f"field {choices!r} must hold a list of at least two options, found {texts!r}")
            labels = tuple(string.ascii_uppercase[: len(texts)])
            listed = "\n".join(f"{label}. {text}" for label, text in zip(labels, texts))
            gold, prompt_text = _gold_choice(gold, labels, texts), prompt.format(**row, options=listed)
        elif options is not None:
            labels = tuple(str(o) for o in options)
            gold, prompt_text = _gold_choice(gold, labels, labels), prompt.format(**row)
        else:
            labels, gold, prompt_text = (), str(gold).strip(), prompt.format(**row)
        return Example(prompt=render_prompt(prompt_text), target=target.format(**{**row, "answer": gold}),
                       answer=gold, choices=labels, source=name)

    return _examples(_subset(_read_rows(str(path)), limit, seed), example)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------------


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids, with the tokenizer's special tokens (bos for Llama). Generation uses the same call, so the
    model sees identical prompt ids whether training, scoring or generating."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def target_ids(tokenizer, target: str) -> list[int]:
    """The target's ids, tokenized on its own without special tokens, then eos.

    Tokenizing prompt and target separately (rather than prompt+target as one string) makes the prompt/target
    boundary exact: the labels mask precisely the prompt ids, never a token merged across the boundary. With a
    SentencePiece tokenizer the target gets the usual leading-space marker, i.e. it reads "### Response: The ...".
    """
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the target must end with one so generation can stop")
    return ids + [tokenizer.eos_token_id]


def tokenize(examples: Sequence[Example], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize examples for teacher-forced training / scoring.

    Each feature is ``{"input_ids": prompt + target + eos, "labels": -100 on the prompt, the ids on the target}``,
    cut at ``max_length`` tokens. An example whose prompt alone fills ``max_length`` would have no target token
    left to learn from, so it is dropped (the count is logged); a long target is simply cut, losing its tail.
    """
    features = []
    dropped = 0
    for ex in examples:
        p = prompt_ids(tokenizer, ex.prompt)
        t = target_ids(tokenizer, ex.target)
        if len(p) >= max_length:
            dropped += 1
            continue
        ids = (p + t)[:max_length]
        labels = ([-100] * len(p) + t)[:max_length]
        features.append({"input_ids": ids, "labels": labels})
    if dropped:
        log.warning(
            "tokenize: dropped %d of %d examples whose prompt fills max_length=%d", dropped, len(examples), max_length
        )
    return features


def random_token_features(features: Sequence[dict[str, list[int]]], vocab_size: int,
                          generator: torch.Generator) -> list[dict[str, list[int]]]:
    """The same lengths and prompt/answer split as ``features``, every token id drawn uniformly from the vocabulary:
    calibration data with the task's shape and none of its content."""
    out = []
    for feature in features:
        ids = torch.randint(vocab_size, (len(feature["input_ids"]),), generator=generator).tolist()
        labels = [-100 if old == -100 else new for old, new in zip(feature["labels"], ids)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(features: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, ``attention_mask`` 1 on real tokens, ``labels`` -100 on
    padding (so padding never enters the loss, whatever ``pad_id`` is, even when it equals eos)."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(f["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
