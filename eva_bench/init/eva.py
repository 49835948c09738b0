"""EVA: Explained Variance Adaptation (Paischer et al., arXiv 2410.07170v5 Sec. 3), at about the cost of its forwards.

What EVA is (see also docs/methods.md): A = the top right-singular vectors of each adapted layer's *input
activations* on downstream minibatches (incremental PCA: the running mean is subtracted), computed until consecutive
minibatches give components with cosine similarity >= tau; ranks are redistributed across layers by explained
variance within the budget r x (number of layers), each layer offering round(r * rho) components; B = 0, W untouched.
EVA never decomposes the weights (that would be CorDA / PiSSA).

How this computes it. The algorithm (which batches a layer sees, when it stops, how ranks are allocated) follows
PEFT 0.21's ``get_eva_state_dict`` step for step, so ``eva`` and ``eva_peft`` (eva_peft.py) give the same result on
the same batches (tests/test_eva_fast.py); only the arithmetic is cheaper (bench/eva.py, bench/README.md):
- Statistics are gathered on the base model, before any LoRA wrapping, by forward hooks that reduce each layer's
  masked input rows (float32) into a running mean and a centred scatter matrix (d x d, float64; the pairwise update of
  Chan, Golub & LeVeque 1979). That is an *exact* incremental PCA: its eigenvectors are the principal directions of
  every row seen so far. PEFT's IncrementalPCA keeps only k = round(r * rho) directions between batches (a truncated,
  approximate update) and runs a randomized low-rank SVD of a (rows + k) x d matrix per batch per layer.
- Layers that receive the same input (q/k/v; gate/up) share one decomposition (methods.md step 7). They are found by
  tensor *identity* during the first forward (the same tensor object reaches q, k and v), where PEFT hashes the values
  of every layer's input with a Python-level ``hash(tuple(x.tolist()))`` in an extra forward pass.
- After each batch a group's top-k eigenpairs give its components, their explained-variance ratios (eigenvalue /
  total variance, PEFT's ``explained_variance_ratio_``) and singular values (sqrt of the eigenvalues, PEFT's
  ``singular_values_``, used by ``whiten``); the sign of each component is fixed as PEFT's ``svd_flip`` does (largest
  entry positive) so that consecutive components can be compared by signed cosine, as PEFT does. Small d: exact
  ``torch.linalg.eigh``; large d: subspace iteration with Rayleigh-Ritz warm-started from the previous batch's basis,
  stopped at a relative residual of 1e-5 (eigh on 768 x 768 costs more than a ViT-tiny forward; see bench/README.md).
- Convergence and stopping as PEFT (Sec. 3.1): a group keeps receiving batches until the components its leading
  layer's current rank needs have cosine >= tau with the previous batch's; converged groups are unhooked (and hooked
  again if the reallocation gives them more rank); the run stops when every group has converged or at the batch cap.
- Rank redistribution as PEFT (Sec. 3.2): pool the top-k ratios of every layer (layers sharing an input contribute the
  same values), keep the global top r x N with the same ``torch.argsort`` call on the values in the same order, count
  per layer, and let a group's leading layer take the largest count of its group.
- The LoRA model is built with ``rank_pattern``/``alpha_pattern`` (alpha' = alpha r'/r with
  ``adjust_scaling_factors``, as PEFT), rank-0 layers are left unadapted, and the lora_A rows are written in.

Differences from PEFT 0.21 that remain (by design): components are the exact principal directions rather than
PEFT's truncated approximation (they agree to cosine >= 0.99 once converged, tests/test_eva_fast.py); a batch that
gives a group fewer rows than k is used (PEFT skips it: its SVD needs rows >= k); inputs that are equal by value but
are different tensor objects are decomposed separately (same components, but a tie at the allocation boundary may
then be broken differently); whitening is applied once per layer, not repeatedly per shared-input group.

Cache (``cache=True``, eva_bench/init/cache.py): the per-group states after every batch a group consumed are stored,
keyed by the model, the batches and their row masks, the target layers, ``label_mask`` and the batch cap; entries are
named by k. A request for k' components is *replayed* from an entry with k >= k': the same loop runs on the stored
states (first k' components, which do not depend on k: ratios, cosines and signs are per component) instead of on
forward passes; ``tau``, ``whiten`` and ``adjust_scaling_factors`` are applied at replay time. If the replayed run
ever needs a batch the stored run did not give that group (it stopped the group earlier, or skipped a batch the
new run uses), the entry cannot tell what would have happened: that is a miss, and the statistics are recomputed.
So a hit returns what a fresh computation returns - bit for bit where ``eigh`` is used (d <= _EIGH_MAX_DIM), and to
the subspace iteration's tolerance otherwise (its block size grows with k) - whatever the cache held before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import EvaConfig, LoraConfig, get_peft_model

from . import cache as stats_cache
from .calibration import Calibration, select_rows

_EIGH_MAX_DIM = 256  # up to this input size a full eigh is cheapest (bench/README.md, "EVA cost")
_SOLVER_TOL = 1e-5  # subspace iteration stops when every needed Ritz pair has |S v - l v| <= tol * l_max
_SOLVER_MAX_ITER = 200  # then falls back to eigh (never reached in the benchmarks)


@dataclass
class _State:
    """A group's decomposition after some batch (PEFT's IncrementalPCA attributes of the same names)."""

    components: torch.Tensor  # (k, d) float32 unit rows, sign fixed as PEFT's svd_flip: largest |entry| positive
    singular_values: torch.Tensor  # (k,) sqrt of the centred scatter's eigenvalues
    ratios: torch.Tensor  # (k,) explained-variance ratios: eigenvalue / total variance (trace of the scatter)
    cosines: torch.Tensor | None  # (k,) cosine with the group's previous state; None for its first state

    def head(self, k: int) -> _State:
        """The first k components: each is independent of how many were computed."""
        cos = None if self.cosines is None else self.cosines[:k]
        return _State(self.components[:k], self.singular_values[:k], self.ratios[:k], cos)


@dataclass
class _Group:
    """Target layers that receive one identical input and so share one decomposition (methods.md step 7)."""

    names: list[str]  # in model order; names[0] leads (PEFT hooks it and gives it the group's largest rank)
    state: _State | None = None
    history: list[tuple[int, _State | None]] = field(default_factory=list)  # (batch, state after it; None: no rows)

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
):
    """EVA init. ``label_mask``: keep only loss-carrying rows (the paper did not, for math and commonsense).

    ``adjust_scaling_factors``: when a layer's rank moves from r to r', scale alpha by r'/r so s = alpha/r is kept
    (PEFT's behaviour; the authors' training code does not). ``max_batches``: at most this many calibration batches,
    each used once (default: all the task supplied). ``exact_pca``: principal directions of every row seen, instead of
    the paper's/PEFT's incremental SVD that keeps only round(r * rho) directions between batches (module doc).
    ``cache``: reuse / store the statistics on disk (module doc).
    """
    check_eva_params(rho, tau)
    check_components_fit(model, lora_config, rho)
    if lora_config.rank_pattern or lora_config.alpha_pattern:
        raise ValueError("eva: per-layer rank_pattern/alpha_pattern are not supported; EVA sets them itself")
    from . import find_targets

    targets = list(find_targets(model, lora_config.target_modules))  # model order, as PEFT iterates named_modules
    k = round(lora_config.r * rho)
    budget = lora_config.r * len(targets)
    cap = min(max_batches or len(calibration.batches), len(calibration.batches))
    batches = list(calibration.batches[:cap])
    masks = [calibration.mask(b, loss_only=label_mask) for b in batches]

    key, store, status = None, None, "off"
    if cache:
        try:
            key = stats_cache.make_key(
                "eva",
                model=stats_cache.model_fingerprint(model),
                calibration=stats_cache.data_fingerprint({"batches": batches, "masks": masks}),
                params={"targets": targets, "label_mask": label_mask, "max_batches": cap, "exact_pca": exact_pca},
            )
            store = stats_cache.StatsCache()
        except TypeError as err:  # a batch type the fingerprint does not know: run uncached rather than fail
            warnings.warn(f"EVA: statistics not cached ({err})", stacklevel=3)

    feed = None
    if key is not None:
        status = "miss"
        for size in sorted(int(v[1:]) for v in store.variants(key) if re.fullmatch(r"k\d+", v)):
            # truncated PCA depends on k itself (k directions are kept between batches): only the same k serves it;
            # exact PCA's first k components do not depend on how many were computed: any larger entry serves it
            entry = store.load(key, f"k{size}") if size == k or (exact_pca and size > k) else None
            if entry is None:
                continue
            try:
                feed = _Replay(entry, k)
                ranks, used = _calibrate(feed, targets, k, budget, tau, cap)
                status = "hit"
                break
            except _Miss:
                feed = None
    if feed is None:
        feed = _Forwards(
            model, targets, calibration.forward, batches, masks, k, exact_pca=exact_pca, record=key is not None
        )
        ranks, used = _calibrate(feed, targets, k, budget, tau, cap)
        if key is not None:
            store.save(key, _entry(feed.groups, k), f"k{k}")

    group_of = {name: g for g in feed.groups for name in g.names}
    unconverged = sorted(n for n, r in ranks.items() if r and group_of[n].needs_data(r, tau))
    if unconverged:
        warnings.warn(
            f"EVA: {len(unconverged)} layer(s) had not converged to tau={tau} after {used} calibration batches; "
            f"their components are the best estimate so far: {', '.join(unconverged)}. "
            "Supply more calibration batches (or lower tau) for converged components.",
            stacklevel=3,
        )
    rows = {}
    for name, r in ranks.items():
        if r:
            state = group_of[name].state.head(r)
            # whiten (Sec. 3, "EVA with whitening"): divide by sqrt of the singular values, once per layer
            rows[name] = state.components / state.singular_values.sqrt().unsqueeze(1) if whiten else state.components
    peft_model = _wrap(model, lora_config, ranks, rows, adjust_scaling_factors, rho, tau, label_mask, whiten)
    return peft_model, {
        "calibration_batches": used,
        "forward_passes": feed.passes,
        "unconverged_layers": unconverged,
        "explained_variance": {  # share of input variance the kept components explain, per adapted layer
            n: round(group_of[n].state.ratios[:r].sum().item(), 6) for n, r in ranks.items() if r
        },
        "cache": status,
    }


# ---------------------------------------------------------------------------------------------------- the loop


def _calibrate(feed, targets: list[str], k: int, budget: int, tau: float, cap: int):
    """PEFT 0.21's EVA loop (``_get_eva_state_dict``) over at most ``cap`` batches, each used once.

    ``feed(i, active)`` brings the ``active`` groups (None: every target layer, the first pass that finds the groups)
    up to date with batch ``i``. Returns the per-layer ranks and the number of batches consumed.
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
    """Rank redistribution (Sec. 3.2), with PEFT's tie-breaking: same value order, same (unstable) argsort call.

    Every layer offers its group's top-k explained-variance ratios; the top ``budget`` values of the pool survive and
    a layer's rank is how many of its own survived. Layers sharing an input offer identical values, so which of them
    wins a tie at the boundary is decided by the sort; afterwards the group's leading layer takes the largest count.
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


# ---------------------------------------------------------------------------------------------------- live statistics


class _Forwards:
    """Feeds the loop from calibration forward passes: hooks reduce layer inputs into each group's statistics."""

    def __init__(self, model, targets: list[str], forward, batches, masks, k: int, *, exact_pca: bool, record: bool):
        self.model, self.targets, self.forward = model, targets, forward
        self.batches, self.masks, self.k, self.exact_pca, self.record = batches, masks, k, exact_pca, record
        self.groups: list[_Group] = []
        self.stats: dict[int, _Scatter] = {}  # id(group) -> its running statistics
        self.passes = 0
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")

    def __call__(self, i: int, active: list[_Group] | None) -> None:
        mask = self.masks[i] if self.masks[i] is None else self.masks[i].to(self.device)
        fed: dict[int, int] = {}  # id(group) -> rows added in this batch

        def add(group: _Group, layer_input) -> None:
            rows = select_rows(_first(layer_input), mask).float()
            self.stats[id(group)].add(rows)
            fed[id(group)] = fed.get(id(group), 0) + rows.shape[0]

        handles = []
        if active is None:  # first pass: hook every target, find shared inputs by identity
            seen: list[tuple[weakref.ref, _Group]] = []  # weak: never keeps an activation alive
            group_of: dict[str, _Group] = {}

            def first_pass_hook(name):
                def hook(_module, args, _output):
                    x = _first(args)
                    for ref, g in seen:
                        if ref() is x:  # the same tensor object as an earlier layer's input: share its group
                            if name not in group_of:
                                g.names.append(name)
                                group_of[name] = g
                            return
                    g = group_of.get(name)
                    if g is None:
                        g = group_of[name] = _Group([name])
                        self.stats[id(g)] = _Scatter(truncate=not self.exact_pca)
                        self.groups.append(g)
                    seen.append((weakref.ref(x), g))
                    if g.names[0] == name:
                        add(g, args)

                return hook

            for name in self.targets:
                handles.append(self.model.get_submodule(name).register_forward_hook(first_pass_hook(name)))
        else:
            for g in active:
                hook = (lambda g: lambda _m, args, _o: add(g, args))(g)
                handles.append(self.model.get_submodule(g.names[0]).register_forward_hook(hook))

        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.forward(self.model, self.batches[i])
        finally:
            for h in handles:
                h.remove()
            self.model.train(training)
        self.passes += 1

        if active is None:
            self._order_groups()
        with _one_thread(self.device):
            for g in self.groups if active is None else active:
                state = None
                if fed.get(id(g), 0) > 0:  # a batch with no rows for this group changes nothing (PEFT skips it too)
                    state = self.stats[id(g)].state(self.k, g.state)
                    g.state = state
                if self.record:
                    g.history.append((i, None if state is None else _to_cpu(state)))

    def _order_groups(self) -> None:
        """Model order within and across groups (PEFT: the first equal-input layer in named_modules leads)."""
        position = {n: j for j, n in enumerate(self.targets)}
        missing = [n for n in self.targets if not any(n in g.names for g in self.groups)]
        if missing:
            raise ValueError(f"EVA: target layer(s) never ran in the calibration forward: {', '.join(missing)}")
        for g in self.groups:
            g.names.sort(key=position.__getitem__)
        self.groups.sort(key=lambda g: position[g.names[0]])


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """Run the small per-group solves single-threaded on CPU: a d x d eigh gains nothing from threads, and when the
    cores are shared its many thread barriers stall (measured on the 2-core benchmark machine: 172 x 172 float64
    eigh 1.7 ms on one thread, 54 ms median on two)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Scatter:
    """Incremental PCA of a group's input rows, from their second moments about a fixed shift c.

    With y = x - c, one matrix product per batch accumulates M = sum over rows of [y, 1]^T [y, 1], i.e. sum y y^T,
    sum y and the row count; the centred scatter of all rows seen is S = sum y y^T - (sum y)(sum y)^T / n (PEFT's
    IncrementalPCA subtracts the running mean the same way). c = the first batch's mean keeps that correction small,
    so float32 accumulation of positive terms loses nothing to cancellation even when |mean| >> spread; the eigen
    solve runs in float64. The hook does one fused product per batch and nothing else d x d.

    ``truncate`` (the default, as PEFT and the paper's incremental SVD, Sec. 3.1): after each batch S is replaced by
    its top-k part V diag(l) V^T, so the next batch is merged into k directions only - algebraically PEFT's update,
    whose SVD input [diag(s) V; X_b - m_b; mean correction] has exactly this Gram matrix. Without it S is the exact
    scatter of every row seen (``exact_pca``). The ratios' denominator is the exact total variance in both cases (PEFT
    computes it from running per-feature variances): the trace grows by the same amount per batch either way.
    """

    def __init__(self, truncate: bool):
        self.truncate = truncate
        self.n = 0
        self.shift: torch.Tensor | None = None  # (d,) float32
        self.moments: torch.Tensor | None = None  # (d + 1, d + 1) float32
        self.total = 0.0  # total variance (trace of the exact scatter) of every row seen
        self.kept = 0.0  # trace of S as left after the previous solve
        self.basis: torch.Tensor | None = None  # subspace iteration's warm start (large d only)

    def add(self, rows: torch.Tensor) -> None:
        n_b, d = rows.shape
        if n_b == 0:
            return
        if self.shift is None:
            self.shift = rows.mean(0)
            self.moments = rows.new_zeros(d + 1, d + 1)
        y = rows.new_empty(n_b, d + 1)
        torch.sub(rows, self.shift, out=y[:, :d])
        y[:, d] = 1
        self.moments.addmm_(y.T, y)
        self.n += n_b

    def state(self, k: int, previous: _State | None) -> _State:
        moments = self.moments.double()
        d = moments.shape[0] - 1
        mean_term = torch.outer(moments[:d, d], moments[:d, d]) / self.n
        scatter = moments[:d, :d] - mean_term
        trace = torch.diagonal(scatter).sum().item()
        self.total += trace - self.kept
        values, vectors, self.basis = _top_eigenpairs(scatter, k, self.basis)
        values = values.clamp_min(0)
        if self.truncate:
            self.moments[:d, :d] = ((vectors * values) @ vectors.T + mean_term).float()
            self.kept = values.sum().item()
        else:
            self.kept = trace
        components = vectors.T.contiguous()
        # PEFT's svd_flip(u_based_decision=False): each component's largest-magnitude entry is made positive
        largest = components.abs().argmax(dim=1)
        components *= components[torch.arange(k), largest].sign().unsqueeze(1)
        components = components.float()
        cosines = None if previous is None else F.cosine_similarity(components, previous.components, dim=1)
        return _State(components, values.sqrt().float(), (values / self.total).float(), cosines)


def _top_eigenpairs(scatter: torch.Tensor, k: int, basis: torch.Tensor | None):
    """The top-k eigenpairs (descending) of a symmetric PSD matrix, and the basis to warm-start the next call.

    d <= _EIGH_MAX_DIM: exact ``eigh``. Larger d: subspace (block power) iteration on q = 2k + 8 vectors with
    Rayleigh-Ritz, started from the previous batch's Ritz basis (the scatter changes little from batch to batch), one
    d x d x q product per iteration; it stops when every top-k Ritz pair has residual |S v - l v| <= tol * l_max, which
    bounds each eigenvector's angle error by the residual over its eigengap.
    """
    d = scatter.shape[0]
    q = min(d, 2 * k + 8)
    if d > _EIGH_MAX_DIM and 2 * q < d:
        if basis is None:
            g = torch.Generator(device=scatter.device).manual_seed(0)
            basis = torch.randn(d, q, dtype=scatter.dtype, device=scatter.device, generator=g)
        q_basis = torch.linalg.qr(basis).Q
        for _ in range(_SOLVER_MAX_ITER):
            product = scatter @ q_basis
            values, rotation = torch.linalg.eigh(q_basis.T @ product)  # Rayleigh-Ritz on span(q_basis)
            values, rotation = values.flip(0), rotation.flip(1)
            ritz, s_ritz = q_basis @ rotation, product @ rotation
            residual = (s_ritz[:, :k] - ritz[:, :k] * values[:k]).norm(dim=0).max()
            if residual <= _SOLVER_TOL * values[0].clamp_min(torch.finfo(values.dtype).tiny):
                return values[:k], ritz[:, :k], ritz
            q_basis = torch.linalg.qr(s_ritz).Q  # one power step: span(S Q)
    values, vectors = torch.linalg.eigh(scatter)
    values, vectors = values.flip(0), vectors.flip(1)
    return values[:k], vectors[:, :k], vectors[:, :q]


# ---------------------------------------------------------------------------------------------------- cache replay


class _Replay:
    """Feeds the loop from a cached entry: each group's stored state after each batch it consumed, first k kept."""

    def __init__(self, entry: dict, k: int):
        self.passes = 0  # no forward pass
        self.groups = [_Group(list(names)) for names in entry["groups"]]
        self.stored = [_unpack(h, k) for h in entry["histories"]]
        self.position = [0] * len(self.groups)
        self.index = {id(g): j for j, g in enumerate(self.groups)}

    def __call__(self, i: int, active: list[_Group] | None) -> None:
        for g in self.groups if active is None else active:
            j = self.index[id(g)]
            stored, p = self.stored[j], self.position[j]
            if p >= len(stored) or stored[p][0] != i:  # the cached run did not give this group batch i
                raise _Miss
            if stored[p][1] is not None:
                g.state = stored[p][1]
            self.position[j] = p + 1


