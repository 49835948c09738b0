"""The control inits (eva_bench/init/controls.py): each is EVA with exactly one thing changed."""

import copy
import warnings

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from eva_bench.init import INITS, Calibration, InitError, initialize
from tests.helpers import lm_calibration, tiny_llama, token_batches


def run(method, model=None, rho=2.0, seed=0, **params):
    model = copy.deepcopy(model or tiny_llama())  # tiny_llama() seeds torch itself: build first, then seed
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged layers: not what these tests are about
        peft_model, report = initialize(
            model, method, rank=4, alpha=1, target_modules="all-linear",
            calibration=lm_calibration(token_batches(8, batch=8)), rho=rho, tau=0.95, **params,
        )
    a = {
        n.removeprefix("base_model.model."): m.lora_A["default"].weight.detach().double()
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    }
    return a, report


def projector(a: torch.Tensor) -> torch.Tensor:
    return a.T @ torch.linalg.solve(a @ a.T, a)


def test_controls_are_registered_with_evas_parameters():
    for name in ("eva_rot", "eva_perm", "random_orth"):
        assert name in INITS
    with pytest.raises(InitError, match="no parameter"):
        initialize(tiny_llama(), "eva_perm", rank=2, alpha=1, target_modules="all-linear",
                   calibration=lm_calibration(token_batches()), permute_layers=False)


def test_eva_rot_spans_evas_subspace_in_another_basis():
    a_eva, r_eva = run("eva")
    a_rot, r_rot = run("eva_rot")
    assert r_rot.ranks == r_eva.ranks and r_rot.scalings == r_eva.scalings and r_rot.function_preserved
    for name, a in a_eva.items():
        torch.testing.assert_close(projector(a_rot[name]), projector(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(a_rot[name].norm(dim=1), torch.ones(len(a), dtype=a.dtype), atol=1e-5, rtol=0)
        if len(a) > 1:  # one row: the only rotations are +-1
            assert not torch.allclose(a_rot[name].abs(), a.abs(), atol=1e-3), name


def test_random_orth_has_evas_ranks_and_norms_and_a_random_subspace():
    a_eva, r_eva = run("eva", whiten=True)  # whitened rows have unequal norms: the control must copy them
    a_ctl, r_ctl = run("random_orth", whiten=True)
    assert r_ctl.ranks == r_eva.ranks and r_ctl.scalings == r_eva.scalings
    for name, a in a_eva.items():
        b = a_ctl[name]
        torch.testing.assert_close(b.norm(dim=1), a.norm(dim=1), atol=1e-5, rtol=1e-5)
        unit = b / b.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.T, torch.eye(len(b), dtype=b.dtype), atol=1e-5, rtol=0)
        overlap = torch.linalg.matrix_norm(projector(a) @ projector(b), ord="fro") ** 2 / len(a)
        assert overlap < 0.9, name  # EVA's subspace would give 1; random r-subspaces of R^32 overlap ~ r / 32


def test_eva_perm_gives_each_layer_another_groups_components():
    a_eva, r_eva = run("eva", rho=1.0)  # uniform ranks: a donor's EVA rows are exactly what its taker gets
    a_perm, r_perm = run("eva_perm", rho=1.0)
    assert r_perm.ranks == r_eva.ranks
    donors = r_perm.details["donors"]
    for name, a in a_perm.items():
        donor = donors[name]
        torch.testing.assert_close(a, a_eva[donor], atol=0, rtol=0)
        assert not torch.allclose(a, a_eva[name], atol=1e-3), f"{name} kept its own components"
        assert a_eva[donor].shape == a_eva[name].shape
    # a permutation of input groups (layers sharing an input share components): the same distinct components
    assert {tuple(a.flatten().tolist()) for a in a_eva.values()} == {tuple(a.flatten().tolist()) for a in a_perm.values()}
    assert len(set(donors.values())) == len({tuple(a.flatten().tolist()) for a in a_eva.values()})


def test_eva_perm_with_rank_redistribution_takes_the_donors_top_components():
    a_perm, report = run("eva_perm", rho=2.0)
    assert len(set(report.ranks.values())) > 1
    for name, a in a_perm.items():
        torch.testing.assert_close(a @ a.T, torch.eye(len(a), dtype=a.dtype), atol=1e-5, rtol=0)


def test_controls_are_deterministic_under_a_seed_and_vary_with_it():
    first, _ = run("eva_rot", seed=3)
    again, _ = run("eva_rot", seed=3)
    other, _ = run("eva_rot", seed=4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_eva_perm_is_undefined_when_no_two_groups_share_a_width():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(32, 8) for _ in range(4)]
    calibration = Calibration(batches=batches, forward=lambda m, x: m(x))
    with pytest.raises(ValueError, match="no two input groups share a width"):
        initialize(model, "eva_perm", rank=2, alpha=1, target_modules=["0", "2"], calibration=calibration, tau=0.5)
