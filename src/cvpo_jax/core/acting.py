"""Acting in the environments, shared by the replay and the rollout trainers: one env step with its
transition, finished-episode metrics and per-environment restarts; the evaluation; the non-finite check.

An episode ends in one of two ways, kept distinct all the way to the learners:
- *termination*: the task itself ends it (`state.done` = 1 from `env.step`: a death, a fall). The next
  observation is terminal: no bootstrap past it (`Transition.terminal`).
- *truncation*: the time limit (`episode_length` steps, counted here per environment) cuts it. The next
  state still has a value (`Transition.truncated`; the learners bootstrap from `next_obs`).
Each environment keeps its own episode clock, so environments (and sweep members) need not run in lock-step.

*Staggered clocks* (`stagger=True`, config `stagger_episode_clocks`): env i's first episode is cut after
T − ⌊i·T/E⌋ steps, so that from then on the E envs sit at evenly spread points of their T-step episodes.
Why: the original steps one environment, so its replay holds every point of the episode in equal measure.
E envs in lock-step fill a replay of fewer than E·T transitions with one window of the episode only: with
Car-Circle's 32 envs, T 300 and replay 8000, the 50 steps of the episode just ahead of the envs are never in
the buffer. A shortened first episode is a real episode (it starts from a reset and is truncated like any
other, so the learners bootstrap past it) but is left out of the finished-episode metrics, which average
full-length episodes only. Its clock counts up from −(its length) to 0, so no extra state is needed.

Restarts are cheap: each environment has its own slot in a *pool* of ready reset states, and an environment
whose episode ended restarts from its slot (a per-env select, no reset computed) while the others go on. The
pool is recomputed as a whole every `refill_period` iterations (one vmapped reset, a real `lax.cond` on the
unbatched iteration counter): 16 for a task that can terminate, the episode length for one that cannot
(`refill_period_for`). An environment whose episodes end twice between two refills (episodes
shorter than the refill period) restarts from the same state again, counted in `reused_resets`. Computing a
reset for every env at every step instead would cost a reset per step: on the CPU a vmapped reset of 10
Point envs is about a third of their step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from brax.envs.base import Env, State
from flax import struct

from cvpo_jax.core.replay import Transition


def select_per_env(mask: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Per-environment choice between two pytrees whose leaves lead with the env axis."""
    def pick(a, b):
        m = jnp.reshape(mask, mask.shape + (1,) * (a.ndim - mask.ndim))
        return jnp.where(m, a, b)
    return jax.tree.map(pick, on_true, on_false)


@struct.dataclass
class EnvsState:
    """The environments of one member with their episode clocks and the pool they restart from."""

    env: State  # leaves [E, ...]: the running environments
    steps: jax.Array  # [E] int32: steps taken in each env's current episode; negative during a shortened
    # first episode (staggered clocks): minus the steps left in it
    episode_reward: jax.Array  # [E]: return of each env's current episode so far
    episode_cost: jax.Array  # [E]
    pool: State  # leaves [E, ...]: a ready reset state for each env
    pool_used: jax.Array  # [E] bool: the env restarted from its pool slot since the last refill

    @property
    def obs(self) -> jax.Array:
        return self.env.obs  # [E, O]


class EnvStep(NamedTuple):
    envs: EnvsState  # after the step; envs whose episode ended already restarted
    transition: Transition  # [E] what happened (next_obs is the true next observation, before any restart)
    # Sums over the envs: episodes, episode_reward, episode_cost, episode_length (of the full-length episodes
    # that ended at this step; a staggered first episode is not one), terminations (of those, ended by the
    # task), step_cost (every env), reused_resets.
    finished: dict[str, jax.Array]
    ended: jax.Array  # [E] bool: the env's episode ended at this step (terminated or truncated)


class Acting(NamedTuple):
    reset: Callable[[jax.Array], EnvsState]  # key -> every env at a fresh start, a full pool
    step: Callable[..., EnvStep]  # (envs [E], action [E, A], iteration [], key) -> EnvStep
    refill_period: int  # iterations between refills of the reset pool (the step's one `lax.cond`)


# Iterations between pool refills for a task that can terminate: about 10% of a Point env step's cost on the
# CPU (experiments/README.md, "Episodes that end early"); shorter episodes reuse their env's slot.
TERMINATING_REFILL_PERIOD = 16


def refill_period_for(env: Env, episode_length: int, requested: int | None = None) -> int:
    """The refill period: `requested`, else 16 for a task that can terminate (`env.terminates`, True when the
    task does not say) and the episode length for one that cannot: each of its envs then restarts at the time
    limit once per refill (at the same iteration in lock-step, spread over the period when staggered)."""
    if requested is not None:
        return int(requested)
    return TERMINATING_REFILL_PERIOD if getattr(env, "terminates", True) else int(episode_length)


def first_episode_clocks(episode_length: int, num_envs: int, stagger: bool) -> jax.Array:
    """[E] int32 starting clocks: 0 in lock-step; staggered, −(T − ⌊i·T/E⌋) for env i > 0 (see the module
    docstring), so env i's first episode ends after T − ⌊i·T/E⌋ steps and env 0's is a full one."""
    if not stagger:
        return jnp.zeros((num_envs,), jnp.int32)
    offsets = (jnp.arange(num_envs) * episode_length) // num_envs  # [E]
    return jnp.where(offsets > 0, offsets - episode_length, 0).astype(jnp.int32)


