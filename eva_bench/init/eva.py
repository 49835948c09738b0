"""EVA: Explained Variance Adaptation (Paischer et al., arXiv 2410.07170v5 Sec. 3), at about the cost of its forwards.

What EVA is (see also docs/methods.md): A = the top right-singular vectors of each adapted layer's *input
activations* on downstream minibatches, from an incremental SVD (incremental PCA: the running mean is subtracted) run
until consecutive minibatches give components with cosine similarity >= tau (Sec. 3.1); ranks are redistributed
across layers by explained variance within the budget r x (number of layers), each layer offering round(r * rho)
components (Sec. 3.2); B = 0, W untouched. EVA never decomposes the weights (that would be CorDA / PiSSA).

The algorithm here is PEFT 0.21's ``get_eva_state_dict`` (written by the paper's authors) step for step - which
batches a layer sees, its incremental SVD, when it stops, how ranks are allocated - so ``eva`` and ``eva_peft``
(eva_peft.py) give the same result on the same batches (tests/test_eva_fast.py: the incremental SVD matches PEFT's
IncrementalPCA batch by batch). Only the arithmetic is arranged differently, at a fraction of PEFT's cost
(bench/eva.py; figures in bench/README.md, "EVA cost"):
- Statistics are gathered on the base model, before any LoRA wrapping, by forward hooks on one layer per group.
  A hook only reduces the layer's masked input rows (float32): into a d x d moment matrix by one product (narrow
  inputs), or by keeping them for a batched update after the forward (wide inputs); see ``_Stats``. PEFT runs its
  whole update per layer inside the hook, with float64 passes over the rows to track per-feature variances.
- Layers receiving the same input (q/k/v; gate/up) share one decomposition (methods.md step 7). They are found by
  tensor *identity* during the first forward (the same tensor object reaches q, k and v); PEFT hashes the values of
  every layer's input with a Python-level ``hash(tuple(x.tolist()))`` in an extra forward pass.
- The incremental SVD is PEFT's IncrementalPCA: after each batch the estimate keeps only its top k = round(r * rho)
  directions (the paper's incremental SVD keeps k components between batches), and the new directions come from
  PEFT's randomized SVD (``torch.svd_lowrank(q=2k, niter=4)``, seed 42), reproduced from products with the Gram
  matrix of PEFT's SVD input (``_lowrank_eigh``), which is never formed. Updates are batched over groups of one
  input width. Components are sign-fixed as PEFT's ``svd_flip`` (largest entry positive), because consecutive
  components are compared by signed cosine.
- Convergence and stopping as PEFT: a group keeps receiving batches until the components its leading layer's current
  rank needs have cosine >= tau with the previous batch's; converged groups are unhooked (and hooked again if the
  reallocation gives them more rank); the run stops when every group has converged, or at the batch cap. A batch
  that gives a group fewer rows than k is skipped for it, as PEFT does.
- Rank redistribution as PEFT: pool the top-k ratios of every layer (layers sharing an input offer the same values),
  keep the global top r x N with the same ``torch.argsort`` call on the values in the same order (PEFT's unstable
  sort breaks ties between a group's layers), count per layer, and let a group's leading layer take the largest count.
- The LoRA model is built by ``get_peft_model`` with ``rank_pattern``/``alpha_pattern`` (alpha' = alpha r'/r under
  ``adjust_scaling_factors``, as PEFT); rank-0 layers are not adapted; the lora_A rows are written in.

``exact_pca=True`` replaces the truncated, randomized incremental SVD by the exact PCA of every row seen (``eigh`` of
the whole scatter; O(d^3) per group and batch, and d x d memory per group). Truncation loses real variance when a
layer's input spectrum is flat: on a randomly initialised ViT-tiny with random images, PEFT's 5th/6th components of
attn.proj have cosine 0.23-0.35 with the true principal directions of the same batches, and its explained variance
is 0.32 where the truth is 0.38, which moves rank between layers (24 of 48 layers differ). On stories260K
(pretrained, decaying spectra) both give the same ranks. The default stays the paper's/PEFT's algorithm.

Differences from PEFT 0.21 that remain: inputs equal by value but not the same tensor object are decomposed
separately (same components; a tie at the allocation boundary may then break differently); a layer called more than
once per forward is updated once per batch with all its rows (PEFT: once per call); when PEFT's SVD input is wider
than tall (rows + k + 1 < d) or 2k > d, svd_lowrank transposes it or cannot run, and the exact top-k stands in;
whitening divides each layer once, not once per group member.

Cache (``cache=True``, eva_bench/init/cache.py). Stored: each group's state after every batch it was offered,
keyed by the model, the batches and their row masks, the target layers, ``label_mask``, the batch cap and
``exact_pca``; entries are named by k. A run is *replayed* from an entry: the same loop runs on the stored states
instead of forward passes, with its own tau, budget (r) and whitening/scaling. If the replayed run needs a batch the
stored run did not give a group (it had stopped that group earlier, or paused it), the entry cannot say what would
have happened: that is a miss, and the statistics are recomputed and stored. Which entries may serve a request:
- default (truncated) PCA: only an entry with the same k. Its states depend on k itself (k directions are kept
  between batches, and the random start has 2k columns), so a larger run's first components are not the smaller
  run's; reusing them would make a result depend on what the cache happened to hold.
- ``exact_pca``: any entry with k' >= k: its first k components, ratios, cosines and signs are those a k run computes
  (one ``eigh`` of the same matrix; each is per component). So components computed once for the largest r x rho serve
  a smaller rank whenever the smaller run consumes, per group, a prefix of the batches the larger one did: always with
  uniform ranks (rho = 1); with redistribution, a group whose rank drops to 0 is unhooked (as PEFT does) and may
  resume later, which the larger run's entry does not hold - a miss (stories260K, r = 8 then r = 2: a hit).
So a hit returns what a fresh computation returns, whatever the cache held before (bit for bit in the tests; in
principle to rounding, as batched products may round differently when a different set of groups shares a batch).

Several processes (``torchrun``; eva_bench/distributed.py). Each rank offers its own calibration batches; at every
step each hook concatenates the masked input rows of all ranks (rank order) before the update, so every rank runs
the incremental SVD, convergence and allocation of one process whose batch i is the union of the ranks' batches i,
and ends with the same components (rank 0's adapters are broadcast at the end). Every rank must supply the same
number of batches. The cache is off there (its key is one rank's batches, not the union).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import EvaConfig, LoraConfig, get_peft_model

from .. import distributed
from . import cache as stats_cache
from .calibration import Calibration, select_rows

_LOWRANK_NITER, _LOWRANK_SEED = 4, 42  # PEFT's IncrementalPCA(lowrank=True): svd_lowrank(q=2k, niter=4), seed 42
_STASH_BYTES = 1 << 30  # rows-path inputs kept per forward for a batched update after it; beyond, updates in the hook


@dataclass
class _State:
    """A group's decomposition after some batch (PEFT's IncrementalPCA attributes of the same names)."""

    components: torch.Tensor  # (k, d) float32 unit rows, sign fixed as PEFT's svd_flip: largest |entry| positive
    singular_values: torch.Tensor  # (k,) sqrt of the eigenvalues of the centred scatter
    ratios: torch.Tensor  # (k,) explained-variance ratios: eigenvalue / total variance of every row seen
    cosines: torch.Tensor | None  # (k,) cosine with the group's previous state; None for its first state

    def head(self, k: int) -> _State:
        cos = None if self.cosines is None else self.cosines[:k]
        return _State(self.components[:k], self.singular_values[:k], self.ratios[:k], cos)


@dataclass
class _Group:
    """Target layers that receive one identical input and so share one decomposition (methods.md step 7)."""

    names: list[str]  # in model order; names[0] leads (PEFT hooks it and gives it the group's largest rank)
    state: _State | None = None
    history: list[tuple[int, int, _State | None]] = field(default_factory=list)  # (batch, rows offered, new state)

    def needs_data(self, rank: int, tau: float) -> bool:
        """PEFT's rule: hooked until the first ``rank`` components have cosine >= tau with the previous batch's."""
        if rank == 0:
            return False
        state = self.state
        return state is None or state.cosines is None or not bool((state.cosines[:rank] >= tau).all())


class _Miss(Exception):
    """A replayed run needs a batch the cached run did not give that group."""


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
    instead of the paper's/PEFT's truncated incremental SVD (module doc). ``cache``: reuse / store the statistics.
    ``permute_layers``: the ``eva_perm`` control (controls.py): each layer gets the components of another input
    group of the same width (a random derangement, torch's global RNG); ranks and scales stay EVA's.
    """
    check_eva_params(rho, tau)
    check_components_fit(model, lora_config, rho)
    if lora_config.rank_pattern or lora_config.alpha_pattern:
        raise ValueError("eva: per-layer rank_pattern/alpha_pattern are not supported; EVA sets the ranks itself")
    from . import find_targets

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
    key = _cache_key(model, batches, masks, targets, label_mask, cap, exact_pca) if cache else None
    if key is not None:
        feed, ranks, used = _replay_from_cache(key, exact_pca, run)
        status = "miss" if feed is None else "hit"
    if feed is None:
        feed = _Forwards(model, targets, calibration.forward, batches, masks, k, exact_pca, record=key is not None)
        ranks, used = _calibrate(feed, **run)
        if key is not None:
            stats_cache.StatsCache().save(key, _entry(feed.groups, k), f"k{k}")

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


