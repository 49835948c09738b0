"""Decision-transformer windows on a hand-checked episode: returns-to-go, timesteps, left padding and masks."""

import numpy as np
import pytest

from tasks.rl.data import Episode
from tasks.rl.sequences import SequenceDataset, StateNormalizer, returns_to_go


def episode(rewards, obs_dim=2):
    T = len(rewards)
    return Episode(
        observations=np.arange(T * obs_dim, dtype=np.float32).reshape(T, obs_dim),
        actions=np.arange(T, dtype=np.float32)[:, None] / 10,
        rewards=np.asarray(rewards, dtype=np.float32),
        successes=None,
    )


def test_returns_to_go_by_hand():
    np.testing.assert_allclose(returns_to_go(np.array([1.0, 2.0, 3.0, 4.0])), [10.0, 9.0, 7.0, 4.0])


def test_windows_of_a_hand_checked_episode():
    data = SequenceDataset([episode([1, 2, 3, 4])], context=3, return_scale=2.0,
                           normalizer=StateNormalizer(np.zeros(2), np.ones(2)))
    assert len(data) == 4  # a window ends at every step
    first = data.batch([0])  # ends at step 0: two padded steps on the left
    np.testing.assert_array_equal(first["attention_mask"][0], [0, 0, 1])
    np.testing.assert_array_equal(first["timesteps"][0], [0, 0, 0])
    np.testing.assert_allclose(first["returns_to_go"][0, :, 0], [0, 0, 5.0])  # 10 / return_scale
    np.testing.assert_allclose(first["states"][0], [[0, 0], [0, 0], [0, 1]])
    last = data.batch([3])  # steps 1..3, no padding
    np.testing.assert_array_equal(last["attention_mask"][0], [1, 1, 1])
    np.testing.assert_array_equal(last["timesteps"][0], [1, 2, 3])
    np.testing.assert_allclose(last["returns_to_go"][0, :, 0], [4.5, 3.5, 2.0])
    np.testing.assert_allclose(last["actions"][0, :, 0], [0.1, 0.2, 0.3])
    both = data.batch([1, 3])
    assert both["states"].shape == (2, 3, 2) and both["returns_to_go"].shape == (2, 3, 1)


def test_states_are_normalised_by_the_training_data():
    data = SequenceDataset([episode([0, 0]), episode([0, 0, 0])], context=2, return_scale=1.0)
    states = np.concatenate(data.states)
    np.testing.assert_allclose(states.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(states.std(0), 1, atol=1e-3)


def test_context_longer_than_episodes_is_a_clear_error():
    with pytest.raises(ValueError, match="context 5 is longer than the shortest episode \\(3 steps\\)"):
        SequenceDataset([episode([1, 2, 3]), episode([1] * 8)], context=5, return_scale=1.0)
