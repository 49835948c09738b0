"""Config values checked before any work: a value of the wrong type or out of range is one clear error naming the
key, the value and what it must be. ``RunContext.from_config`` calls ``check_config``, so a single run fails before
it builds anything and a sweep fails at its plan, before it launches a run (the sweeper locates every record first).

Each rule applies where a task module's config has the key (vision has no ``task.train.limit``, RL has
``data.steps``); a rule a config does not reach is skipped.
"""

from __future__ import annotations

import math
import numbers

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot give a valid run."""


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer_at_least(low: int):
    return f"an integer >= {low}", lambda v: _integer(v) and v >= low


def number_above(low: float):
    return f"a finite number > {low:g}", lambda v: _number(v) and v > low


def optional(rule):
    what, test = rule
    return f"null or {what}", lambda v: v is None or test(v)


RULES = {  # dotted key -> (what it must be, test)
    "seed": integer_at_least(0),  # seeds name the record file (s<seed>) and seed numpy's 32-bit generator
    "threads": optional(integer_at_least(1)),
    "lora.r": integer_at_least(1),
    "lora.alpha": number_above(0),
    "data.batch_size": integer_at_least(1),
    "data.eval_batch_size": integer_at_least(1),
    "data.max_length": integer_at_least(2),  # a prompt token and an answer token
    "data.steps": integer_at_least(1),
    "calibration.batches": integer_at_least(1),
    "calibration.batch_size": integer_at_least(1),
    "task.train.limit": optional(integer_at_least(1)),  # 0 examples would train nothing
    "task.eval_limit": optional(integer_at_least(1)),  # 0 examples would score nothing, after the training
    "optim.lr": number_above(0),
    "optim.epochs": integer_at_least(1),
    "optim.weight_decay": ("a finite number >= 0", lambda v: _number(v) and v >= 0),
    "optim.warmup_ratio": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "optim.grad_accumulation": integer_at_least(1),
    "optim.max_grad_norm": optional(number_above(0)),
    "optim.log_every": integer_at_least(1),
}


def problems(cfg: DictConfig | dict) -> list[str]:
    """Every rule a config breaks, as ``key=value: must be ...``."""
    config = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    out = []
    for key, (what, test) in RULES.items():
        found, value = _lookup(config, key)
        if found and not test(value):
            out.append(f"{key}={value!r}: must be {what}")
    return out


def check_config(cfg: DictConfig | dict) -> None:
    """Raise ``ConfigError`` naming every broken rule; nothing when the config is valid."""
    broken = problems(cfg)
    if broken:
        raise ConfigError("invalid config (nothing was run): " + "; ".join(broken))


def _lookup(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node
