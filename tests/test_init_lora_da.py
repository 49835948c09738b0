"""LoRA-DA (Zhang et al., arXiv 2510.24561), tested against problems with known answers and on tiny LMs."""

import copy
import math

import warnings

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from eva_bench.init import Calibration, InitError, initialize
from eva_bench.init import lora_da as lora_da_module
from tests.helpers import lm_calibration, tiny_llama, token_batches

IN, OUT = 16, 8


def lora_layers(peft_model):
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def factors(layer):
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


def cosines(a_rows: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of two matrices (all 1: the same subspace)."""
    qa = torch.linalg.qr(a_rows.T.double())[0]
    qb = torch.linalg.qr(b_rows.T.double())[0]
    return torch.linalg.svdvals(qa.T @ qb)


class Single(nn.Module):
    """One linear map, as nn.Linear (W: out x in) or HF Conv1D (stored in x out)."""

    def __init__(self, kind: str):
        super().__init__()
        self.layer = nn.Linear(IN, OUT) if kind == "linear" else Conv1D(OUT, IN)
        if kind == "conv1d":
            nn.init.normal_(self.layer.weight, std=0.3)

    def forward(self, x):
        return self.layer(x)


def inputs_with_covariance(cov: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n rows whose second moment X^T X / n is exactly ``cov``: sqrt(n) * orthonormal columns * cov^(1/2)."""
    q = torch.linalg.qr(torch.randn(n, cov.shape[0], generator=g))[0]
    evals, evecs = torch.linalg.eigh(cov)
    return math.sqrt(n) * q @ (evecs * evals.sqrt()) @ evecs.T


def regression(model: Single, update: torch.Tensor, cov: torch.Tensor, batches=8, batch=64, seed=0) -> Calibration:
    """MSE toward the outputs of W* = W + update: the loss's minimiser is known, its gradient is -c update cov."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        x = inputs_with_covariance(cov, batch, g)
        with torch.no_grad():
            data.append((x, model(x) + x @ update.T))
    return Calibration(batches=data, forward=lambda m, b: m(b[0]), loss=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())


def anisotropic(seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(IN, IN, generator=g))[0]
    return rot @ torch.diag(torch.logspace(1, -1, IN)) @ rot.T  # eigenvalues 10 ... 0.1, all distinct


def low_rank_update(seed=2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(OUT, 2, generator=g) @ torch.randn(2, IN, generator=g) * 0.5  # U V^T, rank 2


def mean_gradient(model: Single, cal: Calibration, batches) -> torch.Tensor:
    """dL/dW (out x in), averaged over the given batches: computed here independently of lora_da."""
    grads = []
    for b in batches:
        model.zero_grad()
        cal.loss(model, b).backward()
        grads.append(model.layer.weight.grad.T if isinstance(model.layer, Conv1D) else model.layer.weight.grad)
    model.zero_grad()
    return torch.stack(grads).mean(0)


# ---- known answers ----

@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_recovers_row_space_of_true_update(kind):
    """Inputs anisotropic, target W* = W + U V^T: the natural gradient Z^-1 G^T undoes the input covariance, so A
    spans row(U V^T) = span(V) exactly, where the plain gradient's subspace (LoRA-GA) is tilted by the covariance."""
    torch.manual_seed(0)
    model, update, cov = Single(kind), low_rank_update(), anisotropic()
    cal = regression(model, update, cov)
    peft_model, report = initialize(
        model, "lora_da", rank=2, alpha=2, target_modules=["layer"], calibration=cal, n_train=10**9  # no variance
    )
    a, b = factors(lora_layers(peft_model)["layer"])
    assert a.shape == (2, IN) and b.shape == (OUT, 2)
    assert cosines(a, update).min() >= 0.99
    # the test can tell: the raw gradient's top right-singular subspace is a different one
    g_rows = -update @ cov  # the exact mean gradient, up to a positive factor, for these inputs
    assert cosines(torch.linalg.svd(g_rows).Vh[:2], update).min() < 0.95
    # s B A points from W towards W* (a descent step), and A's rows are orthonormal / sqrt(gamma)
    assert torch.sum((b @ a) * update) > 0
    torch.testing.assert_close(a @ a.T * 1024, torch.eye(2), atol=1e-5, rtol=0)
    assert report.details["gradient_examples"] == 256 and report.details["fisher_examples"] == 256
    assert report.details["fisher_reused_batches"] == 0 and report.calibration_batches == 8


def test_identity_factors_and_no_variance_give_the_gradient_svd_subspace():
    """Whitened inputs (Z = I) and errors with equal row norms (Y = c I), beta = 0: Delta is -G^T / c, so A is the
    top-r right-singular subspace of the mean gradient (LoRA-GA / LoRA-One)."""
    torch.manual_seed(0)
    model = Single("linear")
    # error = H diag(s) R^T with H a normalised Hadamard matrix: every row has the same norm (so Y = c I) while the
    # singular values s are distinct and well separated
    h = torch.tensor([[1.0]])
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    r = torch.linalg.qr(torch.randn(IN, OUT, generator=torch.Generator().manual_seed(3)))[0]
    error = (h / math.sqrt(OUT)) @ torch.diag(torch.tensor([2.0, 1.5, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1])) @ r.T
    cal = regression(model, error, torch.eye(IN))
    reference = copy.deepcopy(model)
    peft_model, _ = initialize(model, "lora_da", rank=2, alpha=2, target_modules=["layer"], calibration=cal, beta=0.0)
    a, b = factors(lora_layers(peft_model)["layer"])
    grad = mean_gradient(reference, cal, cal.batches[:4])  # the batches lora_da used for G (n_g = 256)
    u, s, vh = torch.linalg.svd(grad)
    assert s[1] > 2 * s[2]  # a well-separated subspace, so the comparison means something
    assert cosines(a, vh[:2]).min() >= 0.999
    # and B A is the rank-2 truncation of the descent direction -G, normalised and scaled by 1/gamma
    truncated = -(u[:, :2] * s[:2]) @ vh[:2] / s[0]
    torch.testing.assert_close(b @ a * 1024, truncated, atol=1e-3, rtol=0)


def test_guidance_matrix_matches_the_formula():
    """Omega = -Delta Delta^T + beta tr(Y^-1)/N / sigma_max^2 Z^-1 with both terms active, against factors computed
    here from the data (G by autograd; Z, Y from the Fisher batches' inputs and residuals)."""
    torch.manual_seed(0)
    model, update, cov = Single("linear"), low_rank_update(), anisotropic()
    cal = regression(model, update, cov)
    reference = copy.deepcopy(model)
    n_train, beta, damping = 3, 0.03, 1e-6  # a small N, so that the variance term moves A visibly
    peft_model, _ = initialize(
        model, "lora_da", rank=2, alpha=2, target_modules=["layer"], calibration=cal, n_train=n_train, beta=beta
    )
    a, b = factors(lora_layers(peft_model)["layer"])

    grad = mean_gradient(reference, cal, cal.batches[:4]).double()
    x = torch.cat([x for x, _ in cal.batches[4:]]).double()
    with torch.no_grad():
        residual = torch.cat([reference(x_) - t for x_, t in cal.batches[4:]]).double()
    z = x.T @ x / len(x) + damping * torch.eye(IN, dtype=torch.float64)
    y_inv = 1 / ((2 / OUT * residual).square().mean(0) + damping)  # dL/dy of a per-example mean squared error
    delta = -torch.linalg.solve(z, grad.T) * y_inv
    sigma = torch.linalg.matrix_norm(delta, ord=2)
    delta = delta / sigma
    omega = -delta @ delta.T + beta * y_inv.sum() / n_train / sigma**2 * torch.linalg.inv(z)
    a0 = torch.linalg.eigh(omega).eigenvectors[:, :2]
    assert cosines(a, a0.T).min() >= 0.999
    torch.testing.assert_close((b @ a).double() * 1024, (a0 @ a0.T @ delta).T, atol=1e-4, rtol=0)
    # both terms matter at this N: the answer is neither the bias-only nor the variance-only one
    assert cosines(a, update).min() < 0.99 and cosines(a, torch.linalg.eigh(cov).eigenvectors[:, -2:].T).min() < 0.99


def test_output_factor_reweights_outputs():
    """Z = I, beta = 0, but unequal output-gradient variances: Delta ~ G^T Y^-1, so A is the top right-singular
    subspace of Y^-1 G (outputs reweighted), not of G."""
    torch.manual_seed(0)
    model = Single("linear")
    error = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(4)) * torch.logspace(0.5, -0.5, OUT)[:, None]
    cal = regression(model, error, torch.eye(IN))
    peft_model, _ = initialize(model, "lora_da", rank=2, alpha=2, target_modules=["layer"], calibration=cal, beta=0.0)
    a, _ = factors(lora_layers(peft_model)["layer"])
    y = error.square().sum(1)  # E[(dL/dy_j)^2] is proportional to the squared norm of error row j (Z = I)
    assert cosines(a, torch.linalg.svd(error / y[:, None]).Vh[:2]).min() >= 0.999
    assert cosines(a, torch.linalg.svd(error).Vh[:2]).min() < 0.99


