"""The decision transformer: forward/backward, and every registered init through the RL calibration callbacks."""

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from eva_bench.init import INITS, Calibration, initialize
from eva_bench.train import OptimConfig, fit
from tasks.rl import models
from tasks.rl.data import Episode
from tasks.rl.sequences import SequenceDataset

CONTEXT = 4


def tiny_dt(seed=0):
    torch.manual_seed(seed)
    return models.decision_transformer(state_dim=5, act_dim=2, hidden=16, layers=2, heads=2, context=CONTEXT,
                                       max_episode_steps=12, dropout=0.0)


def windows(seed=0, episodes=3, steps=12):
    rng = np.random.default_rng(seed)
    eps = [Episode(rng.normal(size=(steps, 5)).astype(np.float32), rng.uniform(-1, 1, (steps, 2)).astype(np.float32),
                   rng.uniform(0, 1, steps).astype(np.float32), None) for _ in range(episodes)]
    return SequenceDataset(eps, context=CONTEXT, return_scale=10.0)


def calibration(data):
    batches = [data.batch(range(i, len(data), 4)[:6]) for i in range(3)]  # includes padded windows
    return Calibration(batches=batches, forward=models.forward, loss=models.action_loss, rows=models.token_rows,
                       loss_rows=models.token_rows, dataset_size=len(data))


def test_forward_backward_and_the_loss_ignores_padding():
    model, data = tiny_dt(), windows()
    batch = data.batch([0, 1, 20])  # windows 0 and 1 are left-padded
    assert models.forward(model, batch).shape == (3, CONTEXT, 2)
    loss = models.action_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.embed_state.weight.grad.abs().sum() > 0
    changed = {k: v.clone() for k, v in batch.items()}
    changed["actions"][0, 0] = 99.0  # a padded step's action target: masked out of the loss
    model.eval()
    with torch.no_grad():
        assert torch.allclose(models.action_loss(model, changed), models.action_loss(model, batch))


def test_token_rows_follow_the_interleaved_order():
    mask = torch.tensor([[0, 1, 1]])
    assert models.token_rows({"attention_mask": mask}).tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("method", sorted(INITS))
def test_every_init_attaches_to_the_dt_and_trains(method):
    model, data = tiny_dt(), windows()
    peft_model, report = initialize(model, method, rank=2, alpha=1, target_modules=models.BLOCK_LAYERS,
                                    calibration=calibration(data))
    adapted = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == 8 and sum(report.ranks.values()) > 0  # 4 Conv1D layers x 2 blocks
    result = fit(peft_model, lambda epoch: (data.batch(range(i, i + 8)) for i in (0, 8)), models.action_loss,
                 OptimConfig(lr=1e-3, log_every=1), steps_per_epoch=2, batch_size=lambda b: len(b["states"]))
    assert result.status == "success" and result.optimizer_steps == 2
