"""OLoRA, CorDA and LoRA-GA (through PEFT), and DoRA composed with every registered init."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from eva_bench.init import INITS, Calibration, find_targets, initialize
from tests.helpers import lm_calibration, tiny_llama, token_batches
from tests.test_init_svd import (
    ALPHA,
    IDS,
    MODELS,
    R,
    delta,
    lora_layers,
    out_in,
    pretrained_weights,
    residual,
    tiny_gpt2,
)

# ---- olora ----


@pytest.mark.parametrize("build, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, "all-linear")])
def test_olora_is_truncated_qr(build, targets):
    """B = Q_r (orthonormal columns), A = R_r of W = QR, W_res = W - s B A; on Linear and on HF Conv1D (GPT-2)."""
    model = build()
    original = pretrained_weights(model, targets)
    peft_model, report = initialize(model, "olora", rank=R, alpha=ALPHA, target_modules=targets)
    for name, layer in lora_layers(peft_model).items():
        w = original[name]
        q, r = torch.linalg.qr(w)
        b = layer.lora_B["default"].weight.detach()
        torch.testing.assert_close(b.T @ b, torch.eye(R), rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(delta(layer), (ALPHA / R) * q[:, :R] @ r[:R], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(residual(layer) + delta(layer), w, rtol=0, atol=1e-5, msg=name)


def test_olora_matches_peft_on_linear():
    ours = lora_layers(initialize(tiny_llama(), "olora", rank=R, alpha=ALPHA, target_modules="all-linear")[0])
    peft = lora_layers(get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                                 init_lora_weights="olora")))
    for name in ours:
        torch.testing.assert_close(delta(ours[name]), delta(peft[name]), rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(residual(ours[name]), residual(peft[name]), rtol=0, atol=1e-6, msg=name)


# ---- corda ----


def masked_covariances(model, targets, calibration: Calibration) -> dict[str, torch.Tensor]:
    """Independent of the implementation: mean over batches of x^T x over the non-padding rows, x max-normalised."""
    sums, handles = {}, []
    for name, module in find_targets(model, targets).items():
        def hook(module, inputs, output, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[keep].float()
            x = x / x.abs().max()
            sums[name] = sums.get(name, 0) + x.T @ x
        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in calibration.batches:
            keep = batch["attention_mask"].reshape(-1).bool()
            calibration.forward(model, batch)
    for h in handles:
        h.remove()
    return {n: s / len(calibration.batches) for n, s in sums.items()}


@pytest.mark.parametrize("corda_method, which", [("ipm", "top"), ("kpm", "bottom")])
def test_corda_decomposes_w_times_masked_input_covariance(corda_method, which, calibration):
    """s B A = (top or bottom r of W C) C^-1, with C the damped covariance of the layer's non-padding inputs."""
    model = tiny_llama()
    original = pretrained_weights(model, "all-linear")
    covariances = masked_covariances(model, "all-linear", calibration)
    peft_model, report = initialize(model, "corda", rank=R, alpha=ALPHA, target_modules="all-linear",
                                    calibration=calibration, corda_method=corda_method)
    assert report.calibration_batches == len(calibration.batches)
    for name, layer in lora_layers(peft_model).items():
        w, c = original[name], covariances[name]
        c = c + 0.01 * c.diagonal().mean() * torch.eye(len(c))  # PEFT's damping (first try suffices here)
        sv = torch.linalg.svdvals(w @ c)
        expected = sv[:R] if which == "top" else sv[-R:]
        got = torch.linalg.svdvals(delta(layer) @ c)[:R]
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5, msg=name)
        torch.testing.assert_close(residual(layer) + delta(layer), w, rtol=0, atol=1e-5, msg=name)


def test_corda_ignores_padding_rows():
    """Changing only padded tokens must not change CorDA's adapters (the task's `rows` mask reaches the hooks)."""
    batches = token_batches()
    altered = [dict(b) for b in batches]
    for b in altered:
        ids = b["input_ids"].clone()
        ids[b["attention_mask"] == 0] = 3  # right padding: no real token attends to these positions
        b["input_ids"] = ids
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(altered, batches))
    kwargs = dict(rank=R, alpha=ALPHA, target_modules="all-linear")
    one = lora_layers(initialize(tiny_llama(), "corda", calibration=lm_calibration(batches), **kwargs)[0])
    two = lora_layers(initialize(tiny_llama(), "corda", calibration=lm_calibration(altered), **kwargs)[0])
    for name in one:
        torch.testing.assert_close(delta(one[name]), delta(two[name]), rtol=1e-4, atol=1e-5, msg=name)


def test_corda_bad_method(calibration):
    with pytest.raises(ValueError, match="corda_method must be"):
        initialize(tiny_llama(), "corda", rank=R, alpha=ALPHA, target_modules="all-linear", calibration=calibration,
                   corda_method="svd")


# ---- lora_ga ----


def mean_gradient(model, module_name: str, calibration: Calibration) -> torch.Tensor:
    weight = model.get_submodule(module_name).weight
    grads = []
    for batch in calibration.batches:
        grads.append(torch.autograd.grad(calibration.loss(model, batch), weight)[0])
    return torch.stack(grads).mean(0)


