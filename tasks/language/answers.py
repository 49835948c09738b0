"""Answers: reading a gold answer and a model's answer, and comparing them.

The scorers of the built-in sets (``gsm8k_correct``, ``math_correct``, ``commonsense_correct``) follow the papers'
evaluation scripts (MetaMath for GSM8K/MATH, LLM-Adapters for commonsense). ``SCORERS`` names the generic ones a
task config picks by name (``scorer: number``), for sets added by config (``tasks.language.data.file_set``).
A scorer is ``(generated text, example) -> bool``. This module reads only strings, so the data loaders and the
evaluation loops can both import it.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from tasks.language.data import Example

GSM8K_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")  # the closing "#### n" line of a GSM8K solution


def gsm8k_final(answer_field: str) -> str:
    """The text after ``####`` in a GSM8K answer, commas removed (e.g. ``"70,000"`` -> ``"70000"``)."""
    match = GSM8K_FINAL.search(answer_field)
    if match is None:
        raise ValueError(f"GSM8K answer has no '#### n' line: {answer_field[-80:]!r}")
    return match.group(1).replace(",", "").strip()

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
# Generic scorers, picked by name in a task config (``scorer: number``)
# ----------------------------------------------------------------------------------------------------------------

_GOLD_MARK = re.compile(r"####|the answer is:?", re.IGNORECASE)
_LETTER = re.compile(r"\(?([A-Z])(?:[).:]|\s|$)")  # "B", "(B)", "B)", "B." or "B: text" at the start
_BRACKETED = re.compile(r"\(([A-Z])\)")  # "(B)" anywhere


def number_in_gold(answer: str) -> str | None:
    """A gold answer's number: the first after a closing mark ("####", "The answer is") when there is one, else the
    first in the text ("9 (apples)" -> "9", "1,000 dollars" -> "1000", "$4.50" -> "4.5")."""
    marks = list(_GOLD_MARK.finditer(answer))
    found = _NUMBER.search(answer.replace("$", ""), marks[-1].end() if marks else 0)
    return canonical_number(found.group()) if found else None


def number_correct(text: str, example: Example) -> bool:
    """Numbers with units, currency or thousands separators: the model's number (:func:`extract_number`) equals the
    gold's (:func:`number_in_gold`)."""
    gold = number_in_gold(example.answer)
    return gold is not None and extract_number(text) == gold


def _after_answer_is(text: str) -> str:
    marks = list(_ANSWER_IS.finditer(text))
    return text[marks[-1].end():].lstrip(" :") if marks else text


def choice_of(text: str, choices: Sequence[str]) -> int | None:
    """Which option ``text`` names, by its position in ``choices``. Letter options: a letter at the start ("B",
    "(B)", "B.") or else the first bracketed one ("(B)"). Other options: the one written first in the text
    (case-insensitive), as LLM-Adapters reads its option words. Only what follows the last "The answer is" counts when the phrase is there."""
    text = _after_answer_is(text).strip()
    if all(len(c) == 1 for c in choices):  # letters: a substring search would find "A" in any sentence
        upper = [c.upper() for c in choices]
        for letter in (_LETTER.match(text), _BRACKETED.search(text)):
            if letter and letter.group(1) in upper:
                return upper.index(letter.group(1))
        return None
    found = [(m.start(), i) for i, c in enumerate(choices) if (m := re.search(re.escape(c), text, re.IGNORECASE))]
    return min(found)[1] if found else None


def choice_correct(text: str, example: Example) -> bool:
    """Multiple choice: the option the model names is the gold one (``example.answer`` is one of its choices)."""
    picked = choice_of(text, example.choices)
    return picked is not None and example.choices[picked] == example.answer


def _exact_form(text: str) -> str:
    return " ".join(text.split("\n", 1)[0].casefold().split()).strip(" .!")


def exact_correct(text: str, example: Example) -> bool:
    """Exact strings: the first line after the last "The answer is" (or the first line) equals the gold, ignoring
    case, repeated spaces and a closing period."""
    return _exact_form(_after_answer_is(text.strip())) == _exact_form(example.answer)


# The scorers a task config names without a module path: ``scorer: <name>`` (a dotted path names any other function).
SCORERS: dict[str, Callable[[str, Example], bool]] = {
    "number": number_correct,
    "choice": choice_correct,
    "exact": exact_correct,
    "math": math_correct,
}


def scorer(name: str) -> Callable[[str, Example], bool]:
    """``SCORERS[name]``, or the function at a dotted path; anything else is an error listing the names."""
    if name in SCORERS:
        return SCORERS[name]
    if "." not in name:
        raise ValueError(f"unknown scorer {name!r}; valid: {', '.join(SCORERS)} or a function's dotted path")
    import hydra

    return hydra.utils.get_method(name)
