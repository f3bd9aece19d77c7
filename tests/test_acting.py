"""The acting step both trainers share (core/acting.py): per-env termination, truncation and restarts from the
reset pool, on pure-JAX tasks (milliseconds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax import envs
from cvpo_jax.core.acting import make_acting, make_evaluate, select_per_env
from terminating_toy import TerminatesOnRequest

KEEP, END = [0.0, 0.0], [0.0, 1.0]  # actions of the toy: go on, terminate


def test_select_per_env_broadcasts_the_mask_over_trailing_axes():
    on, off = {"a": jnp.ones((3, 2)), "b": jnp.ones((3,))}, {"a": jnp.zeros((3, 2)), "b": jnp.zeros((3,))}
    picked = select_per_env(jnp.array([True, False, True]), on, off)
    np.testing.assert_array_equal(picked["a"], [[1, 1], [0, 0], [1, 1]])
    np.testing.assert_array_equal(picked["b"], [1, 0, 1])


@pytest.fixture(scope="module")
def toy_acting():
    acting = make_acting(TerminatesOnRequest(), episode_length=5, num_envs=3, refill_period=100)
    return acting, jax.jit(acting.reset), jax.jit(acting.step)


def test_one_env_terminating_among_many_restarts_alone_and_the_others_go_on(toy_acting):
    acting, reset, step = toy_acting
    envs_state = reset(jax.random.PRNGKey(0))
    pool_obs = np.asarray(envs_state.pool.obs)
    key = jax.random.PRNGKey(1)
    out = step(envs_state, jnp.array([KEEP, KEEP, KEEP]), jnp.int32(0), key)
    out = step(out.envs, jnp.array([KEEP, END, KEEP]), jnp.int32(1), key)
    t = out.transition
    np.testing.assert_array_equal(t.terminal, [0, 1, 0])  # no bootstrap past env 1's last state
    np.testing.assert_array_equal(t.truncated, [0, 0, 0])
    np.testing.assert_array_equal(out.ended, [False, True, False])
    np.testing.assert_array_equal(t.next_obs[:, 0], [2, 2, 2])  # the true next observations, before the restart
    # Env 1 restarted from its pool slot; envs 0 and 2 are untouched.
    np.testing.assert_array_equal(out.envs.obs[1], pool_obs[1])
    np.testing.assert_array_equal(np.asarray(out.envs.obs)[[0, 2], 0], [2, 2])
    np.testing.assert_array_equal(out.envs.steps, [2, 0, 2])
    np.testing.assert_array_equal(out.envs.pool_used, [False, True, False])
    f = jax.device_get(out.finished)
    assert (f["episodes"], f["terminations"], f["episode_length"], f["episode_reward"]) == (1, 1, 2, 2.0)
    assert f["reused_resets"] == 0


def test_truncation_is_not_a_termination_and_each_env_keeps_its_own_clock(toy_acting):
    acting, reset, step = toy_acting
    envs_state, key = reset(jax.random.PRNGKey(0)), jax.random.PRNGKey(1)
    costly = [1.0, 0.0]  # env 0 pays a cost at every step
    for i, actions in enumerate([[costly, KEEP, KEEP], [costly, END, KEEP]] + [[costly, KEEP, KEEP]] * 3):
        out = step(envs_state, jnp.array(actions), jnp.int32(i), key)
        envs_state = out.envs
    # The fifth step reaches the time limit of envs 0 and 2; env 1 restarted at the second and is 3 steps in.
    np.testing.assert_array_equal(out.transition.truncated, [1, 0, 1])
    np.testing.assert_array_equal(out.transition.terminal, [0, 0, 0])
    np.testing.assert_array_equal(out.envs.steps, [0, 3, 0])
    f = jax.device_get(out.finished)
    assert (f["episodes"], f["terminations"], f["episode_length"]) == (2, 0, 10)
    assert (f["episode_reward"], f["episode_cost"], f["step_cost"]) == (10.0, 5.0, 1.0)
    # Each env restarts from its own pool slot.
    pool_obs = np.asarray(reset(jax.random.PRNGKey(0)).pool.obs)
    np.testing.assert_array_equal(np.asarray(out.envs.obs)[[0, 2]], pool_obs[[0, 2]])


def test_an_env_ending_twice_between_refills_reuses_its_slot_and_a_refill_restores_it():
    acting = make_acting(TerminatesOnRequest(), episode_length=50, num_envs=2, refill_period=3)
    reset, step = jax.jit(acting.reset), jax.jit(acting.step)
    envs_state = reset(jax.random.PRNGKey(0))
    first_pool = np.asarray(envs_state.pool.obs)
    out = step(envs_state, jnp.array([END, END]), jnp.int32(0), jax.random.PRNGKey(1))
    assert int(out.finished["reused_resets"]) == 0
    out = step(out.envs, jnp.array([END, KEEP]), jnp.int32(1), jax.random.PRNGKey(2))
    assert int(out.finished["reused_resets"]) == 1  # env 0 ends again before the refill: its slot again
    np.testing.assert_array_equal(out.envs.obs[0], first_pool[0])
    out = step(out.envs, jnp.array([KEEP, KEEP]), jnp.int32(2), jax.random.PRNGKey(3))  # refill after this one
    assert not np.asarray(out.envs.pool_used).any()
    fresh = np.asarray(out.envs.pool.obs)
    assert not np.isin(fresh[:, 1], first_pool[:, 1]).any()
    out = step(out.envs, jnp.array([END, KEEP]), jnp.int32(3), jax.random.PRNGKey(4))
    np.testing.assert_array_equal(out.envs.obs[0], fresh[0])


def test_time_limited_task_matches_stepping_it_by_hand():
    """speed_limit never terminates: every episode ends at the limit, with the sums of the steps before."""
    env = envs.make("speed_limit")
    acting = make_acting(env, episode_length=3, num_envs=2)
    step = jax.jit(acting.step)
    state = jax.jit(acting.reset)(jax.random.PRNGKey(0))
    actions = jnp.array([[1.0, 0.0], [0.2, 0.0]])  # env 0 speeds (reward 1, cost 1), env 1 does not
    for t in range(3):
        out = step(state, actions, jnp.int32(t), jax.random.PRNGKey(9))
        np.testing.assert_array_equal(out.transition.obs, state.obs)  # the observation the action was taken in
        np.testing.assert_array_equal(out.transition.truncated, [float(t == 2)] * 2)
        np.testing.assert_array_equal(out.transition.terminal, [0.0, 0.0])
        state = out.envs
    np.testing.assert_allclose(float(out.finished["episode_reward"]), 3.6, rtol=1e-6)
    assert float(out.finished["episode_cost"]) == 3.0 and float(out.finished["step_cost"]) == 1.0
    np.testing.assert_array_equal(state.steps, [0, 0])


def test_staggered_clocks_spread_the_envs_over_the_episode_and_count_only_full_episodes():
    """T 6, E 3: envs 1 and 2 first run 4 and 2 steps; then every env's episodes are 6 steps, ending at
    evenly spread iterations, and only full-length episodes reach the metrics."""
    from cvpo_jax.core.acting import first_episode_clocks

    np.testing.assert_array_equal(first_episode_clocks(6, 3, stagger=True), [0, -4, -2])
    np.testing.assert_array_equal(first_episode_clocks(6, 3, stagger=False), [0, 0, 0])
    acting = make_acting(TerminatesOnRequest(), episode_length=6, num_envs=3, refill_period=6, stagger=True)
    reset, step = jax.jit(acting.reset), jax.jit(acting.step)
    state, key = reset(jax.random.PRNGKey(0)), jax.random.PRNGKey(1)
    ends, truncations, counted = [], [], []
    for i in range(18):
        out = step(state, jnp.array([KEEP] * 3), jnp.int32(i), key)
        ends.append(np.asarray(out.ended))
        truncations.append(np.asarray(out.transition.truncated))
        counted.append((int(out.finished["episodes"]), int(out.finished["episode_length"]),
                        float(out.finished["episode_reward"])))
        assert int(out.finished["reused_resets"]) == 0  # each env ends once per refill period
        state = out.envs
    end_steps = [np.flatnonzero(np.array(ends)[:, e]).tolist() for e in range(3)]
    assert end_steps == [[5, 11, 17], [3, 9, 15], [1, 7, 13]]  # 0-based iterations: 6 apart, 2 between envs
    np.testing.assert_array_equal(np.array(truncations), np.array(ends, dtype=float))  # truncations, bootstrapped
    # The shortened first episodes (iterations 1 and 3) are not counted; every counted one has 6 steps and the
    # toy's reward of 1 per step.
    assert counted[1] == (0, 0, 0.0) and counted[3] == (0, 0, 0.0)
    assert [c for c in counted if c[0]] == [(1, 6, 6.0)] * 7
    # At any iteration from the first restarts on, the three envs sit 2 steps apart in their episodes.
    assert sorted(np.asarray(state.steps).tolist()) == [0, 2, 4]


def test_evaluation_stops_counting_at_a_termination():
    """Policy: terminate at once in member-env 0, never in env 1; reward 1 per step, episode length 5."""
    def act(params, obs, key, deterministic):
        return jnp.where(obs[:, 1:2] < 0.5, jnp.array([[1.0, 1.0]]), jnp.array([[1.0, 0.0]]))

    evaluate = jax.jit(make_evaluate(TerminatesOnRequest(), episode_length=5, num_episodes=64, act=act))
    m = jax.device_get(evaluate(None, jax.random.PRNGKey(0)))
    obs = jax.vmap(TerminatesOnRequest().reset)(jax.random.split(jax.random.PRNGKey(0), 64)).obs
    ends = np.asarray(obs[:, 1] < 0.5)
    lengths = np.where(ends, 1, 5)
    np.testing.assert_allclose(m["eval/episode_length"], lengths.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["eval/episode_reward"], lengths.mean(), rtol=1e-6)  # nothing after the end
    np.testing.assert_allclose(m["eval/episode_cost"], lengths.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["eval/terminated"], ends.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["eval/cost_rate"], 1.0, rtol=1e-6)


def test_refill_period_follows_whether_the_task_can_terminate():
    from cvpo_jax.core.acting import TERMINATING_REFILL_PERIOD, refill_period_for

    assert refill_period_for(TerminatesOnRequest(), 5) == TERMINATING_REFILL_PERIOD
    assert refill_period_for(envs.make("speed_limit"), 50) == 50  # time limit only: one refill per episode
    assert refill_period_for(envs.make("speed_limit"), 50, requested=7) == 7

    class Unsure(TerminatesOnRequest):  # a task that does not say is assumed to terminate
        pass
    del TerminatesOnRequest.terminates
    try:
        assert refill_period_for(Unsure(), 5) == TERMINATING_REFILL_PERIOD
    finally:
        TerminatesOnRequest.terminates = True