def make_acting(env: Env, episode_length: int, num_envs: int, refill_period: int | None = None,
                stagger: bool = False) -> Acting:
    """The `num_envs` environments of one member under an `episode_length` time limit (see `EnvStep`);
    `stagger`: spread their episode clocks (module docstring)."""
    refill_period = refill_period_for(env, episode_length, refill_period)
    batched_reset = jax.vmap(env.reset)
    batched_step = jax.vmap(env.step)

    def fresh_states(key: jax.Array) -> State:
        return batched_reset(jax.random.split(key, num_envs))

    def reset(key: jax.Array) -> EnvsState:
        env_key, pool_key = jax.random.split(key)
        zeros = jnp.zeros((num_envs,))
        return EnvsState(env=fresh_states(env_key), steps=first_episode_clocks(episode_length, num_envs, stagger),
                         episode_reward=zeros, episode_cost=zeros, pool=fresh_states(pool_key),
                         pool_used=jnp.zeros((num_envs,), jnp.bool_))

    def step(envs: EnvsState, action: jax.Array, iteration: jax.Array, key: jax.Array) -> EnvStep:
        stepped = batched_step(envs.env, action)
        cost = stepped.info["cost"]
        steps = envs.steps + 1
        terminated = stepped.done > 0  # [E]
        shortened = envs.steps < 0  # [E] a staggered first episode, cut when its clock reaches 0
        truncated = jnp.where(shortened, steps >= 0, steps >= episode_length) & ~terminated
        ended = terminated | truncated
        counted = ended & ~shortened  # the finished episodes the metrics average: full-length ones
        episode_reward = envs.episode_reward + stepped.reward
        episode_cost = envs.episode_cost + cost
        goal_reached = stepped.info.get("goal_reached", jnp.zeros_like(cost))
        transition = Transition(
            obs=envs.env.obs, action=action, reward=stepped.reward, cost=cost, next_obs=stepped.obs,
            # A termination ends the value; so does a reached goal, as in the original code, though that
            # episode goes on.
            terminal=jnp.maximum(goal_reached, terminated.astype(jnp.float32)),
            truncated=truncated.astype(jnp.float32), terminated=terminated.astype(jnp.float32))

        finished = {
            "episodes": jnp.sum(counted, dtype=jnp.int32),
            "episode_reward": jnp.sum(jnp.where(counted, episode_reward, 0.0)),
            "episode_cost": jnp.sum(jnp.where(counted, episode_cost, 0.0)),
            "episode_length": jnp.sum(jnp.where(counted, steps, 0)),
            "terminations": jnp.sum(terminated & counted, dtype=jnp.int32),
            "step_cost": jnp.sum(cost),
            "reused_resets": jnp.sum(ended & envs.pool_used, dtype=jnp.int32),
        }
        envs = EnvsState(env=select_per_env(ended, envs.pool, stepped),
                         steps=jnp.where(ended, 0, steps),
                         episode_reward=jnp.where(ended, 0.0, episode_reward),
                         episode_cost=jnp.where(ended, 0.0, episode_cost),
                         pool=envs.pool, pool_used=envs.pool_used | ended)
        # The iteration counter is the same for every member, so this stays a real branch under the vmap.
        refill = (iteration + 1) % refill_period == 0
        envs = jax.lax.cond(refill, lambda e: e.replace(pool=fresh_states(key), pool_used=jnp.zeros_like(ended)),
                            lambda e: e, envs)
        return EnvStep(envs, transition, finished, ended)

    return Acting(reset=reset, step=step, refill_period=refill_period)


def make_evaluate(env: Env, episode_length: int, num_episodes: int, act: Callable) -> Callable:
    """One member's evaluation: `num_episodes` parallel episodes with the policy mean (deterministic act),
    each up to `episode_length` steps or its termination (nothing after a termination is counted).

    Returns evaluate(params, key) -> episodic reward, cost, cost rate, length and the fraction of episodes
    that terminated; the trainers vmap it.
    """
    batched_reset, batched_step = jax.vmap(env.reset), jax.vmap(env.step)

    def evaluate(params, key: jax.Array):
        env_state = batched_reset(jax.random.split(key, num_episodes))

        def step(carry, _):
            env_state, alive = carry
            action = act(params, env_state.obs, key, deterministic=True)
            env_state = batched_step(env_state, action)
            # A terminated env keeps being stepped (its state is not used), so mask with where, not a product:
            # its physics may go anywhere after the end.
            reward = jnp.where(alive, env_state.reward, 0.0)
            cost = jnp.where(alive, env_state.info["cost"], 0.0)
            counted = alive
            alive = alive & (env_state.done <= 0)
            return (env_state, alive), (reward, cost, counted)

        alive = jnp.ones((num_episodes,), jnp.bool_)
        (_, alive), (rewards, costs, counted) = jax.lax.scan(step, (env_state, alive), None,
                                                             length=episode_length)  # [T, E]
        episode_reward, episode_cost = jnp.sum(rewards, 0), jnp.sum(costs, 0)  # [E]
        lengths = jnp.sum(counted, 0)  # [E]
        return {
            "eval/episode_reward": jnp.mean(episode_reward),
            "eval/episode_cost": jnp.mean(episode_cost),
            "eval/cost_rate": jnp.sum(episode_cost) / jnp.maximum(jnp.sum(lengths), 1),
            "eval/episode_reward_std": jnp.std(episode_reward),
            "eval/episode_length": jnp.mean(lengths),
            "eval/terminated": jnp.mean(1.0 - alive),
        }

    return evaluate


def nonfinite_flag(*trees) -> jax.Array:
    """True if any leaf of the trees holds a NaN or an infinity (the run stops before checkpointing it)."""
    leaves = [x for tree in trees for x in jax.tree.leaves(tree)]
    return jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))
