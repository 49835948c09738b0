"""What a task hands the initializer: batches and callbacks, so no initializer knows which task it serves.

Every data-driven method (EVA, LoRA-DA, CorDA, LoRA-GA, ...) sees the same seeded batches, drawn once per run by the
task from its training split.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def hf_forward(model: nn.Module, batch: dict) -> Any:
    """A Hugging Face model on a tokenized batch (a dict of input_ids, attention_mask, ...; labels left out)."""
    return model(**{k: v for k, v in batch.items() if k != "labels"})


def hf_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """A Hugging Face model's own loss on a batch that carries ``labels``."""
    return model(**batch).loss


def hf_rows(batch: dict) -> torch.Tensor | None:
    """Real tokens (the attention mask) when the batch has one."""
    return batch.get("attention_mask") if isinstance(batch, dict) else None


@dataclass(frozen=True)
class Calibration:
    """Batches from the downstream training data plus how to use them.

    ``rows`` and ``loss_rows`` return a boolean mask over a layer input's leading dimensions (for a batch of token
    sequences: ``(batch, seq)``; for images: ``(batch, patches)``; for a decision transformer: ``(batch, 3 * steps)``),
    so every adapted layer's input can be reduced to the rows that count, whatever the task. ``batches`` may be any
    iterable (a DataLoader): it is read once into a list, at most ``max_batches`` of it, since every method may pass
    over the batches more than once and must see the same ones.
    """

    batches: Sequence[Any] | Iterable[Any]  # the same seeded batches for every data-driven method
    forward: Callable[[nn.Module, Any], Any] = hf_forward  # run the model on one batch (no loss needed)
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None  # scalar training loss, for gradient-based inits
    rows: Callable[[Any], torch.Tensor] | None = None  # rows of a layer input that are real data (not padding)
    loss_rows: Callable[[Any], torch.Tensor] | None = None  # rows that carry a training loss (label masking)
    dataset_size: int | None = None  # examples in the training split (LoRA-DA's N: the variance term scales as 1/N)
    max_batches: int | None = None  # read at most this many batches (an endless loader stops here)

    def __post_init__(self):
        batches = self.batches
        if not isinstance(batches, (list, tuple)) or (self.max_batches is not None and len(batches) > self.max_batches):
            batches = list(itertools.islice(iter(batches), self.max_batches))  # a DataLoader is read once, here
            object.__setattr__(self, "batches", batches)
        if len(batches) == 0:
            raise ValueError("Calibration needs at least one batch")

    @classmethod
    def for_hf(cls, batches, **kwargs) -> "Calibration":
        """A Hugging Face causal LM's calibration: its forward, its own loss (batches with ``labels``), real tokens
        by the attention mask, loss rows where labels are not -100."""
        return cls(batches, forward=hf_forward, loss=hf_loss, rows=hf_rows,
                   loss_rows=lambda b: b["labels"] != -100, **kwargs)

    def mask(self, batch: Any, *, loss_only: bool = False) -> torch.Tensor | None:
        """The flattened row mask of ``batch`` (``None``: every row counts)."""
        fn = self.loss_rows if loss_only else self.rows
        if loss_only and fn is None:
            raise ValueError("label masking was asked for, but the task's Calibration has no `loss_rows` callback")
        return None if fn is None else fn(batch).reshape(-1).bool()


def first_input(layer_input):
    """The input tensor of a layer from what a forward hook receives (its positional args, or PEFT's one tensor)."""
    return layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input


def select_rows(layer_input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten a layer input to ``(rows, features)`` and keep the rows the mask marks."""
    flat = layer_input.reshape(-1, layer_input.shape[-1])
    if mask is None:
        return flat
    if mask.numel() != flat.shape[0]:
        raise ValueError(
            f"row mask has {mask.numel()} entries but the layer input has {flat.shape[0]} rows "
            f"(input shape {tuple(layer_input.shape)}): the task's `rows` callback does not match its batches"
        )
    return flat[mask.to(flat.device)]