def _derangement(groups: list[_Group]) -> dict[int, _Group]:
    """id(group) -> the group whose components it takes: within each input width, the groups in a random order each
    take the next one's (a cyclic shift, so none keeps its own). A width with a single group cannot be permuted."""
    by_width: dict[int, list[_Group]] = {}
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


def _allocate(groups: list[_Group], k: int, budget: int) -> dict[str, int]:
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


# ---------------------------------------------------------------------------------------------------- statistics


class _Forwards:
    """Feeds the loop from calibration forward passes: hooks reduce layer inputs into each group's statistics."""

    def __init__(self, model, targets: list[str], forward, batches, masks, k: int, exact_pca: bool, *, record: bool):
        self.model, self.targets, self.forward = model, targets, forward
        self.batches, self.masks, self.k, self.exact_pca, self.record = batches, masks, k, exact_pca, record
        self.groups: list[_Group] = []
        self.stats: dict[int, _Stats] = {}  # id(group) -> its statistics
        self.passes = 0
        self._seen: list[tuple[weakref.ref, _Group]] = []  # first pass: input tensors seen so far, and their group
        self._group_of: dict[str, _Group] = {}
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")

    def __call__(self, i: int, active: list[_Group] | None) -> None:
        mask = self.masks[i] if self.masks[i] is None else self.masks[i].to(self.device)
        offered: dict[int, int] = {}  # id(group) -> input rows in this batch
        stashed = [0]  # bytes of layer inputs kept for after the forward

        def add(group: _Group, layer_input) -> None:
            x = _first(layer_input)
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
        states = _update_states(updated, self.stats, self.k)
        for g, state in zip(updated, states):
            if state is not None:
                g.state = state
            if self.record:
                g.history.append((i, offered.get(id(g), 0), None if state is None else _to_cpu(state)))

    def _first_pass_hook(self, name: str, add):
        """A hook that puts ``name`` in the group of the earlier layer that got the same tensor object, or a new one.

        ``self._seen`` holds weak references: it never keeps an activation alive, and a dead reference cannot match a
        new tensor that reuses the memory or the id of a freed one.
        """

        def hook(_module, args, _output):
            x = _first(args)
            for ref, g in self._seen:
                if ref() is x:
                    if name not in self._group_of:
                        g.names.append(name)
                        self._group_of[name] = g
                    return
            g = self._group_of.get(name)
            if g is None:
                g = self._group_of[name] = _Group([name])
                self.stats[id(g)] = _Stats(truncate=not self.exact_pca, k=self.k)
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


