"""The replay trainer of the off-policy learners: acting, replay and learning in jitted chunks.

Everything here is written for one sweep member and vmapped once at the top (`Trainer`), so N seeds cost
one compile. A chunk is a `lax.scan` over iterations of: step `num_envs` environments (`acting.py`), insert
the transitions, then `updates_per_iteration` learner updates; at the first iteration after the random
warm-up, before the policy acts, `warmup_updates` updates on the warm-up's data (the original's protocol).
Python only runs between chunks (logging, evaluation, checkpoints). The warm-up switch is a real `lax.cond`:
it reads only the iteration counter, which every member shares.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from brax.envs.base import Env
from flax import struct

from cvpo_jax.config import RunConfig, warmup_updates
from cvpo_jax.core import replay
from cvpo_jax.core.acting import EnvsState, make_acting, make_evaluate, nonfinite_flag
from cvpo_jax.core.contracts import MemberSettings, OffPolicyLearner, Schedule, Trainer
from cvpo_jax.core.replay import ReplayState, Transition


@struct.dataclass
class TrainState:
    """One member's whole training state (the trainer stacks N of them on a leading axis)."""

    learner: object  # the learner's state; `.params` is what evaluation and checkpoints read
    replay: ReplayState
    envs: EnvsState  # the member's environments, leaves [num_envs, ...]
    key: jax.Array


def make_schedule(cfg: RunConfig, episode_length: int) -> Schedule:
    per_chunk = max(1, cfg.chunk_env_steps // cfg.num_envs)
    total = max(1, math.ceil(cfg.total_env_steps / cfg.num_envs))
    total = math.ceil(total / per_chunk) * per_chunk
    return Schedule(per_chunk, math.ceil(cfg.warmup_env_steps / cfg.num_envs), total, episode_length)


def make_replay_trainer(cfg: RunConfig, env: Env, learner: OffPolicyLearner) -> Trainer:
    """The replay trainer driving `learner` on `env` with `cfg.episode_length`-step episodes."""
    episode_length = int(cfg.episode_length)
    schedule = make_schedule(cfg, episode_length)
    num_envs, action_size = cfg.num_envs, env.action_size
    acting = make_acting(env, episode_length, num_envs, cfg.reset_refill_period, cfg.stagger_episode_clocks)
    capacity = replay.rounded_capacity(cfg.replay_capacity, num_envs)

    def init(key: jax.Array) -> TrainState:
        learner_key, env_key, key = jax.random.split(key, 3)
        envs = acting.reset(env_key)
        example = Transition(
            obs=envs.obs[0], action=jnp.zeros((action_size,)), reward=jnp.zeros(()), cost=jnp.zeros(()),
            next_obs=envs.obs[0], terminal=jnp.zeros(()), truncated=jnp.zeros(()),
            terminated=jnp.zeros(()))
        return TrainState(learner=learner.init(learner_key), replay=replay.init(example, capacity),
                          envs=envs, key=key)

    def env_iteration(state: TrainState, iteration: jax.Array, settings: MemberSettings):
        """Act in every env (uniform random during warm-up), store the transitions, restart ended episodes."""
        key, act_key, reset_key = jax.random.split(state.key, 3)
        action = jax.lax.cond(
            iteration < schedule.warmup_iterations,
            lambda: jax.random.uniform(act_key, (num_envs, action_size), minval=-1.0, maxval=1.0),
            lambda: learner.act(state.learner.params, state.envs.obs, act_key),
        )  # [E, A]
        step = acting.step(state.envs, action, iteration, reset_key)
        learner_state = state.learner
        if learner.observe_episodes is not None:  # e.g. the episodic PID multiplier
            # Called at every step at which some of the member's episodes ended, with their mean cost.
            mean_cost = step.finished["episode_cost"] / jnp.maximum(step.finished["episodes"], 1)
            learner_state = jax.lax.cond(step.finished["episodes"] > 0,
                                         lambda s: learner.observe_episodes(s, mean_cost, settings),
                                         lambda s: s, learner_state)
        return state.replace(learner=learner_state, replay=replay.insert(state.replay, step.transition),
                             envs=step.envs, key=key), step.finished

    def learn(state: TrainState, settings: MemberSettings, num_updates: int):
        def one_update(carry, _):
            learner_state, key = carry
            key, sample_key, update_key = jax.random.split(key, 3)
            batch = replay.sample(state.replay, sample_key, learner.batch_size)
            learner_state, metrics = learner.update(learner_state, batch, settings, update_key)
            return (learner_state, key), metrics

        key, learn_key = jax.random.split(state.key)
        (learner_state, _), metrics = jax.lax.scan(one_update, (state.learner, learn_key), None, length=num_updates)
        return state.replace(learner=learner_state, key=key), jax.tree.map(jnp.mean, metrics)

    # The original trains on the warm-up's data before the policy first acts (warm-up / 2 updates by default,
    # cvpo-safe-rl safe_rl/worker/off_policy_worker.py): one burst, at the first iteration after the warm-up.
    burst = warmup_updates(cfg) if schedule.warmup_iterations > 0 else 0

    def warmup_burst(state: TrainState, iteration: jax.Array, settings: MemberSettings):
        if burst == 0:
            return state, jnp.zeros((), jnp.bool_)
        at_end_of_warmup = iteration == schedule.warmup_iterations
        state = jax.lax.cond(at_end_of_warmup, lambda s: learn(s, settings, burst)[0], lambda s: s, state)
        return state, at_end_of_warmup

    update_metric_shapes = None

    def run_chunk(state: TrainState, settings: MemberSettings, first_iteration: jax.Array):
        nonlocal update_metric_shapes
        if update_metric_shapes is None:
            update_metric_shapes = jax.eval_shape(lambda s: learn(s, settings, cfg.updates_per_iteration)[1], state)
        no_update = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), update_metric_shapes)

        def iteration_body(state, offset):
            iteration = first_iteration + offset
            state, bursting = warmup_burst(state, iteration, settings)
            state, finished = env_iteration(state, iteration, settings)
            learning = (iteration >= schedule.warmup_iterations) & (cfg.updates_per_iteration > 0)
            state, update_metrics = jax.lax.cond(
                learning, lambda s: learn(s, settings, cfg.updates_per_iteration), lambda s: (s, no_update), state)
            return state, (finished, update_metrics, learning, bursting)

        state, (finished, update_metrics, learning, bursting) = jax.lax.scan(
            iteration_body, state, jnp.arange(schedule.iterations_per_chunk))
        num_learning = jnp.sum(learning)
        metrics = {f"train/{k}": jnp.sum(v) for k, v in finished.items()}
        metrics["train/updates"] = num_learning * cfg.updates_per_iteration + jnp.sum(bursting) * burst
        metrics.update({
            k: jnp.sum(jnp.where(learning, v, 0.0)) / jnp.maximum(num_learning, 1)
            for k, v in update_metrics.items()
        })
        # Non-finite values anywhere in the learner stop the run before they are checkpointed.
        metrics["nonfinite"] = nonfinite_flag(state.learner.params, update_metrics)
        return state, metrics

    evaluate = make_evaluate(env, episode_length, cfg.eval_episodes, learner.act)

    return Trainer.over_members(init, run_chunk, evaluate, learner, schedule, env)
