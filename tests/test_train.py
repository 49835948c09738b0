"""The shared training loop: learns, schedules, accumulates, and ends a non-finite run as diverged."""

import math

import pytest
import torch
from torch import nn

from eva_bench.train import OptimConfig, fit, lr_lambda


def regression(n_batches=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 1, generator=g)
    xs = [torch.randn(16, 4, generator=g) for _ in range(n_batches)]
    return [{"input_ids": x, "y": x @ w} for x in xs]


def mse(model, batch):
    return ((model(batch["input_ids"]) - batch["y"]) ** 2).mean()


def test_fit_reduces_loss_and_reports():
    torch.manual_seed(0)
    model, data = nn.Linear(4, 1), regression()
    before = sum(mse(model, b).item() for b in data) / len(data)
    result = fit(model, lambda epoch: iter(data), mse, OptimConfig(lr=0.2, epochs=5, log_every=4),
                 steps_per_epoch=len(data))
    after = sum(mse(model, b).item() for b in data) / len(data)
    assert result.status == "success" and result.optimizer_steps == 40 and result.examples == 40 * 16
    assert after < before / 10
    assert [s for s, _ in result.curve] == list(range(4, 41, 4))
    assert result.final_loss == result.curve[-1][1]


def test_grad_accumulation_equals_big_batch():
    data = regression(4)
    merged = [{"input_ids": torch.cat([b["input_ids"] for b in data]), "y": torch.cat([b["y"] for b in data])}]
    torch.manual_seed(0)
    a = nn.Linear(4, 1)
    b = nn.Linear(4, 1)
    b.load_state_dict(a.state_dict())
    fit(a, lambda e: iter(data), mse, OptimConfig(lr=0.1, grad_accumulation=4, max_grad_norm=None), steps_per_epoch=4)
    fit(b, lambda e: iter(merged), mse, OptimConfig(lr=0.1, max_grad_norm=None), steps_per_epoch=1)
    torch.testing.assert_close(a.weight, b.weight)


def test_nan_loss_ends_run_as_diverged():
    model, data = nn.Linear(4, 1), regression()
    data[2] = {"input_ids": data[2]["input_ids"], "y": data[2]["y"] * float("nan")}
    result = fit(model, lambda e: iter(data), mse, OptimConfig(lr=0.01, log_every=1), steps_per_epoch=len(data))
    assert result.status == "diverged" and result.optimizer_steps == 2 and math.isnan(result.final_loss)


def test_nan_loss_without_clipping_is_caught_at_log_time():
    model, data = nn.Linear(4, 1), regression()
    data[0] = {"input_ids": data[0]["input_ids"], "y": data[0]["y"] * float("inf")}
    result = fit(model, lambda e: iter(data), mse, OptimConfig(lr=0.01, max_grad_norm=None, log_every=2),
                 steps_per_epoch=len(data))
    assert result.status == "diverged"


def test_schedule_warmup_then_cosine():
    f = lr_lambda(total_steps=10, warmup_steps=2, schedule="cosine")
    assert [round(f(s), 3) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert f(9) < 0.05 and f(6) == pytest.approx(0.5)
    assert lr_lambda(10, 0, "constant")(7) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_lambda(10, 0, "linear")


def test_fit_needs_trainable_parameters():
    model = nn.Linear(4, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        fit(model, lambda e: iter(regression()), mse, OptimConfig(lr=0.1), steps_per_epoch=8)


SCRIPT = """
import logging, sys, torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_train import regression, mse
from eva_bench.train import OptimConfig, fit
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
torch.manual_seed(0)
fit(nn.Linear(4, 1), lambda epoch: iter(regression()), mse, OptimConfig(lr=0.2, epochs=2, log_every=8),
    steps_per_epoch=8)
"""


@pytest.mark.parametrize("terminal", [True, False])
def test_a_bar_on_a_terminal_and_step_lines_everywhere(terminal, tmp_path):
    """On a terminal a progress bar over the optimizer steps (with loss and lr) and the step lines above it; in a log
    file only the step lines."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios
    import sys
    from pathlib import Path

    code = SCRIPT.format(tests=str(Path(__file__).parent))
    if terminal:
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 wide
        proc = subprocess.run([sys.executable, "-c", code], stderr=follower, stdout=subprocess.DEVNULL, timeout=120)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        err = b"".join(chunks).decode(errors="replace")
    else:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        err = proc.stderr
    assert proc.returncode == 0, err
    assert "step 8/16  loss" in err and "step 16/16  loss" in err  # the step lines, both ways
    assert ("training:" in err and "16/16" in err and "lr " in err) == terminal  # the bar only on a terminal
