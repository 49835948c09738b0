"""Rolling a decision transformer out in its Meta-World task: success rate and return over several episodes.

The episodes run side by side (one batched model forward per step for all of them: cheaper than one per episode,
bench/rl.py). Each is reset with its own seed (a goal variation drawn apart from the training data's seeds) and
conditioned on ``target_return``, taken from the data (Decision Transformer, Sec. 4: condition on a high return).
A MuJoCo error inside one episode ends that episode as a failure and is counted; the others carry on.
"""

from __future__ import annotations

import numpy as np
import torch

from eva_bench import distributed
from tasks.rl import envs
from tasks.rl.models import forward
from tasks.rl.sequences import StateNormalizer

EVAL_STREAM = 1  # seeds evaluation episodes apart from data generation's (SeedSequence([seed, i]))


@torch.no_grad()
def rollout(model, task: str, *, normalizer: StateNormalizer, context: int, return_scale: float,
            target_return: float, episodes: int, max_episode_steps: int, seed: int = 0) -> dict:
    """``episodes`` rollouts of ``model`` in ``task``: success rate, mean return, episodes that raised. Episode i
    has its own seed, so under torchrun each rank runs its share of the same episodes."""
    model.eval()

    def run_share(indices: list[int]) -> list[tuple[bool, float, str | None]]:
        runs = [_Episode(envs.make(task, max_episode_steps), seed, i, target_return / return_scale, normalizer)
                for i in indices]
        _run_together(model, runs, context, return_scale, max_episode_steps)
        return [(r.success, r.total, r.error) for r in runs]

    outcomes = distributed.spread(range(episodes), run_share)
    errors = [error for _, _, error in outcomes if error is not None]
    return {
        "success_rate": float(np.mean([success for success, _, _ in outcomes])),
        "return": float(np.mean([total for _, total, _ in outcomes])),
        "episodes": episodes,
        "errors": len(errors),
        "error_messages": sorted(set(errors)),
    }


def _run_together(model, runs: list, context: int, return_scale: float, max_episode_steps: int) -> None:
    """Step every episode until it ends: one batched model forward per step for the episodes still running."""
    device = next(model.parameters()).device
    for _ in range(max_episode_steps):
        active = [r for r in runs if not r.done]
        if not active:
            break
        batch = {k: torch.from_numpy(np.stack([r.window(context)[k] for r in active])).to(device)
                 for k in ("states", "actions", "returns_to_go", "timesteps", "attention_mask")}
        actions = forward(model, batch)[:, -1].cpu().numpy()
        for run, action in zip(active, actions):
            run.step(action, return_scale)
    for run in runs:
        run.env.close()


class _Episode:
    """One rollout's history (what the model's next window is built from) and outcome."""

    def __init__(self, env, seed: int, index: int, scaled_target: float, normalizer: StateNormalizer):
        self.env, self.normalizer = env, normalizer
        obs, _ = env.reset(seed=int(np.random.SeedSequence([seed, EVAL_STREAM, index]).generate_state(1)[0]))
        self.states, self.actions, self.rtg = [normalizer(obs)], [], [scaled_target]
        act_dim = env.action_space.shape[0]
        self.placeholder = np.zeros(act_dim, dtype=np.float32)  # the action being predicted (not seen by it)
        self.done, self.success, self.total, self.error = False, False, 0.0, None

    def window(self, context: int) -> dict:
        t = len(self.states)
        start = max(0, t - context)
        pad = context - (t - start)
        actions = np.asarray([*self.actions, self.placeholder], dtype=np.float32)[start:t]
        return {
            "states": np.pad(np.asarray(self.states[start:t]), ((pad, 0), (0, 0))),
            "actions": np.pad(actions, ((pad, 0), (0, 0))),
            "returns_to_go": np.pad(np.asarray(self.rtg[start:t], dtype=np.float32), (pad, 0))[:, None],
            "timesteps": np.pad(np.arange(start, t), (pad, 0)).astype(np.int64),
            "attention_mask": np.pad(np.ones(t - start, dtype=np.int64), (pad, 0)),
        }

    def step(self, action: np.ndarray, return_scale: float) -> None:
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as error:  # MuJoCo instability and the like: this episode failed, the evaluation goes on
            self.done, self.success, self.error = True, False, f"{type(error).__name__}: {error}"
            return
        self.actions.append(np.asarray(action, dtype=np.float32))
        self.total += float(reward)
        self.success = self.success or bool(info.get("success", False))
        self.done = bool(terminated or truncated)
        if not self.done:
            self.states.append(self.normalizer(obs))
            self.rtg.append(self.rtg[-1] - float(reward) / return_scale)