class _Stats:
    """One group's incremental SVD: PEFT's ``IncrementalPCA.partial_fit`` once per batch, arranged to cost little.

    The update merges a batch's scatter S_b (about its own mean m_b) into the running estimate by the pairwise rule of
    Chan, Golub & LeVeque (1979), which is PEFT's mean-correction row: S <- S + S_b + n n_b / (n + n_b) dd^T with
    d = m_b - m. With ``truncate`` (the default; the paper's incremental SVD, Sec. 3.1, and PEFT) S is kept as its top
    k directions V diag(l) V^T, and the new top directions come from PEFT's randomized SVD (``_lowrank_eigh``), which
    only needs products of the new S with d x 2k bases: PEFT's SVD input [diag(s) V; X_b - m_b; mean correction] has
    Gram matrix exactly V diag(l) V^T + S_b + n n_b / (n + n_b) dd^T. The products with S_b are formed one of two
    ways, whichever costs less for the input width d (same arithmetic up to rounding):
    - the "gram" path (d <= 64 k): the hook accumulates M_b = sum over rows of [y, 1]^T [y, 1] with y = x - c
      (c = the first batch's mean, fixed), one n x d x d product per call; its blocks give S_b = sum y y^T -
      (sum y)(sum y)^T / n_b (c keeps that correction small, so float32 loses nothing to cancellation even when
      |mean| >> spread), and S_b w = M_b's block times w.
    - the "rows" path (d > 64 k): the hook keeps the rows X, and S_b w = X_c^T (X_c w) with X_c = X - m_b, as PEFT
      computes: 2 (niter + 1) products of n x d by d x 2k instead of one of n x d by d x d. The kept rows are dropped
      at the update; if they would exceed _STASH_BYTES in one forward (a 7B model), the update runs in the hook.
    The flop ratio favours the rows path from d > 20 k, but its ~30 thin operations per update are latency-bound on
    CPUs. The 64 k threshold comes from per-group timings (k = 8, n = 2080, 2 cores) of an earlier version whose
    updates ran single-threaded and stacked the rows: gram vs rows 1.9 vs 4.2 ms (d = 192), 4.8 vs 7.3 ms (384),
    15.0 vs 12.5 ms (768); not remeasured since. Gram-path groups of one width are updated together, batched (one
    call per operation instead of one per group); rows-path groups one by one (``_RowsBatch``). Without ``truncate`` (``exact_pca``) S is the exact scatter of every row seen,
    kept whole (gram path) and solved by ``eigh``. The explained-variance ratios divide by the exact total variance
    in every case, as PEFT does.
    """

    def __init__(self, truncate: bool, k: int):
        self.truncate, self.k = truncate, k
        self.n = 0  # rows merged so far
        self.mean: torch.Tensor | None = None  # (d,) float64 running mean
        self.total = 0.0  # total variance of every row seen (trace of the exact scatter)
        self.values: torch.Tensor | None = None  # (k,) truncated: the kept eigenvalues
        self.vectors: torch.Tensor | None = None  # (d, k) truncated: the kept directions
        self.scatter: torch.Tensor | None = None  # (d, d) float64, exact_pca: the whole scatter
        self.shift: torch.Tensor | None = None  # (d,) float32: c (gram path)
        self.batch: torch.Tensor | None = None  # (d + 1, d + 1) float32: M_b of the pending rows (gram path)
        self.stash: list[torch.Tensor] = []  # the pending rows themselves (rows path)
        self.pending = 0  # rows received since the last update
        self.top: tuple[torch.Tensor, torch.Tensor] | None = None  # the last update's top-k (values, vectors)
        self.fresh = False  # updated since the last state was taken

    def rows_path(self, d: int) -> bool:
        return self.truncate and d > 64 * self.k

    def add(self, rows: torch.Tensor, may_stash: bool = True, aliased: bool = False) -> int:
        """Take a batch's rows (n_b x d, float32); returns the bytes kept until the update. ``aliased``: the rows
        share memory with the layer's input, which the model might still modify in place: kept as a copy."""
        n_b, d = rows.shape
        self.pending += n_b
        if self.rows_path(d):
            self.stash.append(rows.clone() if aliased else rows)  # centred in place at the update
            if may_stash:
                return rows.nbytes
            # no room to keep them: update now, in the hook
            _merge([self], d, self.k, _RowsBatch([self]), _lowrank_applies(self, d, self.k, self.pending))
            return 0
        if self.shift is None:
            self.shift = rows.mean(0)
            self.batch = rows.new_empty(d + 1, d + 1)
        y = rows.new_empty(n_b, d + 1)
        torch.sub(rows, self.shift, out=y[:, :d])
        y[:, d] = 1
        if self.pending > n_b:
            self.batch.addmm_(y.T, y)
        else:
            torch.mm(y.T, y, out=self.batch)
        return 0


