"""The rollout trainer of the on-policy methods (ppo_lag, trpo_lag, cpo, trpo) and CSC.

It returns the same `Trainer` as the replay trainer of `cvpo_jax/trainer.py`, with the same conventions:
everything is written for one sweep member and vmapped once; a chunk is one jitted `lax.scan`; the
environments of all members stay in lock-step (our tasks end only by their time limit), so the episode clock
is the plain iteration counter and the reset is a real `lax.cond`. One iteration is one step of every
environment. A chunk is a whole number of rollouts; each rollout is `rollout_length` iterations of acting
with `learner.explore`, then one `learner.update` on the whole rollout. There is no warm-up.

Shape legend: T = rollout length, E = environments per member, O = observation size, A = action size.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from brax.envs.base import Env, State
from brax.envs.wrappers.training import EpisodeWrapper, VmapWrapper
from flax import struct

from cvpo_jax.config import RunConfig
from cvpo_jax.learner import MemberSettings
from cvpo_jax.trainer import Schedule, Trainer, _select, make_evaluate, nonfinite_flag


@struct.dataclass
class Rollout:
    """One rollout of every environment of a member, time-major."""

    obs: jax.Array  # [T, E, O]
    action: jax.Array  # [T, E, A], as sampled (before clipping; the env clips)
    log_prob: jax.Array  # [T, E], log π_old(action | obs) at sampling time
    reward: jax.Array  # [T, E]
    cost: jax.Array  # [T, E]
    next_obs: jax.Array  # [T, E, O], the true next observation, before any reset
    terminal: jax.Array  # [T, E], 1: next_obs is terminal for the value (goal reached, as trainer.py)
    truncated: jax.Array  # [T, E], 1: the episode was cut by the time limit after this step


class OnPolicyLearner(NamedTuple):
    """An on-policy learner as the rollout trainer drives it (the four baselines of on_policy.py, CSC).

    init(key) -> state; state has `.params`, the pytree `act` takes.
    act(params, obs [N, O], key, deterministic: bool) -> actions [N, A] clipped to [-1, 1] (evaluation).
    explore(state, obs [E, O], key, settings) -> (action [E, A] unclipped sample, log_prob [E],
        metrics: dict of scalars, averaged over the chunk's steps).
    update(state, rollout, episode_cost [], settings, key) -> (state, metrics: dict of scalars), where
        episode_cost is the mean cost of the episodes that ended in this rollout (NaN if none ended).
    """

    init: Callable[[jax.Array], Any]
    act: Callable
    explore: Callable
    update: Callable


@struct.dataclass
class RolloutTrainState:
    """One member's training state (the trainer stacks N of them on a leading axis)."""

    learner: Any  # the learner's state; `.params` is what evaluation and checkpoints read
    env_state: State  # leaves [E, ...]
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


def make_learner_for(cfg: RunConfig, observation_size: int, action_size: int, episode_length: int):
    """The learner `cfg.algo` names; CSC lives in its own module, imported only when asked for."""
    if cfg.algo == "csc":
        from cvpo_jax.baselines.csc import make_csc_learner

        return make_csc_learner(cfg, observation_size, action_size)
    from cvpo_jax.baselines.on_policy import make_on_policy_learner

    return make_on_policy_learner(cfg, observation_size, action_size, episode_length)


def make_rollout_trainer(cfg: RunConfig, env: Env, episode_length: int,
                         learner: Optional[OnPolicyLearner] = None) -> Trainer:
    """The on-policy trainer; `learner` defaults to the one `cfg.algo` names."""
    schedule = make_rollout_schedule(cfg, episode_length)
    length = rollout_length(cfg, episode_length)
    rollouts_per_chunk = schedule.iterations_per_chunk // length
    if learner is None:
        learner = make_learner_for(cfg, env.observation_size, env.action_size, episode_length)
    num_envs = cfg.num_envs
    train_env = EpisodeWrapper(VmapWrapper(env), episode_length, 1)

    def init(key: jax.Array) -> RolloutTrainState:
        learner_key, env_key, key = jax.random.split(key, 3)
        env_state = train_env.reset(jax.random.split(env_key, num_envs))
        return RolloutTrainState(learner=learner.init(learner_key), env_state=env_state, key=key)

    def env_iteration(carry, iteration: jax.Array, settings: MemberSettings):
        """Act in every env with the exploring policy, record the transition, reset finished envs."""
        learner_state, env_state, key = carry
        key, act_key, reset_key = jax.random.split(key, 3)
        obs = env_state.obs  # [E, O]
        action, log_prob, explore_metrics = learner.explore(learner_state, obs, act_key, settings)
        stepped = train_env.step(env_state, action)
        step = Rollout(
            obs=obs, action=action, log_prob=log_prob, reward=stepped.reward, cost=stepped.info["cost"],
            next_obs=stepped.obs,
            # Reaching the goal stops bootstrapping as in trainer.py, though the episode goes on.
            terminal=stepped.info["goal_reached"].astype(jnp.float32),
            truncated=stepped.info["truncation"].astype(jnp.float32))
        done = stepped.done  # [E]
        episode = stepped.info["episode_metrics"]
        finished = {
            "episodes": jnp.sum(done),
            "episode_reward": jnp.sum(done * episode["sum_reward"]),
            "episode_cost": jnp.sum(done * episode["cost"]),
            "step_cost": jnp.sum(stepped.info["cost"]),
        }
        # Episodes end together (time limit only), so one unbatched test decides whether to reset.
        episode_over = (iteration + 1) % schedule.episode_length == 0
        env_state = jax.lax.cond(
            episode_over,
            lambda: _select(done, train_env.reset(jax.random.split(reset_key, num_envs)), stepped),
            lambda: stepped,
        )
        return (learner_state, env_state, key), (step, finished, explore_metrics)

    def one_rollout(state: RolloutTrainState, first_iteration: jax.Array, settings: MemberSettings):
        """`length` env iterations, then one update on the rollout they produced."""
        carry = (state.learner, state.env_state, state.key)
        carry, (rollout, finished, explore_metrics) = jax.lax.scan(
            lambda c, offset: env_iteration(c, first_iteration + offset, settings), carry, jnp.arange(length))
        learner_state, env_state, key = carry
        finished = {k: jnp.sum(v) for k, v in finished.items()}
        # The mean episodic cost of the episodes that ended here; NaN tells the learner there was none.
        episode_cost = jnp.where(finished["episodes"] > 0,
                                 finished["episode_cost"] / jnp.maximum(finished["episodes"], 1), jnp.nan)
        key, update_key = jax.random.split(key)
        learner_state, update_metrics = learner.update(learner_state, rollout, episode_cost, settings, update_key)
        metrics = {**{k: jnp.mean(v) for k, v in explore_metrics.items()}, **update_metrics}
        return RolloutTrainState(learner=learner_state, env_state=env_state, key=key), (finished, metrics)

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

    return Trainer(
        init=jax.jit(jax.vmap(init)),
        run_chunk=jax.jit(jax.vmap(run_chunk, in_axes=(0, 0, None)), donate_argnums=0),
        evaluate=jax.jit(jax.vmap(evaluate)),
        learner=learner,
        schedule=schedule,
        env=env,
    )
