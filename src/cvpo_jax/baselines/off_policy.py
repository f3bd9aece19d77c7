"""The off-policy Lagrangian baselines of the CVPO paper: SAC-Lag, TD3-Lag and DDPG-Lag (Section 4.2).

They plug into the same replay trainer as CVPO (`core/replay_trainer.py`) and share its
networks (the Gaussian policy, twin reward critics, one cost critic), its critic targets and losses
(`critics.py`, evaluated on clipped actions as CVPO's are), its replay and its acting loop. What differs is
the policy step: gradient ascent on the Lagrangian, as the CVPO authors' baselines write their actor loss
(cvpo-safe-rl safe_rl/policy/sac_lag.py `_update_actor`)

    L(π) = E_s[ Q_r(s, a) − α·log π(a|s) ] − λ·(E_s[Q_c(s, a)] − ε1)        a = π(s) (reparameterised)

with α = 0 for TD3/DDPG. λ comes from `offpolicy.multiplier`: by default the authors' PID controller
(`pid_lagrangian.qc_pid_update`), stepped at every actor update on this batch's mean Q_c against the member's
per-state threshold ε1; or, with 'episodic_pid', Stooke et al.'s PID on the mean episodic cost of each batch of
finished episodes against the episodic limit. `offpolicy.normalize_by_multiplier` divides the loss by 1 + λ
(steady step size as λ grows; the maximiser is unchanged; the original does not).

One difference from the original is kept on purpose: its SAC-Lag subtracts α·log π(a'|s') inside the cost
critic's target too; here the cost critic estimates the discounted cost alone (its target is CVPO's).

Per method:
- sac_lag: stochastic tanh-squashed policy: u ~ N(atanh μ(s), Σ(s)) and a = tanh(u), so the deterministic
  action is still the network's mean μ(s) (as CVPO's), log π(a) has the tanh Jacobian correction, and every
  sample lies inside the box. (A clipped Gaussian failed here: samples outside the box carry no Q gradient,
  so the entropy bonus inflated Σ unopposed; on point_goal the training cost stayed ~40 while λ grew past 20.)
  Entropy temperature α fixed at `offpolicy.sac_initial_alpha` (the original's 0.0085), or tuned towards a target
  entropy with `offpolicy.sac_tune_alpha`; twin-min target with the bonus.
- td3_lag: deterministic policy = the Gaussian's mean; Gaussian exploration noise while acting; target policy
  smoothing noise; twin-min reward target; the policy and the targets move every `policy_delay` updates.
- ddpg_lag: deterministic policy, exploration noise, the first reward head only (no twin minimum, no
  smoothing, no delay). The second head is still trained, so the network is the same as the others'.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from cvpo_jax import critics, networks, policy
from cvpo_jax.baselines.pid_lagrangian import (PIDState, QcPIDGains, gains_from_config, init_pid, pid_update,
                                               qc_pid_update)
from cvpo_jax.config import OFF_POLICY_MULTIPLIERS, RunConfig
from cvpo_jax.core.contracts import MemberSettings, OffPolicyLearner
from cvpo_jax.core.gradients import gradient_step
from cvpo_jax.core.replay import Transition

class Variant(NamedTuple):
    """What tells the three methods apart (see the module docstring)."""

    stochastic: bool  # SAC's squashed Gaussian with the entropy term; else a deterministic actor + noise
    twin_min: bool  # clipped double-Q minimum; else the first reward head
    target_smoothing: bool  # TD3's noise on the target action
    delayed_policy: bool  # TD3: the policy and the targets move every `offpolicy.policy_delay` updates


SAC_LAG = Variant(stochastic=True, twin_min=True, target_smoothing=False, delayed_policy=False)
TD3_LAG = Variant(stochastic=False, twin_min=True, target_smoothing=True, delayed_policy=True)
DDPG_LAG = Variant(stochastic=False, twin_min=False, target_smoothing=False, delayed_policy=False)


def squashed_sample(dist: policy.Gaussian, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SAC's a = tanh(u), u ~ N(atanh μ, Σ) (reparameterised), and log π(a).

    dist: mean [B, A] inside (−1, 1), scale_tril [B, A, A]. Returns actions [B, A] and log π [B].
    """
    pre_squash = dist._replace(mean=jnp.arctanh(jnp.clip(dist.mean, -1.0 + 1e-6, 1.0 - 1e-6)))
    u = policy.sample(pre_squash, key, 1)[:, 0]  # [B, A]
    # log π(a) = log N(u) − Σ log(1 − tanh²u), the Jacobian written stably as 2(log 2 − u − softplus(−2u)).
    log_jacobian = jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), axis=-1)
    return jnp.tanh(u), policy.log_prob(pre_squash, u) - log_jacobian


