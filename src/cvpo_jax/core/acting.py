"""Acting in the environments, shared by the replay and the rollout trainers: one env step with its
transition, finished-episode metrics and reset; the evaluation; the non-finite check.

All our tasks end only by their time limit, so the environments of every member stay in lock-step: the
episode clock is a plain (unbatched) iteration counter, and the reset is a real `lax.cond` rather than a
select that would compute a reset under vmap at every step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from brax.envs.base import Env, State
from brax.envs.wrappers.training import EpisodeWrapper, VmapWrapper

from cvpo_jax.core.replay import Transition


def select_per_env(mask: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Per-environment choice between two pytrees whose leaves lead with the env axis."""
    def pick(a, b):
        m = jnp.reshape(mask, mask.shape + (1,) * (a.ndim - mask.ndim))
        return jnp.where(m, a, b)
    return jax.tree.map(pick, on_true, on_false)


class EnvStep(NamedTuple):
    env_state: State  # after the step, finished envs already reset
    transition: Transition  # [E] what happened (next_obs is the true next observation, before any reset)
    finished: dict[str, jax.Array]  # sums over the envs: episodes, episode_reward, episode_cost, step_cost
    episode_over: jax.Array  # [] bool: this step ended the episodes of every env


class Acting(NamedTuple):
    reset: Callable[[jax.Array], State]  # key -> env state [E]
    step: Callable[..., EnvStep]  # (env_state [E], action [E, A], iteration [], reset_key) -> EnvStep


def make_acting(env: Env, episode_length: int, num_envs: int) -> Acting:
    """The vectorised, time-limited env of one member and its step (see `EnvStep`)."""
    train_env = EpisodeWrapper(VmapWrapper(env), episode_length, 1)

    def reset(key: jax.Array) -> State:
        return train_env.reset(jax.random.split(key, num_envs))

    def step(env_state: State, action: jax.Array, iteration: jax.Array, reset_key: jax.Array) -> EnvStep:
        stepped = train_env.step(env_state, action)
        transition = Transition(
            obs=env_state.obs, action=action, reward=stepped.reward, cost=stepped.info["cost"],
            next_obs=stepped.obs,
            # Reaching the goal stops bootstrapping as in the original code, though the episode goes on.
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
        # Episodes end together (time limit only), so one unbatched test decides whether to reset; the
        # reset draws a fresh layout for the tasks that randomise one.
        episode_over = (iteration + 1) % episode_length == 0
        env_state = jax.lax.cond(episode_over,
                                 lambda: select_per_env(done, reset(reset_key), stepped),
                                 lambda: stepped)
        return EnvStep(env_state, transition, finished, episode_over)

    return Acting(reset=reset, step=step)


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