def test_variance_term_favours_well_excited_inputs():
    """With the variance term dominant, Omega ~ Z^-1: A = the top principal directions of the input second moment."""
    torch.manual_seed(0)
    model, cov = Single("linear"), anisotropic()
    cal = regression(model, low_rank_update(), cov)
    peft_model, _ = initialize(
        model, "lora_da", rank=2, alpha=2, target_modules=["layer"], calibration=cal, beta=1e8, n_train=1
    )
    a, _ = factors(lora_layers(peft_model)["layer"])
    top = torch.linalg.eigh(cov).eigenvectors[:, -2:].T
    assert cosines(a, top).min() >= 0.99
    assert cosines(a, low_rank_update()).min() < 0.95  # not the bias-only answer


def test_batch_size_does_not_change_the_estimate():
    """G is a mean of per-example gradients and Y of per-example output gradients, whatever the batching."""
    torch.manual_seed(0)
    model, update, cov = Single("linear"), low_rank_update(), anisotropic()
    big = regression(model, update, cov, batches=2, batch=32)
    small = Calibration(
        batches=[(x[i : i + 1], y[i : i + 1]) for x, y in big.batches for i in range(len(x))],
        forward=big.forward, loss=big.loss,
    )
    kwargs = dict(rank=2, alpha=2, target_modules=["layer"], n_g=32, n_F=32)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    p1, r1 = initialize(m1, "lora_da", calibration=big, **kwargs)
    p2, r2 = initialize(m2, "lora_da", calibration=small, **kwargs)
    assert (r1.details["gradient_batches"], r2.details["gradient_batches"]) == (1, 32)
    a1, b1 = factors(lora_layers(p1)["layer"])
    a2, b2 = factors(lora_layers(p2)["layer"])
    torch.testing.assert_close(b1 @ a1, b2 @ a2, atol=1e-6, rtol=1e-4)


