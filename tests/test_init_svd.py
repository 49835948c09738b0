"""Weight-SVD inits (pissa, milora, ailora), tested by their maths on tiny Llama, Mistral, timm ViT and GPT-2 models.

The model builders and the init-then-step helper here are shared with tests/test_init_peft_methods.py.
"""

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM
from transformers.pytorch_utils import Conv1D

from eva_bench.init import INITS, Calibration, find_targets, initialize
from eva_bench.init.svd import refresh_dora_magnitude
from tests.helpers import lm_calibration, tiny_llama, token_batches

R, ALPHA = 4, 8  # s = alpha / r = 2: a scale that is not 1, so a missing s shows


# ---- tiny models of every layout the inits must handle ----


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    config = MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )
    return MistralForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """HF Conv1D layers (weight stored in x out) and a fused c_attn = Conv1D(d, 3d), dropout on in train mode."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_vit(seed: int = 0) -> nn.Module:
    """timm ViT: fused attn.qkv = Linear(d, 3d); patch_embed.proj is a Conv2d the targets must not hit."""
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2, num_classes=10
    ).eval()


def image_calibration(n: int = 3, batch: int = 4, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)
    ]
    return Calibration(batches=batches, forward=lambda m, b: m(b[0]), loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]))


IDS = token_batches(1, seed=7)[0]["input_ids"]
IMAGES = image_calibration(1, seed=7).batches[0][0]


@dataclass(frozen=True)
class Setup:
    build: Callable[[], nn.Module]
    targets: object
    calibration: Callable[[], Calibration]
    logits: Callable[[nn.Module], torch.Tensor]


def _lm_calibration() -> Calibration:
    return lm_calibration(token_batches(3))


def _lm_logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


MODELS = {
    "llama": Setup(tiny_llama, "all-linear", _lm_calibration, _lm_logits),
    "mistral": Setup(tiny_mistral, "all-linear", _lm_calibration, _lm_logits),
    "vit": Setup(tiny_vit, r".*blocks.*(qkv|proj|fc1|fc2)$", image_calibration, lambda m: m(IMAGES)),
    "gpt2": Setup(tiny_gpt2, "all-linear", _lm_calibration, _lm_logits),  # all-linear: c_attn, c_proj, c_fc (Conv1D)
}


def lora_layers(peft_model) -> dict[str, LoraLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def out_in(module: nn.Module) -> torch.Tensor:
    """A Linear/Conv1D weight as out x in (Conv1D stores it transposed)."""
    w = module.weight.detach().float()
    return w.T if isinstance(module, Conv1D) else w


def pretrained_weights(model, targets) -> dict[str, torch.Tensor]:
    return {n: out_in(m).clone() for n, m in find_targets(model, targets).items()}


def delta(layer: LoraLayer) -> torch.Tensor:
    """s B A, out x in."""
    return layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()


def residual(layer: LoraLayer) -> torch.Tensor:
    return out_in(layer.get_base_layer())


def init_then_step(setup: Setup, method: str, seed: int = 0, **kwargs):
    """Init, check nothing; take one AdamW step on a calibration batch. Returns the numbers the tests compare."""
    model = setup.build()
    calibration = setup.calibration()
    with torch.no_grad():
        before = setup.logits(model)
    torch.manual_seed(seed)
    peft_model, report = initialize(
        model, method, rank=R, alpha=ALPHA, target_modules=setup.targets, calibration=calibration, **kwargs
    )
    peft_model.eval()
    with torch.no_grad():
        at_init = setup.logits(peft_model)
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    peft_model.train()
    torch.manual_seed(seed)
    loss = calibration.loss(peft_model, calibration.batches[0])
    loss.backward()
    optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        after = setup.logits(peft_model)
    for name, p in peft_model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen parameter {name} moved"
    adapters = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return before, at_init, after, loss.detach(), adapters, report


def check_attach_step_deterministic(setup: Setup, method: str, **kwargs):
    before, at_init, after, loss, adapters, report = init_then_step(setup, method, **kwargs)
    if report.function_preserved:  # every method but lora_da without its offset
        torch.testing.assert_close(at_init, before, rtol=1e-5, atol=1e-5)  # the pretrained function at step 0
    assert report.base_weights_modified == INITS[method].modifies_base_weights and any(report.ranks.values())
    assert torch.isfinite(loss) and not torch.allclose(after, at_init)  # the step moved the model
    again = init_then_step(setup, method, **kwargs)
    torch.testing.assert_close(again[2], after, rtol=0, atol=0)  # same seed, same result
    assert again[4].keys() == adapters.keys()
    for name in adapters:
        torch.testing.assert_close(again[4][name], adapters[name], rtol=0, atol=0)


# ---- pissa / milora: W = W_res + s B A, on the right singular triplets ----


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("method, which", [("pissa", "top"), ("milora", "bottom")])
def test_reconstruction_uses_extreme_triplets(method, which, use_rslora):
    model = tiny_llama()
    original = pretrained_weights(model, "all-linear")
    peft_model, report = initialize(
        model, method, rank=R, alpha=ALPHA, target_modules="all-linear", lora={"use_rslora": use_rslora}
    )
    scale = ALPHA / math.sqrt(R) if use_rslora else ALPHA / R
    assert set(report.scalings.values()) == {scale} and report.base_weights_modified
    for name, layer in lora_layers(peft_model).items():
        w, ba, w_res = original[name], delta(layer), residual(layer)
        torch.testing.assert_close(w_res + ba, w, rtol=0, atol=1e-5, msg=name)
        sv = torch.linalg.svdvals(w)
        chosen, rest = (sv[:R], sv[R:]) if which == "top" else (sv[-R:], sv[:-R])
        torch.testing.assert_close(torch.linalg.svdvals(ba)[:R], chosen, rtol=1e-4, atol=1e-5, msg=name)
        # the residual holds exactly the other triplets (its last R singular values are ~0)
        torch.testing.assert_close(torch.linalg.svdvals(w_res)[: len(rest)], rest, rtol=1e-4, atol=1e-5, msg=name)
        # PiSSA's factor convention: B = U (S/s)^(1/2), A = (S/s)^(1/2) V^T, so B^T B = A A^T = diag(S / s)
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        torch.testing.assert_close(b.T @ b, torch.diag(chosen) / scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a @ a.T, b.T @ b, rtol=1e-4, atol=1e-5)


def test_pissa_equals_peft_pissa():
    ours = lora_layers(initialize(tiny_llama(), "pissa", rank=R, alpha=ALPHA, target_modules="all-linear")[0])
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights="pissa")
    peft = lora_layers(get_peft_model(tiny_llama(), config))
    assert ours.keys() == peft.keys()
    for name in ours:
        torch.testing.assert_close(delta(ours[name]), delta(peft[name]), rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(residual(ours[name]), residual(peft[name]), rtol=0, atol=1e-5, msg=name)


def test_milora_is_not_pissa():
    """milora's adapter is small, pissa's large (a swap of the two would still pass W = W_res + s B A)."""
    p = lora_layers(initialize(tiny_llama(), "pissa", rank=R, alpha=ALPHA, target_modules=["q_proj"])[0])
    m = lora_layers(initialize(tiny_llama(), "milora", rank=R, alpha=ALPHA, target_modules=["q_proj"])[0])
    for name in p:
        assert torch.linalg.matrix_norm(delta(m[name])) < 0.5 * torch.linalg.matrix_norm(delta(p[name]))


# ---- ailora ----


def test_ailora_query_top_value_bottom_others_standard():
    model = tiny_llama()
    original = pretrained_weights(model, "all-linear")
    peft_model, report = initialize(model, "ailora", rank=R, alpha=ALPHA, target_modules="all-linear")
    layers = lora_layers(peft_model)
    details = report.details
    assert details["top"] == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert details["bottom"] == [f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)]
    assert len(details["other"]) == 10 and details["other_init"] == "random"
    for name, layer in layers.items():
        w, ba = original[name], delta(layer)
        sv = torch.linalg.svdvals(w)
        if name in details["top"] or name in details["bottom"]:
            chosen = sv[:R] if name in details["top"] else sv[-R:]
            torch.testing.assert_close(torch.linalg.svdvals(ba)[:R], chosen, rtol=1e-4, atol=1e-5, msg=name)
            torch.testing.assert_close(residual(layer) + ba, w, rtol=0, atol=1e-5, msg=name)
        else:  # standard LoRA: B = 0, W untouched
            assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
            assert torch.equal(residual(layer), w)


@pytest.mark.parametrize("rank, r_q, r_v", [(4, 2, 2), (3, 2, 1), (1, 1, 0)])
@pytest.mark.parametrize("model_name, fused", [("gpt2", "attn.c_attn"), ("vit", "attn.qkv")])
def test_ailora_fused_blocks(model_name, fused, rank, r_q, r_v):
    setup = MODELS[model_name]
    model = setup.build()
    original = pretrained_weights(model, setup.targets)
    peft_model, report = initialize(model, "ailora", rank=rank, alpha=ALPHA, target_modules=setup.targets)
    layers = lora_layers(peft_model)
    names = [n for n in layers if n.endswith(fused)]
    assert len(names) == 2
    assert report.details["top"] == [f"{n}[q]" for n in names]
    assert report.details["bottom"] == ([f"{n}[v]" for n in names] if r_v else [])
    for name in names:
        layer, w = layers[name], original[name]
        d = w.shape[0] // 3
        ba, b = delta(layer), layer.lora_B["default"].weight.detach()
        assert report.details["fused_ranks"][name] == {"q": r_q, "v": r_v}
        torch.testing.assert_close(residual(layer) + ba, w, rtol=0, atol=1e-5)
        assert torch.equal(residual(layer)[d : 2 * d], w[d : 2 * d])  # k block untouched
        assert torch.count_nonzero(b[d : 2 * d]) == 0
        assert torch.count_nonzero(b[:d, r_q:]) == 0 and torch.count_nonzero(b[2 * d :, :r_q]) == 0
        top_q = torch.linalg.svdvals(w[:d])[:r_q]
        torch.testing.assert_close(torch.linalg.svdvals(ba[:d])[:r_q], top_q, rtol=1e-4, atol=1e-5)
        if r_v:
            bottom_v = torch.linalg.svdvals(w[2 * d :])[-r_v:]
            torch.testing.assert_close(torch.linalg.svdvals(ba[2 * d :])[:r_v], bottom_v, rtol=1e-4, atol=1e-5)
        else:
            assert torch.count_nonzero(ba[2 * d :]) == 0


def test_ailora_other_pissa_and_skip():
    model = tiny_llama()
    original = pretrained_weights(model, "all-linear")
    peft_model, report = initialize(model, "ailora", rank=R, alpha=ALPHA, target_modules="all-linear", other="pissa")
    for name in report.details["other"]:
        layer = lora_layers(peft_model)[name]
        torch.testing.assert_close(
            torch.linalg.svdvals(delta(layer))[:R], torch.linalg.svdvals(original[name])[:R], rtol=1e-4, atol=1e-5
        )
    peft_model, report = initialize(
        tiny_llama(), "ailora", rank=R, alpha=ALPHA, target_modules="all-linear", other="skip"
    )
    adapted = {n for n, r in report.ranks.items() if r}
    assert adapted == set(report.details["top"]) | set(report.details["bottom"]) and len(adapted) == 4
    assert report.trainable_parameters == 2 * R * (32 + 32) + 2 * R * (32 + 16)  # q: 32->32, v: 32->16 (GQA)


def test_ailora_names_are_configurable():
    _, report = initialize(
        tiny_llama(), "ailora", rank=R, alpha=ALPHA, target_modules="all-linear", query=r".*\.k_proj", value=["o_proj"]
    )
    assert report.details["top"] == [f"model.layers.{i}.self_attn.k_proj" for i in (0, 1)]
    assert report.details["bottom"] == [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]


def test_ailora_clear_errors():
    with pytest.raises(ValueError, match="no target layer is a query/value projection"):
        initialize(tiny_llama(), "ailora", rank=R, alpha=ALPHA, target_modules=["gate_proj", "up_proj"])
    with pytest.raises(ValueError, match="more than one"):
        initialize(tiny_llama(), "ailora", rank=R, alpha=ALPHA, target_modules="all-linear", value=["q_proj"])
    with pytest.raises(ValueError, match="other must be"):
        initialize(tiny_llama(), "ailora", rank=R, alpha=ALPHA, target_modules="all-linear", other="gaussian")

    class OddFused(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 10)

        def forward(self, x):
            return self.qkv(x)

    odd = OddFused()
    with pytest.raises(ValueError, match="not three equal q/k/v blocks"):
        initialize(odd, "ailora", rank=2, alpha=1, target_modules=["qkv"])
    assert not any(isinstance(m, LoraLayer) for m in odd.modules())  # refused before wrapping


# ---- every model layout: attaches, function preserved, one step, deterministic ----


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(INITS))
def test_every_method_attaches_steps_and_is_deterministic(method, model_name):
    """Every registered method on a tiny model of each family (Llama, Mistral, timm ViT, GPT-2 Conv1D: the layout of
    the decision transformer's GPT-2 backbone)."""
    check_attach_step_deterministic(MODELS[model_name], method)


def test_dora_magnitude_refreshed_from_final_weights():
    """refresh_dora_magnitude recomputes DoRA's magnitude from W_res + s B A, whatever it held before."""
    peft_model, _ = initialize(tiny_llama(), "milora", rank=R, alpha=ALPHA, target_modules=["q_proj"],
                               lora={"use_dora": True})
    for layer in lora_layers(peft_model).values():
        magnitude = layer.lora_magnitude_vector["default"].weight
        expected = (residual(layer) + delta(layer)).norm(dim=1)
        torch.testing.assert_close(magnitude.detach(), expected, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            magnitude.mul_(3.0)
        refresh_dora_magnitude(layer)
        torch.testing.assert_close(magnitude.detach(), expected, rtol=1e-5, atol=1e-6)
        assert magnitude.requires_grad
