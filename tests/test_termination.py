"""Both trainers on a task whose episodes end early (tests/terminating_toy.py), with stand-in learners that
need no networks: what reaches the replay buffer and the on-policy rollouts at terminations and truncations,
and the episode metrics of a chunk.

Toy: obs = [steps into the episode, u drawn at reset]; the stand-in policy terminates its episode on the third
step when u < 0.5; the others are truncated by the 5-step limit.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from cvpo_jax.baselines.advantages import gae
from cvpo_jax.config import RunConfig
from cvpo_jax.core.contracts import MemberSettings, OffPolicyLearner, OnPolicyLearner, Rollout
from cvpo_jax.core.replay_trainer import make_replay_trainer
from cvpo_jax.core.rollout_trainer import make_rollout_trainer
from terminating_toy import TerminatesOnRequest

EPISODE, NUM_ENVS = 5, 4


def policy(obs: jax.Array) -> jax.Array:
    """[E, 2] -> [E, 2]: cost on every step (a_0 = 1), and a termination on the third step when u < 0.5."""
    end = (obs[:, 0] == 2) & (obs[:, 1] < 0.5)
    return jnp.stack([jnp.ones_like(obs[:, 0]), end.astype(jnp.float32)], axis=1)


def config(**fields) -> RunConfig:
    cfg = RunConfig(env="toy", episode_length=EPISODE, cost_limit=1.0, num_envs=NUM_ENVS, warmup_env_steps=0,
                    chunk_env_steps=NUM_ENVS * 40, total_env_steps=NUM_ENVS * 40, eval_episodes=2,
                    replay_capacity=NUM_ENVS * 40, reset_refill_period=2,
                    # The flags below are read off the toy's own step counter, which a staggered first episode
                    # (tests/test_acting.py) would cut short.
                    stagger_episode_clocks=False)
    for k, v in fields.items():
        setattr(cfg, k, v)
    return cfg


def settings(n: int) -> MemberSettings:
    return MemberSettings(cost_threshold=jnp.ones(n), kl_bound=jnp.ones(n), cost_limit=jnp.ones(n))


def check_flags(obs, next_obs, terminal, truncated, terminated):
    """Per step of one env's stream, what the flags must be given the stand-in policy."""
    ends = (obs[..., 0] == 2) & (obs[..., 1] < 0.5)
    np.testing.assert_array_equal(terminated, ends)
    np.testing.assert_array_equal(terminal, ends)  # the toy has no goal
    np.testing.assert_array_equal(truncated, obs[..., 0] == EPISODE - 1)
    np.testing.assert_array_equal(next_obs[..., 0], obs[..., 0] + 1)  # the true next obs, before a restart
    np.testing.assert_array_equal(next_obs[..., 1], obs[..., 1])
    assert ends.any() and (obs[..., 0] == EPISODE - 1).any()


def check_restarts(obs):
    """obs [T, E]: after an episode ended, the env's next step starts a fresh episode from a pool entry."""
    for t in range(obs.shape[0] - 1):
        ended = ((obs[t, :, 0] == 2) & (obs[t, :, 1] < 0.5)) | (obs[t, :, 0] == EPISODE - 1)
        np.testing.assert_array_equal(obs[t + 1, ended, 0], 0)
        np.testing.assert_array_equal(obs[t + 1, ~ended, 0], obs[t, ~ended, 0] + 1)
        assert not np.isin(obs[t + 1, ended, 1], obs[t, ended, 1]).any()


def test_replay_trainer_stores_terminations_and_truncations_apart_and_counts_episodes():
    learner = OffPolicyLearner(init=lambda key: _Params(),
                               update=lambda state, batch, s, key: (state, {}),
                               act=lambda params, obs, key, deterministic=False: policy(obs), batch_size=8)
    trainer = make_replay_trainer(config(updates_per_iteration=0), TerminatesOnRequest(), learner)
    state = trainer.init(jax.random.split(jax.random.PRNGKey(0), 2))
    state, metrics = trainer.run_chunk(state, settings(2), jnp.int32(0))
    data = jax.device_get(state.replay.data)
    iterations = 40
    for m in range(2):
        rows = jax.tree.map(lambda x: x[m].reshape((iterations, NUM_ENVS) + x.shape[2:]), data)  # [T, E, ...]
        check_flags(rows.obs, rows.next_obs, rows.terminal, rows.truncated, rows.terminated)
        check_restarts(rows.obs)
        assert int(metrics["train/terminations"][m]) == int(rows.terminated.sum())
        assert int(metrics["train/episodes"][m]) == int(rows.terminated.sum() + rows.truncated.sum())
        ended = (rows.terminated + rows.truncated) > 0
        assert int(metrics["train/episode_length"][m]) == int(np.sum(rows.obs[..., 0][ended] + 1))
        # Every step costs 1, so an episode's cost is its length.
        assert float(metrics["train/episode_cost"][m]) == float(metrics["train/episode_length"][m])
        assert int(metrics["train/reused_resets"][m]) == 0  # episodes of 3 steps or more: at most 4 endings between refills


