"""eva_bench's EVA (eva.py) against PEFT 0.21's (eva_peft.py) on the same batches: same stopping, same rank
allocation, same components up to sign; and the pieces that make it cheap (arXiv 2410.07170v5 Sec. 3)."""

import copy
import warnings

import pytest
import timm
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from eva_bench.init import Calibration, initialize
from eva_bench.init.eva_pca import lowrank_eigh
from tests.helpers import lm_calibration, tiny_llama, token_batches

VIT_TARGETS = r".*blocks.*(qkv|proj|fc1|fc2)$"


def lora_a(peft_model) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model."): m.lora_A["default"].weight.detach()
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer)
    }


def both(model, calibration, targets, rank, **params):
    """(eva, eva_peft) results on copies of one model with the same batches: (lora_A per layer, report) each."""
    out = []
    for method, extra in (("eva", {"cache": False}), ("eva_peft", {})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model, report = initialize(
                copy.deepcopy(model), method, rank=rank, alpha=1, target_modules=targets, calibration=calibration,
                **params, **extra,
            )
        out.append((lora_a(peft_model), report))
    return out


def assert_same_result(fast, reference):
    (a_fast, r_fast), (a_ref, r_ref) = fast, reference
    assert r_fast.calibration_batches == r_ref.calibration_batches
    assert r_fast.ranks == r_ref.ranks  # the same allocation, layer by layer (rank 0 included)
    assert r_fast.details["unconverged_layers"] == r_ref.details["unconverged_layers"]
    assert r_fast.details["forward_passes"] == r_fast.calibration_batches  # no extra pass to find shared inputs
    assert r_ref.details["forward_passes"] == r_ref.calibration_batches + 1  # PEFT's hashing pass
    for name, a in a_fast.items():
        cos = (a * a_ref[name]).sum(1).abs()  # unit rows: |cos| per component, sign-free
        assert cos.min() >= 0.99, f"{name}: per-component |cos| {cos.tolist()}"
        ev_fast, ev_ref = r_fast.details["explained_variance"][name], r_ref.details["explained_variance"][name]
        assert ev_fast == pytest.approx(ev_ref, abs=1e-3)


def test_same_result_as_peft_on_a_tiny_llama():
    """q/k/v and gate/up share inputs; one sequence of each batch is half padding (masked rows)."""
    fast, reference = both(tiny_llama(), lm_calibration(token_batches(8, batch=8)), "all-linear", 4, tau=0.95)
    assert_same_result(fast, reference)
    ranks = fast[1].ranks
    assert len(set(ranks.values())) > 1  # the allocation is not the trivial uniform one


@pytest.mark.parametrize("rank", [1, 2])
def test_same_result_as_peft_on_a_tiny_vit(rank):
    """rank 1 (k = 2 components): fc2's 160-wide input takes the rows path (d > 64 k), the 32-wide ones the gram
    path; rank 2 (k = 4): every layer the gram path."""
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, num_classes=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=5.0
    ).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(8)]
    calibration = Calibration(batches=images, forward=lambda m, x: m(x))
    fast, reference = both(vit, calibration, VIT_TARGETS, rank, tau=0.95)
    assert_same_result(fast, reference)


