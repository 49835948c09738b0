"""The shared initializer, tested by its maths: every registered method, on a tiny Llama."""

import warnings

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from eva_bench.init import INITS, Calibration, InitError, find_targets, initialize
from tests.helpers import lm_calibration, tiny_llama, token_batches


def lora_layers(peft_model):
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("method", sorted(INITS))
def test_every_method_reports_and_preserves_function(method, calibration):
    model = tiny_llama()
    ids = token_batches(1)[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    peft_model, report = initialize(model, method, rank=4, alpha=8, target_modules="all-linear", calibration=calibration)
    with torch.no_grad():
        after = peft_model(input_ids=ids).logits
    n_targets = 2 * 7  # q k v o gate up down per layer
    assert len(report.ranks) == n_targets
    assert report.method == method and report.seconds > 0
    assert report.trainable_parameters == sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0
    assert report.base_weights_modified is INITS[method].modifies_base_weights
    assert report.function_preserved is INITS[method].preserves_function
    if report.function_preserved:
        torch.testing.assert_close(after, before, rtol=0, atol=1e-4)
    else:
        assert not torch.allclose(after, before, atol=1e-4)
    if not report.base_weights_modified and report.function_preserved:
        for layer in lora_layers(peft_model).values():
            assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B = 0


def test_random_init_is_seeded_and_standard():
    torch.manual_seed(3)
    a, _ = initialize(tiny_llama(), "random", rank=4, alpha=4, target_modules=["q_proj"])
    torch.manual_seed(3)
    b, _ = initialize(tiny_llama(), "random", rank=4, alpha=4, target_modules=["q_proj"])
    wa = a.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    wb = b.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    torch.testing.assert_close(wa, wb)
    bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32: U(-1/sqrt(32), 1/sqrt(32))
    assert wa.abs().max() <= bound and wa.std() > bound / 3


def test_eva_rows_orthonormal_and_budget_conserved(calibration):
    peft_model, report = initialize(
        tiny_llama(), "eva", rank=4, alpha=1, target_modules="all-linear", calibration=calibration, tau=0.5
    )
    assert sum(report.ranks.values()) == 4 * len(report.ranks)  # budget r x N redistributed, not changed
    assert max(report.ranks.values()) <= round(4 * 2.0)  # rho = 2 bounds a layer's rank
    for name, layer in lora_layers(peft_model).items():
        a = layer.lora_A["default"].weight
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)
        assert a.shape[0] == report.ranks[name]
    assert report.calibration_batches >= 1


def test_eva_rho_one_gives_uniform_ranks(calibration):
    _, report = initialize(
        tiny_llama(), "eva", rank=3, alpha=1, target_modules="all-linear", calibration=calibration, rho=1.0, tau=0.5
    )
    assert set(report.ranks.values()) == {3}


def test_eva_scaling_adjusted_with_rank(calibration):
    _, report = initialize(tiny_llama(), "eva", rank=4, alpha=2, target_modules="all-linear", calibration=calibration)
    assert set(round(s, 6) for s in report.scalings.values()) == {0.5}  # alpha' = alpha r'/r keeps s = alpha/r
    _, report = initialize(
        tiny_llama(), "eva", rank=4, alpha=2, target_modules="all-linear", calibration=calibration,
        adjust_scaling_factors=False,
    )
    assert {round(2 / r, 6) for r in report.ranks.values() if r} == set(round(s, 6) for s in report.scalings.values())


class TwoLayer(nn.Module):
    """Inputs with a known principal structure: EVA's A must be their top principal directions."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_eva_components_are_principal_directions_of_layer_inputs():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8))[0]
    scales = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    batches = [(torch.randn(64, 8) * scales) @ basis.T + 3.0 for _ in range(8)]  # mean offset: EVA centres (PCA)
    cal = Calibration(batches=batches, forward=lambda m, x: m(x))
    peft_model, report = initialize(
        TwoLayer(), "eva", rank=2, alpha=1, target_modules=["first"], calibration=cal, rho=1.0, tau=0.999
    )
    a = peft_model.base_model.model.first.lora_A["default"].weight
    data = torch.cat(batches)
    expected = torch.linalg.svd(data - data.mean(0), full_matrices=False).Vh[:2]
    # the same subspace (projectors agree), and each direction up to sign
    torch.testing.assert_close(a.T @ a, expected.T @ expected, atol=2e-2, rtol=0)
    assert report.details["explained_variance"]["first"] > 0.9


def test_eva_not_weights():
    """EVA never decomposes W: changing W (same inputs) must not change the first layer's A."""
    torch.manual_seed(0)
    batches = [torch.randn(32, 8) for _ in range(4)]
    cal = Calibration(batches=batches, forward=lambda m, x: m(x))
    m1, m2 = TwoLayer(), TwoLayer()
    with torch.no_grad():
        m2.first.weight.mul_(-3.0)
    a1 = initialize(m1, "eva", rank=2, alpha=1, target_modules=["first"], calibration=cal, rho=1, tau=0.5)[0]
    a2 = initialize(m2, "eva", rank=2, alpha=1, target_modules=["first"], calibration=cal, rho=1, tau=0.5)[0]
    torch.testing.assert_close(
        a1.base_model.model.first.lora_A["default"].weight, a2.base_model.model.first.lora_A["default"].weight
    )


