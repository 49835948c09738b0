"""LoRA-DA: data-aware LoRA initialization via asymptotic analysis (Zhang et al., arXiv 2510.24561).

Per target layer: the mean gradient G and K-FAC Fisher factors (Z over input rows, diagonal Y over output rows) from
the calibration batches give a natural-gradient estimate Delta of the update; A spans the r input directions that
minimise the guidance matrix Omega (bias: how much of Delta a direction carries; variance: how little the data
excites it), and B holds Delta's coefficients on them. The steps, the orientation of A and B in PEFT's layout, and
the choices made where the paper and the authors' code leave room (base offset, eval mode, what an example is, N,
several processes) are in docs/methods.md (LoRA-DA).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from .. import distributed
from .calibration import Calibration, select_rows
from .targets import as_out_in, find_targets, in_features, out_in_shape

# Below this input dimension the linear algebra runs in float64 (cheap, and Z + 1e-6 I is badly conditioned);
# above it float32, as in the reference code, to keep 11k x 11k eigen-decompositions affordable.
_FLOAT64_MAX_DIM = 4096


def lora_da(
    model: nn.Module,
    lora_config: LoraConfig,
    calibration: Calibration,
    *,
    n_g: int | None = 256,
    n_F: int | None = 256,
    beta: float = 0.03,
    gamma: float = 1024.0,
    damping: float = 1e-6,
    offset_base: bool = False,
    n_train: int | None = None,
):
    """LoRA-DA init; these keyword defaults are the authors' code (256/256 examples, beta 0.03, stable gamma 1024,
    damping 1e-6, no offset); conf/init/lora_da.yaml sets n_g, n_F to null. ``n_g=None, n_F=None``: the first half of the calibration batches
    for the gradient, the second half for the Fisher (every data-driven method then sees the same calibration
    budget, however large the run makes it). ``n_train``: the training-set size N of the variance term
    (default: the training-set size the task states, ``Calibration.dataset_size``; without one, the number of
    distinct calibration examples used)."""
    _check_params(n_g=n_g, n_F=n_F, beta=beta, gamma=gamma, damping=damping, n_train=n_train)
    if n_g is None and len(calibration.batches) < 2:
        raise ValueError("lora_da: n_g = n_F = None splits the calibration batches in half: supply at least 2")
    if lora_config.use_dora:
        raise ValueError("lora_da initializes standard LoRA only: DoRA's magnitude vector is not part of the method")
    targets = find_targets(model, lora_config.target_modules)
    for name, module in targets.items():
        if lora_config.r > in_features(module):
            raise ValueError(
                f"lora_da: rank {lora_config.r} exceeds the {in_features(module)} input features of {name}: "
                "A0 takes r eigenvectors of the in x in guidance matrix"
            )

    distributed.same_everywhere(len(calibration.batches), "lora_da: the number of calibration batches")
    stats = _statistics(model, targets, calibration, n_g=n_g, n_F=n_F)
    n = n_train or calibration.dataset_size or stats.distinct_examples

    with warnings.catch_warnings():  # PEFT announces it sets fan_in_fan_out for Conv1D; that is what we want
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        peft_model = get_peft_model(model, lora_config)
    layers = {key: m for key, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}

    for leader, members in stats.groups.items():
        z_chol, z_inv = _input_factor(stats.z_sum[leader], stats.z_rows[leader], damping, leader)
        for name in members:
            layer = layers[name]
            a, b = _layer_init(
                grad=stats.grads.pop(name).to(z_inv.dtype),  # popped: one layer's G in memory at a time
                y_diag=(stats.y_sum[name] / max(stats.y_rows[name], 1)).to(z_inv.dtype),
                z_chol=z_chol, z_inv=z_inv, rank=layer.r["default"], beta=beta, gamma=gamma, damping=damping,
                n_train=n, name=name,
            )
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
                if offset_base:
                    # PEFT's delta is s * B @ A in the base weight's own layout (transposed for Conv1D), so
                    # W - delta gives exactly the pretrained function at step 0
                    base = layer.get_base_layer().weight
                    base.sub_(layer.get_delta_weight("default").to(base.dtype))

    distributed.broadcast_trainable(peft_model)  # bit-identical adapters on every rank (no-op in one process)
    return peft_model, {
        "calibration_batches": stats.distinct_batches,
        "base_weights_modified": bool(offset_base),
        "function_preserved": bool(offset_base),
        "offset_base": bool(offset_base),
        "gradient_batches": stats.gradient_batches,
        "gradient_examples": stats.gradient_examples,
        "fisher_batches": stats.fisher_batches,
        "fisher_examples": stats.fisher_examples,
        "fisher_reused_batches": stats.fisher_reused,
        "n_train": n,
        # layers that share one input factor Z (computed and inverted once per group)
        "input_factor_groups": {leader: list(members) for leader, members in stats.groups.items()},
    }


def _layer_init(*, grad, y_diag, z_chol, z_inv, rank, beta, gamma, damping, n_train, name):
    """Steps 3-5 for one layer: (lora_A, lora_B) in PEFT's layout, (r x in) and (out x r)."""
    y_inv = 1.0 / (y_diag + damping)  # Y is diagonal: its inverse is elementwise (damped, step 2)
    # step 3: Delta = - Z^-1 G^T Y^-1 (in x out), the natural-gradient (K-FAC) estimate of the target update
    delta = -torch.cholesky_solve(grad.T, z_chol) * y_inv
    sigma_max = torch.linalg.matrix_norm(delta, ord=2)
    if not torch.isfinite(sigma_max) or sigma_max <= 0:
        raise RuntimeError(
            f"lora_da: the natural-gradient estimate of {name} is {sigma_max.item()} in norm: the calibration loss "
            "gives this layer no (finite) gradient; check that the loss depends on it, or leave it out of the targets"
        )
    delta = delta / sigma_max
    # step 4: Omega = - Delta Delta^T + beta tr(Y^-1)/N / sigma_max^2 Z^-1. Delta was divided by sigma_max, so the
    # variance term is divided by sigma_max^2 too: the same Omega up to a positive factor, i.e. the same eigenvectors
    omega = -delta @ delta.T + (beta * y_inv.sum() / n_train / sigma_max**2) * z_inv
    omega = (omega + omega.T) / 2  # exact symmetry for eigh
    _, vectors = torch.linalg.eigh(omega)  # ascending eigenvalues
    a0 = _fix_signs(vectors[:, :rank])  # step 5: the r directions that minimise bias + variance (in x r)
    b0 = a0.T @ delta  # (r x out): the update's coefficients on those directions
    scale = math.sqrt(gamma)  # "stable gamma": lora_B @ lora_A = (A0 A0^T Delta)^T / gamma
    return a0.T / scale, b0.T / scale


