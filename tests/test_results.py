"""Run records: atomic writes, round trip, resume semantics, provenance."""

import json

import pytest

from eva_bench import results


def test_round_trip_and_finished(tmp_path):
    path = results.record_path(tmp_path, "exp", "math--m--eva--r2--s0--abcd1234")
    assert not results.is_finished(path) and results.read_record(path) is None
    results.write_record(path, {"run": {"init": "eva"}, "status": "success", "metrics": {"x/nll": 1.5}})
    record = results.read_record(path)
    assert record["schema"] == results.SCHEMA and record["metrics"] == {"x/nll": 1.5}
    assert results.is_finished(path)
    results.write_record(path, {"run": {}, "status": "diverged"})
    assert results.is_finished(path)  # a diverged run is a result, not something to retry
    results.write_record(path, {"run": {}, "status": "failed"})
    assert not results.is_finished(path)  # a failed run is retried on the next sweep


def test_killed_write_leaves_no_file(tmp_path):
    path = tmp_path / "exp" / "run.json"

    with pytest.raises(TypeError):
        results.write_record(path, {"status": "success", "x": _unserialisable()})
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # the temp file is gone too


def _unserialisable():
    class Loop(dict):
        def items(self):
            raise TypeError("cannot serialise")

    return Loop(a=1)


def test_existing_record_survives_a_failed_rewrite(tmp_path):
    path = tmp_path / "exp" / "run.json"
    results.write_record(path, {"status": "success", "metrics": {"a": 1}})
    with pytest.raises(TypeError):
        results.write_record(path, {"status": "success", "x": _unserialisable()})
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
    df = results.load_records(tmp_path)
    assert len(df) == 2 and sorted(df["metric.g/nll"]) == [1.0, 2.0]
