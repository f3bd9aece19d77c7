"""The CVPO update: critics, E-step, M-step and polyak averaging fused into one pure function.

`make_learner(...)` closes over the networks and optimisers and returns pure functions of
`(LearnerState, batch, settings, key) -> (LearnerState, metrics)`. The three phases are also exposed one by
one so the benchmark can time them apart.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

from cvpo_jax import critics, estep, mstep, networks, policy
from cvpo_jax.config import RunConfig
from cvpo_jax.replay import Transition


class MemberSettings(NamedTuple):
    """Scalar settings that may differ between the members of a vmapped sweep (all traced, no recompile).

    Every algorithm gets the same settings and reads what it needs.
    """

    cost_threshold: jax.Array  # ε1: per-state threshold on Q_c derived from the episodic cost limit
    kl_bound: jax.Array  # ε: E-step KL bound
    cost_limit: jax.Array  # the episodic cost limit itself (Lagrangian baselines, CSC)


@struct.dataclass
class LearnerState:
    params: networks.NetworkParams
    target_params: networks.NetworkParams  # polyak averages; the target policy is the E-step's "old" policy
    policy_opt_state: optax.OptState
    reward_opt_state: optax.OptState
    cost_opt_state: optax.OptState
    mstep_duals: mstep.MStepDuals  # α_μ, α_Σ: persist across updates (eqs. 81-82)
    dual_warm_start: jax.Array  # [2] (η, λ) of the last E-step, the next solve starts there
    num_updates: jax.Array  # int32


class Learner(NamedTuple):
    """An off-policy learner as the replay trainer drives it; CVPO and the off-policy baselines fill it."""

    init: Callable[[jax.Array], LearnerState]
    update: Callable  # (state, batch, settings, key) -> (state, metrics)
    act: Callable  # (params, obs, key, deterministic) -> action [N, A] inside the action box
    batch_size: int  # replay transitions per update
    networks: object
    # (state, mean episodic cost [], settings) -> state; called when a batch of episodes has ended (PID λ).
    observe_episodes: Optional[Callable] = None
    # CVPO's phases, timed apart by the train benchmark.
    critic_step: Optional[Callable] = None  # (state, batch, key) -> (state, metrics)
    estep_step: Optional[Callable] = None  # (state, batch, settings, key) -> (old_dist, particles, q_r, q_c, sol)
    mstep_step: Optional[Callable] = None  # (state, obs, particles, weights, old_dist) -> (state, metrics)


# NaN asks solve_dual for its scale-aware first start (λ = 0, η from the spread of Q_r) instead of the
# original code's fixed η = λ = 0.1, which is far off when Q values are large.
INITIAL_DUAL = (float("nan"), float("nan"))


def make_learner(cfg: RunConfig, observation_size: int, action_size: int) -> Learner:
    c = cfg.cvpo
    nets = networks.make_networks(observation_size, action_size, hidden=tuple(cfg.network.hidden),
                                  covariance=cfg.network.covariance)
    # The policy's gradient-norm clip (original: 0.01) is applied inside mstep_update, torch-style.
    policy_optimizer = optax.adam(c.actor_lr)
    reward_optimizer = optax.adam(c.critic_lr)
    cost_optimizer = optax.adam(c.critic_lr)

    def apply_policy(params, obs):
        return nets.policy.apply(params, obs)

    def init(key: jax.Array) -> LearnerState:
        params = networks.init_params(nets, key, observation_size, action_size)
        return LearnerState(
            params=params,
            target_params=params,
            policy_opt_state=policy_optimizer.init(params.policy),
            reward_opt_state=reward_optimizer.init(params.reward_critic),
            cost_opt_state=cost_optimizer.init(params.cost_critic),
            mstep_duals=mstep.init_mstep_duals(),
            dual_warm_start=jnp.asarray(INITIAL_DUAL, jnp.float32),
            num_updates=jnp.int32(0),
        )

    def critic_step(state: LearnerState, batch: Transition, key: jax.Array):
        """One gradient step of the twin reward critics and the cost critic (eqs. 74-77)."""
        # The next action comes from the current policy, as in the original code; the targets from the
        # target critics.
        next_dist = apply_policy(state.params.policy, batch.next_obs)  # [B]
        # The environment clips actions, so Q(s, a) = Q(s, clip(a)): evaluating the critics on clipped
        # actions keeps them on the data they were trained on instead of extrapolating outside the box.
        next_action = jnp.clip(policy.sample(next_dist, key, 1)[:, 0], -1.0, 1.0)  # [B, A]
        next_q_r = nets.reward_critic.apply(state.target_params.reward_critic, batch.next_obs, next_action)
        next_q_c = nets.cost_critic.apply(state.target_params.cost_critic, batch.next_obs, next_action)
        reward_target = critics.reward_target(batch.reward, batch.terminal, next_q_r, c.gamma)  # [B]
        cost_target = critics.cost_target(batch.cost, batch.terminal, next_q_c, c.gamma)  # [B]

        (reward_loss, reward_aux), reward_grads = jax.value_and_grad(critics.reward_critic_loss, has_aux=True)(
            state.params.reward_critic, nets.reward_critic.apply, batch.obs, batch.action, reward_target)
        (cost_loss, cost_aux), cost_grads = jax.value_and_grad(critics.cost_critic_loss, has_aux=True)(
            state.params.cost_critic, nets.cost_critic.apply, batch.obs, batch.action, cost_target)
        reward_updates, reward_opt_state = reward_optimizer.update(
            reward_grads, state.reward_opt_state, state.params.reward_critic)
        cost_updates, cost_opt_state = cost_optimizer.update(
            cost_grads, state.cost_opt_state, state.params.cost_critic)
        params = state.params._replace(
            reward_critic=optax.apply_updates(state.params.reward_critic, reward_updates),
            cost_critic=optax.apply_updates(state.params.cost_critic, cost_updates),
        )
        metrics = {
            "critic/reward_loss": reward_loss,
            "critic/cost_loss": cost_loss,
            "critic/reward_target": jnp.mean(reward_target),
            "critic/cost_target": jnp.mean(cost_target),
        }
        return state.replace(params=params, reward_opt_state=reward_opt_state,
                             cost_opt_state=cost_opt_state), metrics

    def estep_step(state: LearnerState, batch: Transition, settings: MemberSettings, key: jax.Array):
        """Particles from the target policy, target Q values, and the dual solve (Algorithm 2, lines 8-14)."""
        old_dist = apply_policy(state.target_params.policy, batch.obs)  # [B]
        particles = policy.sample(old_dist, key, c.num_particles)  # [B, K, A]
        executed = jnp.clip(particles, -1.0, 1.0)  # what the env would run (see critic_step)
        q_r_twin = nets.reward_critic.apply(state.target_params.reward_critic, batch.obs, executed)  # [B, K, 2]
        q_r = jnp.min(q_r_twin, axis=-1)  # [B, K]
        q_c = nets.cost_critic.apply(state.target_params.cost_critic, batch.obs, executed)  # [B, K]
        solution = estep.solve_dual(
            q_r, q_c, cost_threshold=settings.cost_threshold, kl_bound=settings.kl_bound,
            init=(state.dual_warm_start[0], state.dual_warm_start[1]),
            per_state=c.per_state_dual, max_iter=c.dual_max_iter)
        return old_dist, particles, q_r, q_c, solution

    def mstep_step(state: LearnerState, obs, particles, weights, old_dist):
        """M weighted maximum-likelihood steps inside the decoupled KL trust region (eqs. 79-83)."""
        policy_params, policy_opt_state, duals, metrics = mstep.mstep_update(
            state.params.policy, state.policy_opt_state, state.mstep_duals, policy_optimizer, apply_policy,
            obs, particles, weights, old_dist,
            num_steps=c.mstep_iterations,
            kl_mean_bound=c.kl_mean_bound, kl_cov_bound=c.kl_cov_bound,
            lr_mean=c.dual_lr_mean, lr_cov=c.dual_lr_cov,
            max_mean=c.dual_max_mean, max_cov=c.dual_max_cov, max_grad_norm=c.actor_grad_clip,
            average_over_particles=c.mstep_mean_over_particles)
        params = state.params._replace(policy=policy_params)
        return state.replace(params=params, policy_opt_state=policy_opt_state, mstep_duals=duals), metrics

    def update(state: LearnerState, batch: Transition, settings: MemberSettings, key: jax.Array):
        critic_key, particle_key = jax.random.split(key)
        state, critic_metrics = critic_step(state, batch, critic_key)
        old_dist, particles, q_r, q_c, solution = estep_step(state, batch, settings, particle_key)
        state, mstep_metrics = mstep_step(state, batch.obs, particles, solution.weights, old_dist)
        # Warm-start the next solve from this one (a per-state solve warm-starts from its batch means).
        warm = jnp.stack([jnp.mean(solution.eta), jnp.mean(solution.lam)])
        target_params = critics.polyak_update(state.target_params, state.params, c.polyak)
        state = state.replace(target_params=target_params, dual_warm_start=warm,
                              num_updates=state.num_updates + 1)
        metrics = {
            **critic_metrics,
            **{f"mstep/{k}": v for k, v in mstep_metrics.items()},
            "estep/eta": jnp.mean(solution.eta),
            "estep/lambda": jnp.mean(solution.lam),
            "estep/kl": solution.kl,
            "estep/expected_cost": solution.expected_cost,
            "estep/cost_threshold": settings.cost_threshold,
            "estep/iterations": solution.iterations.astype(jnp.float32),
            "estep/infeasible": solution.infeasible.astype(jnp.float32),
            "estep/q_r": jnp.mean(q_r),
            "estep/q_c": jnp.mean(q_c),
        }
        return state, metrics

    def act(params: networks.NetworkParams, obs: jax.Array, key: jax.Array, deterministic: bool = False):
        """Actions for a batch of observations [N, O] -> [N, A], clipped to the action box."""
        dist = apply_policy(params.policy, obs)
        action = dist.mean if deterministic else policy.sample(dist, key, 1)[:, 0]
        return jnp.clip(action, -1.0, 1.0)

    return Learner(init=init, update=update, act=act, batch_size=c.batch_size, networks=nets,
                   critic_step=critic_step, estep_step=estep_step, mstep_step=mstep_step)
