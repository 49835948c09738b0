"""Control inits that separate what EVA's start contributes: the subspace, the basis, or the scale.

The EVA paper (arXiv 2410.07170v5, Sec. 4 ablations) asks whether its gain comes from the principal subspace itself;
at equal alpha and lr, EVA's unit-norm A rows also take larger first steps than PEFT's random rows (norm ~0.57), so
part of a gain can be step size. Each control is EVA (same calibration, ranks, scales, B = 0) with one thing changed:
- ``eva_rot``: A <- Q A with Q a random orthogonal r x r matrix per layer: the same subspace and row scale, another
  basis (LoRA's update B A can represent the same matrices; only the optimisation path differs);
- ``eva_perm``: every layer gets the components of another input group of the same width (eva.py, a derangement):
  EVA's spectrum-shaped, orthonormal rows in the wrong layer;
- ``random_orth``: random orthonormal rows scaled to EVA's row norms: EVA's ranks and scale, a random subspace.
With ``random`` and ``eva`` they answer "is it the subspace, the basis, or the scale?". Randomness comes from torch's
global RNG, which the recipe seeds per run.
"""

from __future__ import annotations

import inspect

import torch
from peft.tuners.lora import LoraLayer

from . import eva as eva_module


def _eva_signature(drop: str | None = None):
    """Decorate a control so it accepts exactly EVA's parameters (minus ``drop``), as initialize() checks them."""

    def decorate(control):
        signature = inspect.signature(eva_module.eva)
        if drop:
            signature = signature.replace(parameters=[p for n, p in signature.parameters.items() if n != drop])
        control.__signature__ = signature
        return control

    return decorate


@_eva_signature()
def eva_rot(model, lora_config, calibration, **params):
    peft_model, details = eva_module.eva(model, lora_config, calibration, **params)
    _replace_rows(peft_model, lambda a: _haar_orthogonal(a.shape[0], a) @ a)
    return peft_model, {**details, "control": "eva_rot: EVA's A rotated by a random orthogonal r x r matrix"}


@_eva_signature(drop="permute_layers")
def eva_perm(model, lora_config, calibration, **params):
    peft_model, details = eva_module.eva(model, lora_config, calibration, permute_layers=True, **params)
    return peft_model, {**details, "control": "eva_perm: each layer has another input group's EVA components"}


@_eva_signature()
def random_orth(model, lora_config, calibration, **params):
    peft_model, details = eva_module.eva(model, lora_config, calibration, **params)

    def random_rows(a: torch.Tensor) -> torch.Tensor:
        basis = _haar_orthogonal(a.shape[1], a)[: a.shape[0]]  # r random orthonormal rows in R^d
        return basis * a.norm(dim=1, keepdim=True)

    _replace_rows(peft_model, random_rows)
    details = {k: v for k, v in details.items() if k != "explained_variance"}  # not of these rows
    return peft_model, {**details, "control": "random_orth: random orthonormal rows with EVA's ranks and row norms"}


def _replace_rows(peft_model, transform) -> None:
    """lora_A <- transform(lora_A) for every adapted layer, in model order (a fixed RNG sequence per seed)."""
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                weight = module.lora_A["default"].weight
                weight.copy_(transform(weight.detach().double()).to(weight.dtype))


def _haar_orthogonal(n: int, like: torch.Tensor) -> torch.Tensor:
    """A random n x n orthogonal matrix, uniformly (Haar) distributed: QR of a Gaussian with R's diagonal signs
    moved into Q (Mezzadri 2007), so the draw does not depend on the QR routine's sign convention."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64).to(like.device))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


__all__ = ["eva_perm", "eva_rot", "random_orth"]