class _GramBatch:
    """The pending batch of G gram-path groups of one width: S_b products from the accumulated M_b blocks."""

    def __init__(self, sts: list[_Stats], d: int):
        batch = torch.stack([st.batch for st in sts])  # (G, d + 1, d + 1) float32
        self.gram, self.sums = batch[:, :d, :d], batch[:, :d, d].double()
        self.n = torch.tensor([float(st.pending) for st in sts], dtype=torch.float64, device=batch.device)
        self.mean = torch.stack([st.shift for st in sts]).double() + self.sums / self.n.unsqueeze(1)
        self.trace = torch.diagonal(self.gram, dim1=1, dim2=2).sum(1).double() - self.sums.square().sum(1) / self.n

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        centre = self.sums.unsqueeze(2) * (self.sums.unsqueeze(1) @ w) / self.n.view(-1, 1, 1)
        return (self.gram @ w.float()).double() - centre

    def explicit(self) -> torch.Tensor:
        return self.gram.double() - self.sums.unsqueeze(2) * self.sums.unsqueeze(1) / self.n.view(-1, 1, 1)


class _RowsBatch:
    """The pending batch of G rows-path groups of one width: S_b products from their kept rows, centred in place
    (the rows belong to the statistics: ``_Stats.add`` copies any that alias a layer input). A loop over the groups,
    not one batched product: stacking them would copy every row once more, and each product is large enough
    (n x d by d x 2k) that the per-call overhead does not count."""

    def __init__(self, sts: list[_Stats]):
        self.rows = []
        for st in sts:
            self.rows.append(torch.cat(st.stash) if len(st.stash) > 1 else st.stash[0])
            st.stash = []
        means = [rows.mean(0) for rows in self.rows]  # float32, as PEFT centres a batch (X -= mean(X))
        for rows, mean in zip(self.rows, means):
            rows.sub_(mean)
        self.mean = torch.stack(means).double()
        self.n = torch.tensor([float(rows.shape[0]) for rows in self.rows], dtype=torch.float64, device=self.mean.device)
        self.trace = torch.stack([torch.linalg.vector_norm(rows) for rows in self.rows]).double().square()

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        w = w.float()
        return torch.stack([rows.T @ (rows @ w_j) for rows, w_j in zip(self.rows, w)]).double()

    def explicit(self) -> torch.Tensor:
        return torch.stack([rows.T @ rows for rows in self.rows]).double()