def _entry(groups: list[_Group], k: int) -> dict:
    """A cache entry: the groups and, per group, its state after every batch it consumed (tensors stacked)."""
    histories = []
    for g in groups:
        states = [s for _, s in g.history if s is not None]
        first = [s.cosines is None for s in states]
        histories.append(
            {
                "batches": [i for i, _ in g.history],
                "has_rows": [s is not None for _, s in g.history],
                "components": _stack([s.components for s in states]),
                "singular_values": _stack([s.singular_values for s in states]),
                "ratios": _stack([s.ratios for s in states]),
                "cosines": _stack([torch.full((k,), float("nan")) if f else s.cosines for s, f in zip(states, first)]),
            }
        )
    return {"k": k, "groups": [list(g.names) for g in groups], "histories": histories}


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors) if tensors else torch.empty(0)


def _unpack(history: dict, k: int) -> list[tuple[int, _State | None]]:
    out, j = [], 0
    for i, has_rows in zip(history["batches"], history["has_rows"]):
        state = None
        if has_rows:
            cos = history["cosines"][j]
            state = _State(
                history["components"][j], history["singular_values"][j], history["ratios"][j],
                None if bool(cos.isnan().all()) else cos,
            ).head(k)
            j += 1
        out.append((i, state))
    return out


