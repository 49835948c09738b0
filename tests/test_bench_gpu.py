"""The GPU benchmark and the GPU-hours estimate stay runnable without a GPU (their arithmetic, their --smoke path)."""

import json

import pytest
import torch

from bench import gpu, gpu_hours


def test_the_gpu_benchmark_runs_its_smoke_size_on_the_cpu(capsys):
    gpu.main(["--smoke"])
    figures = json.loads(capsys.readouterr().out)
    assert figures["train"]["status"] == figures["train_checkpointing"]["status"] == "success"
    assert figures["train"]["tokens_per_s"] > 0 and figures["init"]["eva"]["calibration_batches"] >= 1


def test_padding_factor_is_padded_over_real_tokens():
    assert gpu_hours.padded_factor([1, 3], batch_size=2) == 1.5  # one batch padded to 3: 6 tokens for 4 real
    assert gpu_hours.padded_factor([5] * 8, batch_size=4) == 1.0


def test_a_measured_record_gives_its_tokens_per_second_times_six_times_the_model_size(tmp_path):
    record = tmp_path / "gpu.json"
    record.write_text(json.dumps({"model": {**gpu.TINY, "dtype": "torch.float32", "lora_r": 16, "targets": []},
                                  "train_checkpointing": {"tokens_per_s": 1000.0}}))
    size = sum(p.numel() for p in gpu.build(gpu.TINY, torch.device("cpu"), torch.float32).parameters())
    assert gpu_hours.measured_rate(record) == pytest.approx(1000.0 * 6 * size)


def test_a_language_table_estimate_counts_its_sweep_and_prices_training_at_six_n_per_token():
    estimate = gpu_hours.estimate("paper_commonsense_llama2_7b", 1e14)
    assert estimate["runs"] == 6  # init random,eva x seed 0,10,101
    assert estimate["train_hours_per_run"] == pytest.approx(6 * 6.74e9 * estimate["train_tokens_per_run"] / 1e14 / 3600)
    assert 170_420 * 20 < estimate["train_tokens_per_run"] < 170_420 * 512  # 20 tokens an example .. max_length
    total = estimate["runs"] * (estimate["train_hours_per_run"] + estimate["eval_hours_per_run"])
    assert estimate["table_gpu_hours"] == pytest.approx(total) and estimate["eval_hours_per_run"] > 0