class SharedInput(nn.Module):
    """q, k, v read one tensor; b and c read their own. Designed so the rank budget ends inside q/k/v's tie."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.b, self.c = (nn.Linear(8, 4) for _ in range(5))

    def forward(self, batch):
        x, y, z = batch
        return self.q(x) + self.k(x) + self.v(x), self.b(y), self.c(z)


def test_rank_ties_between_shared_layers_broken_as_peft():
    # r = 2, rho = 2: each of the 5 layers offers 4 ratios (a pool of 20: torch's unstable sort path, which breaks ties
    # unlike a stable sort) and the budget is 10. y, z: one dominant direction each (b1, c1 ~ 0.56, the rest ~ 0.06);
    # x: three strong ones (a1 ~ 0.39, a2 ~ 0.33, a3 ~ 0.27). The top 10 are b1, c1, q/k/v's a1 and a2 (6 ties) and
    # two of their three tied a3: which two is up to the sort, then the leader q takes the largest count.
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8))[0]
    sx = torch.tensor([5.0, 4.6, 4.2, 0.5, 0.4, 0.3, 0.2, 0.1])
    sy = torch.tensor([3.0, 1, 1, 1, 1, 1, 1, 1])
    batches = [
        ((torch.randn(512, 8) * sx) @ basis.T, torch.randn(512, 8) * sy, torch.randn(512, 8) * sy) for _ in range(6)
    ]
    calibration = Calibration(batches=batches, forward=lambda m, b: m(b))
    fast, reference = both(SharedInput(), calibration, ["q", "k", "v", "b", "c"], 2, tau=0.5)
    assert_same_result(fast, reference)
    ranks = fast[1].ranks
    assert ranks["b"] == ranks["c"] == 1
    assert ranks["q"] == 3 and sorted([ranks["k"], ranks["v"]]) == [2, 3]


def test_exact_pca_gives_the_principal_directions_of_every_row_seen():
    """exact_pca: the components are those of one SVD of all (masked) input rows of the batches used."""
    batches = token_batches(6, batch=8)
    calibration = lm_calibration(batches)
    model = tiny_llama()
    seen = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    hook.remove()
    masks = [b["attention_mask"].reshape(-1).bool() for b in batches]
    rows = torch.cat([x.reshape(-1, x.shape[-1])[m] for x, m in zip(seen, masks)])
    truth = torch.linalg.svd((rows - rows.mean(0)).double(), full_matrices=False).Vh
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tau = 1: nothing converges, every batch is used by every layer
        peft_model, report = initialize(
            model, "eva", rank=4, alpha=1, target_modules="all-linear", calibration=calibration, tau=1.0,
            rho=1.0, exact_pca=True, cache=False,
        )
    assert report.calibration_batches == 6
    a = lora_a(peft_model)["model.layers.1.mlp.down_proj"].double()
    assert (a @ truth[: len(a)].T).diagonal().abs().min() > 0.9999


@pytest.mark.parametrize(("d", "may_stash"), [(32, True), (160, True), (160, False)])
def test_incremental_svd_is_peft_incremental_pca_batch_by_batch(d, may_stash):
    """The same ratios and components as PEFT's IncrementalPCA(lowrank=True, seed 42) after every batch, on a flat
    spectrum (where its truncation and randomized SVD differ most from exact PCA) with a mean offset. k = 2: d = 32
    takes the gram path, d = 160 the rows path (d > 64 k), updated after the forward or, with no room to keep the
    rows, in the hook."""
    from peft.utils.incremental_pca import IncrementalPCA

    from eva_bench.init.eva_pca import GramBatch, RowsBatch, Stats, lowrank_applies, merge

    torch.manual_seed(0)
    k = 2
    reference = IncrementalPCA(n_components=k, copy=True, lowrank=True, lowrank_seed=42)
    stats = Stats(truncate=True, k=k)
    for _ in range(6):
        x = torch.randn(272, d) * torch.linspace(1.5, 0.5, d) + 3.0
        reference.partial_fit(x)
        stats.add(x, may_stash=may_stash)
        if stats.pending:  # not updated in the hook: update as after a forward
            batch = RowsBatch([stats]) if stats.stash else GramBatch([stats], d)
            merge([stats], d, k, batch, lowrank_applies(stats, d, k, stats.pending))
        values, vectors = stats.top
        ratios = values / stats.total
        torch.testing.assert_close(ratios, reference.explained_variance_ratio_.double(), rtol=1e-4, atol=0)
        assert (vectors.T @ reference.components_.T.double()).diagonal().abs().min() > 0.9999


def test_lowrank_eigh_is_peft_svd_lowrank_from_the_gram_matrix():
    """PEFT's IncrementalPCA runs torch.svd_lowrank(q=2k, niter=4) after torch.manual_seed(42); from A^T A alone we
    get the same singular values and right singular vectors."""
    torch.manual_seed(0)
    a = torch.randn(600, 48) * torch.linspace(2.0, 0.5, 48)  # a flat spectrum, where the approximation shows
    k = 6
    with torch.random.fork_rng():
        torch.manual_seed(42)
        _, s, v = torch.svd_lowrank(a, q=2 * k, niter=4)
    gram = (a.T @ a).double().unsqueeze(0)
    values, vectors = lowrank_eigh(lambda w: gram @ w, 48, k, [True], gram.device)
    values, vectors = values[0], vectors[0]
    torch.testing.assert_close(values.sqrt().float(), s[:k], rtol=1e-5, atol=0)
    assert (vectors.T.float() @ v[:, :k]).diagonal().abs().min() > 0.99999
    exact = torch.linalg.svdvals(a)[:k]
    assert not torch.allclose(s[:k], exact, rtol=1e-3)  # ... and it is an approximation, which EVA's result inherits


def test_hooks_removed_and_model_state_restored():
    model = tiny_llama().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model, _ = initialize(
            model, "eva", rank=2, alpha=1, target_modules="all-linear", calibration=lm_calibration(token_batches()),
            cache=False,
        )
    assert not any(m._forward_hooks for m in peft_model.modules())
    assert peft_model.base_model.model.training
