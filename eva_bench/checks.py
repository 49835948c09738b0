"""Config values checked before any work: a value of the wrong type or out of range is one clear error naming the
key, the value and what it must be. ``RunContext.from_config`` calls ``check_config``, so a single run fails before
it builds anything and a sweep fails at its plan, before it launches a run (the sweeper locates every record first).

Each rule applies where a task module's config has the key (vision has no ``task.train.limit``, RL has
``data.steps``); a rule a config does not reach is skipped.

Unknown keys fail here too, with a close match: ``+lora.rank=4`` adds a key Hydra cannot judge, so every key of the
composed config must be one that some file under conf/ defines (``known_keys``), a ``LoraConfig`` option under
``lora``, a parameter of the chosen init method under ``init.params``, or an argument of the callable a ``_target_``
node calls. ``check_command_line`` applies the same schema to the command line before Hydra composes anything, so
``lora.rank=4`` (without ``+``) gets the suggestion instead of Hydra's advice to append the key.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parent.parent / "conf"


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
    "calibration.source": ("null, random_tokens or a data config with _target_",
                           lambda v: v is None or v == "random_tokens" or (isinstance(v, dict) and "_target_" in v)),
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
    out = [f"unknown key {key}{_did_you_mean(key, near)}" for key, near in unknown_keys(config)]
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


# --- unknown keys -----------------------------------------------------------------------------------------------

SKIPPED = ("hydra",)  # Hydra's own settings: Hydra checks them
NAMED_BY_USER = ("task.evals",)  # mappings keyed by names a config chooses (a task's eval sets, in its own file)
ANY = None  # _extra_keys' answer for a node whose callable takes **kwargs: every key is valid there


@functools.lru_cache(maxsize=None)
def known_keys(domain: str | None = None) -> frozenset[str]:
    """Every dotted key some file under conf/ defines, where Hydra puts it: the primary configs' keys at the root
    (only ``conf/<domain>.yaml``'s and those of primaries built on it, so the RL recipe's ``data.steps`` is unknown
    to vision; every primary's when ``domain`` is None), a group's options under the group's name, ``# @package
    _global_`` files (the experiments, the ``domain``'s only) at the root."""
    keys: set[str] = set()
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group.split("/")[0] in SKIPPED or (group == "." and domain and not _extends(path, domain)):
            continue  # Hydra's own, or another recipe's primary config
        if group == "experiment" and domain and _experiment_domain(path.stem) not in (domain, None):
            continue  # another recipe's experiment: its keys (RL's data.steps) are not this recipe's
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        node.pop("defaults", None)
        is_global = group == "." or "# @package _global_" in path.read_text().splitlines()[:3]
        _collect(node, "" if is_global else group.replace("/", "."), keys)
    return frozenset(keys)


def _extends(primary: Path, domain: str) -> bool:
    """Whether a primary config is ``domain``'s or builds on it (language_score.yaml: ``defaults: [language]``)."""
    defaults = OmegaConf.load(primary).get("defaults") or []
    return primary.stem == domain or domain in [entry for entry in defaults if isinstance(entry, str)]


def _experiment_domain(stem: str) -> str | None:
    """The recipe an experiment is for: that of the model or task option its defaults choose, or of the experiment
    it extends; None when it chooses neither."""
    for entry in OmegaConf.load(CONF / "experiment" / f"{stem}.yaml").get("defaults") or []:
        if isinstance(entry, str) and (CONF / "experiment" / f"{entry}.yaml").exists():
            return _experiment_domain(entry)
        for key, option in (entry.items() if not isinstance(entry, str) else ()):
            group = key.removeprefix("override ").strip("/")
            if group in ("model", "task") and option in group_options(group):
                return domain_of(group_options(group)[option])
    return None


def _collect(node, prefix: str, into: set) -> None:
    if prefix:
        into.add(prefix)
    if isinstance(node, dict):
        for key, value in node.items():
            _collect(value, f"{prefix}.{key}" if prefix else str(key), into)


def unknown_keys(config: dict) -> list[tuple[str, list[str]]]:
    """(key, the valid keys beside it) for every key of ``config`` that nothing defines (module docstring)."""
    domain = domain_of(config.get("model") or {})  # as recipe.check_domain, which runs first
    known = known_keys(domain if (CONF / f"{domain}.yaml").exists() else None)
    out: list[tuple[str, list[str]]] = []

    def walk(node: dict, prefix: str, pattern: str) -> None:
        if pattern in NAMED_BY_USER:  # any name; each entry is checked against every entry conf/ defines there
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}.{key}", f"{pattern}.*")
            return
        extra = _extra_keys(pattern, node, config)
        if pattern == "init.params":  # the chosen method's parameters, not every method's
            defined, near = extra, sorted(extra)
        else:
            defined, near = set(_siblings(pattern, known)) | (extra or set()), _siblings(pattern, known)
        for key, value in node.items():
            dotted, deeper = (f"{prefix}.{key}", f"{pattern}.{key}") if prefix else (str(key), str(key))
            if dotted in SKIPPED:
                continue
            if extra is not ANY and key not in defined:
                out.append((dotted, near))
            elif isinstance(value, dict):
                walk(value, dotted, deeper)

    walk(config, "", "")
    return out


def _siblings(prefix: str, known) -> list[str]:
    """The keys conf/ defines directly under ``prefix`` (``*``: any name there): what a misspelt key is compared
    with."""
    parts = prefix.split(".") if prefix else []
    return sorted({k.rsplit(".", 1)[-1] for k in known if k.count(".") == len(parts)
                   and all(p in ("*", q) for p, q in zip(parts, k.split(".")))})


def _extra_keys(dotted: str, node: dict, config: dict) -> frozenset | None:
    """Keys valid under ``dotted`` beyond those conf/ defines (what the code hands the node to accepts); ANY when
    the callable takes any keyword."""
    if dotted == "lora":  # every lora key but the four the recipe renames goes to PEFT's LoraConfig
        import dataclasses

        from peft import LoraConfig

        renamed = {"r", "lora_alpha", "lora_dropout", "target_modules"}  # ours: r, alpha, dropout, target_modules
        return frozenset(f.name for f in dataclasses.fields(LoraConfig)) - renamed
    if dotted == "init.params":  # the chosen method's keyword parameters (eva_bench.init checks them again)
        from .init import INITS

        method = INITS.get((config.get("init") or {}).get("name"))
        params = inspect.signature(method.apply).parameters.values() if method else ()
        return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY)  # as eva_bench.init._check_params
    if isinstance(node.get("_target_"), str):  # a call spec: the callable's arguments
        import hydra

        try:
            return _parameters(hydra.utils.get_method(node["_target_"]))
        except Exception:  # noqa: BLE001 - a target that cannot be imported fails later, with its own error
            return frozenset()
    return frozenset()