def _to_cpu(state: _State) -> _State:
    cos = None if state.cosines is None else state.cosines.cpu()
    return _State(state.components.cpu(), state.singular_values.cpu(), state.ratios.cpu(), cos)


# ---------------------------------------------------------------------------------------------------- the LoRA model


def _wrap(model, lora_config, ranks, rows, adjust_scaling_factors, rho, tau, label_mask, whiten):
    """``get_peft_model`` with EVA's per-layer ranks (rank 0: no adapter), then lora_A = the components, B = 0."""
    r, alpha = lora_config.r, lora_config.lora_alpha
    changed = {n: rank for n, rank in ranks.items() if rank and rank != r}
    config = dataclasses.replace(
        lora_config,
        target_modules=[n for n, rank in ranks.items() if rank],
        # PEFT matches pattern keys as regexes against the end of a name: escape the dots of full names
        rank_pattern={re.escape(n): rank for n, rank in changed.items()},
        alpha_pattern={re.escape(n): alpha * rank / r for n, rank in changed.items()} if adjust_scaling_factors else {},
        init_lora_weights="eva",  # PEFT: B = 0, A overwritten below; recorded in the adapter config
        eva_config=EvaConfig(
            rho=rho, tau=tau, use_label_mask=label_mask, whiten=whiten, adjust_scaling_factors=adjust_scaling_factors
        ),
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
