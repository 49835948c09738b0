"""Episodes -> decision-transformer training windows: returns-to-go, timesteps, attention masks, left padding.

A window ends at every step ``t`` of every episode and holds the ``context`` steps before it (fewer at an episode's
start: left-padded, masked out), so the model also learns to act with the short histories it has early in a rollout.
States are normalised by the training data's mean and std (kept, so a rollout normalises the same way); returns-to-go
are divided by ``return_scale`` (Decision Transformer, Chen et al. 2021, Sec. 3: R_t = sum of rewards from t on).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tasks.rl.data import Episode


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """R_t = r_t + r_{t+1} + ... + r_{T-1} (undiscounted, as in the Decision Transformer)."""
    return np.cumsum(rewards[::-1])[::-1].copy()


@dataclass
class StateNormalizer:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, episodes: list[Episode]) -> StateNormalizer:
        states = np.concatenate([e.observations for e in episodes])
        return cls(states.mean(0), states.std(0) + 1e-6)  # constant features (Meta-World pads zeros): std ~ 0

    def __call__(self, states: np.ndarray) -> np.ndarray:
        return ((states - self.mean) / self.std).astype(np.float32)


class SequenceDataset:
    """Every (episode, end step) window of ``context`` steps; ``batch(indices)`` collates them for the model."""

    def __init__(self, episodes: list[Episode], context: int, return_scale: float,
                 normalizer: StateNormalizer | None = None):
        if not episodes:
            raise ValueError("no episodes to train on")
        shortest = min(len(e) for e in episodes)
        if context > shortest:
            raise ValueError(
                f"context {context} is longer than the shortest episode ({shortest} steps): lower the model's context "
                "or generate longer episodes"
            )
        self.context, self.return_scale = context, return_scale
        self.normalizer = normalizer or StateNormalizer.fit(episodes)
        self.states = [self.normalizer(e.observations) for e in episodes]
        self.actions = [e.actions for e in episodes]
        self.rtg = [returns_to_go(e.rewards) / return_scale for e in episodes]
        self.windows = [(i, end) for i, e in enumerate(episodes) for end in range(1, len(e) + 1)]

    def __len__(self) -> int:
        return len(self.windows)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Windows ``indices`` as tensors: states/actions (B, K, dim), returns_to_go (B, K, 1), timesteps and
        attention_mask (B, K); padding sits on the left with mask 0."""
        rows = [self.window(*self.windows[int(i)]) for i in indices]
        return {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]}

    def window(self, episode: int, end: int) -> dict[str, np.ndarray]:
        K = self.context
        start = max(0, end - K)
        pad = K - (end - start)
        states, actions = self.states[episode][start:end], self.actions[episode][start:end]
        return {
            "states": np.pad(states, ((pad, 0), (0, 0))),
            "actions": np.pad(actions, ((pad, 0), (0, 0))),
            "returns_to_go": np.pad(self.rtg[episode][start:end], (pad, 0))[:, None].astype(np.float32),
            "timesteps": np.pad(np.arange(start, end), (pad, 0)).astype(np.int64),
            "attention_mask": np.pad(np.ones(end - start, dtype=np.int64), (pad, 0)),
        }
