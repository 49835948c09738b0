"""Rollouts in Meta-World: success rate and return, and a step that raises is a failed episode, not a crash."""

import numpy as np

from tasks.rl import evaluate
from tasks.rl.models import decision_transformer
from tasks.rl.sequences import StateNormalizer

NORM = StateNormalizer(np.zeros(39), np.ones(39))


def dt():
    return decision_transformer(state_dim=39, act_dim=4, hidden=16, layers=1, heads=1, context=3,
                                max_episode_steps=20, dropout=0.0)


def test_rollout_reports_success_and_return():
    out = evaluate.rollout(dt(), "reach-v3", normalizer=NORM, context=3, return_scale=100.0, target_return=50.0,
                           episodes=2, max_episode_steps=20, seed=0)
    assert out["episodes"] == 2 and out["errors"] == 0
    assert 0.0 <= out["success_rate"] <= 1.0 and out["return"] > 0  # Meta-World rewards are positive


def test_an_exception_inside_the_simulator_is_a_failed_episode(monkeypatch):
    calls = {"n": 0}
    step = evaluate._Episode.step

    def flaky(self, action, scale):
        calls["n"] += 1
        if calls["n"] == 3:  # one episode's simulator blows up mid-rollout
            self.env.step = lambda a: (_ for _ in ()).throw(RuntimeError("MuJoCo: unstable simulation"))
        return step(self, action, scale)

    monkeypatch.setattr(evaluate._Episode, "step", flaky)
    out = evaluate.rollout(dt(), "reach-v3", normalizer=NORM, context=3, return_scale=100.0, target_return=50.0,
                           episodes=2, max_episode_steps=10, seed=0)
    assert out["errors"] == 1 and "unstable simulation" in out["error_messages"][0]
    assert out["success_rate"] <= 0.5
