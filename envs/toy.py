"""`speed_limit`: a tiny constrained task in pure JAX, for tests and quick checks of the learners.

A point on a plane moves by 0.1·a per step, a ∈ [-1, 1]². The reward is the forward speed a_x; the cost is
1 whenever a_x > 0.5 ("speeding"). Unconstrained, the best policy drives at a_x = 1 and pays one cost per
step (50 per episode); under the preset limit of 5 per episode the best policy drives just under 0.5 and
earns about half the reward at no cost. A uniformly random policy earns ~0 reward at ~12 cost, so a
learner has to raise the reward and push the cost down at the same time. No physics: it compiles and
steps in milliseconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from brax.envs.base import Env, State

SPEED_LIMIT = 0.5
ARENA_HALF_SIZE = 5.0


class SpeedLimit(Env):
    episode_length = 50
    terminates = False
    cost_limit = 5.0

    def reset(self, rng: jax.Array) -> State:
        position = jax.random.uniform(rng, (2,), minval=-1.0, maxval=1.0)  # [2]
        zero = jnp.zeros(())
        metrics = {"cost": zero, "goal_reached": zero, "reward/speed": zero}
        info = {"cost": zero, "goal_reached": zero}
        return State(pipeline_state=position, obs=self._obs(position), reward=zero, done=zero,
                     metrics=metrics, info=info)

    def step(self, state: State, action: jax.Array) -> State:
        # A NaN action is treated as standing still, as the MJX tasks do, and never reaches the state.
        action = jnp.clip(jnp.nan_to_num(action, nan=0.0), -1.0, 1.0)  # [2]
        position = jnp.clip(state.pipeline_state + 0.1 * action, -ARENA_HALF_SIZE, ARENA_HALF_SIZE)
        reward = action[0]
        cost = (action[0] > SPEED_LIMIT).astype(jnp.float32)
        metrics = {"cost": cost, "goal_reached": jnp.zeros(()), "reward/speed": reward}
        info = {**state.info, "cost": cost, "goal_reached": jnp.zeros(())}
        return state.replace(pipeline_state=position, obs=self._obs(position), reward=reward,
                             metrics=metrics, info=info)

    def _obs(self, position: jax.Array) -> jax.Array:
        return jnp.concatenate([position / ARENA_HALF_SIZE, jnp.ones((1,))])  # [3]

    @property
    def observation_size(self) -> int:
        return 3

    @property
    def action_size(self) -> int:
        return 2

    @property
    def backend(self) -> str:
        return "jax"