@struct.dataclass
class OffPolicyState:
    params: networks.NetworkParams
    target_params: networks.NetworkParams
    policy_opt_state: optax.OptState
    reward_opt_state: optax.OptState
    cost_opt_state: optax.OptState
    log_alpha: jax.Array  # SAC's entropy temperature (unused by TD3/DDPG)
    alpha_opt_state: optax.OptState
    pid: PIDState
    num_updates: jax.Array  # int32


def make_sac_lag_learner(cfg: RunConfig, observation_size: int, action_size: int) -> OffPolicyLearner:
    return make_off_policy_learner(SAC_LAG, cfg, observation_size, action_size)


def make_td3_lag_learner(cfg: RunConfig, observation_size: int, action_size: int) -> OffPolicyLearner:
    return make_off_policy_learner(TD3_LAG, cfg, observation_size, action_size)


def make_ddpg_lag_learner(cfg: RunConfig, observation_size: int, action_size: int) -> OffPolicyLearner:
    return make_off_policy_learner(DDPG_LAG, cfg, observation_size, action_size)


def make_off_policy_learner(variant: Variant, cfg: RunConfig, observation_size: int,
                            action_size: int) -> OffPolicyLearner:
    """The Lagrangian actor-critic learner of `variant` (the three differ only where `Variant` says)."""
    c = cfg.offpolicy
    if c.multiplier not in OFF_POLICY_MULTIPLIERS:
        raise ValueError(f"offpolicy.multiplier={c.multiplier!r}; allowed: {', '.join(OFF_POLICY_MULTIPLIERS)}")
    gains = gains_from_config(cfg.lagrange)
    qc_gains = QcPIDGains(kp=c.qc_pid_kp, ki=c.qc_pid_ki, kd=c.qc_pid_kd)
    multiplier_on_qc = c.multiplier == "qc_pid"
    nets = networks.make_networks(observation_size, action_size, hidden=tuple(cfg.network.hidden),
                                  covariance=cfg.network.covariance)
    # CVPO's policy clips its mean logits at ±5, where the gradient of a deterministic actor (or of SAC's
    # pre-squash mean) would vanish for good; ±10 keeps actions up to tanh(5) ≈ 0.9999 and gradients alive.
    nets = nets._replace(policy=networks.GaussianPolicyNet(
        hidden=tuple(cfg.network.hidden), action_size=action_size, covariance=cfg.network.covariance,
        mean_clip=10.0))
    policy_optimizer = optax.adam(c.actor_lr)
    critic_optimizers = critics.CriticOptimizers(reward=optax.adam(c.critic_lr), cost=optax.adam(c.critic_lr))
    alpha_optimizer = optax.adam(c.sac_alpha_lr)
    target_entropy = -float(action_size) if c.sac_target_entropy is None else float(c.sac_target_entropy)
    stochastic, twin_min = variant.stochastic, variant.twin_min
    policy_delay = c.policy_delay if variant.delayed_policy else 1

    def reward_q(q_twin: jax.Array) -> jax.Array:
        """[..., 2] -> [...]: the clipped double-Q minimum (SAC, TD3) or the first head (DDPG)."""
        return jnp.min(q_twin, axis=-1) if twin_min else q_twin[..., 0]

    def init(key: jax.Array) -> OffPolicyState:
        params = networks.init_params(nets, key, observation_size, action_size)
        log_alpha = jnp.log(jnp.float32(c.sac_initial_alpha))
        return OffPolicyState(
            params=params, target_params=params,
            policy_opt_state=policy_optimizer.init(params.policy),
            reward_opt_state=critic_optimizers.reward.init(params.reward_critic),
            cost_opt_state=critic_optimizers.cost.init(params.cost_critic),
            log_alpha=log_alpha, alpha_opt_state=alpha_optimizer.init(log_alpha),
            pid=init_pid(gains, 0.0 if multiplier_on_qc else cfg.lagrange.initial),
            num_updates=jnp.int32(0))

    def next_action(params: networks.NetworkParams, next_obs: jax.Array, key: jax.Array):
        """a' for the Bellman targets, inside the box; with its log-density for SAC's entropy bonus."""
        dist = nets.policy.apply(params.policy, next_obs)  # [B]
        if stochastic:
            return squashed_sample(dist, key)
        action = dist.mean
        if variant.target_smoothing:
            noise = jnp.clip(c.target_noise * jax.random.normal(key, action.shape), -c.target_noise_clip,
                             c.target_noise_clip)
            action = action + noise
        return jnp.clip(action, -1.0, 1.0), jnp.zeros(action.shape[:-1])

    def critic_step(state: OffPolicyState, batch: Transition, key: jax.Array):
        # SAC's next action comes from the current policy (as CVPO's does); TD3/DDPG use the target actor.
        actor_params = state.params if stochastic else state.target_params
        action, log_prob = next_action(actor_params, batch.next_obs, key)
        alpha = jnp.exp(state.log_alpha) if stochastic else 0.0
        next_q_r = nets.reward_critic.apply(state.target_params.reward_critic, batch.next_obs, action)  # [B, 2]
        next_q_r = reward_q(next_q_r) - alpha * log_prob  # soft value for SAC
        # critics.reward_target takes twin heads and takes their minimum: pass the chosen value twice.
        reward_target = critics.reward_target(batch.reward, batch.terminal, jnp.stack([next_q_r] * 2, -1), c.gamma)
        next_q_c = nets.cost_critic.apply(state.target_params.cost_critic, batch.next_obs, action)  # [B]
        cost_target = critics.cost_target(batch.cost, batch.terminated, next_q_c, c.gamma, mask_done=True)

        params, (reward_opt_state, cost_opt_state), metrics = critics.critic_step(
            state.params, (state.reward_opt_state, state.cost_opt_state), critic_optimizers, nets, batch,
            reward_target, cost_target)
        return state.replace(params=params, reward_opt_state=reward_opt_state, cost_opt_state=cost_opt_state), metrics

    def policy_loss(policy_params, state: OffPolicyState, obs: jax.Array, key: jax.Array, threshold: jax.Array):
        """mean(α·log π − Q_r) + λ·mean(Q_c − ε1) at a = π(s), as the original's actor loss.

        With 'qc_pid' the controller steps first on this batch's Q_c (held constant) and the new λ is used, as
        the original computes its multiplier inside the loss; the −λ·ε1 term is a constant for the gradient.
        Returns (loss, (metrics, controller state)).
        """
        dist = nets.policy.apply(policy_params, obs)  # [B]
        if stochastic:
            action, log_prob = squashed_sample(dist, key)  # [B, A], [B]
        else:
            action, log_prob = dist.mean, jnp.zeros(obs.shape[:-1])
        q_r = reward_q(nets.reward_critic.apply(state.params.reward_critic, obs, action))  # [B]
        q_c = nets.cost_critic.apply(state.params.cost_critic, obs, action)  # [B]
        pid = qc_pid_update(state.pid, q_c, threshold, qc_gains) if multiplier_on_qc else state.pid
        lam = jax.lax.stop_gradient(pid.multiplier)
        alpha = jnp.exp(state.log_alpha) if stochastic else 0.0
        loss = jnp.mean(alpha * log_prob - q_r) + lam * jnp.mean(q_c - threshold)
        if c.normalize_by_multiplier:
            loss = loss / (1.0 + lam)
        metrics = {"actor/q_r": jnp.mean(q_r), "actor/q_c": jnp.mean(q_c), "actor/entropy": -jnp.mean(log_prob)}
        return loss, (metrics, pid)

    def policy_step(state: OffPolicyState, obs: jax.Array, key: jax.Array, threshold: jax.Array):
        fit = gradient_step(policy_loss, state.params.policy, state.policy_opt_state, policy_optimizer, state, obs,
                            key, threshold, has_aux=True)
        loss, (aux, pid), policy_opt_state = fit.loss, fit.aux, fit.opt_state
        params = state.params._replace(policy=fit.params)
        log_alpha, alpha_opt_state = state.log_alpha, state.alpha_opt_state
        if stochastic and c.sac_tune_alpha:
            # Descend −log α·(log π + H_target) in log α: its gradient is the entropy's excess over the target,
            # so α falls while the policy is more random than the target and rises when it is less.
            entropy_excess = jax.lax.stop_gradient(aux["actor/entropy"] - target_entropy)
            temperature = gradient_step(lambda la: la * entropy_excess, log_alpha, alpha_opt_state, alpha_optimizer)
            log_alpha, alpha_opt_state = temperature.params, temperature.opt_state
        target_params = critics.polyak_update(state.target_params, params, c.polyak)
        state = state.replace(params=params, policy_opt_state=policy_opt_state, log_alpha=log_alpha,
                              alpha_opt_state=alpha_opt_state, target_params=target_params, pid=pid)
        return state, {"actor/loss": loss, **aux}

    policy_metric_shapes = None

    def update(state: OffPolicyState, batch: Transition, settings: MemberSettings, key: jax.Array):
        nonlocal policy_metric_shapes
        critic_key, policy_key = jax.random.split(key)
        state, critic_metrics = critic_step(state, batch, critic_key)
        if policy_metric_shapes is None:
            policy_metric_shapes = jax.eval_shape(
                lambda s: policy_step(s, batch.obs, policy_key, settings.cost_threshold)[1], state)
        skip = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), policy_metric_shapes)
        state, policy_metrics = jax.lax.cond(
            state.num_updates % policy_delay == 0,
            lambda s: policy_step(s, batch.obs, policy_key, settings.cost_threshold), lambda s: (s, skip), state)
        state = state.replace(num_updates=state.num_updates + 1)
        metrics = {**critic_metrics, **policy_metrics, "lagrange/lambda": state.pid.multiplier,
                   "sac/alpha": jnp.exp(state.log_alpha)}
        return state, metrics

    def observe_episodes(state: OffPolicyState, episode_cost: jax.Array, settings: MemberSettings):
        return state.replace(pid=pid_update(state.pid, episode_cost, settings.cost_limit, gains))

    def act(params: networks.NetworkParams, obs: jax.Array, key: jax.Array, deterministic: bool = False):
        dist = nets.policy.apply(params.policy, obs)
        if deterministic:
            action = dist.mean
        elif stochastic:
            action, _ = squashed_sample(dist, key)
        else:
            action = dist.mean + c.exploration_noise * jax.random.normal(key, dist.mean.shape)
        return jnp.clip(action, -1.0, 1.0)

    return OffPolicyLearner(init=init, update=update, act=act, batch_size=c.batch_size,
                            observe_episodes=None if multiplier_on_qc else observe_episodes)
