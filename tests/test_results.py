"""Run records: atomic writes, round trip, resume semantics, provenance, and records that cannot be trusted."""

import json
import math
import os
import stat

import pytest

from eva_bench import results

RUN = {"experiment": "exp", "task": "math", "model": "m", "init": "eva", "rank": 2, "seed": 0, "config_hash": "abcd1234"}


def test_round_trip_and_finished(tmp_path):
    path = results.record_path(tmp_path, "exp", "math--m--eva--r2--s0--abcd1234")
    assert not results.is_finished(path) and results.read_record(path) is None
    results.write_record(path, {"run": RUN, "status": "success", "metrics": {"x/nll": 1.5}})
    record = results.read_record(path)
    assert record["schema"] == results.SCHEMA and record["metrics"] == {"x/nll": 1.5}
    assert results.is_finished(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # a teammate's reader on a shared cluster can read it
    results.write_record(path, {"run": RUN, "status": "diverged"})
    assert results.is_finished(path)  # a diverged run is a result, not something to retry
    results.write_record(path, {"run": RUN, "status": "failed"})
    assert not results.is_finished(path)  # a failed run is retried on the next sweep


def test_non_finite_numbers_are_written_as_null_and_listed(tmp_path):
    path = tmp_path / "exp" / "run.json"
    results.write_record(path, {"run": RUN, "status": "diverged", "metrics": {"x/nll": math.nan},
                                "train": {"curve": [[1, 2.0], [2, math.inf]]}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)  # strict JSON
    assert record["metrics"] == {"x/nll": None} and record["train"]["curve"][1] == [2, None]
    assert record["non_finite"] == ["metrics.x/nll", "train.curve[1][1]"]
    assert results.read_record(path) == record


@pytest.mark.parametrize("content,why", [
    ("{x", "unreadable"),
    ("[]", "not a record (a JSON list)"),
    ('{"status": "success"}', "no run keys"),
    (json.dumps({"run": {**RUN, "seed": "0"}, "status": "success", "metrics": {}}), "wrong type: seed"),
    (json.dumps({"run": RUN, "status": "done", "metrics": {}}), "status 'done'"),
    (json.dumps({"run": RUN, "status": "success", "metrics": {"x/nll": None}}), "non-finite metric"),
])
def test_an_invalid_record_is_named_and_not_finished(tmp_path, content, why):
    path = tmp_path / "exp" / "run.json"
    path.parent.mkdir()
    path.write_text(content)
    record, problem = results.check_record(path)
    assert record is None and why in problem
    assert not results.is_finished(path)


def test_an_edited_metric_breaks_the_digest(tmp_path):
    path = tmp_path / "exp" / "run.json"
    results.write_record(path, {"run": RUN, "status": "success", "metrics": {"x/nll": 1.5}})
    assert results.check_record(path)[1] is None
    path.write_text(path.read_text().replace("1.5", "1.4"))
    assert results.check_record(path) == (None, "edited after it was written (its digest does not match its content)")
    assert not results.is_finished(path)


def test_killed_write_leaves_no_file(tmp_path):
    path = tmp_path / "exp" / "run.json"

    with pytest.raises(TypeError):
        results.write_record(path, {"run": RUN, "status": "success", "x": _unserialisable()})
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # the temp file is gone too


def _unserialisable():
    class Loop(dict):
        def items(self):
            raise TypeError("cannot serialise")

    return Loop(a=1)


def test_existing_record_survives_a_failed_rewrite(tmp_path):
    path = tmp_path / "exp" / "run.json"
    results.write_record(path, {"run": RUN, "status": "success", "metrics": {"a": 1}})
    with pytest.raises(TypeError):
        results.write_record(path, {"run": RUN, "status": "success", "x": _unserialisable()})
    assert json.loads(path.read_text())["metrics"] == {"a": 1}


def test_config_hash_ignores_seed_and_bookkeeping():
    base = {"lora": {"r": 8}, "seed": 0, "force": False, "logger": {"kind": "none"}, "results_dir": "a"}
    same = {**base, "seed": 10, "force": True, "logger": {"kind": "wandb"}, "results_dir": "b"}
    other = {**base, "lora": {"r": 2}}
    assert results.config_hash(base) == results.config_hash(same) != results.config_hash(other)


def test_provenance_has_what_a_reader_needs():
    prov = results.provenance()
    assert prov["packages"]["torch"] and prov["packages"]["peft"] == "0.21.2"
    assert set(prov["git"]) == {"commit", "dirty"}
    assert prov["hardware"]["cpu_count"] >= 1
    assert results.peak_memory_bytes()["process_peak_rss"] > 0


def test_load_records_flattens_metrics(tmp_path):
    for seed in (0, 1):
        run = {"experiment": "e", "task": "t", "model": "m", "init": "eva", "rank": 2, "seed": seed, "config_hash": "h"}
        results.write_record(tmp_path / "e" / f"r{seed}.json", {"run": run, "status": "success",
                                                                 "metrics": {"g/nll": 1.0 + seed}})
    (tmp_path / "e" / "corrupt.json").write_text("{not json")
    with pytest.warns(UserWarning, match="invalid record left out: .*corrupt.json: unreadable"):
        df = results.load_records(tmp_path)
    assert len(df) == 2 and sorted(df["metric.g/nll"]) == [1.0, 2.0]
    assert [(os.path.basename(p), why.split(" ")[0]) for p, why in df.attrs["invalid"]] == [("corrupt.json", "unreadable")]


def test_a_stale_temp_file_of_a_killed_writer_is_removed_on_the_next_write(tmp_path):
    path = tmp_path / "exp" / "run.json"
    path.parent.mkdir()
    stale = path.parent / ".run.k1ll3d.tmp"
    stale.write_text('{"half": ')
    results.write_record(path, {"run": RUN, "status": "failed"})
    assert not stale.exists() and results.read_record(path)["status"] == "failed"


def test_load_gives_one_row_per_run_with_lr_metrics_and_summaries(tmp_path):
    def write(name, seed, **extra):
        results.write_record(tmp_path / "exp" / f"{name}.json", {
            "run": {**RUN, "seed": seed}, "status": "success", "metrics": {"gsm8k/nll": 2.5 + seed},
            "config": {"optim": {"lr": 5e-3}}, "seconds": 30.0,
            "init_report": {"seconds": 1.5, "ranks": {"q": 2, "v": 4}},
            "train": {"optimizer_steps": 31, "final_loss": 1.25, "seconds": 20.0}, **extra})

    write("a", 0)
    write("b", 1, protocol={"name": "tuned", "selected_lr": 4e-2})
    (tmp_path / "exp" / "c.json").write_text("{x")  # unreadable: named, left out
    with pytest.warns(UserWarning, match="invalid record left out: .*c.json"):
        runs = results.load("exp", tmp_path)
    assert len(runs) == 2 and runs.attrs["invalid"][0][0].endswith("c.json")
    first, second = runs.iloc[0], runs.iloc[1]
    assert (first["lr"], first["protocol"], second["lr"], second["protocol"]) == (5e-3, "fixed", 4e-2, "tuned")
    assert second["gsm8k/nll"] == 3.5 and first["init_seconds"] == 1.5 and first["mean_rank"] == 3.0
    assert first["adapted_layers"] == 2 and first["optimizer_steps"] == 31 and first["train_seconds"] == 20.0


def test_the_experiment_name_is_in_the_hash_and_bookkeeping_is_not():
    """results.py's docstring says so: one run config in two experiments has two ids; bookkeeping keys never move it."""
    from eva_bench.results import IGNORED_FOR_HASH, config_hash

    base = {"experiment_name": "a", "init": {"name": "eva"}, "seed": 0, "threads": 1, "save_adapter": False}
    assert config_hash(base) != config_hash({**base, "experiment_name": "b"})
    for key in IGNORED_FOR_HASH:
        assert config_hash(base) == config_hash({**base, key: "anything"}), key


def test_a_moved_scorer_and_a_key_added_at_its_default_keep_a_committed_id():
    before = {"experiment_name": "x", "model": {"name": "m"}, "task": {"evals": {"gsm8k": {
        "scorer": "tasks.language.evaluate.gsm8k_correct"}}}}
    now = {"experiment_name": "x", "model": {"name": "m", "domain": "language"}, "task": {"domain": "language",
           "evals": {"gsm8k": {"scorer": "tasks.language.answers.gsm8k_correct"}}}}
    assert results.config_hash(now) == results.config_hash(before)
    elsewhere = {**now, "model": {"name": "m", "domain": "vision"}}
    assert results.config_hash(elsewhere) != results.config_hash(before)
