"""Saved adapters: a trained run's adapter on disk, and back onto its pretrained model for scoring.

A run keeps its adapter only when asked (``save_adapter=true``): records are small and committed, adapters are not.
The folder is PEFT's ``save_pretrained`` output, plus ``base_layers.safetensors`` when the init method replaced base
weights (PiSSA, OLoRA, MiLoRA, CorDA, LoRA-GA, AILoRA keep W - sBA as the frozen weight): a plain LoRA adapter on the
pristine model would compute something else. That file holds the adapted layers' base weights in full, so such a
folder is as large as those layers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

BASE_LAYERS = "base_layers.safetensors"  # the replaced base weights of the adapted layers, by parameter name
ABOUT = "eva_bench.json"  # which run wrote the folder: its record's run keys


def _base_layer_weights(model) -> dict[str, torch.Tensor]:
    """Every adapted layer's frozen base weight (and bias), by its name in the PEFT model."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for key, tensor in module.get_base_layer().named_parameters():
                found[f"{name}.base_layer.{key}"] = tensor.detach().contiguous().cpu()
    return found


def save_adapter(model, folder: str | Path, *, base_weights_modified: bool, run: dict) -> Path:
    """Write ``model``'s adapter (a PEFT model) to ``folder``: PEFT's files, the replaced base layers when there
    are any, and the run keys of the run that trained it."""
    from safetensors.torch import save_file

    from . import distributed

    folder = Path(folder)
    if distributed.rank() != 0:  # every rank holds the same adapter; one writes it
        return folder
    model.save_pretrained(folder)
    if base_weights_modified:
        save_file(_base_layer_weights(model), folder / BASE_LAYERS)
    (folder / ABOUT).write_text(json.dumps({"run": run, "base_weights_modified": base_weights_modified}, indent=1))
    return folder


def load_adapter(model, folder: str | Path):
    """The pretrained ``model`` with the saved adapter at ``folder`` on it (and its replaced base layers), frozen."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = check_folder(folder)
    with warnings.catch_warnings():  # PEFT's PeftModel reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = PeftModel.from_pretrained(model, folder)
    if (folder / BASE_LAYERS).is_file():
        weights = load_file(folder / BASE_LAYERS)
        unknown = sorted(set(weights) - set(dict(model.named_parameters())))
        if unknown:
            raise ValueError(f"{folder / BASE_LAYERS}: {len(unknown)} weights match no layer of this model, e.g. "
                             f"{unknown[0]} (was the adapter trained on another model?)")
        model.load_state_dict(weights, strict=False)
    return model.eval()


def check_folder(folder: str | Path) -> Path:
    """``folder`` when it holds a saved adapter, else an error saying what is missing."""
    folder = Path(folder).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no saved adapter at {folder}: expected PEFT's adapter_config.json there (a run "
                                f"with save_adapter=true writes <record>.adapter/)")
    return folder


def about(folder: str | Path) -> dict:
    """The run keys of the run that saved the adapter at ``folder`` (empty for a folder saved elsewhere)."""
    path = check_folder(folder) / ABOUT
    return json.loads(path.read_text()) if path.is_file() else {}
