"""EVA's incremental PCA, batched over input groups: PEFT 0.21's ``IncrementalPCA.partial_fit`` at little cost.

A group (target layers that receive one input) keeps a running mean, the exact total variance of every row seen and
either its top k directions (default: the paper's truncated incremental SVD, as PEFT) or, with ``exact_pca``, the
whole scatter. Each batch is merged by the pairwise mean-correction rule; the new top k come from PEFT's randomized
SVD (``torch.svd_lowrank``, q = 2k, niter = 4, seed 42), reproduced from products with the Gram matrix of PEFT's SVD
input, which is never formed (``lowrank_eigh``), or from ``eigh`` where that SVD would not run as PEFT runs it.
Products with a batch's scatter come from a moment matrix the hook accumulates (narrow inputs, ``GramBatch``) or from
the rows it keeps (wide inputs, ``RowsBatch``); groups of one input width are updated together. Components are
sign-fixed as PEFT's ``svd_flip``, because consecutive states are compared by signed cosine.
Derivations, thresholds and measurements: docs/methods.md, EVA, "Derivations".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_LOWRANK_NITER, _LOWRANK_SEED = 4, 42  # PEFT's IncrementalPCA(lowrank=True): svd_lowrank(q=2k, niter=4), seed 42


@dataclass
class State:
    """A group's decomposition after some batch (PEFT's IncrementalPCA attributes of the same names)."""

    components: torch.Tensor  # (k, d) float32 unit rows, sign fixed as PEFT's svd_flip: largest |entry| positive
    singular_values: torch.Tensor  # (k,) sqrt of the eigenvalues of the centred scatter
    ratios: torch.Tensor  # (k,) explained-variance ratios: eigenvalue / total variance of every row seen
    cosines: torch.Tensor | None  # (k,) cosine with the group's previous state; None for its first state

    def head(self, k: int) -> State:
        cos = None if self.cosines is None else self.cosines[:k]
        return State(self.components[:k], self.singular_values[:k], self.ratios[:k], cos)


@dataclass
class Group:
    """Target layers that receive one identical input and so share one decomposition (methods.md step 7)."""

    names: list[str]  # in model order; names[0] leads (PEFT hooks it and gives it the group's largest rank)
    state: State | None = None
    history: list[tuple[int, int, State | None]] = field(default_factory=list)  # (batch, rows offered, new state)

    def needs_data(self, rank: int, tau: float) -> bool:
        """PEFT's rule: hooked until the first ``rank`` components have cosine >= tau with the previous batch's."""
        if rank == 0:
            return False
        state = self.state
        return state is None or state.cosines is None or not bool((state.cosines[:rank] >= tau).all())


class Stats:
    """One group's incremental SVD: PEFT's ``IncrementalPCA.partial_fit`` once per batch (module doc).

    With ``truncate`` the running scatter is kept as its top k directions; without (``exact_pca``) whole. A batch's
    scatter is reached through a (d + 1) x (d + 1) moment matrix of the rows about a fixed shift (the "gram" path,
    d <= 64 k) or through the rows themselves (the "rows" path, d > 64 k): whichever costs less at that width
    (docs/methods.md, EVA, "Derivations"). The explained-variance ratios divide by the exact total variance, as PEFT.
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
            merge([self], d, self.k, RowsBatch([self]), lowrank_applies(self, d, self.k, self.pending))
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


class GramBatch:
    """The pending batch of G gram-path groups of one width: S_b products from the accumulated M_b blocks."""

    def __init__(self, sts: list[Stats], d: int):
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


class RowsBatch:
    """The pending batch of G rows-path groups of one width: S_b products from their kept rows, centred in place
    (the rows belong to the statistics: ``Stats.add`` copies any that alias a layer input). A loop over the groups,
    not one batched product: stacking them would copy every row once more, and each product is large enough
    (n x d by d x 2k) that the per-call overhead does not count."""

    def __init__(self, sts: list[Stats]):
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


def lowrank_applies(st: Stats, d: int, k: int, n_b: int) -> bool:
    """Whether PEFT's randomized SVD is reproducible for this update. PEFT's SVD input is the batch's rows, plus k
    kept directions and a mean-correction row after the first batch; svd_lowrank draws its random start in the
    input's row space only when it is at least as tall as wide (else it transposes it), and 2k <= d is needed.
    Otherwise the exact top-k stands in (module doc)."""
    return st.truncate and 2 * k <= d <= n_b + (k + 1 if st.n else 0)


def merge(sts: list[Stats], d: int, k: int, batch, lowrank: bool) -> None:
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

        values, vectors = lowrank_eigh(apply, d, k, [st.n == 0 for st in sts], mean.device)
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


def update_states(groups: list[Group], stats: dict[int, Stats], k: int) -> list[State | None]:
    """Bring every group that received rows up to date; the new state of each group (None: no rows this batch).

    Groups of one input width (and path) are merged together: one call per operation instead of one per group for
    the gram path (at these sizes the per-call overhead, not the arithmetic, is the cost). States are taken together.
    """
    pending: dict[tuple, list[Stats]] = {}
    for g in groups:
        st = stats[id(g)]
        if st.stash:  # rows path
            d = st.stash[0].shape[1]
            pending.setdefault(("rows", d, lowrank_applies(st, d, k, st.pending)), []).append(st)
        elif st.pending:
            d = st.batch.shape[0] - 1
            pending.setdefault(("gram", d, lowrank_applies(st, d, k, st.pending)), []).append(st)
    for (path, d, lowrank), sts in pending.items():
        merge(sts, d, k, RowsBatch(sts) if path == "rows" else GramBatch(sts, d), lowrank)

    fresh: dict[int, list[int]] = {}
    for j, g in enumerate(groups):
        st = stats[id(g)]
        if st.fresh:
            st.fresh = False
            fresh.setdefault(st.top[1].shape[0], []).append(j)
    new: list[State | None] = [None] * len(groups)
    for members in fresh.values():
        _take_states(groups, members, stats, new)
    return new


def _take_states(groups: list[Group], members: list[int], stats: dict[int, Stats], new: list) -> None:
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
        new[j] = State(components[row], singular_values[row], ratios[row], cosines)


def lowrank_eigh(apply, d: int, k: int, first: list[bool], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of G Gram matrices G_j = A_j^T A_j, given only w -> G w (batched: w is (G, d, q)), as PEFT's
    ``torch.svd_lowrank(A, q=2k, niter=4)`` after ``torch.manual_seed(42)`` finds them: (values (G, k) descending,
    vectors (G, d, k)). ``first[j]``: A_j is a group's first batch, whose random start PEFT draws in float32 (later
    ones in float64). Why products with G suffice: docs/methods.md, EVA, "Derivations".
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
