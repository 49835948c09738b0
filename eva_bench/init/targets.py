"""Which layers a target spec selects, and their weights in one orientation: the leaf every method imports.

``find_targets`` applies PEFT's matching rules and refuses what no method here can adapt; ``check_rank`` refuses a
rank larger than a target layer allows. HF ``Conv1D`` (GPT-2-style models) stores its weight transposed, in x out;
``as_out_in`` and ``out_in_shape`` are the one place that knows it, so every formula can take W as out x in.
This module imports nothing from the rest of the package, so any module of it can import this one at the top.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)  # layers every method here can adapt (HF Conv1D: GPT-2-style models)


class InitError(ValueError):
    """Bad input to the initializer, raised before any work is done."""


def find_targets(model: nn.Module, target_modules: str | list[str]) -> dict[str, nn.Module]:
    """The layers a target spec selects, with PEFT's matching rules, checked to be adaptable linear layers.

    ``"all-linear"``: every Linear/Conv1D except the output layer. A string is a regex matched against the full
    module name; a list matches a name equal to an entry or ending in ``.entry``. Matching anything that is not a
    linear layer (a plain ``"proj"`` also hits timm's ``patch_embed.proj`` Conv2d) is an error, not a silent skip.
    """
    if target_modules == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found = {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and m is not head}
    else:
        found = {n: m for n, m in model.named_modules() if n and matches(n, target_modules)}
    if not found:
        raise InitError(f"target_modules {target_modules!r} match no module of {type(model).__name__}")
    wrong = {n: type(m).__name__ for n, m in found.items() if not isinstance(m, LINEAR_TYPES)}
    if wrong:
        listed = ", ".join(f"{n} ({t})" for n, t in sorted(wrong.items())[:8])
        raise InitError(
            f"target_modules {target_modules!r} match layers that are not nn.Linear/Conv1D: {listed}; "
            "narrow the pattern (e.g. '.*blocks.*(qkv|proj)$' instead of 'proj')"
        )
    return found


def matches(name: str, target_modules: str | list[str]) -> bool:
    """PEFT's rule: a string is a regex for the full name; a list entry matches the name or its last dotted parts."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def check_rank(targets: dict[str, nn.Module], rank: int) -> None:
    too_small = {n: tuple(m.weight.shape) for n, m in targets.items() if rank > min(m.weight.shape)}
    if too_small:
        name, shape = next(iter(too_small.items()))
        raise InitError(
            f"rank {rank} exceeds what {len(too_small)} target layer(s) allow, e.g. {name} with weight {shape} "
            f"(rank <= min(in, out) = {min(shape)})"
        )


def as_out_in(weight_like: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``weight_like`` (the layer's weight, its gradient, a residual) as out x in, the layout every formula here uses.

    HF Conv1D stores W transposed (in x out, y = x W + b). The map is its own inverse: applied to an out x in tensor
    it gives the layer's stored layout.
    """
    return weight_like.T if isinstance(module, Conv1D) else weight_like


def out_in_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a target layer, whatever layout it stores its weight in."""
    out_features, in_features = as_out_in(module.weight, module).shape
    return out_features, in_features


def in_features(module: nn.Module) -> int:
    return out_in_shape(module)[1]
