"""The language recipe end to end on the real stories260K: a few steps per task, records, resume, bad input."""

import json
import re
import shutil
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from eva_bench.assets import OfflineHubError
from eva_bench.init import InitError
from tasks.language.train import run

CONF = Path(__file__).resolve().parent.parent / "conf"
REPO = CONF.parent
TINY = [  # a 2-step run: 40 training examples (a few are too long), batch 16, 4 test examples per eval, short generations
    "task.train.limit=40", "task.eval_limit=4", "data.batch_size=16", "data.eval_batch_size=4",
    "calibration.batches=2", "calibration.batch_size=8", "optim.log_every=1",
]


def compose_run(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="language", overrides=[*TINY, f"results_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("task,init,model", [
    ("math", "random", "stories260k"), ("commonsense", "eva", "stories260k"), ("math", "eva", "stories260k_mistral"),
])
def test_two_step_smoke_run_writes_a_complete_record(tmp_path, task, init, model):
    record = run(compose_run(tmp_path, f"task={task}", f"init={init}", f"model={model}", "lora.r=2"))
    assert record["status"] == "success"
    assert record["train"]["optimizer_steps"] == 2
    assert record["init_report"]["method"] == init and sum(record["init_report"]["ranks"].values()) == 2 * 35
    used = record["init_report"]["calibration_batches"]
    assert 1 <= used <= 2 if init == "eva" else used == 0  # EVA: at most the 2 supplied, each once
    evals = [k for k in record["metrics"] if k.endswith("/n")]
    assert evals and all(record["metrics"][k] > 0 for k in evals)
    for key in ("config", "provenance", "peak_memory", "trainable_parameters", "seconds"):
        assert key in record
    written = json.loads(Path(next(tmp_path.glob("dev/*.json"))).read_text())
    assert written["run"]["init"] == init and written["run"]["rank"] == 2