def _input_factor(z_sum: torch.Tensor, rows: int, damping: float, name: str):
    """Z = E[x x^T] + damping I (step 2), as its Cholesky factor and its inverse."""
    dtype = torch.float64 if z_sum.shape[0] <= _FLOAT64_MAX_DIM else torch.float32
    z = z_sum.to(dtype) / max(rows, 1)
    z = (z + z.T) / 2
    z.diagonal().add_(damping)
    chol, info = torch.linalg.cholesky_ex(z)
    if info.item() != 0:
        raise RuntimeError(
            f"lora_da: the input factor of {name} is not positive definite; raise `damping` above {damping}"
        )
    return chol, torch.cholesky_inverse(chol)


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Eigenvectors are defined up to sign; make each column's largest entry positive (reproducible across devices)."""
    pivot = vectors.abs().argmax(dim=0)
    signs = vectors[pivot, torch.arange(vectors.shape[1], device=vectors.device)].sign()
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


# ---- statistics: steps 1 and 2, on the unwrapped model ----


@dataclass
class _Statistics:
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # mean gradient G per layer, (out x in), float32
    z_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of x x^T per input group (by leader name)
    z_rows: dict[str, int] = field(default_factory=dict)
    y_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of (dL/dy)^2 per layer
    y_rows: dict[str, int] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # leader -> layers fed the same input tensor
    gradient_batches: int = 0
    gradient_examples: int = 0
    fisher_batches: int = 0
    fisher_examples: int = 0
    fisher_reused: int = 0  # gradient batches the Fisher pass had to reuse
    batch_examples: dict[int, int] = field(default_factory=dict)  # calibration batch index -> its examples

    @property
    def distinct_batches(self) -> int:
        return len(self.batch_examples)

    @property
    def distinct_examples(self) -> int:
        return sum(self.batch_examples.values())