def test_padding_rows_are_left_out():
    """Rows the task's `rows` mask marks as padding enter neither Z nor Y: padded batches give the unpadded answer."""
    torch.manual_seed(0)
    model, update, cov = Single("linear"), low_rank_update(), anisotropic()
    plain = regression(model, update, cov)
    junk = torch.randn(64, 1, IN, generator=torch.Generator().manual_seed(5)) * 100  # large, so leaking would show
    padded = Calibration(
        batches=[(torch.cat([x[:, None], junk], 1), t) for x, t in plain.batches],  # (batch, 2 rows, IN)
        forward=lambda m, b: m(b[0]),
        loss=lambda m, b: ((m(b[0])[:, 0] - b[1]) ** 2).mean(),  # the second row carries no loss
        rows=lambda b: torch.tensor([True, False]).expand(len(b[0]), 2),
    )
    results = []
    for cal in (plain, padded):
        peft_model, _ = initialize(copy.deepcopy(model), "lora_da", rank=2, alpha=2, target_modules=["layer"],
                                   calibration=cal, n_train=3)  # small N: Y matters in Omega too
        a, b = factors(lora_layers(peft_model)["layer"])
        results.append(b @ a)
    torch.testing.assert_close(results[1], results[0], atol=1e-7, rtol=1e-4)


