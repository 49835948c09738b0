"""Offline RL data: Meta-World expert episodes stored as Minari datasets, or any Minari dataset from the hub.

    spec = ExpertSpec(task="push-v3", episodes=40, max_episode_steps=150, action_noise=0.1)
    dataset = expert_dataset(spec)              # built once under the eva_bench cache, then loaded
    episodes = load_episodes(dataset)            # [Episode(observations, actions, rewards, successes)]

Generation: Meta-World's scripted expert policy (``metaworld.policies``) acts, optionally with Gaussian action noise
and an epsilon share of uniformly random actions, so a dataset can range from expert to mixed quality. Episode ``i``
of a spec is reset with seed ``(spec.seed, i)`` (which goal variation) and its noise drawn from the same seed, so a
spec fully determines its data. A dataset lives in ``<cache>/minari/<id>`` where the id carries the spec's hash: an
unchanged spec is loaded, not rebuilt; a dataset whose completion marker is missing or does not match (a killed
build, a corrupt copy) is removed and rebuilt; concurrent builders wait on one lock per dataset.

A remote Minari dataset (``RemoteSpec("mujoco/halfcheetah/expert-v0")``, e.g. D4RL MuJoCo) goes through the same
``load_episodes``; it needs the hub (``minari.load_dataset(..., download=True)``) unless already downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

from eva_bench.assets import OfflineHubError, cache_dir, hub_offline
from eva_bench.locks import exclusive
from tasks.rl import envs

FORMAT = 1  # bump when the way episodes are generated changes: every cached dataset is rebuilt
MARKER = "eva_bench_spec.json"  # written last into a finished dataset's folder: its spec and episode count


@dataclass(frozen=True)
class ExpertSpec:
    task: str  # Meta-World task name, e.g. "push-v3"
    episodes: int  # episodes generated
    max_episode_steps: int = 200  # steps per episode (Meta-World allows at most 500)
    action_noise: float = 0.0  # std of Gaussian noise added to the expert's action (actions are clipped to [-1, 1])
    epsilon: float = 0.0  # probability that a step takes a uniformly random action instead
    seed: int = 0  # seeds goal variations and noise

    def hash(self) -> str:
        blob = json.dumps({**asdict(self), "format": FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def dataset_id(self) -> str:
        return f"eva_bench/metaworld/{self.task}-{self.hash()}-v0"


@dataclass(frozen=True)
class RemoteSpec:
    dataset_id: str  # a Minari hub id, e.g. "mujoco/halfcheetah/expert-v0"


@dataclass
class Episode:
    observations: np.ndarray  # (T, obs_dim): the observation each action was taken in
    actions: np.ndarray  # (T, act_dim)
    rewards: np.ndarray  # (T,)
    successes: np.ndarray | None  # (T,) Meta-World's success flag after each step (None: the data has none)

    def __len__(self) -> int:
        return len(self.actions)


def datasets_root() -> Path:
    """Minari's dataset folder, inside the eva_bench cache (never the repository)."""
    root = cache_dir() / "minari"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["MINARI_DATASETS_PATH"] = str(root)  # minari.load_dataset reads its root from here
    return root


# --- expert data -------------------------------------------------------------------------------------------------


def expert_dataset(spec: ExpertSpec):
    """The Minari dataset of ``spec``: loaded when a finished one exists, else (re)built under a lock."""
    import minari

    envs.check_task(spec.task)
    if spec.episodes < 1 or not 0 <= spec.epsilon <= 1 or spec.action_noise < 0:
        raise ValueError(f"bad expert data spec {spec}: episodes >= 1, 0 <= epsilon <= 1, action_noise >= 0")
    folder = datasets_root() / spec.dataset_id
    with exclusive(datasets_root() / "locks" / f"{spec.task}-{spec.hash()}.lock"):
        if not _finished(folder, spec):
            if folder.exists():
                print(f"rebuilding incomplete or corrupt dataset {spec.dataset_id}")
                shutil.rmtree(folder)
            _build(spec)
            (folder / MARKER).write_text(json.dumps({"spec": asdict(spec), "format": FORMAT}))
        return minari.load_dataset(spec.dataset_id)


def expert_datasets(specs: list[ExpertSpec], n_jobs: int = 1) -> list:
    """Every spec's dataset, the missing ones built in ``n_jobs`` parallel processes (one task per process)."""
    if n_jobs > 1 and len(specs) > 1:
        from joblib import Parallel, delayed

        # processes even inside a sweep's joblib worker, where joblib's default for a nested Parallel is threads
        cache = os.environ.get("EVA_BENCH_CACHE")
        Parallel(n_jobs=n_jobs, backend="loky")(delayed(_build_in_worker)(s, cache) for s in specs)
    return [expert_dataset(s) for s in specs]


def _build_in_worker(spec: ExpertSpec, cache: str | None) -> None:
    if cache:
        os.environ["EVA_BENCH_CACHE"] = cache
    expert_dataset(spec)