def _statistics(model, targets: dict[str, nn.Module], calibration: Calibration, *, n_g: int | None, n_F: int | None) -> _Statistics:
    """G, Z and Y on the base model. Only the target weights require grad while this runs; every parameter's
    requires_grad and the model's train/eval mode are restored afterwards."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    stats = _Statistics()
    try:
        model.eval()
        for p, _ in saved:
            p.requires_grad_(False)
        for module in targets.values():
            module.weight.requires_grad_(True)
        _gradient_pass(model, targets, calibration, n_g, stats)
        _fisher_pass(model, targets, calibration, n_F, stats)
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
    return stats


class _Hooks:
    """Forward hooks on the target layers for one pass: the batch size (first dimension of the first target input),
    and, when ``capture`` is on, each layer's input and output for the K-FAC factors."""

    def __init__(self, targets: dict[str, nn.Module], capture: bool):
        self.capture = capture
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in targets.items()]
        self.start()

    def start(self):
        self.batch_size = None
        self.inputs: dict[int, tuple[str, torch.Tensor]] = {}  # id(input) -> (first layer that saw it, the tensor)
        self.calls: list[tuple[str, str, torch.Tensor]] = []  # (layer, leader of its input group, output)

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0]
            if self.batch_size is None:
                self.batch_size = x.shape[0]
            if self.capture:
                # layers fed the very same tensor (q/k/v; gate/up) share one Z; holding the tensor keeps its id unique
                leader = self.inputs.setdefault(id(x), (name, x))[0]
                self.calls.append((name, leader, output))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _gradient_pass(model, targets, calibration, n_g, stats) -> None:
    """Step 1: G = mean over examples of dL/dW, from calibration batches in order until n_g examples are covered
    (None: the first half of the batches)."""
    first_half = (len(calibration.batches) + 1) // 2
    names = list(targets)
    weights = [targets[n].weight for n in names]
    totals = {n: torch.zeros(out_in_shape(targets[n]), dtype=torch.float32, device=targets[n].weight.device)
              for n in names}
    hooks = _Hooks(targets, capture=False)
    try:
        for batch in calibration.batches:
            if stats.gradient_examples >= n_g if n_g is not None else stats.gradient_batches >= first_half:
                break
            hooks.start()
            loss = calibration.loss(model, batch)
            b = _batch_size(hooks)
            # the loss is a batch mean; x b sums per-example losses, so totals / examples is the per-example mean
            grads = torch.autograd.grad(loss * b, weights, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    totals[n] += as_out_in(g, targets[n]).float()
            b = distributed.sum_int(b)  # the union's examples in this step (one process: b)
            stats.batch_examples[stats.gradient_batches] = b
            stats.gradient_batches += 1
            stats.gradient_examples += b
    finally:
        hooks.close()
    totals = {n: distributed.sum_tensor(t) for n, t in totals.items()}
    if n_g is not None and stats.gradient_examples < n_g:
        warnings.warn(
            f"lora_da: the calibration holds {stats.gradient_examples} examples, fewer than n_g={n_g}; "
            "the mean gradient uses them all",
            stacklevel=5,
        )
    stats.grads = {n: t / stats.gradient_examples for n, t in totals.items()}


def _fisher_pass(model, targets, calibration, n_F, stats) -> None:
    """Step 2: K-FAC factors from the batches after the gradient's, until n_F examples are covered (None: all of
    them); when the calibration runs out, gradient batches are reused (each batch at most once) with a warning."""
    count = len(calibration.batches)
    start = stats.gradient_batches
    order = list(range(start, count)) + (list(range(min(start, count))) if n_F is not None else [])
    hooks = _Hooks(targets, capture=True)
    first_groups: dict[str, str] | None = None
    try:
        for i in order:
            if n_F is not None and stats.fisher_examples >= n_F:
                break
            batch = calibration.batches[i]
            mask = calibration.mask(batch)  # real rows only (padding dropped), as for EVA
            hooks.start()
            loss = calibration.loss(model, batch)
            b = _batch_size(hooks)
            outputs = [out for _, _, out in hooks.calls]
            # dL/dy for each layer output, with the loss scaled to a sum of per-example means (see _gradient_pass)
            out_grads = torch.autograd.grad(loss * b, outputs, allow_unused=True)
            groups = {}
            for (name, leader, out), g in zip(hooks.calls, out_grads):
                groups[name] = leader
                if g is None:
                    g = torch.zeros_like(out)
                g = select_rows(g.detach(), mask).float()
                _add(stats.y_sum, name, (g * g).sum(0))
                stats.y_rows[name] = stats.y_rows.get(name, 0) + g.shape[0]
            for leader, x in hooks.inputs.values():  # one Z per distinct input tensor
                x = select_rows(x.detach(), mask).float()
                _add(stats.z_sum, leader, x.T @ x)
                stats.z_rows[leader] = stats.z_rows.get(leader, 0) + x.shape[0]
            if first_groups is None:
                first_groups = groups
            elif groups != first_groups:
                raise RuntimeError("lora_da: layers shared their inputs differently from one batch to the next")
            b = distributed.sum_int(b)  # the union's examples in this step (one process: b)
            stats.batch_examples[i] = b
            stats.fisher_batches += 1
            stats.fisher_examples += b
            stats.fisher_reused += int(i < start)
    finally:
        hooks.close()
    for sums, counts in ((stats.z_sum, stats.z_rows), (stats.y_sum, stats.y_rows)):  # the union's K-FAC sums
        for name in sums:
            sums[name] = distributed.sum_tensor(sums[name])
            counts[name] = distributed.sum_int(counts[name])
    missing = sorted(set(targets) - set(first_groups or {}))
    if missing:
        raise RuntimeError(f"lora_da: the calibration loss never ran these target layers: {', '.join(missing[:8])}")
    for name, leader in first_groups.items():
        stats.groups.setdefault(leader, []).append(name)

    if stats.fisher_reused or stats.fisher_examples < (n_F if n_F is not None else 1):
        warnings.warn(
            f"lora_da: the Fisher factors use {stats.fisher_examples} examples (n_F={n_F}); {stats.fisher_reused} of "
            f"their {stats.fisher_batches} batches are reused from the gradient's; supply more calibration batches "
            "for independent estimates",
            stacklevel=5,
        )


def _add(store: dict, key: str, value: torch.Tensor) -> None:
    store[key] = store[key] + value if key in store else value


def _batch_size(hooks: _Hooks) -> int:
    if hooks.batch_size is None:
        raise RuntimeError("lora_da: the calibration loss ran none of the target layers")
    return int(hooks.batch_size)


def _check_params(*, n_g, n_F, beta, gamma, damping, n_train) -> None:
    if (n_g is None) != (n_F is None):
        raise ValueError("lora_da: give both n_g and n_F, or neither (None: split the calibration batches in half)")
    if n_g is not None and (n_g < 1 or n_F < 1):
        raise ValueError(f"lora_da: n_g and n_F count examples and must be >= 1 (got {n_g}, {n_F})")
    if beta < 0:
        raise ValueError(f"lora_da: beta weighs the variance term and must be >= 0 (got {beta})")
    if gamma <= 0 or damping <= 0:
        raise ValueError(f"lora_da: gamma and damping must be > 0 (got {gamma}, {damping})")
    if n_train is not None and n_train < 1:
        raise ValueError(f"lora_da: n_train is a training-set size and must be >= 1 (got {n_train})")
