"""The acting step both trainers share (core/acting.py), on the pure-JAX speed_limit task (milliseconds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cvpo_jax import envs
from cvpo_jax.core.acting import make_acting, select_per_env


def test_select_per_env_broadcasts_the_mask_over_trailing_axes():
    on, off = {"a": jnp.ones((3, 2)), "b": jnp.ones((3,))}, {"a": jnp.zeros((3, 2)), "b": jnp.zeros((3,))}
    picked = select_per_env(jnp.array([True, False, True]), on, off)
    np.testing.assert_array_equal(picked["a"], [[1, 1], [0, 0], [1, 1]])
    np.testing.assert_array_equal(picked["b"], [1, 0, 1])


def test_step_records_transitions_counts_finished_episodes_and_resets_at_the_time_limit():
    env = envs.make("speed_limit")
    acting = make_acting(env, episode_length=3, num_envs=2)
    step = jax.jit(acting.step)
    state = jax.jit(acting.reset)(jax.random.PRNGKey(0))
    actions = jnp.array([[1.0, 0.0], [0.2, 0.0]])  # env 0 speeds (reward 1, cost 1), env 1 does not
    reset_key = jax.random.PRNGKey(9)
    rewards, costs = [], []
    for t in range(3):
        out = step(state, actions, jnp.int32(t), reset_key)
        np.testing.assert_array_equal(out.transition.obs, state.obs)  # the observation the action was taken in
        rewards.append(np.asarray(out.transition.reward))
        costs.append(np.asarray(out.transition.cost))
        last = t == 2
        assert bool(out.episode_over) == last
        np.testing.assert_array_equal(out.transition.truncated, [float(last)] * 2)
        np.testing.assert_array_equal(out.transition.terminal, [0.0, 0.0])
        assert int(out.finished["episodes"]) == (2 if last else 0)
        state = out.env_state
    np.testing.assert_allclose(np.sum(rewards, 0), [3.0, 0.6], rtol=1e-6)
    np.testing.assert_array_equal(np.sum(costs, 0), [3.0, 0.0])
    # Finished-episode sums over both envs; the per-step cost of the last step alone.
    np.testing.assert_allclose(float(out.finished["episode_reward"]), 3.6, rtol=1e-6)
    assert float(out.finished["episode_cost"]) == 3.0 and float(out.finished["step_cost"]) == 1.0
    # The next observation of the last step is the true one; the env state is a fresh reset from reset_key.
    fresh = acting.reset(reset_key)
    np.testing.assert_array_equal(state.obs, fresh.obs)
    assert not np.array_equal(out.transition.next_obs, fresh.obs)
    np.testing.assert_array_equal(state.info["steps"], [0, 0])