def _parameters(fn) -> frozenset | None:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return ANY
    return frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def _did_you_mean(key: str, valid: list[str]) -> str:
    """``: did you mean <prefix>.<closest>?`` by difflib, else the longest valid key the typed one starts with
    (``rank`` -> ``r``, too short for difflib); else the valid keys when they are few."""
    prefix, _, typed = key.rpartition(".")
    close = difflib.get_close_matches(typed, valid, n=2, cutoff=0.6) or \
        [v for v in sorted(valid, key=len, reverse=True) if typed.startswith(v)][:1]
    if close:
        return ": did you mean " + " or ".join(f"{prefix}.{v}" if prefix else v for v in close) + "?"
    return f" (valid here: {', '.join(valid)})" if 0 < len(valid) <= 12 else ""


def check_command_line(domain: str | None = None, args: list[str] | None = None) -> None:
    """Before Hydra composes a ``domain`` recipe's config (``conf/<domain>.yaml``): a plain override of a key
    nothing defines (``lora.rank=4``) exits with the close match, where Hydra would advise appending it with ``+``
    (which then fails on the same key). Only keys invalid under every option are named here; anything else is
    left to Hydra and ``check_config``."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = get_args_parser().parse_args(sys.argv[1:] if args is None else args)
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except (SystemExit, Exception):  # noqa: BLE001 - a command line Hydra cannot read: Hydra says why
        return
    known, messages = known_keys(domain), []
    for override in overrides:
        key = override.key_or_group
        plain = not (override.is_add() or override.is_force_add() or override.is_delete() or override.package)
        group = "/" in key or (CONF / key).is_dir()  # an option choice (experiment=..., hydra/launcher=...)
        if plain and not group and key.split(".")[0] not in SKIPPED and not _valid_somewhere(key, known):
            parent = key.rpartition(".")[0]
            messages.append(f"unknown key {key}{_did_you_mean(key, _siblings(parent, known))}")
    if messages:
        print("\n".join(messages) + "\n(nothing was run)", file=sys.stderr)
        raise SystemExit(1)


def _valid_somewhere(key: str, known) -> bool:
    """Whether ``key`` can be valid under some choice of options (the command line is checked before composing)."""
    parent, _, name = key.rpartition(".")
    if key in known or f"{parent}._target_" in known:  # a call spec's arguments depend on its target
        return True
    if parent == "init.params":  # a parameter of any init method
        from .init import INITS

        return any(p.name == name and p.kind is p.KEYWORD_ONLY
                   for m in INITS.values() for p in inspect.signature(m.apply).parameters.values())
    return parent == "lora" and name in _extra_keys("lora", {}, {})


# --- options of another task module -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def group_options(group: str) -> dict[str, dict]:
    """conf/<group>/'s options: file stem (what a user types after ``group=``) -> its unresolved content."""
    return {path.stem: _option(group, path.stem) for path in sorted((CONF / group).glob("*.yaml"))}


