"""RL benchmark: Meta-World environment steps per second (serial vs vectorized) and the decision transformer's
training throughput in ``eva_bench.train.fit`` vs a plain PyTorch loop, on the CPU default's settings.

    python -m bench.rl      # about 1-2 minutes on 2 idle cores

(a) data generation: one env stepped by the scripted expert vs Gymnasium's AsyncVectorEnv with one env per core
    (expert actions computed in the main process);
(b) evaluation: rollouts of the CPU default DT, all episodes batched into one model forward per step
    (``tasks.rl.evaluate.rollout``) vs the same episodes one at a time;
(c) training: ``fit`` vs a hand-written AdamW/clip loop on the same pre-drawn window batches (model as conf/model/
    dt_cpu.yaml, LoRA r=8 on the blocks, ``random`` init; a fresh copy per timed run).

Prints the figures and writes them with the machine to bench/results/rl-<date>.json.
"""

from __future__ import annotations

import copy
import os
import time

import gymnasium as gym
import numpy as np
import torch

from bench import machine, save
from eva_bench.init import initialize
from eva_bench.train import OptimConfig, fit
from tasks.rl import envs, models
from tasks.rl.data import Episode
from tasks.rl.evaluate import rollout
from tasks.rl.sequences import SequenceDataset, StateNormalizer

TASK, STEPS_PER_EPISODE = "push-v3", 100  # conf/task/mw_cpu.yaml: max_episode_steps
DT = dict(hidden=64, layers=2, heads=4, context=10, dropout=0.1)  # conf/model/dt_cpu.yaml
BATCH, TRAIN_STEPS = 32, 60  # data.batch_size; timed steps per loop run


def env_steps_serial(episodes: int) -> float:
    from metaworld.policies import ENV_POLICY_MAP

    env, policy = envs.make(TASK, STEPS_PER_EPISODE), ENV_POLICY_MAP[TASK]()
    start, steps = time.perf_counter(), 0
    for i in range(episodes):
        obs, _ = env.reset(seed=i)
        done = False
        while not done:
            obs, _, term, trunc, _ = env.step(policy.get_action(obs))
            steps, done = steps + 1, term or trunc
    return steps / (time.perf_counter() - start)


def env_steps_vectorized(episodes: int, n_envs: int) -> float:
    from metaworld.policies import ENV_POLICY_MAP

    vec = gym.vector.AsyncVectorEnv([lambda: envs.make(TASK, STEPS_PER_EPISODE) for _ in range(n_envs)])
    policy = ENV_POLICY_MAP[TASK]()
    obs, _ = vec.reset(seed=list(range(n_envs)))
    start, steps = time.perf_counter(), 0
    for _ in range(episodes // n_envs * STEPS_PER_EPISODE):
        obs, *_ = vec.step(np.stack([policy.get_action(o) for o in obs]))
        steps += n_envs
    seconds = time.perf_counter() - start
    vec.close()
    return steps / seconds


def dt(seed=0):
    torch.manual_seed(seed)
    return models.decision_transformer(state_dim=39, act_dim=4, max_episode_steps=STEPS_PER_EPISODE, **DT)


def rollout_rates(episodes: int) -> dict:
    model, norm = dt(), StateNormalizer(np.zeros(39), np.ones(39))
    kwargs = dict(normalizer=norm, context=DT["context"], return_scale=100.0, target_return=400.0,
                  max_episode_steps=STEPS_PER_EPISODE)
    start = time.perf_counter()
    rollout(model, TASK, episodes=episodes, **kwargs)
    batched = episodes * STEPS_PER_EPISODE / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(episodes):
        rollout(model, TASK, episodes=1, seed=i, **kwargs)
    serial = episodes * STEPS_PER_EPISODE / (time.perf_counter() - start)
    return {"batched_steps_per_s": batched, "one_at_a_time_steps_per_s": serial}


def training_rates(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    eps = [Episode(rng.normal(size=(STEPS_PER_EPISODE, 39)).astype(np.float32),
                   rng.uniform(-1, 1, (STEPS_PER_EPISODE, 4)).astype(np.float32),
                   rng.uniform(0, 10, STEPS_PER_EPISODE).astype(np.float32), None) for _ in range(30)]
    windows = SequenceDataset(eps, DT["context"], 100.0)
    g = torch.Generator().manual_seed(0)
    batches = [windows.batch(torch.randint(len(windows), (BATCH,), generator=g).tolist()) for _ in range(TRAIN_STEPS)]
    base, _ = initialize(dt(), "random", rank=8, alpha=1, target_modules=models.BLOCK_LAYERS)
    optim = OptimConfig(lr=3e-3, warmup_ratio=0.05, max_grad_norm=0.25, log_every=50)

    def with_fit():
        model = copy.deepcopy(base)
        start = time.perf_counter()
        fit(model, lambda e: iter(batches), models.action_loss, optim, steps_per_epoch=TRAIN_STEPS,
            batch_size=lambda b: len(b["states"]))
        return time.perf_counter() - start

    def plain():
        model = copy.deepcopy(base)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3)
        model.train()
        start = time.perf_counter()
        for batch in batches:
            models.action_loss(model, batch).backward()
            torch.nn.utils.clip_grad_norm_(params, 0.25)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    fit_times, plain_times = [], []
    for _ in range(repeats):  # alternated to cancel drift
        fit_times.append(with_fit())
        plain_times.append(plain())
    f, p = float(np.median(fit_times)), float(np.median(plain_times))
    return {"fit_windows_per_s": TRAIN_STEPS * BATCH / f, "plain_windows_per_s": TRAIN_STEPS * BATCH / p,
            "fit_vs_plain": p / f}


def main() -> None:
    torch.set_num_threads(1)
    result = {
        "machine": machine(), "load_average_1m_start": os.getloadavg()[0],
        "data_generation": {"serial_steps_per_s": env_steps_serial(8),
                            "async_2_envs_steps_per_s": env_steps_vectorized(8, 2)},
        "evaluation": rollout_rates(8),
        "training": training_rates(3),
    }
    result["load_average_1m_end"] = os.getloadavg()[0]
    save("rl", result)


if __name__ == "__main__":
    main()
