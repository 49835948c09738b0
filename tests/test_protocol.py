"""The learning-rate protocols (eva_bench/protocol.py): fixed and tuned, through the language recipe."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eva_bench import protocol
from eva_bench.results import config_hash
from eva_bench.tables import write_tables
from tasks.language.train import run
from tests.test_language_recipe import compose_run

TUNED = ["protocol=tuned", "protocol.validation_size=8", "optim.max_grad_norm=null", "task=math", "lora.r=2"]


def test_tuned_picks_the_lr_that_does_not_diverge_and_records_the_grid(tmp_path):
    """A grid with a known answer: lr 1e30 (no clipping) blows up in selection; 5e-3 is chosen."""
    record = run(compose_run(tmp_path, *TUNED, "protocol.lr_grid=[1e30,5e-3]", "experiment_name=tuned"))
    assert record["status"] == "success"
    chosen = record["protocol"]
    assert chosen["selected_lr"] == 5e-3 and record["config"]["optim"]["lr"] == 5e-3
    assert chosen["grid"]["1e+30"] is None and chosen["grid"]["0.005"] > 0
    selection = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("tuned/lr_search/*.json"))]
    assert sorted(r["status"] for r in selection) == ["diverged", "success"]  # 1e30: NaN loss or NaN validation NLL
    for r in selection:  # selection is scored on held-out training examples only: no test metric exists
        assert all(k.startswith("validation/") for k in r["metrics"])
        assert r["config"]["protocol"]["stage"] == "validation" and r["run"]["seed"] == 0
    # test metrics only in the final record
    assert any(k.startswith("gsm8k/") for k in record["metrics"])


def test_later_seeds_reuse_the_selection(tmp_path, capsys):
    first = run(compose_run(tmp_path, *TUNED, "protocol.lr_grid=[5e-3,1e-2]", "experiment_name=tuned", "seed=0"))
    capsys.readouterr()
    second = run(compose_run(tmp_path, *TUNED, "protocol.lr_grid=[5e-3,1e-2]", "experiment_name=tuned", "seed=1"))
    out = capsys.readouterr().out
    assert out.count("skip (finished record exists)") == 2  # both selection runs, not retrained
    assert second["protocol"] == first["protocol"]
    assert len(list(tmp_path.glob("tuned/lr_search/*.json"))) == 2


def test_widening_the_grid_reuses_done_selection_runs_and_flags_an_edge(tmp_path, capsys):
    run(compose_run(tmp_path, *TUNED, "protocol.lr_grid=[5e-3]", "experiment_name=tuned"))
    capsys.readouterr()
    with pytest.warns(UserWarning, match="at the edge of the grid"):
        record = run(compose_run(tmp_path, *TUNED, "protocol.lr_grid=[5e-3,1e-3]", "experiment_name=tuned"))
    assert capsys.readouterr().out.count("skip (finished record exists)") == 1  # lr 5e-3's selection, reused
    assert len(list(tmp_path.glob("tuned/lr_search/*.json"))) == 2
    assert record["protocol"]["at_grid_edge"] is True  # a 2-point grid: the choice is always an edge


def test_tables_show_the_chosen_lr(tmp_path):
    for seed in (0, 1):
        run(compose_run(tmp_path, *TUNED, "protocol.lr_grid=[5e-3,1e-2]", "experiment_name=tuned", f"seed={seed}"))
    out = write_tables(tmp_path, "tuned", tmp_path / "tables")
    text = Path(out).with_suffix(".md").read_text() if out else (tmp_path / "tables" / "tuned.md").read_text()
    lr_rows = [line for line in text.splitlines() if "| lr*" in line]
    assert len(lr_rows) == 1, text
    assert "Runs: 2 (2 success)" in text  # the selection records (lr_search/) are not runs of the table


def test_concurrent_runs_of_one_method_and_rank_select_one_after_the_other(tmp_path):
    """Two seeds started together: the second waits on the lock, then reuses (here: is handed) the first's records."""
    import threading
    import time as _time

    cfg = OmegaConf.create({"protocol": {"name": "tuned", "stage": "final", "lr_grid": [1e-3, 2e-3],
                                         "validation_size": 4, "selection_seed": 0},
                            "optim": {"lr": 5e-3}, "seed": 0, "experiment_name": "e", "force": False})
    events = []

    def fake_run(sel):
        events.append(("start", threading.current_thread().name))
        _time.sleep(0.05)  # long enough for the other thread to reach the lock
        events.append(("end", threading.current_thread().name))
        return {"status": "success", "metrics": {protocol.VALIDATION_METRIC: sel.optim.lr}}

    lock = tmp_path / "lr_search" / "x.lock"
    threads = [threading.Thread(target=protocol.select_lr, args=(cfg, fake_run, lock), name=n) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    owners = [name for _, name in events]
    first = owners[0]
    assert owners == [first] * 4 + [("b" if first == "a" else "a")] * 4  # no interleaving: one selection at a time


def test_split_holds_out_training_examples_only():
    cfg = OmegaConf.create({"protocol": {"name": "tuned", "stage": "validation", "lr_grid": [1e-3],
                                         "validation_size": 5, "split_seed": 0}})
    examples = list(range(20))
    train, validation = protocol.split(cfg, examples)
    assert len(validation) == 5 and sorted(train + validation) == examples and not set(train) & set(validation)
    assert protocol.split(cfg, examples) == (train, validation)  # seeded
    cfg.protocol.stage = "final"
    assert protocol.split(cfg, examples) == (examples, [])  # the tested run trains on everything


@pytest.mark.parametrize(("change", "message"), [
    ({"lr_grid": []}, "non-empty list of positive"),
    ({"lr_grid": [1e-3, 0.0]}, "non-empty list of positive"),
    ({"lr_grid": [-1e-3]}, "non-empty list of positive"),
    ({"validation_size": 0}, "positive number of examples"),
    ({"validation_size": 20}, "leaves no training data"),
    ({"name": "bayesian"}, "unknown protocol"),
])
def test_bad_protocol_settings_are_clear_errors(change, message):
    settings = {"name": "tuned", "stage": "final", "lr_grid": [1e-3], "validation_size": 5, "split_seed": 0}
    cfg = OmegaConf.create({"protocol": {**settings, **change}})
    with pytest.raises(ValueError, match=message):
        protocol.split(cfg, list(range(20)))


def test_fixed_protocol_does_not_change_run_ids():
    base = {"task": {"name": "math"}, "optim": {"lr": 5e-3}}
    assert config_hash({**base, "protocol": {"name": "fixed"}}) == config_hash(base)
    assert config_hash({**base, "protocol": {"name": "tuned", "lr_grid": [1e-3]}}) != config_hash(base)
