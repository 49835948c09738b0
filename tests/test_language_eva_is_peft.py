"""The language recipe's EVA is PEFT's EVA: the real stories260K with the recipe's own calibration batches (a recipe
test, so the library's tests in test_init_eva.py import no task recipe)."""

from types import SimpleNamespace

from eva_bench.init import Calibration
from tasks.language import data as language_data
from tasks.language.models import stories260k
from tasks.language.train import calibration_batches
from tests.test_init_eva import assert_same_result, both


def test_same_result_as_peft_on_stories260k_with_the_recipe_calibration():
    """The real pretrained model and the language recipe's calibration (16 batches of 16 GSM8K training examples,
    rows = non-padding tokens), all-linear, r = 8: the CPU default's EVA is PEFT's EVA."""
    model, tokenizer = stories260k()
    model.config.use_cache = False
    features = language_data.tokenize(language_data.math_train(source="gsm8k", limit=300, seed=0), tokenizer, 384)
    batches = calibration_batches(features, SimpleNamespace(batches=16, batch_size=16), tokenizer.pad_token_id, 0)
    calibration = Calibration(
        batches=batches,
        forward=lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
        rows=lambda b: b["attention_mask"],
    )
    fast, reference = both(model.eval(), calibration, "all-linear", 8)
    assert_same_result(fast, reference)
    assert len(set(fast[1].ranks.values())) > 1
