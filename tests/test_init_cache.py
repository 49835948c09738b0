"""The init-statistics cache (eva_bench/init/cache.py) and EVA's use of it: a hit returns exactly what a fresh
computation returns; any change to what the statistics depend on is a miss; a bad file is recomputed."""

import warnings

import pytest
import torch
from peft.tuners.lora import LoraLayer

from eva_bench.init import initialize
from eva_bench.init import cache as stats_cache
from tests.helpers import lm_calibration, tiny_llama, token_batches


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A private cache."""
    monkeypatch.setenv("EVA_BENCH_CACHE", str(tmp_path))
    return tmp_path / "init_stats"


def run(model=None, batches=None, rank=4, **params):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="EVA: .* had not converged")  # not what these tests are about
        peft_model, report = initialize(
            model or tiny_llama(), "eva", rank=rank, alpha=1, target_modules="all-linear",
            calibration=lm_calibration(batches or token_batches()), **params,
        )
    a = {n: m.lora_A["default"].weight.detach() for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    return a, report


def assert_identical(first, second):
    (a1, r1), (a2, r2) = first, second
    assert r1.ranks == r2.ranks and r1.scalings == r2.scalings
    assert r1.calibration_batches == r2.calibration_batches
    for key in ("unconverged_layers", "explained_variance"):
        assert r1.details[key] == r2.details[key]
    assert a1.keys() == a2.keys()
    for name in a1:
        assert torch.equal(a1[name], a2[name]), name


def test_hit_gives_identical_tensors_without_forward_passes(cache_dir):
    fresh = run(cache=False)
    miss = run()
    hit = run()
    assert (fresh[1].details["cache"], miss[1].details["cache"], hit[1].details["cache"]) == ("off", "miss", "hit")
    assert hit[1].details["forward_passes"] == 0 and miss[1].details["forward_passes"] > 0
    assert_identical(fresh, miss)
    assert_identical(fresh, hit)
    assert len(list(cache_dir.glob("eva-*.pt"))) == 1
    assert not list(cache_dir.glob(".*tmp"))  # the atomic write left no temporary file


def _change_embedding(model):
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 0] += 1e-3  # not a target layer, but upstream of every target's input
    return {"model": model}


def _change_target_weight(model):
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    return {"model": model}


def _change_batch_value(model):
    batches = token_batches()
    batches[3]["input_ids"][1, 2] = (batches[3]["input_ids"][1, 2] + 1) % 64
    return {"model": model, "batches": batches}


@pytest.mark.parametrize(
    "change",
    [
        _change_embedding,
        _change_target_weight,
        _change_batch_value,
        lambda model: {"model": model, "label_mask": True},
        lambda model: {"model": model, "max_batches": 5},
        lambda model: {"model": model, "exact_pca": True},
        lambda model: {"model": model, "rho": 1.0},  # fewer components: another k
    ],
    ids=["embedding", "target_weight", "batch_value", "label_mask", "max_batches", "exact_pca", "rho"],
)
def test_any_key_part_change_is_a_miss(change):
    run(model=tiny_llama())
    assert run(model=tiny_llama())[1].details["cache"] == "hit"
    changed = run(**change(tiny_llama()))
    assert changed[1].details["cache"] == "miss"
    kwargs = change(tiny_llama())
    assert_identical(changed, run(**kwargs, cache=False))  # and the recomputation is the right one


def test_version_change_is_a_miss(monkeypatch):
    run()
    monkeypatch.setattr(stats_cache, "FORMAT_VERSION", stats_cache.FORMAT_VERSION + 1)
    assert run()[1].details["cache"] == "miss"


def test_replay_serves_other_tau_and_whitening_exactly():
    """tau and whitening act on the stored states: a stored run serves them exactly, or is a miss when the new run
    would need a batch the stored run never gave some group (here: tau = 0.99 keeps groups hooked for longer)."""
    run(tau=0.95)
    for params in ({"tau": 0.5}, {"tau": 0.95, "whiten": True}):
        hit = run(**params)
        assert hit[1].details["cache"] == "hit"
        assert_identical(hit, run(**params, cache=False))
    strict = run(tau=0.99)
    assert strict[1].details["cache"] == "miss"
    assert_identical(strict, run(tau=0.99, cache=False))


def test_smaller_rank_reuses_exact_pca_components():
    """exact_pca: one entry for r = 4 (k = 4 components at rho = 1) serves r = 2 (k = 2), bit for bit as a fresh r = 2
    run. (rho = 1 keeps ranks uniform; with redistribution a smaller run can unhook a group that drops to rank 0 and
    hook it again later, a pattern a larger run's entry may not hold: then it is a miss, still exact.)"""
    run(rank=4, exact_pca=True, rho=1.0)
    smaller = run(rank=2, exact_pca=True, rho=1.0)
    assert smaller[1].details["cache"] == "hit"
    assert_identical(smaller, run(rank=2, exact_pca=True, rho=1.0, cache=False))
    redistributed = run(rank=2, exact_pca=True)  # k = 4 <= 4 is eligible; hit or miss, the result is the fresh one
    assert_identical(redistributed, run(rank=2, exact_pca=True, cache=False))


def test_smaller_rank_does_not_reuse_truncated_pca():
    """The default (the paper's truncated incremental SVD) keeps k directions between batches: its states depend on
    k, so only the same k is served."""
    run(rank=4)
    assert run(rank=2)[1].details["cache"] == "miss"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_corrupt_file_is_recomputed(cache_dir, damage):
    reference = run()
    (path,) = cache_dir.glob("eva-*.pt")
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a readable file whose stored key is another entry's
        torch.save({"key": "{}", "value": {}}, path)
    with pytest.warns(UserWarning, match="unreadable entry"):
        again = run()
    assert again[1].details["cache"] == "miss"
    assert_identical(reference, again)
    assert run()[1].details["cache"] == "hit"  # rewritten


# ---- the cache module itself ----


def test_data_fingerprint_covers_values_types_and_structure():
    t = torch.arange(6)
    fp = stats_cache.data_fingerprint
    assert fp({"a": t, "b": [t, None]}) == fp({"b": [t.clone(), None], "a": t.clone()})  # order-free dicts
    assert fp([t]) != fp((t,))
    assert fp(t) != fp(t.float())
    assert fp(t) != fp(t.reshape(2, 3))
    assert fp([t[:3], t[3:]]) != fp([t])
    u = t.clone()
    u[4] = 0
    assert fp({"x": t}) != fp({"x": u})
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fp(object())


def test_model_fingerprint_covers_buffers_and_config():
    a, b = tiny_llama(), tiny_llama()
    assert stats_cache.model_fingerprint(a) == stats_cache.model_fingerprint(b)
    b.config.rms_norm_eps = 1e-3  # no weight changes, the forward does
    assert stats_cache.model_fingerprint(a) != stats_cache.model_fingerprint(b)
    net = torch.nn.BatchNorm1d(4)
    before = stats_cache.model_fingerprint(net)
    net.running_mean += 1
    assert stats_cache.model_fingerprint(net) != before


def test_store_load_roundtrip_and_variants(tmp_path):
    store = stats_cache.StatsCache(tmp_path)
    key = stats_cache.make_key("demo", model="m", calibration="c", params={"p": 1})
    assert store.load(key, "k1") is None
    store.save(key, {"x": torch.ones(2)}, "k1")
    store.save(key, {"x": torch.zeros(2)}, "k3")
    assert store.variants(key) == ["k1", "k3"]
    assert torch.equal(store.load(key, "k3")["x"], torch.zeros(2))
    other = stats_cache.make_key("demo", model="m", calibration="c", params={"p": 2})
    assert store.variants(other) == [] and store.load(other, "k1") is None
