"""EVA: Explained Variance Adaptation (Paischer et al., arXiv 2410.07170v5 Sec. 3), at about the cost of its forwards.

A = the top principal directions of each adapted layer's *input activations* on calibration batches, from an
incremental PCA run until consecutive batches give components with cosine >= tau; ranks redistributed across layers
by explained variance within the budget r x (number of layers); B = 0, W untouched (docs/methods.md, EVA, steps 1-7).

The algorithm is PEFT 0.21's ``get_eva_state_dict`` step for step - which batches a layer sees, when it stops, how
ranks are allocated - so ``eva`` and ``eva_peft`` give the same result on the same batches (tests/test_init_eva.py);
only the arithmetic is arranged to cost little (bench/README.md, section (b)). This module is the method: forward
hooks on the base model that feed each input group's statistics (layers fed the same tensor object form a group,
found in the first forward), PEFT's loop, stopping rule and rank allocation, and the LoRA model. The incremental PCA
is eva_pca.py; the statistics cache, eva_replay.py; where this still differs from PEFT, docs/methods.md.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
import weakref
from collections import Counter

import torch
from peft import EvaConfig, LoraConfig, get_peft_model

from .. import distributed
from . import eva_replay
from .calibration import Calibration, first_input, select_rows
from .eva_pca import Group, Stats, update_states
from .targets import find_targets, in_features

_STASH_BYTES = 1 << 30  # rows-path inputs kept per forward for a batched update after it; beyond, updates in the hook


def eva(
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
    exact_pca: bool = False,
    cache: bool = True,
    permute_layers: bool = False,
):
    """EVA init. ``label_mask``: keep only loss-carrying rows (the paper did not, for math and commonsense).

    ``adjust_scaling_factors``: when a layer's rank moves from r to r', scale alpha by r'/r so s = alpha/r is kept
    (PEFT's behaviour; the authors' training code does not). ``max_batches``: at most this many calibration batches,
    each used once (default: all the task supplied). ``exact_pca``: exact principal directions of every row seen
    instead of the paper's/PEFT's truncated incremental SVD (docs/methods.md, EVA). ``cache``: reuse / store the
    statistics (eva_replay.py).
    ``permute_layers``: the ``eva_perm`` control (controls.py): each layer gets the components of another input
    group of the same width (a random derangement, torch's global RNG); ranks and scales stay EVA's.
    """
    check_eva_params(rho, tau)
    check_components_fit(model, lora_config, rho)
    if lora_config.rank_pattern or lora_config.alpha_pattern:
        raise ValueError("eva: per-layer rank_pattern/alpha_pattern are not supported; EVA sets the ranks itself")
    targets = list(find_targets(model, lora_config.target_modules))  # model order, as PEFT iterates named_modules
    k = round(lora_config.r * rho)
    budget = lora_config.r * len(targets)
    cap = min(max_batches or len(calibration.batches), len(calibration.batches))
    distributed.same_everywhere(cap, "eva: the number of calibration batches")
    batches = list(calibration.batches[:cap])
    masks = [calibration.mask(b, loss_only=label_mask) for b in batches]
    run = dict(targets=targets, k=k, budget=budget, tau=tau, cap=cap)

    feed, status = None, "off"
    cache = cache and not distributed.is_distributed()  # a key of one rank's batches would not describe the union
    key = eva_replay.cache_key(model, batches, masks, targets, label_mask, cap, exact_pca) if cache else None
    if key is not None:
        feed, ranks, used = eva_replay.replay(key, k, exact_pca, lambda feed: _calibrate(feed, **run))
        status = "miss" if feed is None else "hit"
    if feed is None:
        feed = _Forwards(model, targets, calibration.forward, batches, masks, k, exact_pca, record=key is not None)
        ranks, used = _calibrate(feed, **run)
        if key is not None:
            eva_replay.save(key, feed.groups, k)

    group_of = {name: g for g in feed.groups for name in g.names}
    unconverged = sorted(n for n, r in ranks.items() if r and group_of[n].needs_data(r, tau))
    if unconverged:
        warnings.warn(
            f"EVA: {len(unconverged)} layer(s) had not converged to tau={tau} after {used} calibration batches; "
            f"their components are the best estimate so far: {', '.join(unconverged)}. "
            "Supply more calibration batches (or lower tau) for converged components.",
            stacklevel=3,
        )
    donor = _derangement(feed.groups) if permute_layers else {id(g): g for g in feed.groups}
    rows = {}
    for name, r in ranks.items():
        if r:
            state = donor[id(group_of[name])].state.head(r)  # every group holds k >= r components
            # whitening (Sec. 3): divide by the square root of the singular values, once per layer
            rows[name] = state.components / state.singular_values.sqrt().unsqueeze(1) if whiten else state.components
    eva_config = EvaConfig(
        rho=rho, tau=tau, use_label_mask=label_mask, whiten=whiten, adjust_scaling_factors=adjust_scaling_factors
    )
    peft_model = _wrap(model, lora_config, ranks, rows, adjust_scaling_factors, eva_config)
    distributed.broadcast_trainable(peft_model)  # bit-identical adapters on every rank (no-op in one process)
    return peft_model, {
        "calibration_batches": used,
        "forward_passes": feed.passes,
        "unconverged_layers": unconverged,
        "explained_variance": {  # share of input variance the kept components explain, per adapted layer
            n: round(group_of[n].state.ratios[:r].sum().item(), 6) for n, r in ranks.items() if r
        },
        "cache": status,
        **({"donors": {n: donor[id(group_of[n])].names[0] for n, r in ranks.items() if r}} if permute_layers else {}),
    }


def _derangement(groups: list[Group]) -> dict[int, Group]:
    """id(group) -> the group whose components it takes: within each input width, the groups in a random order each
    take the next one's (a cyclic shift, so none keeps its own). A width with a single group cannot be permuted."""
    by_width: dict[int, list[Group]] = {}
    for g in groups:
        by_width.setdefault(g.state.components.shape[1], []).append(g)
    lonely = [n for same in by_width.values() if len(same) == 1 for n in same[0].names]
    if len(lonely) == sum(len(g.names) for g in groups):
        raise ValueError(
            "eva_perm: no two input groups share a width, so no layer can take another's components "
            f"(widths: {sorted(by_width)}); the control is undefined for these target layers"
        )
    if lonely:
        warnings.warn(f"eva_perm: {len(lonely)} layer(s) have no other input group of their width and keep their own "
                      f"components: {', '.join(lonely)}", stacklevel=4)
    donor = {}
    for same in by_width.values():
        order = [same[i] for i in torch.randperm(len(same)).tolist()]
        for i, g in enumerate(order):
            donor[id(g)] = order[(i + 1) % len(order)]
    return donor


# ---------------------------------------------------------------------------------------------------- the loop


def _calibrate(feed, *, targets: list[str], k: int, budget: int, tau: float, cap: int):
    """PEFT 0.21's EVA loop (``_get_eva_state_dict``) over at most ``cap`` batches, each used once.

    ``feed(i, active)`` brings the ``active`` groups (None: every target layer, the first pass, which finds the
    groups) up to date with batch ``i``. Returns the per-layer ranks and the number of batches consumed.
    """
    ranks = dict.fromkeys(targets, k)  # every layer needs all k components until each group has some (PEFT)
    used = 0
    for i in range(cap):
        active = None
        if feed.groups:
            active = [g for g in feed.groups if g.needs_data(ranks[g.names[0]], tau)]
            if not active:
                break
        feed(i, active)
        used += 1
        if all(g.state is not None for g in feed.groups):
            ranks = _allocate(feed.groups, k, budget)
    return ranks, used


def _allocate(groups: list[Group], k: int, budget: int) -> dict[str, int]:
    """Rank redistribution (Sec. 3.2) with PEFT's tie-breaking: the same values in the same order, the same
    (unstable) ``torch.argsort`` call.

    Every layer offers its group's top-k explained-variance ratios; the top ``budget`` values of the pool survive and
    a layer's rank is how many of its own survived. Layers sharing an input offer identical values, so which of them
    wins a tie at the boundary is up to the sort; afterwards the group's leading layer takes the largest count.
    """
    group_of = {n: g for g in groups for n in g.names}
    keys = [g.names[0] for g in groups] + [n for g in groups for n in g.names[1:]]  # PEFT's layer_hook_map order
    values = torch.cat([group_of[n].state.ratios[:k].cpu() for n in keys])
    owners = [n for n in keys for _ in range(k)]
    order = torch.argsort(values, descending=True)
    counts = Counter(owners[i] for i in order[:budget].tolist())
    ranks = {n: counts.get(n, 0) for n in keys}
    for g in groups:
        for n in g.names[1:]:
            if ranks[n] > ranks[g.names[0]]:
                ranks[n], ranks[g.names[0]] = ranks[g.names[0]], ranks[n]
    return ranks


# -------------------------------------------------------------------------------- statistics from forward passes


class _Forwards:
    """Feeds the loop from calibration forward passes: hooks reduce layer inputs into each group's statistics."""

    def __init__(self, model, targets: list[str], forward, batches, masks, k: int, exact_pca: bool, *, record: bool):
        self.model, self.targets, self.forward = model, targets, forward
        self.batches, self.masks, self.k, self.exact_pca, self.record = batches, masks, k, exact_pca, record
        self.groups: list[Group] = []
        self.stats: dict[int, Stats] = {}  # id(group) -> its statistics
        self.passes = 0
        self._seen: list[tuple[weakref.ref, Group]] = []  # first pass: input tensors seen so far, and their group
        self._group_of: dict[str, Group] = {}
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")

    def __call__(self, i: int, active: list[Group] | None) -> None:
        mask = self.masks[i] if self.masks[i] is None else self.masks[i].to(self.device)
        offered: dict[int, int] = {}  # id(group) -> input rows in this batch
        stashed = [0]  # bytes of layer inputs kept for after the forward

        def add(group: Group, layer_input) -> None:
            x = first_input(layer_input)
            rows = distributed.cat_rows(select_rows(x, mask).float())  # every rank's rows (one process: its own)
            offered[id(group)] = offered.get(id(group), 0) + rows.shape[0]
            if rows.shape[0] >= self.k:  # PEFT skips a batch with fewer rows than components (its SVD needs them)
                may_stash = stashed[0] + rows.nbytes <= _STASH_BYTES
                aliased = rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                stashed[0] += self.stats[id(group)].add(rows, may_stash=may_stash, aliased=aliased)

        if active is None:  # first pass: hook every target, find shared inputs by identity
            hooks = [(name, self._first_pass_hook(name, add)) for name in self.targets]
        else:
            hooks = [(g.names[0], (lambda g: lambda _m, args, _o: add(g, args))(g)) for g in active]
        handles = [self.model.get_submodule(name).register_forward_hook(hook) for name, hook in hooks]
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.forward(self.model, self.batches[i])
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(training)
        self.passes += 1

        if active is None:
            self._order_groups()
        updated = self.groups if active is None else active
        states = update_states(updated, self.stats, self.k)
        for g, state in zip(updated, states):
            if state is not None:
                g.state = state
            if self.record:
                g.history.append((i, offered.get(id(g), 0), None if state is None else eva_replay.to_cpu(state)))

    def _first_pass_hook(self, name: str, add):
        """A hook that puts ``name`` in the group of the earlier layer that got the same tensor object, or a new one.

        ``self._seen`` holds weak references: it never keeps an activation alive, and a dead reference cannot match a
        new tensor that reuses the memory or the id of a freed one.
        """

        def hook(_module, args, _output):
            x = first_input(args)
            for ref, g in self._seen:
                if ref() is x:
                    if name not in self._group_of:
                        g.names.append(name)
                        self._group_of[name] = g
                    return
            g = self._group_of.get(name)
            if g is None:
                g = self._group_of[name] = Group([name])
                self.stats[id(g)] = Stats(truncate=not self.exact_pca, k=self.k)
                self.groups.append(g)
            self._seen.append((weakref.ref(x), g))
            if g.names[0] == name:
                add(g, args)

        return hook

    def _order_groups(self) -> None:
        """Model order within and across groups (PEFT: the first equal-input layer in named_modules leads)."""
        position = {n: j for j, n in enumerate(self.targets)}
        missing = [n for n in self.targets if not any(n in g.names for g in self.groups)]
        if missing:
            raise ValueError(f"EVA: target layer(s) never ran in the calibration forward: {', '.join(missing)}")
        for g in self.groups:
            g.names.sort(key=position.__getitem__)
        self.groups.sort(key=lambda g: position[g.names[0]])
        self._seen = []


# ---------------------------------------------------------------------------------------------------- the LoRA model


def _wrap(model, lora_config: LoraConfig, ranks: dict, rows: dict, adjust_scaling_factors: bool, eva_config):
    """``get_peft_model`` with EVA's per-layer ranks (rank 0: no adapter), then lora_A = the components, B = 0."""
    r, alpha = lora_config.r, lora_config.lora_alpha
    changed = {n: rank for n, rank in ranks.items() if rank and rank != r}
    config = dataclasses.replace(
        lora_config,
        target_modules=[n for n, rank in ranks.items() if rank],
        # PEFT matches pattern keys as regexes against the end of a module name: escape the dots of full names
        rank_pattern={re.escape(n): rank for n, rank in changed.items()},
        alpha_pattern={re.escape(n): alpha * rank / r for n, rank in changed.items()} if adjust_scaling_factors else {},
        init_lora_weights="eva",  # PEFT's EVA layer init: B = 0 (A is written below); also recorded in the config
        eva_config=eva_config,
    )
    with warnings.catch_warnings():  # PEFT suggests low_cpu_mem_usage; irrelevant at the sizes EVA runs here
        warnings.filterwarnings("ignore", message=".*low_cpu_mem_usage.*")
        peft_model = get_peft_model(model, config)
    base = peft_model.base_model.model
    with torch.no_grad():
        for name, a in rows.items():
            weight = base.get_submodule(name).lora_A["default"].weight
            weight.copy_(a.to(device=weight.device, dtype=weight.dtype))
    return peft_model


# ---------------------------------------------------------------------------------------------------- validation


def check_eva_params(rho: float, tau: float) -> None:
    if rho < 1:
        raise ValueError(f"eva: rho must be >= 1 (got {rho}); rho = 1 keeps uniform ranks")
    if not 0 < tau <= 1:
        raise ValueError(f"eva: tau is a cosine similarity threshold in (0, 1] (got {tau})")


def check_components_fit(model, lora_config: LoraConfig, rho: float) -> None:
    """Each layer computes round(r * rho) components of a d_in-dim input: that must not exceed d_in."""
    needed = round(lora_config.r * rho)
    for name, module in find_targets(model, lora_config.target_modules).items():
        d_in = in_features(module)
        if needed > d_in:
            raise ValueError(
                f"eva: rank {lora_config.r} x rho {rho} = {needed} components, but layer {name} has only "
                f"{d_in} input features; lower the rank or rho"
            )