# ---- the offset flag ----

@pytest.mark.parametrize("offset", [True, False])
def test_offset_flag_preserves_function_and_is_reported(offset):
    model = tiny_llama()
    ids = token_batches(1)[0]["input_ids"]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    peft_model, report = initialize(
        model, "lora_da", rank=2, alpha=64, target_modules="all-linear", calibration=lm_calibration(token_batches()),
        n_g=12, n_F=12, offset_base=offset,
    )
    with torch.no_grad():
        after = peft_model(input_ids=ids).logits
    assert report.base_weights_modified is offset and report.details["offset_base"] is offset
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(q, base["model.layers.0.self_attn.q_proj.weight"]) is not offset
    if offset:
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    else:
        assert (after - before).abs().max() > 1e-4  # the reference behaviour: B A != 0 moves the model


# ---- tiny LMs end to end ----

def test_tiny_llama_attaches_trains_and_is_deterministic(monkeypatch):
    calls = []
    real = lora_da_module._input_factor
    monkeypatch.setattr(lora_da_module, "_input_factor", lambda *a: calls.append(a[-1]) or real(*a))
    cal = lm_calibration(token_batches())
    kwargs = dict(rank=2, alpha=4, target_modules="all-linear", calibration=cal, n_g=12, n_F=12)
    torch.manual_seed(0)
    peft_model, report = initialize(tiny_llama(), "lora_da", **kwargs)

    layers = lora_layers(peft_model)
    first = {n: [t.clone() for t in factors(m)] for n, m in layers.items()}
    assert len(layers) == 14 and set(report.ranks.values()) == {2}
    for name, layer in layers.items():
        a, b = factors(layer)
        base = layer.get_base_layer().weight
        assert a.shape == (2, base.shape[1]) and b.shape == (base.shape[0], 2), name
        assert torch.count_nonzero(b) > 0
    # one Z per distinct layer input: q/k/v share one, gate/up share one -> 4 per decoder layer, not 7
    assert len(calls) == 8 and "model.layers.0.self_attn.q_proj" in calls
    groups = report.details["input_factor_groups"]
    assert groups["model.layers.1.self_attn.q_proj"] == [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    assert groups["model.layers.1.mlp.gate_proj"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert report.calibration_batches == 6 and report.details["n_train"] == 24
    assert all(p.grad is None for p in peft_model.parameters())  # statistics left no gradients behind

    # one optimizer step on the adapters only
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    loss = cal.loss(peft_model, cal.batches[0])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(not torch.equal(p, q) for p, q in zip(trainable, before))

    torch.manual_seed(0)
    again, _ = initialize(tiny_llama(), "lora_da", **kwargs)
    for n, layer in lora_layers(again).items():
        a, b = factors(layer)
        assert torch.equal(a, first[n][0]) and torch.equal(b, first[n][1]), n


def test_short_calibration_reuses_batches_with_a_warning():
    with pytest.warns(UserWarning) as caught:
        _, report = initialize(
            tiny_llama(), "lora_da", rank=2, alpha=1, target_modules=["q_proj"],
            calibration=lm_calibration(token_batches()),  # 24 examples < n_g = n_F = 256
        )
    messages = " ".join(str(w.message) for w in caught)
    assert "fewer than n_g=256" in messages and "6 of their 6 batches are reused from the gradient" in messages
    assert report.details["gradient_batches"] == 6 and report.details["fisher_reused_batches"] == 6
    assert report.calibration_batches == 6 and report.details["n_train"] == 24


def test_n_train_defaults_to_the_training_set_size_the_task_states():
    """N of the variance term is Calibration.dataset_size when the task states one; the calibration examples (24
    here) stand in only without it (the test above)."""
    _, report = initialize(
        tiny_llama(), "lora_da", rank=2, alpha=1, target_modules=["q_proj"], n_g=12, n_F=12,
        calibration=lm_calibration(token_batches(), dataset_size=7473),
    )
    assert report.details["n_train"] == 7473


def test_no_counts_split_the_calibration_batches_in_half():
    """n_g = n_F = None: the suite's config default; the gradient takes the first ceil(B/2) batches, the Fisher the
    rest, none reused and no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # ours; transformers' FutureWarnings are not
        _, report = initialize(
            tiny_llama(), "lora_da", rank=2, alpha=1, target_modules=["q_proj"],
            calibration=lm_calibration(token_batches(5)), n_g=None, n_F=None,
        )
    d = report.details
    assert (d["gradient_batches"], d["fisher_batches"], d["fisher_reused_batches"]) == (3, 2, 0)
    assert (d["gradient_examples"], d["fisher_examples"]) == (12, 8) and report.calibration_batches == 5
    with pytest.raises(ValueError, match="both n_g and n_F, or neither"):
        initialize(tiny_llama(), "lora_da", rank=2, alpha=1, target_modules=["q_proj"],
                   calibration=lm_calibration(token_batches(5)), n_g=None)
    with pytest.raises(ValueError, match="at least 2"):
        initialize(tiny_llama(), "lora_da", rank=2, alpha=1, target_modules=["q_proj"],
                   calibration=lm_calibration(token_batches(1)), n_g=None, n_F=None)


def test_gpt2_conv1d_targets():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    ids = token_batches(1)[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    peft_model, report = initialize(
        model, "lora_da", rank=2, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
        calibration=lm_calibration(token_batches()), n_g=12, n_F=12, offset_base=True,
    )
    layers = lora_layers(peft_model)
    assert len(layers) == 8 and len(report.details["input_factor_groups"]) == 8
    shapes = {n.split(".", 3)[-1]: (tuple(factors(m)[0].shape), tuple(factors(m)[1].shape)) for n, m in layers.items()}
    assert shapes["attn.c_attn"] == ((2, 32), (96, 2)) and shapes["mlp.c_proj"] == ((2, 128), (32, 2))
    with torch.no_grad():
        after = peft_model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)  # the offset is applied in Conv1D's layout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda():
    model = tiny_llama().cuda()
    batches = [{k: v.cuda() for k, v in b.items()} for b in token_batches()]
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    peft_model, _ = initialize(model, "lora_da", rank=2, alpha=4, target_modules="all-linear",
                               calibration=lm_calibration(batches), n_g=12, n_F=12, offset_base=True)
    a, _ = factors(lora_layers(peft_model)["model.layers.0.self_attn.q_proj"])
    assert a.is_cuda
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before, rtol=0, atol=1e-4)


# ---- bad input ----

def test_calibration_without_loss_is_refused():
    cal = Calibration(batches=token_batches(), forward=lambda m, b: m(input_ids=b["input_ids"]))
    with pytest.raises(InitError, match=r"'lora_da' needs calibration data \(loss\)"):
        initialize(tiny_llama(), "lora_da", rank=2, alpha=1, target_modules="all-linear", calibration=cal)


def test_rank_above_input_features_is_refused():
    wide = nn.Sequential(nn.Linear(8, 16))
    cal = Calibration(batches=[torch.randn(4, 8)], forward=lambda m, x: m(x), loss=lambda m, x: m(x).square().mean())
    with pytest.raises(InitError, match=r"rank 12 exceeds"):
        initialize(wide, "lora_da", rank=12, alpha=1, target_modules=["0"], calibration=cal)
    # called directly (no registry checks), the method says why itself
    with pytest.raises(ValueError, match="exceeds the 8 input features of 0"):
        lora_da_module.lora_da(wide, LoraConfig(r=12, target_modules=["0"]), cal)
