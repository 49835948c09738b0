"""Sets added by config (tasks.language.data.file_set), named scorers (tasks.language.answers.SCORERS), scoring
without training (tasks.language.score) and saved adapters (save_adapter=true), on the real stories260K."""

import csv
import json
import math
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from eva_bench.assets import MissingAssetError

from tasks.language import answers as A
from tasks.language import data as D
from tasks.language import score
from tasks.language import train as language_train
from tasks.language.data import Example

CONF = Path(__file__).resolve().parent.parent / "conf"
TINY = [  # a 2-step run, 4 test examples per eval, short generations (as in test_language_recipe.py)
    "task.train.limit=40", "task.eval_limit=4", "data.batch_size=16", "data.eval_batch_size=4",
    "calibration.batches=2", "calibration.batch_size=8",
]


def _compose(config_name, tmp_path, *overrides, tiny=TINY):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=[*tiny, f"results_dir={tmp_path}", *overrides])


def _example(answer, choices=()):
    return Example(prompt="", target="", answer=answer, choices=tuple(choices))


# --- named scorers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gold,text,correct", [
    ("9 (apples)", "She has 4 + 5 = 9 apples. The answer is: 9", True),
    ("9 (apples)", "The answer is 9 apples.", True),
    ("9 (apples)", "The answer is 8", False),
    ("1,000 dollars", "so 1000", True),
    ("$4.50", "The answer is $4.5.", True),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "24 + 48 = 72", True),
    ("no number here", "The answer is 3", False),
])
def test_number_scorer_reads_units_separators_and_closing_marks(gold, text, correct):
    assert A.SCORERS["number"](text, _example(gold)) is correct


@pytest.mark.parametrize("text,choices,picked", [
    ("The answer is (B) because", "ABCD", 1),
    ("B. Paris", "ABCD", 1),
    ("C", "ABCD", 2),
    ("the correct answer is answer3", ("answer1", "answer2", "answer3"), 2),
    ("answer2 or answer1", ("answer1", "answer2"), 1),  # the first one written wins
    ("I am not sure", "ABCD", None),
    ("I think it is (D), not A", "ABCD", 3),
    ("E", "ABCD", None),
])
def test_choice_reads_letters_and_option_words(text, choices, picked):
    assert A.choice_of(text, tuple(choices)) == picked


def test_exact_and_math_scorers_and_an_unknown_name():
    assert A.SCORERS["exact"]("The answer is: New  York.\nmore text", _example("new york"))
    assert not A.SCORERS["exact"]("The answer is: York", _example("new york"))
    assert A.SCORERS["math"]("so \\boxed{\\frac12}", _example("0.5"))
    assert A.scorer("tasks.language.answers.gsm8k_correct") is A.gsm8k_correct  # the built-in sets' dotted paths
    with pytest.raises(ValueError, match="unknown scorer 'numbr'; valid: number, choice, exact, math"):
        A.scorer("numbr")


# --- the generic loader ------------------------------------------------------------------------------------------


def _quiz_csv(path: Path, golds=("B", "Paris", 0)) -> Path:
    rows = [("Capital of France?", "Rome", "Paris", "Oslo", golds[0]),
            ("Capital of France, again?", "Rome", "Paris", "Oslo", golds[1]),
            ("First letter?", "a", "b", "c", golds[2])]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "A", "B", "C", "gold"])
        writer.writerows(rows)
    return path


def test_file_set_reads_csv_choices_as_letters_with_gold_as_letter_text_or_index(tmp_path):
    examples = D.file_set(str(_quiz_csv(tmp_path / "quiz.csv")), prompt="{question}\n{options}", answer="gold",
                          choices=["A", "B", "C"])
    assert [ex.answer for ex in examples] == ["B", "B", "A"]
    assert all(ex.choices == ("A", "B", "C") for ex in examples)
    assert "Capital of France?\nA. Rome\nB. Paris\nC. Oslo" in examples[0].prompt
    assert examples[0].prompt.endswith("### Response:") and examples[0].target == "The answer is: B"
    assert examples[0].source == "quiz"


def test_file_set_errors_name_the_file_and_row(tmp_path):
    path = _quiz_csv(tmp_path / "quiz.csv", golds=("B", "Madrid", 0))
    with pytest.raises(D.DataError, match=r"quiz.csv, line 3: gold answer 'Madrid' is neither a label \(A/B/C\)"):
        D.file_set(str(path), prompt="{question}", answer="gold", choices=["A", "B", "C"])
    with pytest.raises(D.DataError, match=r"quiz.csv, line 2: no field 'query'"):
        D.file_set(str(path), prompt="{query}", answer="gold")
    with pytest.raises(ValueError, match="shows the answer"):
        D.file_set(str(path), prompt="{question} {answer}", answer="gold")
    with pytest.raises(MissingAssetError, match="missing asset"):
        D.file_set(str(tmp_path / "nowhere.jsonl"), prompt="{q}", answer="a")