def _option(group: str, stem: str) -> dict:
    """An option's content over the options of its group it builds on (math_2000: ``defaults: [math]``)."""
    own = OmegaConf.load(CONF / group / f"{stem}.yaml")
    bases = [_option(group, entry) for entry in own.pop("defaults", []) if isinstance(entry, str) and entry != "_self_"]
    return OmegaConf.to_container(OmegaConf.merge(*bases, own), resolve=False) or {}


def domain_of(option: dict) -> str:
    """The task module an option serves; an option that does not say is a mistake (of a user's new file, mostly)."""
    if "domain" not in option:
        raise ConfigError(f"the {option.get('name', 'unnamed')!r} option declares no domain: add a `domain:` key "
                          "(language, vision or rl) to its YAML file")
    return option["domain"]


def domain_problem(cfg: DictConfig, group: str, domain: str) -> str | None:
    """Why ``cfg``'s ``group`` option cannot serve a ``domain`` recipe (None when it can): the option as the user
    typed it, its domain and the options that fit."""
    node = cfg[group]
    found = domain_of(node)
    if found == domain:
        return None
    valid = [stem for stem, option in group_options(group).items() if domain_of(option) == domain]
    return (f"{_typed(group, node, found)} is {_a(found)} option; the {domain} recipe needs {_a(domain)} {group}, "
            f"one of: {', '.join(valid)}")


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' or word == 'rl' else 'a'} {word}"  # "an rl option" (ar-el)


def _typed(group: str, node: DictConfig, found: str) -> str:
    """``group=<file stem>`` of the option that ``node`` was composed from: the one of domain ``found`` sharing
    most of its unresolved values (names like ``${.dataset}`` alone do not tell vtab from vtab_cpu)."""
    composed = dict(_leaves(OmegaConf.to_container(node, resolve=False)))
    scores = {stem: sum(composed.get(k) == v for k, v in _leaves(option))
              for stem, option in group_options(group).items() if domain_of(option) == found}
    best = [stem for stem, score in scores.items() if scores and score == max(scores.values())]
    return " or ".join(f"{group}={stem}" for stem in best) if best else f"{group}={node.get('name')}"


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, repr(node)


# --- a recipe's --help ------------------------------------------------------------------------------------------

DOMAIN_WORDS = {"language": {"language"}, "vision": {"vision", "vtab", "vit"}, "rl": {"rl", "dt"}}  # in option names


def option_domain(group: str, stem: str) -> str | None:
    """The task module an option serves: its ``domain:`` (models, tasks), its model's or task's (experiments), or a
    domain word in its name (``optim=vision_cpu``, ``lora=dt``); None for options every recipe shares (inits)."""
    if group in ("model", "task"):
        return domain_of(group_options(group)[stem])
    if group == "experiment":
        return _experiment_domain(stem)
    words = set(stem.split("_"))
    return next((domain for domain, marks in DOMAIN_WORDS.items() if words & marks), None)


def options_help(domain: str) -> str:
    """``group: option, ...`` for the groups the ``domain`` recipe composes (conf/<domain>.yaml's defaults), each
    listing its own and the shared options: what ``--help`` prints instead of every group's every option."""
    groups = [next(iter(entry)) for entry in OmegaConf.load(CONF / f"{domain}.yaml").defaults
              if isinstance(entry, DictConfig) and "/" not in next(iter(entry)) and " " not in next(iter(entry))]
    lines = []
    for group in sorted(groups):
        fitting = [stem for stem in group_options(group) if option_domain(group, stem) in (domain, None)]
        lines.append(f"{group}: {', '.join(fitting)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("eva_bench.options", options_help, replace=True)  # base/run.yaml's help template