def _lowrank_applies(st: _Stats, d: int, k: int, n_b: int) -> bool:
    """Whether PEFT's randomized SVD is reproducible for this update. PEFT's SVD input is the batch's rows, plus k
    kept directions and a mean-correction row after the first batch; svd_lowrank draws its random start in the
    input's row space only when it is at least as tall as wide (else it transposes it), and 2k <= d is needed.
    Otherwise the exact top-k stands in (module doc)."""
    return st.truncate and 2 * k <= d <= n_b + (k + 1 if st.n else 0)


def _merge(sts: list[_Stats], d: int, k: int, batch, lowrank: bool) -> None:
    """Merge ``batch`` (the pending rows of each of the G groups ``sts``) into their estimates, batched over G; the
    new top-k goes to each group's ``top``. ``lowrank``: PEFT's randomized SVD (else the exact top-k)."""
    f64 = dict(dtype=torch.float64, device=batch.mean.device)
    n = torch.tensor([float(st.n) for st in sts], **f64)
    mean = torch.stack([st.mean if st.n else torch.zeros(d, **f64) for st in sts])
    delta = batch.mean - mean
    weight = n * batch.n / (n + batch.n)  # 0 at a group's first batch: S = S_b
    totals = torch.tensor([st.total for st in sts], **f64) + batch.trace + weight * delta.square().sum(1)
    truncate = sts[0].truncate
    if truncate:  # the k kept directions (zero before a group's first batch)
        kept_values = torch.stack([st.values if st.n else torch.zeros(k, **f64) for st in sts])
        kept_vectors = torch.stack([st.vectors if st.n else torch.zeros(d, k, **f64) for st in sts])

    if lowrank:

        def apply(w: torch.Tensor) -> torch.Tensor:  # S_new @ w for w (G, d, q), S_new never formed
            out = batch.apply(w)
            out += kept_vectors @ (kept_values.unsqueeze(2) * (kept_vectors.transpose(1, 2) @ w))
            out += weight.view(-1, 1, 1) * delta.unsqueeze(2) * (delta.unsqueeze(1) @ w)
            return out

        values, vectors = _lowrank_eigh(apply, d, k, [st.n == 0 for st in sts], mean.device)
    else:
        scatter = batch.explicit() + weight.view(-1, 1, 1) * delta.unsqueeze(2) * delta.unsqueeze(1)
        if truncate:
            scatter += kept_vectors @ (kept_values.unsqueeze(2) * kept_vectors.transpose(1, 2))
        else:
            scatter += torch.stack([st.scatter if st.n else torch.zeros(d, d, **f64) for st in sts])
        all_values, all_vectors = torch.linalg.eigh(scatter)
        values, vectors = all_values.flip(1)[:, :k], all_vectors.flip(2)[:, :, :k]
    values = values.clamp_min(0)

    new_mean = mean + delta * (batch.n / (n + batch.n)).unsqueeze(1)
    for j, (st, total, n_b) in enumerate(zip(sts, totals.tolist(), batch.n.tolist())):
        st.mean, st.n, st.total, st.pending = new_mean[j], st.n + int(n_b), total, 0
        st.top, st.fresh = (values[j], vectors[j]), True
        if truncate:
            st.values, st.vectors = values[j], vectors[j]
        else:
            st.scatter = scatter[j]