def test_both_trainers_start_their_envs_on_staggered_clocks_by_default():
    from cvpo_jax.core.acting import first_episode_clocks

    learner = OffPolicyLearner(init=lambda key: _Params(), update=lambda state, batch, s, key: (state, {}),
                               act=lambda params, obs, key, deterministic=False: policy(obs), batch_size=8)
    cfg = config(stagger_episode_clocks=RunConfig().stagger_episode_clocks)
    assert cfg.stagger_episode_clocks
    spread = np.asarray(first_episode_clocks(EPISODE, NUM_ENVS, stagger=True))
    assert len(set(spread.tolist())) == NUM_ENVS
    state = make_replay_trainer(cfg, TerminatesOnRequest(), learner).init(jax.random.split(jax.random.PRNGKey(0), 2))
    np.testing.assert_array_equal(np.asarray(state.envs.steps), [spread, spread])
    on_policy = OnPolicyLearner(init=lambda key: _Params(),
                                act=lambda params, obs, key, deterministic=False: policy(obs),
                                explore=lambda state, obs, key, s: (policy(obs), jnp.zeros(obs.shape[0]), {}),
                                update=lambda state, rollout, episode_cost, s, key: (state, {}))
    state = make_rollout_trainer(cfg, TerminatesOnRequest(), on_policy).init(jax.random.split(jax.random.PRNGKey(0), 1))
    np.testing.assert_array_equal(np.asarray(state.envs.steps), [spread])


class _Params(struct.PyTreeNode):
    params: jax.Array = struct.field(default_factory=lambda: jnp.zeros(()))


class _Recorder(struct.PyTreeNode):
    """Keeps the last rollout and the reward and cost advantages the way on_policy.py computes them."""
    params: jax.Array
    rollout: Rollout
    reward_adv: jax.Array
    cost_adv: jax.Array


def test_rollout_trainer_gives_the_learner_terminations_and_gae_stops_there():
    length = 20
    cfg = config()
    cfg.onpolicy.rollout_length = length
    cfg.chunk_env_steps = cfg.total_env_steps = NUM_ENVS * length
    zeros = lambda *shape: jnp.zeros((length, NUM_ENVS) + shape)  # noqa: E731

    def init(key):
        rollout = Rollout(obs=zeros(2), action=zeros(2), log_prob=zeros(), reward=zeros(), cost=zeros(),
                          next_obs=zeros(2), terminal=zeros(), truncated=zeros(), terminated=zeros())
        return _Recorder(params=jnp.zeros(()), rollout=rollout, reward_adv=zeros(), cost_adv=zeros())

    def update(state, rollout, episode_cost, s, key):
        values = lambda obs: 10.0 + obs[..., 0]  # noqa: E731  a value that is never zero
        reward_adv, _ = gae(rollout.reward, values(rollout.obs), values(rollout.next_obs), rollout.terminal,
                            rollout.truncated, 0.9, 0.8)
        cost_adv, _ = gae(rollout.cost, values(rollout.obs), values(rollout.next_obs), rollout.terminated,
                          rollout.truncated, 0.9, 0.8)
        return state.replace(rollout=rollout, reward_adv=reward_adv, cost_adv=cost_adv), {}

    learner = OnPolicyLearner(init=init, act=lambda params, obs, key, deterministic=False: policy(obs),
                              explore=lambda state, obs, key, s: (policy(obs), jnp.zeros(obs.shape[0]), {}),
                              update=update)
    trainer = make_rollout_trainer(cfg, TerminatesOnRequest(), learner)
    state = trainer.init(jax.random.split(jax.random.PRNGKey(1), 1))
    state, metrics = trainer.run_chunk(state, settings(1), jnp.int32(0))
    recorded = jax.device_get(state.learner)
    r = jax.tree.map(lambda x: x[0], recorded.rollout)
    check_flags(r.obs, r.next_obs, r.terminal, r.truncated, r.terminated)
    check_restarts(r.obs)
    assert int(metrics["train/terminations"][0]) == int(r.terminated.sum())
    # At a termination: δ = r − V(s), no bootstrap and nothing carried back from the next episode.
    at_end = (r.terminated > 0) & (np.arange(length) < length - 1)[:, None]
    value = 10.0 + r.obs[..., 0]
    np.testing.assert_allclose(recorded.reward_adv[0][at_end], (r.reward - value)[at_end], rtol=1e-5)
    np.testing.assert_allclose(recorded.cost_adv[0][at_end], (r.cost - value)[at_end], rtol=1e-5)
    # At a truncation: δ = r + γ V(s') − V(s), bootstrapped, but nothing carried back either.
    at_cut = (r.truncated > 0)
    expected = r.reward + 0.9 * (10.0 + r.next_obs[..., 0]) - value
    np.testing.assert_allclose(recorded.reward_adv[0][at_cut], expected[at_cut], rtol=1e-5)
