"""Two processes (torchrun, gloo) against one: EVA and LoRA-DA see the union of the ranks' calibration batches, and
every rank holds the same adapters after init and after DDP training steps.

    torchrun --nproc_per_node 2 tests/test_distributed.py OUT     # the worker half of this file (run by the test)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
WORLD = 2
TARGETS = ["q_proj", "v_proj", "up_proj"]


def global_batches(n: int = 4, batch: int = 4, length: int = 16) -> list[dict]:
    """Batches whose every example has the same padding and answer length, so a batch-mean loss is the mean of its
    ranks' means and LoRA-DA's union is exact (see lora_da.py)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[:, length - 4 :] = 0
        labels = ids.clone()
        labels[:, : length // 4] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def rank_slice(batches, rank: int, world: int = WORLD) -> list[dict]:
    """Rank ``rank``'s different calibration batches: its share of every global batch's examples."""
    per = len(batches[0]["input_ids"]) // world
    return [{k: v[rank * per : (rank + 1) * per] for k, v in b.items()} for b in batches]


def adapters(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def init_both(batches) -> dict:
    """EVA components and LoRA-DA factors and adapters on ``batches`` (this process's share, or all of them)."""
    from eva_bench.init import find_targets, initialize
    from eva_bench.init.lora_da import _statistics
    from tests.helpers import lm_calibration, tiny_llama

    calibration = lm_calibration(batches)
    eva_model, eva_report = initialize(tiny_llama(), "eva", rank=2, alpha=4, target_modules=TARGETS,
                                       calibration=calibration, cache=False)
    base = tiny_llama()
    stats = _statistics(base, find_targets(base, TARGETS), calibration, n_g=None, n_F=None)
    da_model, _ = initialize(tiny_llama(), "lora_da", rank=2, alpha=4, target_modules=TARGETS,
                             calibration=calibration, n_g=None, n_F=None)
    return {
        "eva": adapters(eva_model), "eva_ranks": eva_report.ranks,
        "grads": stats.grads, "z": {k: v / stats.z_rows[k] for k, v in stats.z_sum.items()},
        "y": {k: v / stats.y_rows[k] for k, v in stats.y_sum.items()}, "lora_da": adapters(da_model),
    }


def evaluate_tiny() -> dict:
    """The language evaluators (each rank its share of the examples) on 5 GSM8K and 3 BoolQ test examples with
    stories260K."""
    from tasks.language import answers, data, evaluate
    from tasks.language.models import stories260k

    model, tokenizer = stories260k()
    math, boolq = data.gsm8k_test(limit=5), data.commonsense_test("boolq", limit=3)
    generated = evaluate.generation_accuracy(model, tokenizer, math, answers.gsm8k_correct, max_new_tokens=4,
                                             batch_size=2, keep_outputs=True)
    return {"outputs": generated["outputs"], "n": generated["n"],
            "nll": evaluate.answer_nll(model, tokenizer, math, batch_size=2)["nll"],
            "choice": evaluate.choice_accuracy(model, tokenizer, boolq, batch_size=2)["accuracy"]}


def worker(out: Path) -> None:
    import torch.distributed as dist

    from eva_bench import distributed
    from eva_bench.train import OptimConfig, fit

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = distributed.rank()
    result = init_both(rank_slice(global_batches(), rank))

    # a few DDP steps from the LoRA-DA adapters; every rank iterates the same global batches and takes its slice
    from eva_bench.init import initialize
    from tests.helpers import lm_calibration, tiny_llama

    torch.manual_seed(rank)  # each rank draws different random adapters: DDP must start them all from rank 0's
    model, _ = initialize(tiny_llama(), "random", rank=2, alpha=4, target_modules=TARGETS,
                          calibration=lm_calibration(global_batches()))
    with torch.no_grad():  # B = 0 at init; nonzero per-rank values make the broadcast observable in the result
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    train = global_batches(n=3)
    fit_result = fit(model, lambda epoch: iter(train), lambda m, b: m(**b).loss,
                     OptimConfig(lr=1e-2, log_every=1, grad_accumulation=1), steps_per_epoch=3)
    result["trained"] = adapters(model)
    result["curve"] = fit_result.curve

    # evaluation: each rank computes its share of 5 items (uneven), every rank gets all results in order
    computed = []
    result["spread"] = distributed.spread(list("abcde"), lambda share: computed.extend(share) or [x * 2 for x in share])
    result["computed"] = computed
    result["eval"] = evaluate_tiny()

    try:  # a global batch of 3 cannot be split over 2 ranks: a clear error on every rank, no hang
        odd = [{k: v[:3] for k, v in train[0].items()}]
        fit(model, lambda epoch: iter(odd), lambda m, b: m(**b).loss, OptimConfig(lr=1e-2), steps_per_epoch=1)
        result["odd_error"] = None
    except ValueError as error:
        result["odd_error"] = str(error)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "EVA_BENCH_CACHE": str(out / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
         __file__, str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow  # one 2-process torchrun (~40 s on 2 shared cores), shared by these tests
def test_eva_components_and_lora_da_factors_equal_one_process_on_the_union(ranks):
    single = init_both(global_batches())
    assert ranks[0]["eva_ranks"] == single["eva_ranks"]
    for key in ("grads", "z", "y"):
        _close(ranks[0][key], single[key], rtol=1e-5, atol=1e-7)
    _close(ranks[0]["eva"], single["eva"], rtol=1e-4, atol=1e-6)
    _close(ranks[0]["lora_da"], single["lora_da"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # one 2-process torchrun (~40 s on 2 shared cores), shared by these tests
def test_every_rank_ends_init_and_training_with_identical_adapters(ranks):
    for key in ("eva", "lora_da", "trained"):
        _equal(ranks[0][key], ranks[1][key])
    assert ranks[0]["curve"] == ranks[1]["curve"] and len(ranks[0]["curve"]) == 3


@pytest.mark.slow  # one 2-process torchrun (~40 s on 2 shared cores), shared by these tests
def test_evaluation_is_spread_over_the_ranks_and_equals_one_process(ranks):
    assert ranks[0]["computed"] == ["a", "c", "e"] and ranks[1]["computed"] == ["b", "d"]
    assert ranks[0]["spread"] == ranks[1]["spread"] == ["aa", "bb", "cc", "dd", "ee"]
    single = evaluate_tiny()
    for r in ranks:  # greedy outputs and choices exactly; the NLL up to batching's float rounding (other pad widths)
        assert r["eval"]["outputs"] == single["outputs"] and r["eval"]["n"] == single["n"] == 5
        assert r["eval"]["choice"] == single["choice"]
        assert r["eval"]["nll"] == pytest.approx(single["nll"], rel=1e-5)


@pytest.mark.slow  # one 2-process torchrun (~40 s on 2 shared cores), shared by these tests
def test_a_world_size_that_does_not_divide_the_batch_is_a_clear_error(ranks):
    for r in ranks:
        assert "cannot be split over 2 processes" in (r["odd_error"] or "")


RECIPE = [  # the language recipe's 2-step smoke run (tests/test_language_recipe.py), EVA at rank 2
    "task=math", "init=eva", "lora.r=2", "task.train.limit=40", "task.eval_limit=4", "data.batch_size=16",
    "data.eval_batch_size=4", "calibration.batches=2", "calibration.batch_size=8", "optim.log_every=1",
]


@pytest.mark.slow  # a 2-process torchrun of the language recipe (~1 min on 2 cores)
def test_a_recipe_under_torchrun_writes_one_record_that_matches_one_process(tmp_path):
    """Each rank takes its slice of every calibration and training batch; rank 0 alone locks and writes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "EVA_BENCH_CACHE": str(tmp_path / "cache")}
    records = {}
    for name, launcher in [("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                                 str(WORLD)])]:
        command = [sys.executable, *launcher, "-m", "tasks.language.train", *RECIPE, f"results_dir={tmp_path / name}"]
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        written = list((tmp_path / name / "dev").glob("*.json"))
        assert len(written) == 1, written
        records[name] = json.loads(written[0].read_text())
    one, two = records["one"], records["two"]
    assert one["status"] == two["status"] == "success" and one["run"] == two["run"]  # the same run id
    assert one["provenance"]["hardware"]["processes"] == 1 and two["provenance"]["hardware"]["processes"] == WORLD
    assert two["init_report"]["ranks"] == one["init_report"]["ranks"]  # EVA's allocation on the union of the slices
    variance = one["init_report"]["details"]["explained_variance"]
    assert variance and all(abs(two["init_report"]["details"]["explained_variance"][k] - v) < 1e-4
                            for k, v in variance.items())
    # DDP averages per-rank mean losses: a token-weighted mean in one process, so close, not equal
    assert two["train"]["optimizer_steps"] == one["train"]["optimizer_steps"] == 2
    assert abs(two["metrics"]["gsm8k/nll"] - one["metrics"]["gsm8k/nll"]) < 0.01


LOCK_WAITER = """
import datetime, sys
from pathlib import Path
import torch.distributed as dist
from eva_bench import locks
from eva_bench.recipe import RunContext

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))  # far shorter than the wait below
locks.POLL_SECONDS = 0.5
ctx = RunContext(config={}, run={"experiment": "x"}, path=Path(sys.argv[1]))
assert ctx.existing_or_claim() is None  # waited for the other job's lock, then took it for this job
with ctx.recording() as record:
    record.finish("success")
dist.barrier()
print("rank", dist.get_rank(), "done")
"""


@pytest.mark.slow  # a 2-process torchrun that waits ~8 s on a lock (~30 s on 2 cores)
def test_a_torchrun_job_waits_for_another_jobs_lock_longer_than_the_collective_timeout(tmp_path):
    """Rank 0 waits on a record another job holds while the other ranks wait with it, each wait a short broadcast:
    no collective stays pending past the process group's timeout (3 s here; hours-long waits behind a selection)."""
    import fcntl
    import time

    record = tmp_path / "x" / "math--m--eva--r2--s0--abc.json"
    record.parent.mkdir(parents=True)
    (tmp_path / "waiter.py").write_text(LOCK_WAITER)
    log = tmp_path / "job.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(record.with_suffix(".lock"), "a") as other_job, open(log, "w") as job_log:
        fcntl.flock(other_job, fcntl.LOCK_EX)  # another job is running this record
        job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                str(WORLD), str(tmp_path / "waiter.py"), str(record)],
                               cwd=REPO, env=env, stdout=job_log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "waiting: another job" not in log.read_text() and job.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(8)  # the other job runs on, well past the 3 s collective timeout
    assert job.wait(timeout=120) == 0, log.read_text()[-4000:]
    assert "rank 0 done" in log.read_text() and "rank 1 done" in log.read_text()
    assert json.loads(record.read_text())["status"] == "success"


def test_initialize_from_config_hands_each_rank_its_slice_of_every_calibration_batch(monkeypatch):
    """Rank 1 of 2 (simulated): the initializer sees the second half of each global batch, on the model's device."""
    from omegaconf import OmegaConf

    from eva_bench import distributed, init
    from eva_bench.init import Calibration
    from eva_bench.recipe import initialize_from_config

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    seen = {}
    monkeypatch.setattr(init, "initialize", lambda model, method, calibration, **kw: seen.setdefault("cal", calibration))
    batches = [{"x": torch.arange(4) + 10 * i} for i in range(3)]
    cfg = OmegaConf.create({"init": {"name": "eva", "params": {}}, "lora": {"r": 2, "alpha": 1, "target_modules": "x"}})
    initialize_from_config(torch.nn.Linear(2, 2), cfg, Calibration(batches=batches, forward=lambda m, b: None))
    assert [b["x"].tolist() for b in seen["cal"].batches] == [[2, 3], [12, 13], [22, 23]]


def test_the_helpers_are_no_ops_in_one_process():
    from eva_bench import distributed

    batch = {"x": torch.arange(3)}
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.shard(batch) is batch and distributed.sum_int(5) == 5
    rows = torch.ones(3, 2)
    assert distributed.cat_rows(rows) is rows and distributed.sum_tensor(rows) is rows
    assert distributed.from_rank0(True) is True and distributed.device("cpu") == torch.device("cpu")
    nested = {"a": [torch.ones(1), (torch.zeros(2), "text")]}
    moved = distributed.to_device(nested, torch.device("cpu"))
    assert moved["a"][0] is nested["a"][0] and moved["a"][1][1] == "text"  # already there: the same tensors
    with distributed.local():
        assert not distributed.is_distributed()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker(Path(sys.argv[1]))