def _update_states(groups: list[_Group], stats: dict[int, _Stats], k: int) -> list[_State | None]:
    """Bring every group that received rows up to date; the new state of each group (None: no rows this batch).

    Groups of one input width (and path) are merged together: one call per operation instead of one per group for
    the gram path (at these sizes the per-call overhead, not the arithmetic, is the cost). States are taken together.
    """
    pending: dict[tuple, list[_Stats]] = {}
    for g in groups:
        st = stats[id(g)]
        if st.stash:  # rows path
            d = st.stash[0].shape[1]
            pending.setdefault(("rows", d, _lowrank_applies(st, d, k, st.pending)), []).append(st)
        elif st.pending:
            d = st.batch.shape[0] - 1
            pending.setdefault(("gram", d, _lowrank_applies(st, d, k, st.pending)), []).append(st)
    for (path, d, lowrank), sts in pending.items():
        _merge(sts, d, k, _RowsBatch(sts) if path == "rows" else _GramBatch(sts, d), lowrank)

    fresh: dict[int, list[int]] = {}
    for j, g in enumerate(groups):
        st = stats[id(g)]
        if st.fresh:
            st.fresh = False
            fresh.setdefault(st.top[1].shape[0], []).append(j)
    new: list[_State | None] = [None] * len(groups)
    for members in fresh.values():
        _take_states(groups, members, stats, new)
    return new


