"""Meta-World expert data as Minari datasets: created, loaded back identically, cached, rebuilt when broken."""

import gymnasium as gym
import minari
import numpy as np
import pytest

from eva_bench.assets import OfflineHubError
from tasks.rl import envs
from tasks.rl.data import ExpertSpec, RemoteSpec, check_spaces, expert_dataset, load_episodes, remote_dataset

SPEC = ExpertSpec(task="reach-v3", episodes=2, max_episode_steps=30, action_noise=0.1, epsilon=0.1, seed=3)


def replay(spec, i):
    """Episode i of spec, regenerated directly from its seed (what the dataset must contain)."""
    from metaworld.policies import ENV_POLICY_MAP

    from tasks.rl.data import noisy

    env, policy = envs.make(spec.task, spec.max_episode_steps), ENV_POLICY_MAP[spec.task]()
    seed = int(np.random.SeedSequence([spec.seed, i]).generate_state(1)[0])
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards = [], [], []
    for _ in range(spec.max_episode_steps):
        observations.append(obs)
        actions.append(noisy(policy.get_action(obs), rng, spec, env.action_space))
        obs, reward, *_ = env.step(actions[-1])
        rewards.append(reward)
    return np.array(observations), np.array(actions), np.array(rewards)


def test_expert_episodes_are_a_minari_dataset_that_loads_back_identically():
    dataset = expert_dataset(SPEC)
    reopened = minari.load_dataset(SPEC.dataset_id)  # Minari's own loader opens it
    assert reopened.total_episodes == 2 and reopened.total_steps == 60
    episodes = load_episodes(reopened, envs.make(SPEC.task, SPEC.max_episode_steps))
    for i, episode in enumerate(episodes):
        observations, actions, rewards = replay(SPEC, i)
        np.testing.assert_allclose(episode.observations, observations, rtol=1e-6)
        np.testing.assert_array_equal(episode.actions, actions)
        np.testing.assert_allclose(episode.rewards, rewards, rtol=1e-6)
        assert episode.successes.shape == (30,)
    assert not np.array_equal(episodes[0].observations[0], episodes[1].observations[0])  # another goal variation
    env = dataset.recover_environment()  # our own entry point is serializable
    assert env.spec.kwargs["task"] == "reach-v3" and env.observation_space.shape == (39,)


def test_unchanged_spec_is_loaded_and_a_partial_dataset_is_rebuilt(capsys):
    expert_dataset(SPEC)
    folder = minari.storage.get_dataset_path(SPEC.dataset_id)
    stamp = (folder / "eva_bench_spec.json").stat().st_mtime_ns
    expert_dataset(SPEC)
    assert (folder / "eva_bench_spec.json").stat().st_mtime_ns == stamp  # not rebuilt
    (folder / "eva_bench_spec.json").unlink()  # as a build killed before it finished leaves it
    for f in (folder / "data").iterdir():
        if f.is_file():
            f.write_bytes(b"garbage")
    assert expert_dataset(SPEC).total_episodes == 2
    assert "rebuilding" in capsys.readouterr().out


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown Meta-World task 'reech-v3'; valid: .*reach-v3"):
        expert_dataset(ExpertSpec(task="reech-v3", episodes=1))


def test_spaces_that_do_not_match_the_environment_are_an_error():
    dataset = expert_dataset(SPEC)
    other = gym.make("Pendulum-v1")
    with pytest.raises(ValueError, match=r"observation_space does not match.*shape \(39,\) vs \(3,\)"):
        check_spaces(dataset, other)


def test_remote_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineHubError, match="mujoco/halfcheetah/expert-v0.*minari download"):
        remote_dataset(RemoteSpec("mujoco/halfcheetah/expert-v0"))


def test_goal_variations_built_in_concurrent_threads_are_the_seeds_own():
    """MT1 draws from numpy's global RNG: unserialized, concurrent builds (a sweep worker's nested joblib threads)
    interleave and give other, or repeated, goals."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    def goals(seed):  # uncached: every call builds MT1 anew
        return np.stack([pickle.loads(t.data)["rand_vec"] for t in envs.goal_variations.__wrapped__("reach-v3", seed)])

    reference = {seed: goals(seed) for seed in (0, 1)}
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(goals, [0, 1, 0, 1]))
    for seed, vectors in zip([0, 1, 0, 1], built):
        assert np.array_equal(vectors, reference[seed]) and len(np.unique(vectors, axis=0)) == 50