def test_eva_label_mask_uses_loss_rows():
    batches = token_batches()
    seen = []
    cal = lm_calibration(batches)
    counting = Calibration(
        batches=batches, forward=cal.forward, rows=cal.rows,
        loss_rows=lambda b: seen.append(1) or (b["labels"] != -100),
    )
    initialize(tiny_llama(), "eva", rank=2, alpha=1, target_modules="all-linear", calibration=counting, label_mask=True)
    assert seen  # label masking went through the task's loss_rows callback
    no_loss_rows = Calibration(batches=batches, forward=cal.forward, rows=cal.rows)
    with pytest.raises(ValueError, match="loss_rows"):
        initialize(tiny_llama(), "eva", rank=2, alpha=1, target_modules="all-linear", calibration=no_loss_rows,
                   label_mask=True)


def test_eva_whitening_divides_once_per_layer(calibration):
    kwargs = dict(rank=2, alpha=1, target_modules="all-linear", calibration=calibration, rho=1.0, tau=0.5)
    plain = lora_layers(initialize(tiny_llama(), "eva", **kwargs)[0])
    white = lora_layers(initialize(tiny_llama(), "eva", whiten=True, **kwargs)[0])
    # q, k, v share one input: their whitened components must be identical (PEFT 0.21 divides the group repeatedly)
    q, k, v = (white[f"model.layers.0.self_attn.{p}_proj"].lora_A["default"].weight for p in "qkv")
    torch.testing.assert_close(q, k)
    torch.testing.assert_close(q, v)
    # whitening rescales rows only: same directions as the plain components
    qp = plain["model.layers.0.self_attn.q_proj"].lora_A["default"].weight
    torch.testing.assert_close(q / q.norm(dim=1, keepdim=True), qp, atol=1e-5, rtol=0)


def test_eva_cap_ends_unconverged_loop_with_named_warning(calibration):
    with pytest.warns(UserWarning, match=r"had not converged.*model\.layers\.\d\.") as caught:
        _, report = initialize(
            tiny_llama(), "eva", rank=4, alpha=1, target_modules="all-linear", calibration=calibration, tau=1.0,
            max_batches=3,
        )
    assert report.calibration_batches == 3
    assert report.details["unconverged_layers"]
    assert any("3 calibration batches" in str(w.message) for w in caught)


def test_same_calibration_batches_used_by_eva(calibration):
    _, r1 = initialize(tiny_llama(), "eva", rank=2, alpha=1, target_modules="all-linear", calibration=calibration)
    p1 = initialize(tiny_llama(), "eva", rank=2, alpha=1, target_modules="all-linear", calibration=calibration)[0]
    p2 = initialize(tiny_llama(), "eva", rank=2, alpha=1, target_modules="all-linear", calibration=calibration)[0]
    for (n, a), (_, b) in zip(lora_layers(p1).items(), lora_layers(p2).items()):
        torch.testing.assert_close(a.lora_A["default"].weight, b.lora_A["default"].weight, msg=n)


# ---- bad input: clear errors before any work ----

def test_unknown_method_lists_valid_ones():
    with pytest.raises(InitError, match="valid: .*eva.*random"):
        initialize(tiny_llama(), "evaa", rank=2, alpha=1, target_modules="all-linear")


def test_rank_too_large():
    with pytest.raises(InitError, match=r"rank 33 exceeds .* min\(in, out\) = 32"):
        initialize(tiny_llama(), "random", rank=33, alpha=1, target_modules=["q_proj"])


def test_eva_components_must_fit_layer_input(calibration):
    with pytest.raises(ValueError, match="input features"):
        initialize(tiny_llama(), "eva", rank=20, alpha=1, target_modules=["q_proj"], calibration=calibration, rho=2)


def test_targets_matching_nothing():
    with pytest.raises(InitError, match="match no module"):
        initialize(tiny_llama(), "random", rank=2, alpha=1, target_modules=["qkv"])


def test_targets_matching_a_conv_are_rejected():
    class PatchEmbedViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.proj = nn.Conv2d(3, 8, 4, 4)
            self.attn = nn.Module()
            self.attn.proj = nn.Linear(8, 8)

    with pytest.raises(InitError, match=r"patch_embed\.proj \(Conv2d\)"):
        find_targets(PatchEmbedViT(), ["proj"])
    assert list(find_targets(PatchEmbedViT(), r".*attn\.proj")) == ["attn.proj"]


def test_unknown_parameter_and_missing_calibration():
    with pytest.raises(InitError, match="no parameter"):
        initialize(tiny_llama(), "eva", rank=2, alpha=1, target_modules="all-linear", rhoo=2)
    with pytest.raises(InitError, match="needs calibration"):
        initialize(tiny_llama(), "eva", rank=2, alpha=1, target_modules="all-linear")


def test_all_linear_excludes_lm_head():
    names = find_targets(tiny_llama(), "all-linear")
    assert "lm_head" not in names and len(names) == 14


def test_calibration_needs_batches():
    with pytest.raises(ValueError, match="at least one batch"):
        Calibration(batches=[], forward=lambda m, b: None)


def test_no_warning_when_converged(calibration):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        initialize(tiny_llama(), "eva", rank=2, alpha=1, target_modules="all-linear", calibration=calibration, tau=0.01)