def _take_states(groups: list[_Group], members: list[int], stats: dict[int, _Stats], new: list) -> None:
    """The states of ``members`` (indices into ``groups``, one input width) after their update, batched."""
    sts = [stats[id(groups[j])] for j in members]
    values = torch.stack([st.top[0] for st in sts])
    components = torch.stack([st.top[1] for st in sts]).transpose(1, 2)  # (G, k, d)
    totals = torch.tensor([st.total for st in sts], dtype=torch.float64, device=values.device)
    # PEFT's svd_flip(u_based_decision=False): each component's largest-magnitude entry is made positive
    largest = components.abs().argmax(dim=2, keepdim=True)
    components = (components * components.gather(2, largest).sign()).float()
    singular_values = values.sqrt().float()
    ratios = (values / totals.unsqueeze(1)).float()
    for row, j in enumerate(members):
        previous = groups[j].state
        cosines = None if previous is None else F.cosine_similarity(components[row], previous.components, dim=1)
        new[j] = _State(components[row], singular_values[row], ratios[row], cosines)


def _lowrank_eigh(apply, d: int, k: int, first: list[bool], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of G Gram matrices G_j = A_j^T A_j, given only w -> G w (batched: w is (G, d, q)), as PEFT's
    ``torch.svd_lowrank(A, q=2k, niter=4)`` after ``torch.manual_seed(42)`` finds them: (values (G, k) descending,
    vectors (G, d, k)). ``first[j]``: A_j is a group's first batch.

    svd_lowrank (Halko et al. 2011, Alg. 4.4 + 5.1) builds Q = orth(A (A^T A)^niter R) from a seeded Gaussian
    R (d x q) and takes the SVD of B = Q^T A. With W an orthonormal basis of (A^T A)^niter R, which the same power
    steps give through G alone, B^T B = G W (W^T G W)^-1 W^T G: its eigenpairs are B's squared singular values and
    right singular vectors, without ever forming A. Cost: niter + 1 products with G.
    R is drawn in A's dtype: float32 for a first batch, float64 afterwards (PEFT's float64 mean-correction row
    promotes its SVD input) - two different random sequences.
    """
    q = 2 * k
    starts = {}
    for dtype in (torch.float32, torch.float64):
        generator = torch.Generator(device=device).manual_seed(_LOWRANK_SEED)
        r = torch.randn(d, q, generator=generator, dtype=dtype, device=device)  # PEFT's R, bit for bit
        starts[dtype] = torch.linalg.qr(r.double()).Q
    basis = torch.stack([starts[torch.float32 if f else torch.float64] for f in first])
    for _ in range(_LOWRANK_NITER):
        basis = torch.linalg.qr(apply(basis)).Q
    product = apply(basis)
    inner, rotation = torch.linalg.eigh(basis.transpose(1, 2) @ product)  # W^T G W, symmetric PSD
    # a pseudo-inverse where A has rank < q: directions with ~0 curvature have ~0 product too, and are clamped away
    inner = inner.clamp_min(inner[:, -1:].clamp_min(torch.finfo(inner.dtype).tiny) * 1e-12)
    half = product @ rotation / inner.sqrt().unsqueeze(1)  # half half^T = G W (W^T G W)^-1 W^T G
    vectors, singular, _ = torch.linalg.svd(half, full_matrices=False)
    return singular[:, :k].square(), vectors[:, :, :k]


# ---------------------------------------------------------------------------------------------------- cache


def _cache_key(model, batches, masks, targets, label_mask, cap, exact_pca) -> dict | None:
    try:
        return stats_cache.make_key(
            "eva",
            model=stats_cache.model_fingerprint(model),
            calibration=stats_cache.data_fingerprint({"batches": batches, "masks": masks}),
            params={"targets": targets, "label_mask": label_mask, "max_batches": cap, "exact_pca": exact_pca},
        )
    except TypeError as err:  # a batch type the fingerprint does not know: run uncached rather than fail
        warnings.warn(f"EVA: statistics not cached ({err})", stacklevel=4)
        return None


def _replay_from_cache(key: dict, exact_pca: bool, run: dict):
    """(feed, ranks, batches used) from the first stored entry that can replay this run; (None, None, 0) if none."""
    store, k = stats_cache.StatsCache(), run["k"]
    sizes = sorted(int(v[1:]) for v in store.variants(key) if re.fullmatch(r"k\d+", v))
    for size in sizes:
        if not (size == k or (exact_pca and size > k)):  # which entries may serve: module doc
            continue
        entry = store.load(key, f"k{size}")
        if entry is None:
            continue
        try:
            feed = _Replay(entry, k)
            ranks, used = _calibrate(feed, **run)
        except _Miss:
            continue
        except (KeyError, IndexError, TypeError) as err:  # a layout this code does not read: recompute it
            warnings.warn(f"EVA: ignoring a cache entry of another layout ({err!r}); recomputing", stacklevel=4)
            continue
        return feed, ranks, used
    return None, None, 0


class _Replay:
    """Feeds the loop from a cached entry: each group's stored state after each batch it was offered, first k kept."""

    def __init__(self, entry: dict, k: int):
        self.k = k
        self.passes = 0  # no forward pass
        self.groups = [_Group(list(names)) for names in entry["groups"]]
        self.stored = [_unpack(history, k) for history in entry["histories"]]
        self.position = [0] * len(self.groups)
        self.index = {id(g): j for j, g in enumerate(self.groups)}

    def __call__(self, i: int, active: list[_Group] | None) -> None:
        for g in self.groups if active is None else active:
            j = self.index[id(g)]
            stored, p = self.stored[j], self.position[j]
            if p >= len(stored) or stored[p][0] != i:  # the stored run did not offer batch i to this group
                raise _Miss
            _, rows, state = stored[p]
            if state is None and rows >= self.k:  # the stored run skipped rows that this (smaller) k would use
                raise _Miss
            if state is not None:
                g.state = state
            self.position[j] = p + 1