def test_gradient_checkpointing_trains_as_without_it(tmp_path):
    """model.gradient_checkpointing (the 7B configs' setting) recomputes blocks in backward: the same training curve."""
    plain = run(compose_run(tmp_path / "plain", "task=math", "init=eva", "optim.lr=5e-2"))
    checkpointed = run(compose_run(tmp_path / "ckpt", "task=math", "init=eva", "optim.lr=5e-2",
                                   "+model.gradient_checkpointing=true"))
    assert plain["status"] == checkpointed["status"] == "success"
    assert checkpointed["config"]["model"]["gradient_checkpointing"] is True
    for (step, a), (_, b) in zip(plain["train"]["curve"], checkpointed["train"]["curve"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5), (step, a, b)


def test_rerun_skips_finished_and_force_reruns(tmp_path, capsys):
    first = run(compose_run(tmp_path, "task=math"))
    again = run(compose_run(tmp_path, "task=math"))
    assert "skip" in capsys.readouterr().out and again["finished_at"] == first["finished_at"]
    forced = run(compose_run(tmp_path, "task=math", "force=true"))
    assert forced["started_at"] >= first["finished_at"] and len(list(tmp_path.glob("dev/*.json"))) == 1


def test_exploding_learning_rate_is_recorded_as_diverged(tmp_path):
    record = run(compose_run(tmp_path, "task=math", "optim.lr=1e30", "optim.max_grad_norm=null"))
    assert record["status"] == "diverged" and record["metrics"] == {}


def test_bad_rank_fails_before_training_with_a_failed_record(tmp_path):
    with pytest.raises(InitError, match="rank 100 exceeds"):
        run(compose_run(tmp_path, "task=math", "lora.r=100"))
    record = json.loads(next(tmp_path.glob("dev/*.json")).read_text())
    assert record["status"] == "failed" and "rank 100 exceeds" in record["error"] and "train" not in record


def test_hub_model_offline_is_a_clear_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    with pytest.raises(OfflineHubError, match="meta-llama/Llama-2-7b-hf"):
        run(compose_run(tmp_path, "model=llama2_7b"))


def test_missing_asset_names_the_file_and_host_and_leaves_a_failed_record(tmp_path, monkeypatch):
    """What a cluster job that cannot see the data root leaves: the error in its log and a failed record."""
    monkeypatch.setenv("EVA_BENCH_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="stories260K.bin.*on host .*EVA_BENCH_DATA=.*nowhere"):
        run(compose_run(tmp_path))
    record = json.loads(next(tmp_path.glob("dev/*.json")).read_text())
    assert record["status"] == "failed" and "missing asset" in record["error"]


def test_killed_sweep_resumes_without_losing_records(tmp_path):
    """Kill a 3-run sweep after its first record, rerun it: finished runs are skipped, nothing is corrupt."""
    cmd = [sys.executable, "-m", "tasks.language.train", "-m", *TINY, f"results_dir={tmp_path}", "task=math",
           "seed=0,1,2", f"hydra.sweep.dir={tmp_path}/multirun"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("dev/*.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.read_text() for p in tmp_path.glob("dev/*.json")}
    assert len(done) >= 1  # a kill mid-write can leave only a hidden .tmp file, never a partial record
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    # the sweeper launches only the missing runs (hydra/sweeper=skip_finished); none of them finds a finished record
    assert f"{len(done)} of 3 runs have a finished record: launching {3 - len(done)}" in log
    assert "skip (finished record exists)" not in log
    todo = 3 - len(done)  # the sweep's progress: one "k of N" line per landed record
    assert all(f"[{k} of {todo}] success: math--" in log for k in range(1, todo + 1)), log[-4000:]
    records = [json.loads(p.read_text()) for p in tmp_path.glob("dev/*.json")]
    assert sorted(r["run"]["seed"] for r in records) == [0, 1, 2] and all(r["status"] == "success" for r in records)
    for name, text in done.items():
        assert (tmp_path / "dev" / name).read_text() == text  # finished records untouched

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "3 of 3 runs have a finished record: launching 0" in again.stdout + again.stderr
    one_forced = [("seed=0" if arg == "seed=0,1,2" else arg) for arg in cmd] + ["force=true"]
    forced = subprocess.run(one_forced, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0 and "0 of 1 runs have a finished record: launching 1" in forced.stdout + forced.stderr


def test_wandb_logger_runs_offline_and_a_wandb_failure_never_kills_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    wandb.teardown()  # W&B reads WANDB_DIR once per process: an earlier test's setup would keep its directory
    record = run(compose_run(tmp_path, "logger=wandb", "task=math"))
    assert record["status"] == "success"
    wandb.teardown()  # run.finish() can return before W&B's service has written the run's file; this waits for it
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")  # logged offline, syncable later
    logged = wandb_offline_run(offline)
    assert (logged["run"].run_group, logged["run"].job_type) == ("dev", "train")
    assert {"init:random", "protocol:fixed", "seed:0"} <= set(logged["run"].tags)

    def broken(*args, **kwargs):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken)
    with pytest.warns(UserWarning, match="W&B init failed"):
        record = run(compose_run(tmp_path, "logger=wandb", "task=math", "seed=1"))
    assert record["status"] == "success"


def wandb_offline_run(run_dir: Path) -> dict:
    """What an offline W&B run wrote, read back from its transaction log ``run-<id>.wandb``: the run record (group,
    job type, tags, name), history rows and summary updates. wandb 0.31 has no Python reader of its own (the old
    ``wandb.sdk.internal.datastore`` is gone; wandb-core reads it), so this walks the log's framing (LevelDB's log
    format: 32 KiB blocks of chunks with a 7-byte header: CRC32C, length, type full/first/middle/last) and decodes
    each record with wandb's own protobuf, ``wandb.proto.wandb_internal_pb2.Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"  # the file header: identifier, magic, version (7 bytes)
    block, header = 32768, 7
    out = {"run": None, "history": [], "summary": {}}
    pos, pending = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        chunk, pos = data[pos + header : pos + header + length], pos + header + length
        if kind == 0:  # zero-filled rest of the file
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # full or first start a record; middle, last extend
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        items = lambda entries: {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}  # noqa: E731
        what = record.WhichOneof("record_type")
        if what == "run":
            out["run"] = record.run
        elif what == "history":
            out["history"].append(items(record.history.item))
        elif what == "summary":
            out["summary"].update(items(record.summary.update))
    return out


def test_wandb_run_has_tags_job_type_step_logs_and_the_ranks_table(tmp_path, monkeypatch):
    """A real tuned EVA run (one lr: one selection run, then the final run) logged offline, read back from W&B's
    own files: grouped by experiment, typed, tagged, lr and gradient norm per logged step, each eval metric once,
    the per-layer ranks as a table that matches the record, a small summary."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()  # W&B reads WANDB_DIR once per process: an earlier test's setup would keep its directory
    record = run(compose_run(tmp_path, "logger=wandb", "logger.tags=[mine]", "task=math", "init=eva", "lora.r=2",
                             "protocol=tuned", "protocol.validation_size=8", "protocol.lr_grid=[5e-3]",
                             "experiment_name=wb"))
    assert record["status"] == "success"
    wandb.teardown()  # run.finish() can return before W&B's service has written the run's file; this waits for it
    runs = {r["run"].display_name: (r, d) for d in (tmp_path / "wandb").glob("offline-run-*")
            for r in [wandb_offline_run(d)]}
    final, final_dir = runs[Path(record_path_of(tmp_path, "wb")).stem]
    selection = [r for name, (r, _) in runs.items() if r["run"].job_type == "lr_search"]
    assert len(runs) == 2 and len(selection) == 1

    assert final["run"].run_group == selection[0]["run"].run_group == "wb"  # the experiment, selection runs too
    assert final["run"].job_type == "train"
    assert set(final["run"].tags) == {"init:eva", "rank:2", "task:math", "model:stories260k", "protocol:tuned",
                                      "seed:0", "mine"}

    steps = [row for row in final["history"] if "train/loss" in row]
    assert [row["_step"] for row in steps] == [step for step, _ in record["train"]["curve"]]
    assert all(row["train/lr"] > 0 and row["train/grad_norm"] > 0 for row in steps)
    for name, value in record["metrics"].items():
        logged = [row[f"eval/{name}"] for row in final["history"] if f"eval/{name}" in row]
        assert logged == [value], name  # once, with the record's value
        assert final["summary"][f"eval/{name}"] == value and name not in final["summary"]  # no second copy

    table = json.loads((final_dir / "files" / final["summary"]["init/layers/path"]).read_text())
    assert table["columns"] == ["layer", "rank", "scaling", "explained_variance"]
    assert {row[0]: row[1] for row in table["data"]} == record["init_report"]["ranks"]
    explained = record["init_report"]["details"]["explained_variance"]
    assert explained and all(row[3] == explained.get(row[0]) for row in table["data"])
    ranks = list(record["init_report"]["ranks"].values())
    assert (final["summary"]["init/rank_min"], final["summary"]["init/rank_max"]) == (min(ranks), max(ranks))
    assert final["summary"]["init/method"] == "eva"
    small = {k for k in final["summary"] if k.startswith("init/") and not k.startswith("init/layers/")}
    assert small == {"init/method", "init/seconds", "init/rank_min", "init/rank_mean", "init/rank_max"}  # not the
    # init report's leaf per layer
    assert final["summary"]["status"] == "success"


def record_path_of(root: Path, experiment: str) -> Path:
    return next((root / experiment).glob("*.json"))


def test_unknown_init_or_task_lists_the_valid_ones(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Available options"):
        compose_run(tmp_path, "init=evaa")
    with pytest.raises(MissingConfigException, match="commonsense"):
        compose_run(tmp_path, "task=maths")


def test_a_nan_model_is_recorded_as_diverged_with_null_metrics(tmp_path):
    """lr 1e3 without clipping: training ends with finite logged losses, the weights score NaN on test."""
    record = run(compose_run(tmp_path, "task=math", "optim.lr=1e3", "optim.max_grad_norm=null", "task.train.limit=64",
                             "task.eval_limit=8", "~task.evals.math", "task.evals.gsm8k.metrics=[nll]"))
    assert record["status"] == "diverged"
    written = json.loads(next(tmp_path.glob("dev/*.json")).read_text())  # strict JSON: NaN would not parse
    assert written["status"] == "diverged" and written["metrics"]["gsm8k/nll"] is None
    assert "metrics.gsm8k/nll" in written["non_finite"]


def test_fewer_examples_than_one_batch_is_an_error_not_a_success(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch of data.batch_size=16: nothing to train on"):
        run(compose_run(tmp_path, "task=math", "task.train.limit=10"))
    record = json.loads(next(tmp_path.glob("dev/*.json")).read_text())
    assert record["status"] == "failed" and "nothing to train on" in record["error"]
    assert "init" not in record.get("init_report", {}) and not record.get("train")  # failed before any work


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    """A copy of the data root's GSM8K files to damage (the real root is never touched)."""
    from eva_bench.assets import data_root

    root = tmp_path / "data"
    shutil.copytree(data_root() / "gsm8k", root / "gsm8k")
    for entry in data_root().iterdir():
        if entry.name != "gsm8k":
            (root / entry.name).symlink_to(entry)  # the model and other sets, unchanged
    monkeypatch.setenv("EVA_BENCH_DATA", str(root))
    return root


def test_a_test_file_cut_mid_line_fails_the_run_before_training_naming_file_and_line(tmp_path, data_copy):
    test = data_copy / "gsm8k" / "test.jsonl"
    lines = test.read_text().splitlines()
    test.write_text("\n".join(lines[:99]) + "\n" + lines[99][:40])  # a copy that stopped mid-row
    with pytest.raises(ValueError, match=f"{test}, line 100: not a JSON row"):
        run(compose_run(tmp_path / "runs", "task=math", "~task.evals.math"))
    record = json.loads(next((tmp_path / "runs").glob("dev/*.json")).read_text())
    assert record["status"] == "failed" and not record.get("train")  # it never trained


def test_a_training_row_without_its_answer_is_named(tmp_path, data_copy):
    train = data_copy / "gsm8k" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    del rows[6]["answer"]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=f"{train}, line 7: no field 'answer' \\(the row has 'question'\\)"):
        run(compose_run(tmp_path / "runs", "task=math", "task.train.limit=null"))


def test_an_edited_record_is_set_aside_and_its_run_redone(tmp_path):
    first = run(compose_run(tmp_path, "task=math"))
    path = next(tmp_path.glob("dev/*.json"))
    nll = first["metrics"]["gsm8k/nll"]
    path.write_text(path.read_text().replace(repr(nll), repr(nll - 1)))  # a hand edit of a measured value
    with pytest.warns(UserWarning, match="edited after it was written.*moved to"):
        again = run(compose_run(tmp_path, "task=math"))
    assert again["started_at"] >= first["finished_at"] and again["metrics"]["gsm8k/nll"] == pytest.approx(nll)
    aside = list(tmp_path.glob("dev/*.json.invalid-*"))
    assert len(aside) == 1 and repr(nll - 1) in aside[0].read_text()  # kept, never silently overwritten


def test_a_short_copy_of_a_data_file_warns_and_its_record_names_the_files_read(tmp_path, data_copy):
    import hashlib

    train = data_copy / "gsm8k" / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:60]))  # 60 of 7,473 rows
    with pytest.warns(UserWarning, match=f"{train} holds 60 rows, fewer than the 7,473 its SOURCES.md documents"):
        record = run(compose_run(tmp_path / "runs", "task=math", "~task.evals.math"))
    data = record["provenance"]["data"]
    assert data[str(train)] == hashlib.sha256(train.read_bytes()).hexdigest()  # the short copy, by its hash
    assert str(data_copy / "gsm8k" / "test.jsonl") in data
    assert any(path.endswith("stories260K.bin") for path in data)  # the model's file too


def test_a_local_model_folder_loads_offline_and_trains(tmp_path, monkeypatch):
    """model=hf with a save_pretrained folder (stories260K saved here): under HF_HUB_OFFLINE=1 it loads from disk, the
    weights it holds, and trains. (Its metrics differ from the built-in loader's run in the 4th digit: from_pretrained
    draws from the global RNG before the adapter's init does.)"""
    import torch

    from tasks.language.models import from_hub, stories260k

    model, tokenizer = stories260k()
    folder = tmp_path / "saved_llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded, _ = from_hub(str(folder), dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    quick = ("task=math", "~task.evals.math", "task.evals.gsm8k.metrics=[nll]")
    record = run(compose_run(tmp_path / "hf", *quick, "model=hf", f"model.load.name={folder}", "model.name=saved"))
    assert record["status"] == "success" and record["run"]["model"] == "saved"
    assert record["config"]["model"]["load"]["name"] == str(folder)

    with pytest.raises(FileNotFoundError, match=f"no such directory: {tmp_path / 'nowhere'}"):
        run(compose_run(tmp_path / "hf", *quick, "model=hf", f"model.load.name={tmp_path / 'nowhere'}"))


def test_a_run_logs_its_init_its_steps_and_rounded_metrics(tmp_path, caplog):
    """Through logging (so Hydra's log file has it): a one-line init summary, a line per logged step with loss, lr,
    grad norm and ETA, and the metrics rounded; no transformers deprecation noise from PEFT."""
    import logging
    import warnings

    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(compose_run(tmp_path, "task=math", "init=eva", "~task.evals.math", "task.evals.gsm8k.metrics=[nll]"))
    text = caplog.text
    assert re.search(r"init eva: ranks \d+/[\d.]+/\d+ \(min/mean/max\) over 35 layers, 2 calibration batches", text)
    assert re.search(r"step 2/2  loss [\d.]+  lr [\d.e+-]+  grad-norm [\d.]+  \d+ s, ETA 0 s", text)
    assert re.search(r"success: .*\.json\n  gsm8k/n 4  gsm8k/nll \d\.\d{3}\b", text)  # 4 significant digits
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
