"""Acting, replay and learning in jitted chunks, with the sweep members (seeds × settings) as a vmapped axis.

Everything here is written for one member and vmapped once at the top (`Trainer`), so N seeds cost one
compile. A chunk is a `lax.scan` over iterations of: step `num_envs` environments, insert the transitions,
then `updates_per_iteration` CVPO updates. Python only runs between chunks (logging, evaluation,
checkpoints).

All our tasks end only by their time limit, so the environments of every member stay in lock-step: the
episode clock is a plain (unbatched) iteration counter, and resets and the warm-up switch are real
`lax.cond`s rather than selects that would compute both branches under vmap.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from brax.envs.base import Env, State
from brax.envs.wrappers.training import EpisodeWrapper, VmapWrapper
from flax import struct

from cvpo_jax import replay
from cvpo_jax.config import RunConfig, member_cost_limits
from cvpo_jax.estep import cost_threshold_from_episode_limit
from cvpo_jax.learner import Learner, LearnerState, MemberSettings, make_learner
from cvpo_jax.replay import ReplayState, Transition


@struct.dataclass
class TrainState:
    """One member's whole training state (the trainer stacks N of them on a leading axis)."""

    learner: LearnerState
    replay: ReplayState
    env_state: State  # leaves [num_envs, ...]
    key: jax.Array


class Schedule(NamedTuple):
    """Iteration counts derived from the config (one iteration = one step of every env of a member)."""

    iterations_per_chunk: int
    warmup_iterations: int
    total_iterations: int  # rounded up to whole chunks
    episode_length: int

    @property
    def total_chunks(self) -> int:
        return self.total_iterations // self.iterations_per_chunk


