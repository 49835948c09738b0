"""The shared LoRA initializer: one entry point, every method looked up by name in ``INITS``.

    peft_model, report = initialize(model, "eva", rank=8, alpha=1, target_modules="all-linear", calibration=cal)

A method is a function ``(model, lora_config, calibration, **params) -> (peft_model, details)``; ``initialize`` does
what every method shares: validate the targets and rank against the model, build the ``LoraConfig``, time the
method, and report the realised per-layer ranks. Data reaches a method only through ``Calibration`` callbacks.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from . import controls, eva, eva_peft, lora_da, peft_methods, random, svd
from .calibration import Calibration, select_rows
from .targets import LINEAR_TYPES, InitError, check_rank, find_targets


@dataclass(frozen=True)
class InitMethod:
    apply: Callable  # (model, lora_config, calibration, **params) -> (peft_model, details dict)
    needs: tuple[str, ...] = ()  # Calibration fields the method requires ("batches", "forward", "loss")
    modifies_base_weights: bool = False  # True when W is replaced (e.g. by a residual W - sBA)
    preserves_function: bool = True  # the adapted model computes the pretrained function at step 0


INITS: dict[str, InitMethod] = {
    "random": InitMethod(random.kaiming_uniform),
    "gaussian": InitMethod(random.gaussian),
    # PEFT 0.21's algorithm at about the cost of its forwards: the same ranks and components as eva_peft on the same
    # batches (tests/test_init_eva.py); 2.6x (ViT-tiny) to 3.0x (stories260K) faster than eva_peft where
    # bench/README.md measured it, section (b)
    "eva": InitMethod(eva.eva, needs=("batches", "forward")),
    "eva_peft": InitMethod(eva_peft.eva_peft, needs=("batches", "forward")),  # PEFT 0.21's EVA, the reference
    # controls: EVA with one thing changed (the basis, the layer, the subspace), controls.py
    "eva_rot": InitMethod(controls.eva_rot, needs=("batches", "forward")),
    "eva_perm": InitMethod(controls.eva_perm, needs=("batches", "forward")),
    "random_orth": InitMethod(controls.random_orth, needs=("batches", "forward")),
    "pissa": InitMethod(svd.pissa, modifies_base_weights=True),
    "milora": InitMethod(svd.milora, modifies_base_weights=True),
    "ailora": InitMethod(svd.ailora, modifies_base_weights=True),
    "olora": InitMethod(peft_methods.olora, modifies_base_weights=True),
    "corda": InitMethod(peft_methods.corda, needs=("batches", "forward"), modifies_base_weights=True),
    "lora_ga": InitMethod(peft_methods.lora_ga, needs=("batches", "loss"), modifies_base_weights=True),
    "lora_da": InitMethod(lora_da.lora_da, needs=("batches", "loss"), preserves_function=False),  # offset_base: True
}


@dataclass
class InitReport:
    method: str
    seconds: float  # wall time of the method, model wrapping included
    ranks: dict[str, int]  # realised rank per targeted layer (0: EVA gave it no adapter)
    scalings: dict[str, float]  # realised s = alpha/r per adapted layer
    calibration_batches: int  # calibration batches the method consumed (0 for data-free methods)
    base_weights_modified: bool
    function_preserved: bool  # the model computes the pretrained function at step 0
    trainable_parameters: int
    params: dict = field(default_factory=dict)  # the method parameters used
    details: dict = field(default_factory=dict)  # method-specific (e.g. EVA's unconverged layers)

    def to_dict(self) -> dict:
        return asdict(self)


def initialize(
    model: nn.Module,
    method: str,
    *,
    rank: int,
    alpha: float,
    target_modules: str | list[str],
    calibration: Calibration | None = None,
    lora: dict | None = None,
    **params,
):
    """Wrap ``model`` with LoRA adapters initialised by ``method``; return ``(peft_model, InitReport)``.

    ``lora``: further ``LoraConfig`` options shared by every method (dropout, use_dora, use_rslora, bias).
    ``params``: the method's own parameters (e.g. ``rho``, ``tau`` for EVA); unknown ones are an error.
    """
    if method not in INITS:
        raise InitError(f"unknown init method {method!r}; valid: {', '.join(sorted(INITS))}")
    spec = INITS[method]
    _check_params(method, spec.apply, params)
    if rank < 1:
        raise InitError(f"rank must be >= 1 (got {rank})")
    targets = find_targets(model, target_modules)
    check_rank(targets, rank)
    missing = [f for f in spec.needs if calibration is None or getattr(calibration, f, None) is None]
    if missing:
        raise InitError(f"init {method!r} needs calibration data ({', '.join(missing)}); the task supplied none")

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(targets), **(lora or {}))
    was_training = model.training
    start = time.perf_counter()
    with warnings.catch_warnings():  # PEFT's PeftModel reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model, details = spec.apply(model, config, calibration, **params)
    seconds = time.perf_counter() - start
    peft_model.train(was_training)  # a method may leave train mode on (PEFT's EVA does); dropout would change outputs

    ranks, scalings = {}, {}
    for name in targets:
        module = peft_model.base_model.model.get_submodule(name)
        adapted = isinstance(module, LoraLayer) and "default" in module.r
        ranks[name] = module.r["default"] if adapted else 0
        if adapted:
            scalings[name] = float(module.scaling["default"])
    report = InitReport(
        method=method,
        seconds=seconds,
        ranks=ranks,
        scalings=scalings,
        calibration_batches=details.pop("calibration_batches", 0),
        base_weights_modified=details.pop("base_weights_modified", spec.modifies_base_weights),  # details may override
        function_preserved=details.pop("function_preserved", spec.preserves_function),
        trainable_parameters=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        params=params,
        details=details,
    )
    return peft_model, report


def _check_params(method: str, apply: Callable, params: dict) -> None:
    accepted = [p for p, v in inspect.signature(apply).parameters.items() if v.kind is v.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InitError(f"init {method!r} has no parameter(s) {unknown}; it accepts {accepted or 'none'}")


__all__ = [
    "INITS", "LINEAR_TYPES", "Calibration", "InitError", "InitMethod", "InitReport", "find_targets", "initialize",
    "select_rows",
]
