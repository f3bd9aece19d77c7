"""Generalised advantage estimation (Schulman et al. 2016) over a rollout window, for rewards and for costs.

Shape legend: T = steps of the rollout window, E = environments.

A step is *terminal* when the value of its next state is zero by definition (the task ended there), and
*truncated* when the episode was cut by the time limit: the next state still has a value, but the data after
it belong to a new episode. So a terminal masks the bootstrap, and either one cuts the λ-recursion. The last
step of the window bootstraps from V(next_obs) whatever it is, which is the usual treatment of a rollout that
stops mid-episode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards: jax.Array, values: jax.Array, next_values: jax.Array, terminals: jax.Array,
        truncations: jax.Array, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """GAE(γ, λ) advantages and the λ-returns that the value networks regress onto.

    Args:
      rewards: r_t (or the costs c_t), [T, E].
      values: V(s_t), [T, E].
      next_values: V(s_{t+1}) of the true next state, before any reset (at a truncation that is the final
        observation of the episode), [T, E].
      terminals: 1 where s_{t+1} is terminal (no bootstrap), [T, E].
      truncations: 1 where the episode was cut after step t (bootstrap, but the recursion stops), [T, E].
      gamma: discount γ.
      lam: GAE λ.

    Returns:
      advantages A_t = δ_t + γλ(1 − done_t) A_{t+1} with δ_t = r_t + γ(1 − terminal_t) V(s_{t+1}) − V(s_t),
      and returns A_t + V(s_t); both [T, E].
    """
    terminals = terminals.astype(values.dtype)
    done = jnp.maximum(terminals, truncations.astype(values.dtype))
    deltas = rewards + gamma * (1.0 - terminals) * next_values - values  # [T, E]

    def backward(next_advantage, step):
        delta, step_done = step
        advantage = delta + gamma * lam * (1.0 - step_done) * next_advantage
        return advantage, advantage

    # Scanning in reverse; the advantage after the window is zero (the last δ already bootstraps).
    _, advantages = jax.lax.scan(backward, jnp.zeros_like(values[0]), (deltas, done), reverse=True)
    return advantages, advantages + values


def normalise(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Zero mean, unit standard deviation over all entries (any shape)."""
    return (x - jnp.mean(x)) / (jnp.std(x) + eps)