def make_schedule(cfg: RunConfig, episode_length: int) -> Schedule:
    per_chunk = max(1, cfg.chunk_env_steps // cfg.num_envs)
    total = max(1, math.ceil(cfg.total_env_steps / cfg.num_envs))
    total = math.ceil(total / per_chunk) * per_chunk
    return Schedule(per_chunk, math.ceil(cfg.warmup_env_steps / cfg.num_envs), total, episode_length)


def member_settings(cfg: RunConfig, episode_length: int) -> MemberSettings:
    """Stacked per-member settings [N]: seeds vary fastest, then the swept cost limits."""
    limits = member_cost_limits(cfg)
    thresholds = [cost_threshold_from_episode_limit(limit, episode_length, cfg.cvpo.gamma) for limit in limits]
    n = len(limits)
    return MemberSettings(cost_threshold=jnp.asarray(thresholds, jnp.float32),
                          kl_bound=jnp.full((n,), cfg.cvpo.kl_bound, jnp.float32),
                          cost_limit=jnp.asarray(limits, jnp.float32))


def member_seeds(cfg: RunConfig) -> list[int]:
    limits = cfg.sweep.cost_limits or [cfg.cost_limit]
    return [cfg.seed + s for _ in limits for s in range(cfg.num_seeds)]


def _select(mask: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Per-environment choice between two pytrees whose leaves lead with the env axis."""
    def pick(a, b):
        m = jnp.reshape(mask, mask.shape + (1,) * (a.ndim - mask.ndim))
        return jnp.where(m, a, b)
    return jax.tree.map(pick, on_true, on_false)


class Trainer(NamedTuple):
    """Vmapped-over-members entry points (all jitted)."""

    init: Callable[[jax.Array], TrainState]  # keys [N, 2] -> TrainState [N]
    run_chunk: Callable  # (state [N], settings [N], first_iteration) -> (state, metrics [N])
    evaluate: Callable  # (params [N], keys [N, 2]) -> metrics [N]
    learner: Learner
    schedule: Schedule
    env: Env


def make_evaluate(env: Env, episode_length: int, num_episodes: int, act: Callable) -> Callable:
    """One member's evaluation: `num_episodes` parallel episodes with the policy mean (deterministic act).

    Returns evaluate(params, key) -> episodic reward, cost and cost rate; the trainers vmap it.
    """
    eval_env = EpisodeWrapper(VmapWrapper(env), episode_length, 1)

    def evaluate(params, key: jax.Array):
        env_state = eval_env.reset(jax.random.split(key, num_episodes))

        def step(env_state, _):
            action = act(params, env_state.obs, key, deterministic=True)
            env_state = eval_env.step(env_state, action)
            return env_state, (env_state.reward, env_state.info["cost"])

        _, (rewards, costs) = jax.lax.scan(step, env_state, None, length=episode_length)  # [T, E]
        episode_reward, episode_cost = jnp.sum(rewards, 0), jnp.sum(costs, 0)  # [E]
        return {
            "eval/episode_reward": jnp.mean(episode_reward),
            "eval/episode_cost": jnp.mean(episode_cost),
            "eval/cost_rate": jnp.mean(episode_cost) / episode_length,
            "eval/episode_reward_std": jnp.std(episode_reward),
        }

    return evaluate


def nonfinite_flag(*trees) -> jax.Array:
    """True if any leaf of the trees holds a NaN or an infinity (the run stops before checkpointing it)."""
    leaves = [x for tree in trees for x in jax.tree.leaves(tree)]
    return jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))


def make_trainer(cfg: RunConfig, env: Env, episode_length: int, learner: Optional[Learner] = None) -> Trainer:
    """The replay trainer of the off-policy methods; `learner` defaults to CVPO's."""
    schedule = make_schedule(cfg, episode_length)
    if learner is None:
        learner = make_learner(cfg, env.observation_size, env.action_size)
    num_envs, action_size = cfg.num_envs, env.action_size
    train_env = EpisodeWrapper(VmapWrapper(env), episode_length, 1)
    capacity = replay.rounded_capacity(cfg.replay_capacity, num_envs)

    def init(key: jax.Array) -> TrainState:
        learner_key, env_key, key = jax.random.split(key, 3)
        env_state = train_env.reset(jax.random.split(env_key, num_envs))
        example = Transition(
            obs=env_state.obs[0], action=jnp.zeros((action_size,)), reward=jnp.zeros(()), cost=jnp.zeros(()),
            next_obs=env_state.obs[0], terminal=jnp.zeros(()), truncated=jnp.zeros(()))
        return TrainState(learner=learner.init(learner_key), replay=replay.init(example, capacity),
                          env_state=env_state, key=key)

    def env_iteration(state: TrainState, iteration: jax.Array, settings: MemberSettings):
        """Act in every env (uniform random during warm-up), store the transitions, reset finished envs."""
        key, act_key, reset_key = jax.random.split(state.key, 3)
        obs = state.env_state.obs  # [E, O]
        action = jax.lax.cond(
            iteration < schedule.warmup_iterations,
            lambda: jax.random.uniform(act_key, (num_envs, action_size), minval=-1.0, maxval=1.0),
            lambda: learner.act(state.learner.params, obs, act_key),
        )  # [E, A]
        stepped = train_env.step(state.env_state, action)
        transition = Transition(
            obs=obs, action=action, reward=stepped.reward, cost=stepped.info["cost"], next_obs=stepped.obs,
            # Reaching the goal stops bootstrapping as in the original code, though the episode goes on.
            terminal=stepped.info["goal_reached"], truncated=stepped.info["truncation"])
        done = stepped.done  # [E]
        episode = stepped.info["episode_metrics"]
        finished = {
            "episodes": jnp.sum(done),
            "episode_reward": jnp.sum(done * episode["sum_reward"]),
            "episode_cost": jnp.sum(done * episode["cost"]),
            "step_cost": jnp.sum(stepped.info["cost"]),
        }
        # Episodes end together (time limit only), so one unbatched test decides whether to reset; the
        # reset draws a fresh layout for the tasks that randomise one.
        episode_over = (iteration + 1) % schedule.episode_length == 0
        env_state = jax.lax.cond(
            episode_over,
            lambda: _select(done, train_env.reset(jax.random.split(reset_key, num_envs)), stepped),
            lambda: stepped,
        )
        learner_state = state.learner
        if learner.observe_episodes is not None:  # e.g. the PID multiplier of the Lagrangian baselines
            mean_cost = finished["episode_cost"] / jnp.maximum(finished["episodes"], 1)
            learner_state = jax.lax.cond(
                episode_over, lambda s: learner.observe_episodes(s, mean_cost, settings), lambda s: s, learner_state)
        return state.replace(learner=learner_state, replay=replay.insert(state.replay, transition),
                             env_state=env_state, key=key), finished

    def learn(state: TrainState, settings: MemberSettings):
        def one_update(carry, _):
            learner_state, key = carry
            key, sample_key, update_key = jax.random.split(key, 3)
            batch = replay.sample(state.replay, sample_key, learner.batch_size)
            learner_state, metrics = learner.update(learner_state, batch, settings, update_key)
            return (learner_state, key), metrics

        key, learn_key = jax.random.split(state.key)
        (learner_state, _), metrics = jax.lax.scan(
            one_update, (state.learner, learn_key), None, length=cfg.updates_per_iteration)
        return state.replace(learner=learner_state, key=key), jax.tree.map(jnp.mean, metrics)

    update_metric_shapes = None

    def run_chunk(state: TrainState, settings: MemberSettings, first_iteration: jax.Array):
        nonlocal update_metric_shapes
        if update_metric_shapes is None:
            update_metric_shapes = jax.eval_shape(lambda s: learn(s, settings)[1], state)
        no_update = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), update_metric_shapes)

        def iteration_body(state, offset):
            iteration = first_iteration + offset
            state, finished = env_iteration(state, iteration, settings)
            learning = (iteration >= schedule.warmup_iterations) & (cfg.updates_per_iteration > 0)
            state, update_metrics = jax.lax.cond(
                learning, lambda s: learn(s, settings), lambda s: (s, no_update), state)
            return state, (finished, update_metrics, learning)

        state, (finished, update_metrics, learning) = jax.lax.scan(
            iteration_body, state, jnp.arange(schedule.iterations_per_chunk))
        num_learning = jnp.sum(learning)
        metrics = {f"train/{k}": jnp.sum(v) for k, v in finished.items()}
        metrics["train/updates"] = num_learning * cfg.updates_per_iteration
        metrics.update({
            k: jnp.sum(jnp.where(learning, v, 0.0)) / jnp.maximum(num_learning, 1)
            for k, v in update_metrics.items()
        })
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


def member_keys(cfg: RunConfig) -> jax.Array:
    return jnp.stack([jax.random.PRNGKey(s) for s in member_seeds(cfg)])


def eval_keys(cfg: RunConfig, iteration: int) -> jax.Array:
    """Evaluation keys that depend only on the seed and the step, so evaluation never perturbs training."""
    return jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s + 7919), iteration) for s in member_seeds(cfg)])


def to_host(metrics: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
