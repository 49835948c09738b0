"""OLoRA, CorDA and LoRA-GA through PEFT 0.21's own implementations, fed by the task's Calibration callbacks.

Each starts the adapter on a decomposition and freezes the residual ``W - s B A``. Two of PEFT's routines are
worked around rather than rewritten: ``olora_init`` ignores ``fan_in_fan_out`` (wrong shapes on an HF ``Conv1D``), so
Conv1D layers get the same QR here; ``preprocess_corda``'s collection hook takes batch size 1 and counts padding
rows, so the covariance is collected here over the task's kept rows and handed to PEFT through ``covariance_file``.
Definitions, defaults and deviations: docs/methods.md (PiSSA, MiLoRA and OLoRA; CorDA; LoRA-GA; DoRA).
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga
from peft.tuners.lora.config import CordaConfig
from transformers.pytorch_utils import Conv1D

from .calibration import Calibration, select_rows
from .svd import ADAPTER, wrap, lora_layers, refresh_dora_magnitude, set_adapter_and_residual, weight_out_in
from .targets import find_targets


def olora(model, lora_config: LoraConfig, calibration=None):
    """OLoRA: B = Q_r, A = R_r from W = QR; W <- W - s B A."""
    peft_model = wrap(model, lora_config)
    for layer in lora_layers(peft_model).values():
        if isinstance(layer.get_base_layer(), Conv1D):
            q, r = torch.linalg.qr(weight_out_in(layer))
            rank = layer.r[ADAPTER]
            set_adapter_and_residual(layer, q[:, :rank], r[:rank])
        else:
            layer.olora_init(ADAPTER)  # PEFT's own
            refresh_dora_magnitude(layer)
    # the config keeps init_lora_weights=True: reloading a saved adapter must not redo the init on the base weights
    return peft_model, {}


def corda(
    model,
    lora_config: LoraConfig,
    calibration: Calibration,
    *,
    corda_method: str = "ipm",
    max_batches: int | None = None,
):
    """CorDA: ``corda_method`` "ipm" (top-r of W C; the paper's default for fine-tuning) or "kpm" (bottom-r).

    ``max_batches``: at most this many calibration batches (default: all the task supplied).
    """
    if corda_method not in ("ipm", "kpm"):
        raise ValueError(f"corda: corda_method must be 'ipm' or 'kpm' (got {corda_method!r})")
    batches = _capped(calibration, max_batches)
    from peft.tuners.lora import corda as corda_module  # needs `attrs`, which PEFT 0.21.2 uses but does not declare
    lora_config.init_lora_weights = "corda"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "covariance.pt")
        torch.save(_input_covariances(model, lora_config, calibration, batches), path)
        lora_config.corda_config = CordaConfig(corda_method=corda_method, covariance_file=path)
        corda_module.preprocess_corda(model, lora_config)  # loads the covariances, decomposes W C, attaches the eigens
        peft_model = get_peft_model(model, lora_config)
    lora_config.corda_config.covariance_file = None  # the file is gone; do not leave a dangling path in the config
    return peft_model, {"calibration_batches": len(batches), "corda_method": corda_method}


def lora_ga(
    model,
    lora_config: LoraConfig,
    calibration: Calibration,
    *,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    max_batches: int | None = None,
):
    """LoRA-GA from the mean gradient over the calibration batches (PEFT's ``LoraGAConfig`` knobs, paper defaults).

    Needs 2r <= min(in, out) in every target layer (A and B take different halves of the top-2r gradient triplets).
    """
    if direction not in ("ArB2r", "A2rBr", "ArBr", "random"):
        raise ValueError(f"lora_ga: direction must be 'ArB2r', 'A2rBr', 'ArBr' or 'random' (got {direction!r})")
    if scale not in ("stable", "weight_svd", "gd_scale", "unit"):
        raise ValueError(f"lora_ga: scale must be 'stable', 'weight_svd', 'gd_scale' or 'unit' (got {scale!r})")
    too_small = [n for n, m in _targets(model, lora_config).items() if 2 * lora_config.r > min(m.weight.shape)]
    if too_small:
        raise ValueError(
            f"lora_ga: rank {lora_config.r} needs 2r = {2 * lora_config.r} gradient triplets, more than layer "
            f"{too_small[0]} has (min(in, out)); lower the rank"
        )
    batches = _capped(calibration, max_batches)
    lora_config.init_lora_weights = "lora_ga"
    lora_config.lora_ga_config = LoraGAConfig(direction=direction, scale=scale, stable_gamma=stable_gamma)

    def train_step():  # PEFT averages the accumulated weight gradients over the backward passes
        for batch in batches:
            calibration.loss(model, batch).backward()

    # PEFT counts backward passes with full backward hooks; torch warns that such a hook fires on output gradients
    # when a layer's inputs need none (the first layer's), which is all PEFT needs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(model, lora_config, train_step)
    return get_peft_model(model, lora_config), {"calibration_batches": len(batches)}


def _targets(model, lora_config: LoraConfig) -> dict:
    """The target layers by their name in the unwrapped model (the keys PEFT's CorDA reads the covariances by)."""
    return find_targets(model, sorted(lora_config.target_modules))


def _capped(calibration: Calibration, max_batches: int | None) -> list:
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or null (got {max_batches})")
    return list(calibration.batches[: max_batches or len(calibration.batches)])


@torch.no_grad()
def _input_covariances(model, lora_config: LoraConfig, calibration: Calibration, batches) -> dict[str, torch.Tensor]:
    """Per target layer, the mean over batches of x^T x on its (masked, max-normalised) inputs, keyed as PEFT reads."""
    sums, counts, handles = {}, {}, []
    mask = None

    def hook(name):
        def collect(module, inputs, output):
            x = select_rows(inputs[0].detach(), mask).float()
            x = x / x.abs().max().clamp_min(torch.finfo(x.dtype).tiny)
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + 1

        return collect

    was_training = model.training
    model.eval()
    try:
        for name, module in _targets(model, lora_config).items():
            handles.append(module.register_forward_hook(hook(name)))
        for batch in batches:
            mask = calibration.mask(batch)
            calibration.forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in _targets(model, lora_config) if n not in sums]
    if missing:
        raise ValueError(f"corda: the calibration forward never reached layer(s) {missing[:4]}")
    return {name: sums[name] / counts[name] for name in sums}
