"""The rollout trainer of the on-policy methods (ppo_lag, trpo_lag, cpo, trpo) and CSC.

It returns the same `Trainer` as the replay trainer (`replay_trainer.py`), with the same conventions and the
same acting step (`acting.py`): everything is written for one sweep member and vmapped once; a chunk is one
jitted `lax.scan`. One iteration is one step of every environment. A chunk is a whole number of rollouts; each rollout is `rollout_length` iterations of acting
with `learner.explore`, then one `learner.update` on the whole rollout. There is no warm-up.

Shape legend: T = rollout length, E = environments per member, O = observation size, A = action size.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from brax.envs.base import Env
from flax import struct

from cvpo_jax.config import RunConfig
from cvpo_jax.core.acting import EnvsState, make_acting, make_evaluate, nonfinite_flag
from cvpo_jax.core.contracts import MemberSettings, OnPolicyLearner, Rollout, Schedule, Trainer


@struct.dataclass
class RolloutTrainState:
    """One member's training state (the trainer stacks N of them on a leading axis)."""

    learner: Any  # the learner's state; `.params` is what evaluation and checkpoints read
    envs: EnvsState  # the member's environments, leaves [E, ...]
    key: jax.Array


def rollout_length(cfg: RunConfig, episode_length: int) -> int:
    return int(cfg.onpolicy.rollout_length or episode_length)


def make_rollout_schedule(cfg: RunConfig, episode_length: int) -> Schedule:
    """Iterations per chunk rounded to whole rollouts (at least one); total rounded up to whole chunks."""
    length = rollout_length(cfg, episode_length)
    rollouts_per_chunk = max(1, (cfg.chunk_env_steps // cfg.num_envs) // length)
    per_chunk = rollouts_per_chunk * length
    total = max(1, math.ceil(cfg.total_env_steps / cfg.num_envs))
    total = math.ceil(total / per_chunk) * per_chunk
    return Schedule(per_chunk, 0, total, episode_length)


def make_rollout_trainer(cfg: RunConfig, env: Env, learner: OnPolicyLearner) -> Trainer:
    """The on-policy trainer driving `learner` on `env` with `cfg.episode_length`-step episodes."""
    episode_length = int(cfg.episode_length)
    schedule = make_rollout_schedule(cfg, episode_length)
    length = rollout_length(cfg, episode_length)
    rollouts_per_chunk = schedule.iterations_per_chunk // length
    acting = make_acting(env, episode_length, cfg.num_envs, cfg.reset_refill_period,
                         cfg.stagger_episode_clocks)

    def init(key: jax.Array) -> RolloutTrainState:
        learner_key, env_key, key = jax.random.split(key, 3)
        return RolloutTrainState(learner=learner.init(learner_key), envs=acting.reset(env_key), key=key)

    def env_iteration(carry, iteration: jax.Array, settings: MemberSettings):
        """Act in every env with the exploring policy, record the transition, restart ended episodes."""
        learner_state, envs, key = carry
        key, act_key, reset_key = jax.random.split(key, 3)
        action, log_prob, explore_metrics = learner.explore(learner_state, envs.obs, act_key, settings)
        step = acting.step(envs, action, iteration, reset_key)
        t = step.transition
        record = Rollout(obs=t.obs, action=t.action, log_prob=log_prob, reward=t.reward, cost=t.cost,
                         next_obs=t.next_obs, terminal=t.terminal, truncated=t.truncated,
                         terminated=t.terminated)
        return (learner_state, step.envs, key), (record, step.finished, explore_metrics)

    def one_rollout(state: RolloutTrainState, first_iteration: jax.Array, settings: MemberSettings):
        """`length` env iterations, then one update on the rollout they produced."""
        carry = (state.learner, state.envs, state.key)
        carry, (rollout, finished, explore_metrics) = jax.lax.scan(
            lambda c, offset: env_iteration(c, first_iteration + offset, settings), carry, jnp.arange(length))
        learner_state, envs, key = carry
        finished = {k: jnp.sum(v) for k, v in finished.items()}
        # The mean episodic cost of the episodes that ended here; NaN tells the learner there was none.
        episode_cost = jnp.where(finished["episodes"] > 0,
                                 finished["episode_cost"] / jnp.maximum(finished["episodes"], 1), jnp.nan)
        key, update_key = jax.random.split(key)
        learner_state, update_metrics = learner.update(learner_state, rollout, episode_cost, settings, update_key)
        metrics = {**{k: jnp.mean(v) for k, v in explore_metrics.items()}, **update_metrics}
        return RolloutTrainState(learner=learner_state, envs=envs, key=key), (finished, metrics)

    def run_chunk(state: RolloutTrainState, settings: MemberSettings, first_iteration: jax.Array):
        def body(state, r):
            return one_rollout(state, first_iteration + r * length, settings)

        state, (finished, update_metrics) = jax.lax.scan(body, state, jnp.arange(rollouts_per_chunk))
        metrics = {f"train/{k}": jnp.sum(v) for k, v in finished.items()}
        metrics["train/updates"] = jnp.int32(rollouts_per_chunk)
        metrics.update({k: jnp.mean(v) for k, v in update_metrics.items()})
        # Non-finite values anywhere in the learner stop the run before they are checkpointed.
        metrics["nonfinite"] = nonfinite_flag(state.learner.params, update_metrics)
        return state, metrics

    evaluate = make_evaluate(env, episode_length, cfg.eval_episodes, learner.act)

    return Trainer.over_members(init, run_chunk, evaluate, learner, schedule, env)