def _entry(groups: list[_Group], k: int) -> dict:
    """A cache entry: the groups and, per group, its history (states stacked into tensors)."""
    histories = []
    for g in groups:
        states = [s for _, _, s in g.history if s is not None]
        nan = torch.full((k,), float("nan"))
        histories.append(
            {
                "batches": [i for i, _, _ in g.history],
                "rows": [n for _, n, _ in g.history],
                "has_state": [s is not None for _, _, s in g.history],
                "components": _stack([s.components for s in states]),
                "singular_values": _stack([s.singular_values for s in states]),
                "ratios": _stack([s.ratios for s in states]),
                "cosines": _stack([nan if s.cosines is None else s.cosines for s in states]),
            }
        )
    return {"k": k, "groups": [list(g.names) for g in groups], "histories": histories}


def _unpack(history: dict, k: int) -> list[tuple[int, int, _State | None]]:
    out, j = [], 0
    for i, rows, has_state in zip(history["batches"], history["rows"], history["has_state"]):
        state = None
        if has_state:
            cos = history["cosines"][j]
            state = _State(
                history["components"][j], history["singular_values"][j], history["ratios"][j],
                None if bool(cos.isnan().all()) else cos,
            ).head(k)
            j += 1
        out.append((i, rows, state))
    return out


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors) if tensors else torch.empty(0)


def _to_cpu(state: _State) -> _State:
    cos = None if state.cosines is None else state.cosines.cpu()
    return _State(state.components.cpu(), state.singular_values.cpu(), state.ratios.cpu(), cos)


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


def _first(layer_input):
    return layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input


# ---------------------------------------------------------------------------------------------------- validation


def check_eva_params(rho: float, tau: float) -> None:
    if rho < 1:
        raise ValueError(f"eva: rho must be >= 1 (got {rho}); rho = 1 keeps uniform ranks")
    if not 0 < tau <= 1:
        raise ValueError(f"eva: tau is a cosine similarity threshold in (0, 1] (got {tau})")


def check_components_fit(model, lora_config: LoraConfig, rho: float) -> None:
    """Each layer computes round(r * rho) components of a d_in-dim input: that must not exceed d_in."""
    from . import find_targets

    needed = round(lora_config.r * rho)
    for name, module in find_targets(model, lora_config.target_modules).items():
        d_in = module.weight.shape[1] if isinstance(module, torch.nn.Linear) else module.weight.shape[0]
        if needed > d_in:
            raise ValueError(
                f"eva: rank {lora_config.r} x rho {rho} = {needed} components, but layer {name} has only "
                f"{d_in} input features; lower the rank or rho"
            )
