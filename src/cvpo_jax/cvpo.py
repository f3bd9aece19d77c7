"""The CVPO learner: critics, E-step, M-step and polyak averaging fused into one pure update.

`make_cvpo(...)` closes over the networks and optimisers and returns the `OffPolicyLearner` the replay
trainer drives, `update(state, batch, settings, key) -> (state, metrics)`, together with its three phases
(`CVPOPhases`), which the train benchmark times one by one.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from cvpo_jax import critics, estep, mstep, networks, policy
from cvpo_jax.config import RunConfig
from cvpo_jax.core.contracts import MemberSettings, OffPolicyLearner
from cvpo_jax.core import replay
from cvpo_jax.core.replay import Transition


@struct.dataclass
class CVPOState:
    params: networks.NetworkParams
    target_params: networks.NetworkParams  # polyak averages; the target policy is the E-step's "old" policy
    policy_opt_state: optax.OptState
    reward_opt_state: optax.OptState
    cost_opt_state: optax.OptState
    mstep_duals: mstep.MStepDuals  # α_μ, α_Σ: persist across updates (eqs. 81-82)
    dual_warm_start: jax.Array  # [2] (η, λ) of the last E-step, the next solve starts there
    num_updates: jax.Array  # int32


class EStepSettings(NamedTuple):
    """The E-step's settings: particles per state and how the dual is solved (`estep.solve_dual`)."""

    num_particles: int  # K
    per_state: bool  # one (η, λ) per state (Remark 4) instead of one for the batch
    max_iter: int  # L-BFGS-B iteration cap (tolerance loop)
    solver: str = "lbfgsb"  # or "newton"
    loop: str = "auto"  # tolerance on the CPU, lockstep on accelerators (estep.SolverSettings)
    fixed_iter: int = 10  # budget of the lockstep loop and of the Newton solver

    @classmethod
    def from_config(cls, c) -> "EStepSettings":
        return cls(num_particles=c.num_particles, per_state=c.per_state_dual, max_iter=c.dual_max_iter,
                   solver=c.dual_solver, loop=c.dual_loop, fixed_iter=c.dual_fixed_iter)


class CVPOPhases(NamedTuple):
    """The three phases of one update, for timing them apart (`python -m cvpo_jax.bench train`)."""

    critic_step: Callable  # (state, batch, key) -> (state, metrics)
    estep_step: Callable  # (state, batch, settings, key) -> (MStepTargets, q_r, q_c, DualSolution)
    mstep_step: Callable  # (state, MStepTargets) -> (state, metrics)


# NaN asks solve_dual for its scale-aware first start (λ = 0, η from the spread of Q_r) instead of the
# original code's fixed η = λ = 0.1, which is far off when Q values are large.
INITIAL_DUAL = (float("nan"), float("nan"))