def _config_examples(task: str, eval_name: str) -> list[Example]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="language", overrides=[f"task={task}", "task.eval_limit=20"])
    return language_train.build(cfg.task.evals[eval_name].data)


def test_the_config_examples_read_what_the_built_in_loaders_read():
    """conf/task/openbookqa_file.yaml and math_file.yaml, YAML over the generic loader, give the built-in loaders'
    examples (bar the source name and, for MATH, a solution's trailing whitespace)."""
    by_config = _config_examples("openbookqa_file", "openbookqa")
    built_in = D.commonsense_test("openbookqa", limit=20)
    assert [(e.prompt, e.target, e.answer, e.choices) for e in by_config] == \
        [(e.prompt, e.target, e.answer, e.choices) for e in built_in]
    math_by_config = _config_examples("math_file", "math500")
    math_built_in = D.math_test("math500", limit=20)
    assert [(e.prompt, e.answer) for e in math_by_config] == [(e.prompt, e.answer) for e in math_built_in]
    for a, b in zip(math_by_config, math_built_in):
        solution = b.target.split("\nThe answer is: ")[0]
        assert a.target.startswith(solution) and a.target.endswith(f"\nThe answer is: {b.answer}")
    # the generic choice scorer agrees with the commonsense one on every option word
    for ex in by_config:
        for option in ex.choices:
            text = f"the correct answer is {option}"
            assert A.choice_correct(text, ex) == A.commonsense_correct(text, built_in[by_config.index(ex)])


# --- scoring without training ------------------------------------------------------------------------------------


def test_a_yaml_only_set_is_scored_without_training(tmp_path):
    """A user's own set: a CSV and one YAML file in their own config folder, nothing in Python. The score record's
    accuracy is the named scorer over the model's greedy answers."""
    data = tmp_path / "apples.jsonl"
    rows = [{"q": f"Tom has {n} apples and buys {n + 1} more. How many apples?", "a": f"{2 * n + 1} (apples)"}
            for n in range(1, 6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "conf" / "task").mkdir(parents=True)
    (tmp_path / "conf" / "task" / "apples.yaml").write_text(textwrap.dedent(f"""\
        name: apples
        domain: language
        eval_limit: null
        evals:
          apples:
            data: {{_target_: tasks.language.data.file_set, path: {data}, prompt: "{{q}}", answer: a}}
            metrics: [nll, accuracy]
            scorer: number
            max_new_tokens: 16
        average: false
        """))
    cfg = _compose("language_score", tmp_path / "results", "task=apples",
                   f"hydra.searchpath=[file://{tmp_path / 'conf'}]", tiny=["data.eval_batch_size=4"])
    record = score.run(cfg)
    assert record["status"] == "success" and record["run"]["init"] == "base" and record["run"]["rank"] == 0
    assert record["metrics"]["apples/n"] == 5 and math.isfinite(record["metrics"]["apples/nll"])
    assert str(data) in record["provenance"]["data"]  # the set's file, with its SHA-256
    written = list((tmp_path / "results" / "scores").glob("apples--stories260k--base--r0--s0--*.json"))
    assert len(written) == 1

    # the same accuracy from the model's greedy outputs through the number scorer, computed here
    from tasks.language import evaluate as E

    model, tokenizer = language_train.build(cfg.model.load)
    examples = D.file_set(str(data), prompt="{q}", answer="a")
    texts = E._greedy(model.eval(), tokenizer, examples, 16, 4)
    expected = 100 * sum(A.number_correct(t, ex) for t, ex in zip(texts, examples)) / len(examples)
    assert record["metrics"]["apples/accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("init", ["eva", "pissa"])  # pissa replaces base weights: its folder must carry them
def test_a_saved_adapter_scores_what_its_run_scored(tmp_path, init):
    trained = language_train.run(_compose("language", tmp_path, "task=math", f"init={init}", "lora.r=2",
                                          "optim.lr=5e-2", "save_adapter=true"))
    assert trained["status"] == "success"
    folder = next(tmp_path.glob("dev/*.adapter"))
    assert (folder / "base_layers.safetensors").exists() == (init == "pissa")
    scored = score.run(_compose("language_score", tmp_path, "task=math", f"adapter={folder}"))
    assert scored["run"]["init"] == init and scored["run"]["rank"] == 2
    assert scored["adapter"]["run"]["config_hash"] == trained["run"]["config_hash"]
    for key, value in trained["metrics"].items():
        assert scored["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_scoring_a_folder_without_an_adapter_fails_before_any_record(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved adapter at"):
        score.run(_compose("language_score", tmp_path, "task=math", f"adapter={tmp_path}"))
    assert not list(tmp_path.glob("scores/*.json"))
