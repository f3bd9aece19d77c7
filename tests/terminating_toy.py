"""A pure-JAX task whose episodes end when the test says so: the test's action picks which env terminates.

obs = [steps taken in the episode, a number drawn at reset] (the second tells reset states apart);
reward 1 per step; cost = 1 when action[0] > 0.5; the step terminates (done = 1) when action[1] > 0.5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from brax.envs.base import Env, State


class TerminatesOnRequest(Env):
    episode_length = 5
    terminates = True
    cost_limit = 1.0

    def reset(self, rng: jax.Array) -> State:
        zero = jnp.zeros(())
        obs = jnp.stack([zero, jax.random.uniform(rng)])
        info = {"cost": zero, "goal_reached": zero}
        return State(pipeline_state=obs, obs=obs, reward=zero, done=zero, metrics={"cost": zero}, info=info)

    def step(self, state: State, action: jax.Array) -> State:
        obs = state.obs.at[0].add(1.0)
        cost = (action[0] > 0.5).astype(jnp.float32)
        done = (action[1] > 0.5).astype(jnp.float32)
        info = {**state.info, "cost": cost}
        return state.replace(pipeline_state=obs, obs=obs, reward=jnp.ones(()), done=done, metrics={"cost": cost},
                             info=info)

    @property
    def observation_size(self) -> int:
        return 2

    @property
    def action_size(self) -> int:
        return 2

    @property
    def backend(self) -> str:
        return "jax"