def make_cvpo(cfg: RunConfig, observation_size: int, action_size: int) -> tuple[OffPolicyLearner, CVPOPhases]:
    c = cfg.cvpo
    estep_settings = EStepSettings.from_config(c)
    mstep_settings = mstep.MStepSettings.from_config(c)
    nets = networks.make_networks(observation_size, action_size, hidden=tuple(cfg.network.hidden),
                                  covariance=cfg.network.covariance)
    # The policy's gradient-norm clip (original: 0.01) is applied inside mstep_update, torch-style.
    policy_optimizer = optax.adam(c.actor_lr)
    critic_optimizers = critics.CriticOptimizers(reward=optax.adam(c.critic_lr), cost=optax.adam(c.critic_lr))

    def apply_policy(params, obs):
        return nets.policy.apply(params, obs)

    def init(key: jax.Array) -> CVPOState:
        params = networks.init_params(nets, key, observation_size, action_size)
        return CVPOState(
            params=params,
            target_params=params,
            policy_opt_state=policy_optimizer.init(params.policy),
            reward_opt_state=critic_optimizers.reward.init(params.reward_critic),
            cost_opt_state=critic_optimizers.cost.init(params.cost_critic),
            mstep_duals=mstep.init_mstep_duals(),
            dual_warm_start=jnp.asarray(INITIAL_DUAL, jnp.float32),
            num_updates=jnp.int32(0),
        )

    def critic_step(state: CVPOState, batch: Transition, key: jax.Array):
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
        # Q_c stops only where the task ended the episode, not at a reached goal (see critics.cost_target).
        cost_target = critics.cost_target(batch.cost, batch.terminated, next_q_c, c.gamma, mask_done=True)  # [B]
        params, (reward_opt_state, cost_opt_state), metrics = critics.critic_step(
            state.params, (state.reward_opt_state, state.cost_opt_state), critic_optimizers, nets, batch,
            reward_target, cost_target)
        return state.replace(params=params, reward_opt_state=reward_opt_state,
                             cost_opt_state=cost_opt_state), metrics

    def estep_step(state: CVPOState, batch: Transition, settings: MemberSettings, key: jax.Array):
        """Particles from the target policy, target Q values, and the dual solve (Algorithm 2, lines 8-14)."""
        old_dist = apply_policy(state.target_params.policy, batch.obs)  # [B]
        particles = policy.sample(old_dist, key, estep_settings.num_particles)  # [B, K, A]
        executed = jnp.clip(particles, -1.0, 1.0)  # what the env would run (see critic_step)
        q_r_twin = nets.reward_critic.apply(state.target_params.reward_critic, batch.obs, executed)  # [B, K, 2]
        q_r = jnp.min(q_r_twin, axis=-1)  # [B, K]
        q_c = nets.cost_critic.apply(state.target_params.cost_critic, batch.obs, executed)  # [B, K]
        solution = estep.solve_dual(
            q_r, q_c, cost_threshold=settings.cost_threshold, kl_bound=settings.kl_bound,
            init=(state.dual_warm_start[0], state.dual_warm_start[1]),
            per_state=estep_settings.per_state, max_iter=estep_settings.max_iter, solver=estep_settings.solver,
            loop=estep_settings.loop, fixed_iter=estep_settings.fixed_iter)
        targets = mstep.MStepTargets(obs=batch.obs, particles=particles, weights=solution.weights, old=old_dist)
        return targets, q_r, q_c, solution

    def mstep_step(state: CVPOState, targets: mstep.MStepTargets):
        """M weighted maximum-likelihood steps inside the decoupled KL trust region (eqs. 79-83)."""
        policy_params, policy_opt_state, duals, metrics = mstep.mstep_update(
            state.params.policy, state.policy_opt_state, state.mstep_duals, policy_optimizer, apply_policy,
            targets, mstep_settings, num_steps=c.mstep_iterations)
        params = state.params._replace(policy=policy_params)
        return state.replace(params=params, policy_opt_state=policy_opt_state, mstep_duals=duals), metrics

    def update(state: CVPOState, batch: Transition, settings: MemberSettings, key: jax.Array):
        critic_key, particle_key = jax.random.split(key)
        state, critic_metrics = critic_step(state, batch, critic_key)
        targets, q_r, q_c, solution = estep_step(state, batch, settings, particle_key)
        state, mstep_metrics = mstep_step(state, targets)
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
        return policy.action_in_box(apply_policy(params.policy, obs), key, deterministic)

    learner = OffPolicyLearner(init=init, update=update, act=act, batch_size=c.batch_size)
    return learner, CVPOPhases(critic_step=critic_step, estep_step=estep_step, mstep_step=mstep_step)


def replay_estep(learner: OffPolicyLearner, phases: CVPOPhases) -> Callable:
    """The E-step on one batch drawn from a member's replay, for tools that read what the E-step makes of a
    saved run's state: (state, replay_state, settings, key) -> estep_step's (targets, q_r, q_c, solution)."""
    def run(state: CVPOState, replay_state: replay.ReplayState, settings: MemberSettings, key: jax.Array):
        sample_key, particle_key = jax.random.split(key)
        batch = replay.sample(replay_state, sample_key, learner.batch_size)
        return phases.estep_step(state, batch, settings, particle_key)
    return run


def make_cvpo_learner(cfg: RunConfig, observation_size: int, action_size: int) -> OffPolicyLearner:
    """The algorithm table's factory: CVPO's learner alone."""
    return make_cvpo(cfg, observation_size, action_size)[0]
