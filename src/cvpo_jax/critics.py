"""Critic losses, one-step Bellman targets and Polyak averaging (CVPO Appendix B.1, eqs. (74)-(77), (84)).

The targets are built outside the losses from *target* critics evaluated at the next state and an action
sampled from the current policy (ORIG); the losses treat them as constants. Shape legend: B transitions
(any batch shape works), O observation size, A action size.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cvpo_jax.core.gradients import gradient_step

# apply_twin_q(params, obs [B, O], actions [B, A]) -> [B, 2]; apply_q(params, obs, actions) -> [B].
ApplyTwinQ = Callable[[object, jax.Array, jax.Array], jax.Array]
ApplyQ = Callable[[object, jax.Array, jax.Array], jax.Array]
PyTree = Any


def reward_target(
    reward: jax.Array, done: jax.Array, next_q_r_twin: jax.Array, gamma: float
) -> jax.Array:
    """y_r = r + γ (1 − done) min(Q'_r1, Q'_r2), eq. (74) with the clipped double-Q of ORIG.

    `done` cuts the bootstrap. ORIG stores goal-reached as done, so its reward target stops at a goal even
    though the episode continues; pass whatever terminal flag the trainer decides (a pure timeout should
    *not* be passed as done).

    Args:
      reward: [B]. done: [B], bool or {0, 1}. next_q_r_twin: [B, 2] target critics at (s', a' ~ π(s')).

    Returns:
      [B] targets (gradient-free).
    """
    next_q = jnp.min(next_q_r_twin, axis=-1)  # [B]
    not_done = 1.0 - done.astype(reward.dtype)  # [B]
    return jax.lax.stop_gradient(reward + gamma * not_done * next_q)


def cost_target(
    cost: jax.Array,
    done: jax.Array,
    next_q_c: jax.Array,
    gamma: float,
    *,
    mask_done: bool = False,
) -> jax.Array:
    """y_c = c + γ Q'_c, eq. (75); by default *not* masked with `done` (as ORIG).

    Why no mask: in the Safety-Gym goal tasks `done` is also raised when a goal is reached, yet the episode
    goes on (a new goal is placed) and hazards keep costing. Masking there would tell the cost critic that
    nothing is paid after a goal, under-estimating Q_c near goals and pulling the policy through hazards
    next to them. The reward critic can afford ORIG's masking (it only forgoes later reward); the cost
    critic, which guards the constraint, should not be optimistic. Pass `mask_done=True` only when `done`
    means a true termination after which no cost can occur: y_c = c + γ (1 − done) Q'_c.

    Args:
      cost: [B]. done: [B], bool or {0, 1}. next_q_c: [B] target cost critic at (s', a' ~ π(s')).

    Returns:
      [B] targets (gradient-free).
    """
    if mask_done:
        next_q_c = (1.0 - done.astype(cost.dtype)) * next_q_c
    return jax.lax.stop_gradient(cost + gamma * next_q_c)


def reward_critic_loss(
    params, apply_twin_q: ApplyTwinQ, obs: jax.Array, actions: jax.Array, target: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Σ_heads mean_b (Q_i(s_b, a_b) − y_b)², both heads regressed on one target (eq. (74), ORIG's sum).

    The heads share no parameters, so the sum gives each head exactly its own MSE gradient.

    Args:
      params: twin critic parameters. obs: [B, O]. actions: [B, A]. target: [B] (held constant).

    Returns:
      (loss [], aux) with aux "q1", "q2" (mean predictions), "target" (mean target), "loss".
    """
    q = apply_twin_q(params, obs, actions)  # [B, 2]
    td = q - jax.lax.stop_gradient(target)[..., None]  # [B, 2]
    per_head = jnp.mean(jnp.square(td).reshape(-1, 2), axis=0)  # [2]
    loss = jnp.sum(per_head)
    aux = {
        "loss": loss,
        "q1": jnp.mean(q[..., 0]),
        "q2": jnp.mean(q[..., 1]),
        "target": jnp.mean(target),
    }
    return loss, aux


def cost_critic_loss(
    params, apply_q: ApplyQ, obs: jax.Array, actions: jax.Array, target: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mean_b (Q_c(s_b, a_b) − y_b)², eq. (75).

    Args:
      params: cost critic parameters. obs: [B, O]. actions: [B, A]. target: [B] (held constant).

    Returns:
      (loss [], aux) with aux "qc" (mean prediction), "target" (mean target), "loss".
    """
    q = apply_q(params, obs, actions)  # [B]
    loss = jnp.mean(jnp.square(q - jax.lax.stop_gradient(target)))
    return loss, {"loss": loss, "qc": jnp.mean(q), "target": jnp.mean(target)}


def polyak_update(target: PyTree, online: PyTree, rho: float) -> PyTree:
    """ρ·target + (1 − ρ)·online, leaf by leaf, eq. (84). ρ = 0.995 (Table 1) moves the target slowly."""
    return jax.tree.map(lambda t, o: rho * t + (1.0 - rho) * o, target, online)


class CriticOptimizers(NamedTuple):
    """One optimiser per critic (ORIG keeps separate Adam optimisers)."""

    reward: optax.GradientTransformation
    cost: optax.GradientTransformation


def critic_step(params, opt_states: tuple, optimizers: CriticOptimizers, nets, batch, reward_target: jax.Array,
                cost_target: jax.Array):
    """One gradient step of the twin reward critic and of the cost critic on their targets.

    The step every replay learner shares (CVPO and the off-policy baselines); the targets are theirs to build.

    Args:
      params: `networks.NetworkParams` (only the critics move). opt_states: (reward, cost) optimiser states.
      nets: `networks.Networks` (its critics' apply). batch: a replay `Transition` [B].
      reward_target, cost_target: [B] Bellman targets (constants).

    Returns:
      (params, opt_states, metrics).
    """
    reward_opt_state, cost_opt_state = opt_states
    reward = gradient_step(reward_critic_loss, params.reward_critic, reward_opt_state, optimizers.reward,
                           nets.reward_critic.apply, batch.obs, batch.action, reward_target, has_aux=True)
    cost = gradient_step(cost_critic_loss, params.cost_critic, cost_opt_state, optimizers.cost,
                         nets.cost_critic.apply, batch.obs, batch.action, cost_target, has_aux=True)
    params = params._replace(reward_critic=reward.params, cost_critic=cost.params)
    metrics = {
        "critic/reward_loss": reward.loss,
        "critic/cost_loss": cost.loss,
        "critic/reward_target": jnp.mean(reward_target),
        "critic/cost_target": jnp.mean(cost_target),
    }
    return params, (reward.opt_state, cost.opt_state), metrics
