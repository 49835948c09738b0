"""EVA through PEFT 0.21 (``peft.tuners.lora.eva``): the reference the fast ``eva`` (eva.py) is checked against.

EVA (Paischer et al., arXiv 2410.07170v5 Sec. 3): A = the top right-singular vectors of each layer's *input
activations* on downstream data (incremental PCA over minibatches, stopped when consecutive components agree to cosine
similarity >= tau), B = 0, W untouched; ranks redistributed across layers by explained variance within the budget
r x (number of layers); rho bounds how far.

This wraps PEFT's implementation and adds what a benchmark needs around it:
- a cap on calibration batches: PEFT cycles over the data until every layer converges, forever if one never does;
  here each batch is used at most once and layers still unconverged at the cap are named in a warning and the report;
- the task's row mask (padding, and optionally prompt tokens) through the Calibration callbacks, for any batch type;
- whitening applied once per layer (PEFT 0.21 divides a shared-input group's components in place, once per member).
It is registered as ``eva_peft`` so both implementations can run side by side (tests/test_init_eva.py, bench/eva.py).
"""

from __future__ import annotations

import warnings

import torch
from peft import EvaConfig, LoraConfig, get_peft_model
from peft.tuners.lora.eva import SVDHook, get_eva_state_dict, initialize_lora_eva_weights

from .calibration import Calibration, first_input, select_rows
from .eva import check_components_fit, check_eva_params


class _CappedForward:
    """PEFT's ``forward_fn``: runs the task's forward, counts SVD passes, and ends the loop at the cap.

    PEFT first runs one pass to find layers with identical inputs (hashing), then one pass per SVD step. When the cap
    is reached we mark every live SVD hook converged, which makes PEFT's loop stop at its next convergence check; the
    hooks' true convergence state is kept first, for the warning.
    """

    def __init__(self, forward, max_batches: int):
        self.forward, self.max_batches = forward, max_batches
        self.passes = 0  # every forward, the hashing pass included
        self.hooks: dict[str, SVDHook] = {}  # layer name -> its SVD hook (one per group of equal inputs)
        self.converged: dict[str, torch.Tensor] = {}  # convergence flags per hook, before any forcing

    def __call__(self, model, batch):
        live = [h for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, SVDHook)]
        self.hooks.update({h.name: h for h in live})
        if self.svd_passes >= self.max_batches:
            for hook in live:
                self.converged.setdefault(hook.name, hook.converged.clone())
                hook.converged = torch.ones_like(hook.converged)
            return None
        self.passes += 1
        return self.forward(model, batch)

    @property
    def svd_passes(self) -> int:
        return max(self.passes - 1, 0)


def eva_peft(
    model,
    lora_config: LoraConfig,
    calibration: Calibration,
    *,
    rho: float = 2.0,
    tau: float = 0.99,
    whiten: bool = False,
    label_mask: bool = False,
    adjust_scaling_factors: bool = True,
    max_batches: int | None = None,
):
    """EVA init through PEFT. ``label_mask``: keep only loss-carrying rows (the paper did not, for math/commonsense).

    ``adjust_scaling_factors``: when a layer's rank moves from r to r', scale alpha by r'/r so s = alpha/r is kept
    (PEFT's behaviour; the authors' training code does not). ``max_batches``: at most this many calibration batches,
    each used once (default: all the task supplied).
    """
    check_eva_params(rho, tau)
    check_components_fit(model, lora_config, rho)
    cap = min(max_batches or len(calibration.batches), len(calibration.batches))

    lora_config.init_lora_weights = "eva"
    # whiten=False here: whitening is applied below, once per layer (see module docstring)
    lora_config.eva_config = EvaConfig(
        rho=rho, tau=tau, use_label_mask=label_mask, whiten=False, adjust_scaling_factors=adjust_scaling_factors
    )
    with warnings.catch_warnings():  # PEFT suggests low_cpu_mem_usage; irrelevant at the sizes EVA runs here
        warnings.filterwarnings("ignore", message=".*low_cpu_mem_usage.*")
        peft_model = get_peft_model(model, lora_config)
    forward = _CappedForward(calibration.forward, cap)
    components = get_eva_state_dict(
        peft_model,
        dataloader=list(calibration.batches[:cap]),
        forward_fn=forward,
        prepare_model_inputs_fn=lambda batch, _config: calibration.mask(batch, loss_only=label_mask),
        prepare_layer_inputs_fn=lambda layer_input, mask, _name: select_rows(first_input(layer_input), mask),
        show_progress_bar=False,
    )
    hook_of = {name: _owning_hook(name, u, forward.hooks) for name, u in components.items()}
    if whiten:
        for name, u in components.items():
            components[name] = u / hook_of[name].svd.singular_values_[: len(u)].sqrt().reshape(-1, 1).to(u)

    unconverged = sorted(
        _base_name(name)
        for name, u in components.items()
        if len(u) and not bool(forward.converged.get(hook_of[name].name, torch.ones(len(u), dtype=bool))[: len(u)].all())
    )
    if unconverged:
        warnings.warn(
            f"EVA: {len(unconverged)} layer(s) had not converged to tau={tau} after {cap} calibration batches; "
            f"their components are the best estimate so far: {', '.join(unconverged)}. "
            "Supply more calibration batches (or lower tau) for converged components.",
            stacklevel=3,
        )
    explained = {  # share of input variance the kept components explain, per adapted layer
        _base_name(n): round(hook_of[n].svd.explained_variance_ratio_[: len(u)].sum().item(), 6)
        for n, u in components.items()
        if len(u)
    }
    initialize_lora_eva_weights(peft_model, eva_state_dict=components, show_progress_bar=False)  # consumes the dict
    return peft_model, {
        "calibration_batches": forward.svd_passes,
        "forward_passes": forward.passes,
        "unconverged_layers": unconverged,
        "explained_variance": explained,
    }


def _base_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.")


def _owning_hook(name: str, u: torch.Tensor, hooks: dict[str, SVDHook]) -> SVDHook:
    """The SVD hook whose components a layer received (layers with equal inputs share their group's hook)."""
    if name in hooks:
        return hooks[name]
    for hook in hooks.values():
        c = hook.svd.components_
        if len(u) <= len(c) and c.shape[1] == u.shape[1] and torch.equal(c[: len(u)].to(u), u):
            return hook
    raise RuntimeError(f"EVA: could not find the decomposition that produced the components of {name}")