def test_lora_ga_from_mean_gradient(calibration):
    """ArB2r: A spans the top-r right singular vectors of the mean gradient, B the next r left ones (scaled)."""
    rank, name = 8, "model.layers.1.self_attn.q_proj"  # 2r .. 4r cover all of q_proj's 32: PEFT's SVD is exact
    g = mean_gradient(tiny_llama(), name, calibration)
    u, s, vh = torch.linalg.svd(g)
    model = tiny_llama()
    w = out_in(model.get_submodule(name)).clone()
    peft_model, report = initialize(model, "lora_ga", rank=rank, alpha=ALPHA, target_modules=[name],
                                    calibration=calibration)
    layer = lora_layers(peft_model)[name]
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    v_r = vh[:rank]
    torch.testing.assert_close(a.T @ a, v_r.T @ v_r, rtol=0, atol=1e-4)
    stable = 32**0.25 / 16**0.5  # "stable" scaling: out^(1/4) / sqrt(gamma), gamma = 16
    b_expected = u[:, rank : 2 * rank] * s[rank : 2 * rank] * stable
    torch.testing.assert_close(b @ b.T, b_expected @ b_expected.T, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(residual(layer) + delta(layer), w, rtol=0, atol=1e-5)
    assert report.calibration_batches == len(calibration.batches)
    assert all(p.grad is None for p in peft_model.parameters())  # gradient estimation left nothing behind
    assert not layer.get_base_layer().weight.requires_grad


def test_lora_ga_rank_needs_2r(calibration):
    with pytest.raises(ValueError, match="2r = 34"):
        initialize(tiny_llama(), "lora_ga", rank=17, alpha=1, target_modules=["q_proj"], calibration=calibration)


@pytest.mark.parametrize("method", ["corda", "lora_ga"])
def test_max_batches_caps_the_callbacks(method):
    base = lm_calibration(token_batches())
    calls = []
    counting = Calibration(
        batches=base.batches, rows=base.rows,
        forward=lambda m, b: calls.append("forward") or base.forward(m, b),
        loss=lambda m, b: calls.append("loss") or base.loss(m, b),
    )
    _, report = initialize(tiny_llama(), method, rank=R, alpha=ALPHA, target_modules="all-linear",
                           calibration=counting, max_batches=2)
    assert report.calibration_batches == 2 and len(calls) == 2
    assert set(calls) == {"forward" if method == "corda" else "loss"}


# every model layout x every method: tests/test_init_svd.py::test_every_method_attaches_steps_and_is_deterministic


# ---- DoRA with every init ----

PRESERVES = {"random", "gaussian", "eva", "pissa", "milora", "ailora", "olora", "corda", "lora_ga"}
# method -> the error expected with use_dora=True. PEFT 0.21.2 refuses none of these inits with DoRA; lora_da refuses
# by design (its init defines A and B only, not DoRA's magnitude).
INVALID_WITH_DORA = {"lora_da": "DoRA"}


def check_dora_magnitude(peft_model):
    """DoRA at step 0: magnitude = row norms of the *final* W + s B A, so DoRA's rescaling is exactly 1."""
    for name, layer in lora_layers(peft_model).items():
        dora = layer.lora_magnitude_vector["default"]
        combined = residual(layer) + delta(layer)
        torch.testing.assert_close(dora.weight.detach(), combined.norm(dim=1), rtol=1e-5, atol=1e-6, msg=name)
        assert dora.weight.requires_grad


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("method", sorted(INITS))
def test_every_init_with_and_without_dora(method, use_dora, calibration):
    model = tiny_llama()
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    kwargs = dict(
        rank=R, alpha=ALPHA, target_modules="all-linear", calibration=calibration, lora={"use_dora": use_dora}
    )
    if use_dora and method in INVALID_WITH_DORA:
        with pytest.raises(ValueError, match=INVALID_WITH_DORA[method]):
            initialize(model, method, **kwargs)
        return
    peft_model, report = initialize(model, method, **kwargs)
    peft_model.eval()
    assert any(report.ranks.values())
    if use_dora:
        check_dora_magnitude(peft_model)
    else:
        assert not any(layer.lora_magnitude_vector for layer in lora_layers(peft_model).values())
    if method in PRESERVES:
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=IDS).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["gpt2", "vit"])
@pytest.mark.parametrize("method", ["pissa", "milora", "ailora", "olora", "corda", "lora_ga"])
def test_dora_on_conv1d_and_fused_layouts(method, model_name):
    setup = MODELS[model_name]
    model = setup.build()
    with torch.no_grad():
        before = setup.logits(model)
    peft_model, _ = initialize(model, method, rank=R, alpha=ALPHA, target_modules=setup.targets,
                               calibration=setup.calibration(), lora={"use_dora": True})
    peft_model.eval()
    check_dora_magnitude(peft_model)
    with torch.no_grad():
        torch.testing.assert_close(setup.logits(peft_model), before, rtol=1e-5, atol=1e-5)