def _finished(folder: Path, spec: ExpertSpec) -> bool:
    import minari

    try:
        marker = json.loads((folder / MARKER).read_text())
        if marker != {"spec": asdict(spec), "format": FORMAT}:
            return False
        return minari.load_dataset(spec.dataset_id).total_episodes == spec.episodes
    except Exception:  # missing marker, unreadable or truncated storage: not finished
        return False


def _build(spec: ExpertSpec) -> None:
    import minari
    from metaworld.policies import ENV_POLICY_MAP
    from minari.data_collector import EpisodeBuffer
    from tqdm import tqdm

    env = envs.make(spec.task, spec.max_episode_steps)
    policy = ENV_POLICY_MAP[spec.task]()
    buffers = []
    for i in tqdm(range(spec.episodes), desc=f"expert data {spec.task}", unit="episode", leave=False):
        seed = int(np.random.SeedSequence([spec.seed, i]).generate_state(1)[0])
        rng = np.random.default_rng(seed)
        obs, _ = env.reset(seed=seed)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        successes = [False]  # Minari keeps the reset's info too: one entry more than steps
        done = False
        while not done:
            action = noisy(policy.get_action(obs), rng, spec, env.action_space)
            obs, reward, terminated, truncated, info = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(float(reward))
            terminations.append(bool(terminated))
            truncations.append(bool(truncated))
            successes.append(bool(info["success"]))
            done = terminated or truncated
        buffers.append(EpisodeBuffer(
            id=i, seed=seed, observations=np.asarray(observations), actions=np.asarray(actions),
            rewards=rewards, terminations=terminations, truncations=truncations,
            infos={"success": np.asarray(successes)},
        ))
    minari.create_dataset_from_buffers(
        spec.dataset_id, buffers, env=env, algorithm_name="metaworld scripted policy" + _quality(spec),
        author="eva_bench", author_email="n/a", code_permalink="tasks/rl/data.py",
        description=f"Meta-World {spec.task}: {spec.episodes} episodes of {spec.max_episode_steps} steps, {spec}",
    )
    env.close()


def noisy(action: np.ndarray, rng: np.random.Generator, spec: ExpertSpec, space: gym.spaces.Box) -> np.ndarray:
    """The expert's action, perturbed as the spec says, within the action space."""
    if spec.epsilon and rng.random() < spec.epsilon:
        return rng.uniform(space.low, space.high).astype(np.float32)
    if spec.action_noise:
        action = action + rng.normal(0.0, spec.action_noise, size=action.shape)
    return np.clip(action, space.low, space.high).astype(np.float32)


def _quality(spec: ExpertSpec) -> str:
    return f" + N(0, {spec.action_noise}) noise, epsilon {spec.epsilon}" if spec.action_noise or spec.epsilon else ""


# --- remote data -------------------------------------------------------------------------------------------------


def remote_dataset(spec: RemoteSpec):
    """A Minari hub dataset: the local copy if downloaded before, else a download (a clear error when offline)."""
    import minari

    datasets_root()
    if (datasets_root() / spec.dataset_id / "data").exists():
        return minari.load_dataset(spec.dataset_id)
    if hub_offline():
        raise OfflineHubError(
            f"Minari dataset {spec.dataset_id!r} is not under {datasets_root()} and the hub is off (HF_HUB_OFFLINE=1). "
            f"On a machine with hub access: MINARI_DATASETS_PATH={datasets_root()} minari download {spec.dataset_id}"
        )
    return minari.load_dataset(spec.dataset_id, download=True)


def dataset(spec: ExpertSpec | RemoteSpec):
    return expert_dataset(spec) if isinstance(spec, ExpertSpec) else remote_dataset(spec)


# --- what training reads -----------------------------------------------------------------------------------------


def load_episodes(minari_dataset, env: gym.Env | None = None) -> list[Episode]:
    """Every episode of a Minari dataset as arrays; with ``env``, its spaces must match the dataset's."""
    if env is not None:
        check_spaces(minari_dataset, env)
    out = []
    for ep in minari_dataset.iterate_episodes():
        infos = ep.infos or {}
        success = np.asarray(infos["success"])[1:] if "success" in infos else None
        out.append(Episode(
            observations=np.asarray(ep.observations[:-1], dtype=np.float32),
            actions=np.asarray(ep.actions, dtype=np.float32),
            rewards=np.asarray(ep.rewards, dtype=np.float32),
            successes=success,
        ))
    return out


def check_spaces(minari_dataset, env: gym.Env) -> None:
    """A dataset recorded in other spaces than the env a policy will act in cannot train that policy."""
    for what in ("observation_space", "action_space"):
        theirs, ours = getattr(minari_dataset, what), getattr(env, what)
        if theirs.shape != ours.shape or not (np.allclose(theirs.low, ours.low) and np.allclose(theirs.high, ours.high)):
            why = f"shape {theirs.shape} vs {ours.shape}" if theirs.shape != ours.shape else "same shape, other bounds"
            raise ValueError(f"Minari dataset {minari_dataset.id!r}: its {what} does not match the environment's ({why})")
