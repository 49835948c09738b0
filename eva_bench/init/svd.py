"""Weight-SVD initializations: PiSSA, MiLoRA and AILoRA. Data-free: only the pretrained weights are read.

Each target weight ``W = U S V^T`` (out x in) gives the adapter r chosen singular triplets, scaled as PEFT scales
PiSSA (``B = U_r (S_r / s)^(1/2)``, ``A = (S_r / s)^(1/2) V_r^T``), and keeps the residual ``W - s B A`` frozen, so
step 0 computes the pretrained function. pissa: the top triplets; milora: the bottom ones; ailora: top for query,
bottom for value projections, with fused q|k|v layers split between their q and v blocks. The conventions, the
layer-name rules and the fused-layer layout are in docs/methods.md (AILoRA; PiSSA, MiLoRA and OLoRA; DoRA).
"""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from .targets import as_out_in, find_targets, matches, out_in_shape

ADAPTER = "default"
QUERY = ("q_proj", "query", "q")  # default query-projection name suffixes
VALUE = ("v_proj", "value", "v")  # default value-projection name suffixes
FUSED = ("qkv", "c_attn")  # default fused [q; k; v] projections (timm ViT, GPT-2)


def pissa(model, lora_config: LoraConfig, calibration=None):
    """PiSSA: the top-r singular triplets of every target layer; W <- W - s B A (function preserved)."""
    peft_model = wrap(model, lora_config)
    for layer in lora_layers(peft_model).values():
        _start_on_triplets(layer, "top")
    return peft_model, {"triplets": "top"}


def milora(model, lora_config: LoraConfig, calibration=None):
    """MiLoRA: the bottom-r singular triplets of every target layer; W <- W - s B A (function preserved)."""
    peft_model = wrap(model, lora_config)
    for layer in lora_layers(peft_model).values():
        _start_on_triplets(layer, "bottom")
    return peft_model, {"triplets": "bottom"}


def ailora(
    model,
    lora_config: LoraConfig,
    calibration=None,
    *,
    query: str | list[str] | None = None,
    value: str | list[str] | None = None,
    fused: str | list[str] | None = None,
    other: str = "random",
):
    """AILoRA: query from its top-r triplets, value from its bottom-r, fused q/v blocks split (module docstring).

    ``query``/``value``/``fused``: regex or list of name suffixes (None: the defaults ``QUERY``, ``VALUE``, ``FUSED``).
    ``other``: what the remaining target layers get: ``"random"`` (PEFT's standard init, B = 0), ``"pissa"`` (their
    top-r triplets, residual frozen) or ``"skip"`` (no adapter).
    """
    if other not in ("random", "pissa", "skip"):
        raise ValueError(f"ailora: other must be 'random', 'pissa' or 'skip' (got {other!r})")
    specs = {"query": query or list(QUERY), "value": value or list(VALUE), "fused": fused or list(FUSED)}
    roles = {}
    for name, module in sorted(find_targets(model, lora_config.target_modules).items()):
        hits = [role for role, spec in specs.items() if matches(name, spec)]
        if len(hits) > 1:
            raise ValueError(f"ailora: layer {name} matches more than one of {hits}; make query/value/fused disjoint")
        roles[name] = hits[0] if hits else "other"
        if roles[name] == "fused":
            _check_fused(name, module, lora_config.r)
    if all(role == "other" for role in roles.values()):
        raise ValueError(
            f"ailora: no target layer is a query/value projection (looked for query={specs['query']}, "
            f"value={specs['value']}, fused={specs['fused']}); pass query=/value=/fused= naming them"
        )
    if other == "skip":
        lora_config.target_modules = {n for n, role in roles.items() if role != "other"}

    peft_model = wrap(model, lora_config)
    layers = lora_layers(peft_model)
    top, bottom, rest, fused_ranks = [], [], [], {}
    for name, role in roles.items():
        if role == "other":
            rest.append(name)
            if other == "pissa":
                _start_on_triplets(layers[name], "top")
        elif role == "query":
            _start_on_triplets(layers[name], "top")
            top.append(name)
        elif role == "value":
            _start_on_triplets(layers[name], "bottom")
            bottom.append(name)
        else:
            r_q, r_v = _start_fused(layers[name])
            fused_ranks[name] = {"q": r_q, "v": r_v}
            top.append(f"{name}[q]")
            if r_v:
                bottom.append(f"{name}[v]")
    return peft_model, {"top": top, "bottom": bottom, "other": rest, "other_init": other, "fused_ranks": fused_ranks}


# ---- shared by the weight-decomposition inits (peft_methods.py uses them too) ----


