"""Meta-World tasks as Gymnasium environments that Minari can serialize.

Meta-World registers its environments with lambda entry points, which ``EnvSpec.to_json`` cannot write, so a Minari
dataset made from them cannot ``recover_environment``. ``ENV_ID`` is our own registration with a string entry point:

    env = gymnasium.make(ENV_ID, task="push-v3", seed=0, max_episode_steps=200)

Each reset picks one of the task's 50 goal variations (Meta-World's MT1 train tasks); ``reset(seed=s)`` picks it from
``s``, so an episode is reproducible from its seed alone.
"""

from __future__ import annotations

import functools
import threading

import gymnasium as gym
import numpy as np

ENV_ID = "eva_bench/MetaWorld-v0"
HORIZON = 500  # Meta-World's max_path_length: an env refuses to step further


def task_names() -> list[str]:
    import metaworld

    return sorted(metaworld.ALL_V3_ENVIRONMENTS)


def check_task(task: str) -> None:
    """An unknown task or one without a scripted expert policy is an error naming the valid ones."""
    from metaworld.policies import ENV_POLICY_MAP

    valid = task_names()
    if task not in valid:
        raise ValueError(f"unknown Meta-World task {task!r}; valid: {', '.join(valid)}")
    if task not in ENV_POLICY_MAP:
        raise ValueError(f"Meta-World task {task!r} has no scripted expert policy; with one: {', '.join(sorted(ENV_POLICY_MAP))}")


class MetaWorldTask(gym.Env):
    """One Meta-World task that sets one of its goal variations on every reset (seeded by the reset's seed).

    A plain ``gym.Env`` holding the Meta-World env, not a ``gym.Wrapper``: a wrapper inside the entry point would be
    written into the spec as an extra wrapper, and re-applied (without its arguments) by ``recover_environment``.
    """

    def __init__(self, env, variations: list):
        self.env, self.variations = env, variations
        self.observation_space, self.action_space = env.observation_space, env.action_space
        self._rng = np.random.default_rng(0)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.env.set_task(self.variations[self._rng.integers(len(self.variations))])
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        return self.env.step(action)

    def close(self):
        self.env.close()


def make_metaworld(task: str, seed: int = 0) -> gym.Env:
    """The entry point behind ``ENV_ID``: one Meta-World task, goal observable, a goal variation per reset."""
    import metaworld

    check_task(task)
    return MetaWorldTask(metaworld.ALL_V3_ENVIRONMENTS[task](), goal_variations(task, seed))


_GLOBAL_NP_RANDOM = threading.Lock()  # MT1 seeds, draws from and restores numpy's process-global RNG


@functools.lru_cache(maxsize=None)
def goal_variations(task: str, seed: int) -> tuple:
    """The task's 50 goal variations (Meta-World's MT1 train tasks; the seed fixes them), built once per process:
    an evaluation makes one env per episode.

    Serialized: two threads building MT1 at once (joblib runs a nested Parallel in threads inside a sweep's worker)
    interleave their draws from the global RNG, which gives other goals than the seed's, or repeated ones (Meta-World's
    "Only generated 38 unique goals, not 50" assertion)."""
    import metaworld

    with _GLOBAL_NP_RANDOM:
        return tuple(metaworld.MT1(task, seed=seed).train_tasks)


def make(task: str, max_episode_steps: int, seed: int = 0) -> gym.Env:
    if not 1 <= max_episode_steps <= HORIZON:
        raise ValueError(f"max_episode_steps must be in 1..{HORIZON} (Meta-World's limit), got {max_episode_steps}")
    return gym.make(ENV_ID, task=task, seed=seed, max_episode_steps=max_episode_steps, disable_env_checker=True)


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="tasks.rl.envs:make_metaworld")
