"""Tests for tasks/language/data.py and tasks/language/evaluate.py on the real staged files.

The model-facing tests use a byte-level BPE tokenizer trained in memory on a few hundred real prompts and a tiny
randomly initialised Llama, so nothing is downloaded and the whole file runs in seconds.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from eva_bench.assets import OfflineHubError, asset
from tasks.language import answers as A
from tasks.language import data as D
from tasks.language import evaluate as E

# ------------------------------------------------------------------------------------------------------- loaders


def _jsonl(relpath):
    with open(asset(relpath), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_row_counts_match_sources_md():
    assert len(D.math_train("gsm8k")) == 7473
    assert len(D.gsm8k_test()) == 1319
    assert len(D.math_test("full")) == 5000
    assert len(D.math_test("math500")) == 500
    assert len(D.COMMONSENSE_TASKS) == 7
    for task in D.COMMONSENSE_TASKS:
        assert len(D.commonsense_test(task)) >= 500
    by_source = {}
    for ex in D.commonsense_train():
        by_source[ex.source] = by_source.get(ex.source, 0) + 1
    assert by_source == {
        "commonsense/boolq": 9427,
        "commonsense/ARC-Easy": 2251,
        "commonsense/ARC-Challenge": 1119,
        "commonsense/openbookqa": 4957,
    }


def test_no_gsm8k_test_question_in_math_training():
    test_questions = {row["question"].strip() for row in _jsonl("gsm8k/test.jsonl")}
    for ex in D.math_train("gsm8k"):
        question = ex.prompt.split("### Instruction:\n", 1)[1].rsplit("\n\n### Response:", 1)[0]
        assert question.strip() not in test_questions


def test_templates():
    row = _jsonl("gsm8k/test.jsonl")[0]
    ex = D.gsm8k_test()[0]
    assert ex.prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{row['question']}\n\n### Response:"
    )
    # Calculator annotations removed, "#### 18" rewritten the MetaMathQA way.
    assert ex.target == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer\u2019s market.\n"
        "The answer is: 18"
    )
    assert ex.answer == "18" and ex.source == "gsm8k"
    for ex in D.math_train(limit=50):
        assert "<<" not in ex.target and "####" not in ex.target and ex.target.endswith(f"The answer is: {ex.answer}")

    m = D.math_test("math500")[0]
    assert m.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert m.target.endswith("\nThe answer is: " + m.answer)

    cs = D.commonsense_test("ARC-Challenge")[0]
    assert cs.prompt.startswith("Below is an instruction") and cs.prompt.endswith("### Response:")
    assert cs.target == "the correct answer is answer3" and cs.answer == "answer3"
    assert cs.choices == ("answer1", "answer2", "answer3", "answer4")
    assert D.commonsense_test("boolq")[0].choices == ("true", "false")
    assert D.commonsense_test("piqa")[0].choices == ("solution1", "solution2")
    assert D.commonsense_test("winogrande")[0].choices == ("option1", "option2")
    # ARC has a few 3- and 5-option questions; choices are read per row.
    assert {len(ex.choices) for ex in D.commonsense_test("ARC-Easy")} == {3, 4, 5}
    # The with-input variant of the Alpaca template (commonsense_170k rows may carry an input).
    assert "### Input:\nctx\n\n### Response:" in D.render_prompt("q", "ctx")


def test_limit_is_a_seeded_subset():
    a, b, c = D.gsm8k_test(limit=20), D.gsm8k_test(limit=20), D.gsm8k_test(limit=20, seed=1)
    assert len(a) == 20 and a == b and a != c
    full = D.gsm8k_test()
    assert all(ex in full for ex in a) and a != full[:20]
    assert len(D.commonsense_train(limit=100, seed=3)) == 100


def test_unknown_names_and_offline_hub(monkeypatch):
    with pytest.raises(ValueError, match="boolq"):
        D.commonsense_test("nope")
    with pytest.raises(ValueError, match="HellaSwag"):
        D.commonsense_test("hellaswag")
    with pytest.raises(ValueError, match="openbookqa"):
        D.commonsense_train(tasks=("piqa",))  # no staged train split
    with pytest.raises(ValueError):
        D.math_train("nope")
    with pytest.raises(ValueError):
        D.math_test("nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineHubError, match="MetaMathQA"):
        D.math_train("metamathqa")
    with pytest.raises(OfflineHubError, match="commonsense_170k"):
        D.commonsense_train(source="commonsense_170k")


# -------------------------------------------------------------------------------------------- answer extraction


def test_gsm8k_gold_and_extraction_on_real_rows():
    rows = _jsonl("gsm8k/test.jsonl")[:200]
    for row, ex in zip(rows, D.gsm8k_test()[:200]):
        gold = A.gsm8k_gold(row["answer"])
        assert gold == ex.answer.replace(",", "")
        assert A.extract_number(D.gsm8k_to_metamath(row["answer"])) == gold
        # Without the closing phrase, the last number of the original solution is the answer too.
        assert A.extract_number(row["answer"]) == gold
    # Commas and negatives in real gold fields.
    train = _jsonl("gsm8k/train.jsonl")
    assert any("," in r["answer"].split("####")[1] for r in train)
    for r in train:
        assert A.extract_number(D.gsm8k_to_metamath(r["answer"])) == A.gsm8k_gold(r["answer"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So she makes $1,234. The answer is: 1,234.", "1234"),
        ("The total is $5.50.", "5.5"),
        ("The answer is -3", "-3"),
        ("16-3-4=9 eggs", "9"),
        ("The answer is: 18\n\nThen 20 more questions", "18"),
        ("the answer is 0.50.", "0.5"),
        ("She pays 18.00 dollars", "18"),
        ("no digits here", None),
    ],
)
def test_extract_number(text, expected):
    assert A.extract_number(text) == expected


def test_math_gold_on_real_rows():
    full = _jsonl("math/test.jsonl")
    assert A.math_gold(full[0]) == "2"
    assert A.math_gold(full[2]) == "\\dfrac{9}{7}"
    assert A.math_gold(full[6]) == "x \\in [-2,7]"  # nested brackets inside the box
    for row in full[:300]:
        assert A.math_gold(row)
    # MATH-500: the given answer agrees with the solution's last box, for every row.
    m500 = _jsonl("math/math500.jsonl")
    assert A.math_gold(m500[0]) == m500[0]["answer"]
    assert all(A.math_equal(A.last_boxed(r["solution"]), r["answer"]) for r in m500)
    # And extraction from the full reference solution recovers it.
    for ex in D.math_test("math500")[:50]:
        assert A.math_correct(ex.target, ex)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\sqrt{\\frac{2}{3}}}", "\\sqrt{\\frac{2}{3}}"),
        ("hence \\boxed 5$.", "5"),
        ("The answer is: 42.", "42"),
        ("The answer is: \\frac{3}{4}\nmore text", "\\frac{3}{4}"),
        ("cut off \\boxed{3", None),
        ("nothing", None),
    ],
)
def test_extract_math_answer(text, expected):
    assert A.extract_math_answer(text) == expected


@pytest.mark.parametrize(
    "pred, gold, equal",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{9}{7}", "\\frac97", True),
        ("90^\\circ", "90", True),
        ("5\\text{ cm}", "5", True),
        ("\\$18.00", "18", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
        ("x = 4", "4", True),
        ("1,000", "1000", True),
        ("\\text{(C)}", "(C)", True),
        ("3/4", "\\frac{3}{4}", True),
        ("10\\%", "10", True),
        ("-\\frac{1}{2}", "-0.5", True),
        (".5", "\\frac{1}{2}", True),
        ("2", "3", False),
        ("\\frac{1}{3}", "0.33", False),
        ("(1,2)", "(2,1)", False),
        (None, "3", False),
    ],
)
def test_math_equal(pred, gold, equal):
    assert A.math_equal(pred, gold) is equal


def test_commonsense_extraction():
    assert A.extract_commonsense_answer("boolq", "the correct answer is true") == "true"
    assert A.extract_commonsense_answer("boolq", "The correct answer is False.") == "false"
    assert A.extract_commonsense_answer("ARC-Easy", "answer2 or maybe answer3") == "answer2"
    assert A.extract_commonsense_answer("winogrande", "the correct answer is option1") == "option1"
    assert A.extract_commonsense_answer("piqa", "I do not know") == ""
    with pytest.raises(ValueError):
        A.extract_commonsense_answer("nope", "true")
    # Every real test target is read back as its answer.
    for task in D.COMMONSENSE_TASKS:
        examples = D.commonsense_test(task)
        assert all(A.commonsense_correct(ex.target, ex) for ex in examples)
        assert not A.commonsense_correct("the correct answer is", examples[0])


# --------------------------------------------------------------------------------------- tokenization and models


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer (bos added in front, like Llama's) trained in memory on real prompts/targets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [ex.prompt + " " + ex.target for ex in D.gsm8k_test(limit=100) + D.commonsense_test("ARC-Easy", limit=100)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,  # peaked logits: greedy choices are far from ties, so batched == unbatched
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def test_tokenize_masks_the_prompt(tokenizer):
    examples = D.gsm8k_test(limit=4) + D.commonsense_test("boolq", limit=4)
    features = D.tokenize(examples, tokenizer, max_length=4096)
    assert len(features) == len(examples)
    for ex, f in zip(examples, features):
        p = tokenizer(ex.prompt)["input_ids"]
        assert p[0] == tokenizer.bos_token_id
        assert f["input_ids"][: len(p)] == p
        assert f["labels"][: len(p)] == [-100] * len(p)
        target = f["input_ids"][len(p):]
        assert f["labels"][len(p):] == target and -100 not in target
        assert target[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(target[:-1]) == ex.target


def test_tokenize_truncates_and_drops(tokenizer, caplog):
    ex = D.gsm8k_test()[0]
    n_prompt = len(D.prompt_ids(tokenizer, ex.prompt))
    (f,) = D.tokenize([ex], tokenizer, max_length=n_prompt + 2)
    assert len(f["input_ids"]) == n_prompt + 2 and sum(label != -100 for label in f["labels"]) == 2
    with caplog.at_level(logging.WARNING):
        assert D.tokenize([ex, ex], tokenizer, max_length=n_prompt) == []
    assert "dropped 2 of 2" in caplog.text


def test_collate_right_pads():
    batch = D.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


def test_stories260k_tokenizer_boundary():
    """With the real SentencePiece-style tokenizer, the target starts a new word after "### Response:"."""
    models = pytest.importorskip("tasks.language.models")
    tok = models.load_llama2c_tokenizer(asset("models/stories260K/tok512.bin"))
    ex = D.commonsense_test("boolq")[0]
    (f,) = D.tokenize([ex], tok, max_length=512)
    assert f["input_ids"][0] == tok.bos_token_id and f["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(f["input_ids"], skip_special_tokens=True) == ex.prompt + " " + ex.target


def test_answer_nll_matches_hand_computation(model, tokenizer):
    examples = D.gsm8k_test(limit=3)
    result = E.answer_nll(model, tokenizer, examples, max_length=1024, batch_size=2)
    assert result["n"] == 3 and result["nll"] > 0

    total, count = 0.0, 0
    for ex in examples:
        p, t = D.prompt_ids(tokenizer, ex.prompt), D.target_ids(tokenizer, ex.target)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0].double(), dim=-1)
        for k, token in enumerate(t):
            total -= logp[len(p) + k - 1, token].item()  # position len(p)+k-1 predicts target token k
            count += 1
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    # Padding must not change anything: one at a time gives the same answer.
    assert E.answer_nll(model, tokenizer, examples, max_length=1024, batch_size=1)["nll"] == pytest.approx(
        result["nll"], rel=1e-5
    )


def test_generation_accuracy(model, tokenizer):
    examples = D.gsm8k_test(limit=3) + D.commonsense_test("boolq", limit=2)
    side = tokenizer.padding_side
    batched = E.generation_accuracy(
        model, tokenizer, examples, lambda text, ex: True, max_new_tokens=6, keep_outputs=True
    )
    assert batched["accuracy"] == 1.0 and batched["n"] == 5 and tokenizer.padding_side == side
    # Left padding is right: each prompt alone generates the same text as in the batch.
    single = E.generation_accuracy(
        model, tokenizer, examples, lambda t, e: False, max_new_tokens=6, batch_size=1, keep_outputs=True
    )
    assert single["accuracy"] == 0.0 and single["outputs"] == batched["outputs"]
    assert all(isinstance(text, str) for text in batched["outputs"])
    real = E.generation_accuracy(model, tokenizer, examples[:3], A.gsm8k_correct, max_new_tokens=6)
    assert 0.0 <= real["accuracy"] <= 1.0


def test_choice_accuracy(model, tokenizer):
    examples = D.commonsense_test("ARC-Easy", limit=6)
    result = E.choice_accuracy(model, tokenizer, examples, batch_size=4)
    assert result["n"] == 6 and 0.0 <= result["accuracy"] <= 1.0

    # Hand version: the argmax over each choice's summed target log-likelihood.
    correct = 0
    for ex in examples:
        scores = []
        for choice in ex.choices:
            p = D.prompt_ids(tokenizer, ex.prompt)
            t = D.target_ids(tokenizer, E.choice_target(ex, choice))
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0], dim=-1)
            scores.append(sum(logp[len(p) + k - 1, tok].item() for k, tok in enumerate(t)))
        correct += ex.choices[max(range(len(scores)), key=scores.__getitem__)] == ex.answer
    assert result["accuracy"] == pytest.approx(correct / len(examples))
    with pytest.raises(ValueError):
        E.choice_accuracy(model, tokenizer, D.gsm8k_test(limit=1))


def test_works_with_a_peft_model(model, tokenizer):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    wrapped.train()
    try:
        examples = D.commonsense_test("boolq", limit=3)
        assert math.isfinite(E.answer_nll(wrapped, tokenizer, examples)["nll"])
        assert E.choice_accuracy(wrapped, tokenizer, examples)["n"] == 3
        assert E.generation_accuracy(wrapped, tokenizer, examples, A.commonsense_correct, max_new_tokens=4)["n"] == 3
        assert wrapped.training  # the evaluation restored training mode
    finally:
        wrapped.unload()  # give the shared fixture model back without LoRA layers