def wrap(model, lora_config: LoraConfig):
    """PEFT's standard init (A kaiming, B = 0) as the starting point; the methods overwrite A, B and W after."""
    lora_config.init_lora_weights = True
    return get_peft_model(model, lora_config)


def lora_layers(peft_model) -> dict[str, LoraLayer]:
    """Adapted layers by their name in the unwrapped model."""
    return {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A
    }


def weight_out_in(layer: LoraLayer) -> torch.Tensor:
    """The base weight as out x in in float32."""
    base = layer.get_base_layer()
    return as_out_in(base.weight.detach().float(), base)


def triplets(w: torch.Tensor, r: int, which: str):
    """The r largest (``"top"``) or smallest (``"bottom"``) singular triplets of ``w``: U_r, S_r, V_r^T.

    Exact SVD: the smallest triplets have no cheap randomised estimate, and the same routine serves both ends.
    """
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # s descending
    keep = slice(0, r) if which == "top" else slice(len(s) - r, len(s))
    return u[:, keep], s[keep], vh[keep]


def factors(u, s_vals, vh, scale: float):
    """B = U (S / s)^(1/2), A = (S / s)^(1/2) V^T: then scale * B @ A = U S V^T (PEFT's PiSSA convention)."""
    root = (s_vals / scale).sqrt()
    return u * root, root[:, None] * vh


def set_adapter_and_residual(layer: LoraLayer, b: torch.Tensor, a: torch.Tensor) -> None:
    """Write A and B, replace W by W - s B A, and refresh DoRA's magnitude from the final weights.

    The residual is computed from A and B as stored (in the layer's dtype), so W_res + s B A reproduces W as closely
    as that dtype allows.
    """
    base = layer.get_base_layer()
    dtype = base.weight.dtype
    a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    with torch.no_grad():
        layer.lora_A[ADAPTER].weight.data = a
        layer.lora_B[ADAPTER].weight.data = b
        residual = weight_out_in(layer) - layer.scaling[ADAPTER] * (b.float() @ a.float())
        base.weight.data = as_out_in(residual, base).to(dtype).contiguous()  # back to the stored layout
    refresh_dora_magnitude(layer)


def refresh_dora_magnitude(layer: LoraLayer) -> None:
    """DoRA: magnitude = row norms of W + s B A, from the weights as they are now (PEFT computed it at wrap time)."""
    if ADAPTER not in getattr(layer, "lora_magnitude_vector", {}):
        return
    dora = layer.lora_magnitude_vector[ADAPTER]
    with torch.no_grad():
        lora_weight = layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight
        norm = dora.get_weight_norm(layer.get_base_layer().weight, lora_weight, layer.scaling[ADAPTER])
        dora.weight.data.copy_(norm)


def _start_on_triplets(layer: LoraLayer, which: str) -> None:
    r = layer.r[ADAPTER]
    b, a = factors(*triplets(weight_out_in(layer), r, which), layer.scaling[ADAPTER])
    set_adapter_and_residual(layer, b, a)


def _check_fused(name: str, module, r: int) -> None:
    """Checked before wrapping: three equal output blocks, and a q block with at least ceil(r/2) triplets."""
    out, in_ = out_in_shape(module)
    if out % 3:
        raise ValueError(
            f"ailora: fused layer {name} has {out} output features, not three equal q/k/v blocks; "
            "leave it out of `fused` (it then gets `other`) or adapt its q/v projections separately"
        )
    if math.ceil(r / 2) > min(out // 3, in_):
        raise ValueError(
            f"ailora: rank {r} needs {math.ceil(r / 2)} triplets of {name}'s q block, "
            f"which has rank <= {min(out // 3, in_)}"
        )


def _start_fused(layer: LoraLayer) -> tuple[int, int]:
    """A fused [q; k; v] layer: top ceil(r/2) triplets of the q block, bottom r - ceil(r/2) of the v block."""
    w = weight_out_in(layer)
    out, r, scale = w.shape[0], layer.r[ADAPTER], layer.scaling[ADAPTER]
    d, r_q = out // 3, math.ceil(r / 2)
    r_v = r - r_q
    b = torch.zeros(out, r, device=w.device)
    b_q, a_q = factors(*triplets(w[:d], r_q, "top"), scale)
    b[:d, :r_q] = b_q
    a_parts = [a_q]
    if r_v:
        b_v, a_v = factors(*triplets(w[2 * d :], r_v, "bottom"), scale)
        b[2 * d :, r_q:] = b_v
        a_parts.append(a_v)
    set_adapter_and_residual(layer, b, torch.cat(a_parts))
    return r_q, r_v
