"""Standard LoRA initialization (the baseline every method is measured against).

``random``: PEFT's default, A ~ kaiming_uniform(a=sqrt(5)), B = 0 (Hu et al., 2021; PEFT ``init_lora_weights=True``).
``gaussian``: A ~ N(0, 1/r), B = 0. Both leave the model's function unchanged at step 0.
"""

from __future__ import annotations

from peft import LoraConfig, get_peft_model


def kaiming_uniform(model, lora_config: LoraConfig, calibration=None):
    lora_config.init_lora_weights = True
    return get_peft_model(model, lora_config), {}


def gaussian(model, lora_config: LoraConfig, calibration=None):
    lora_config.init_lora_weights = "gaussian"
    return get_peft_model(model, lora_config), {}
