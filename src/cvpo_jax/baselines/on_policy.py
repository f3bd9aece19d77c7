"""The on-policy baselines PPO-Lagrangian, TRPO-Lagrangian, CPO and unconstrained TRPO.

All four share the policy network of CVPO (`GaussianPolicyNet`, same `network.hidden` and
`network.covariance`), a reward value V_r and a cost value V_c (`MLP(hidden, 1)` each), GAE advantages for
rewards and for costs (`advantages.gae`), and the value fit. They differ only in the policy step:

- ppo_lag: clipped-ratio surrogate on the combined advantage (Â_r − λ Â_c) / (1 + λ), minibatch epochs
  stopped early once the mean KL(old ‖ new) passes 1.5·δ; λ from the PID controller (`pid_lagrangian`).
- trpo_lag: one natural-gradient step on the same combined surrogate, scaled to KL = δ by the quadratic
  model, then a backtracking line search accepting KL ≤ δ and a surrogate improvement.
- trpo: trpo_lag with λ = 0 always (the cost value is still fitted and logged).
- cpo (Achiam et al. 2017): the analytic solution of max gᵀx s.t. bᵀx + c ≤ 0, ½ xᵀFx ≤ δ (`cpo_step`),
  the recovery step x = −√(2δ / bᵀF⁻¹b)·F⁻¹b when no point of the trust region is feasible, and a line
  search accepting KL ≤ δ, a cost-surrogate change ≤ max(0, −c), and (in the feasible cases) a reward
  improvement, as safety-starter-agents does.

Advantage scaling: Â_r is standardised (mean 0, std 1) for all four. For the Lagrangian objective Â_c is
standardised too, so that λ weighs two unit-scale terms and (1 + λ) keeps the step size comparable as λ
grows. CPO only *centres* Â_c: its constraint is linear in cost units, so b = ∇ E[ratio·Â_c] must stay in
the units of c.

CPO constraint scaling: E[ratio·A_c] estimates the change of the *per-step* cost, so the episodic
violation is brought to per-step units as c = (J_c − d) / episode_length, with J_c the mean episodic cost of
the episodes that ended in the rollout (the last such value when none ended), as safety-starter-agents
divides by the episode length.

Shape legend: T = rollout length, E = environments, N = T·E samples, O = observation size, A = action size,
P = flat policy parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from cvpo_jax import policy as gaussian
from cvpo_jax.baselines import natural_gradient as ng
from cvpo_jax.baselines.advantages import gae, normalise
from cvpo_jax.baselines.pid_lagrangian import PIDState, gains_from_config, init_pid, pid_update
from cvpo_jax.baselines.rollout_trainer import OnPolicyLearner, Rollout
from cvpo_jax.config import RunConfig
from cvpo_jax.learner import MemberSettings
from cvpo_jax.networks import MLP, GaussianPolicyNet

ALGORITHMS = ("ppo_lag", "trpo_lag", "cpo", "trpo")
_EPS = 1e-8


class OnPolicyParams(NamedTuple):
    """Flax variable dicts of the policy and the two value networks."""

    policy: dict
    reward_value: dict
    cost_value: dict


@struct.dataclass
class OnPolicyState:
    params: OnPolicyParams
    policy_opt_state: Any  # PPO's Adam state; optax.EmptyState() for the natural-gradient methods
    value_opt_state: Any  # one Adam over (reward_value, cost_value): Adam is per parameter, so same as two
    pid: PIDState  # λ of ppo_lag / trpo_lag (unused by cpo and trpo)
    episode_cost: jax.Array  # [] last finite mean episodic cost J_c seen (CPO's c when no episode ended)
    num_updates: jax.Array  # int32


class CPOStep(NamedTuple):
    step: jax.Array  # x [P]
    case: jax.Array  # int32: 0 infeasible (recovery), 1 infeasible but recoverable, 2 feasible and the
    #                  constraint cuts the trust region, 3 constraint inactive, 4 no cost gradient
    lam: jax.Array  # λ* of the trust region
    nu: jax.Array  # ν* of the cost constraint


def cpo_step(v: jax.Array, w: jax.Array, q: jax.Array, r: jax.Array, s: jax.Array, c: jax.Array,
             b_norm_sq: jax.Array, delta: float) -> CPOStep:
    """Solve max_x gᵀx s.t. bᵀx + c ≤ 0, ½ xᵀHx ≤ δ through its dual (Achiam et al. 2017, Appendix 10.2).

    Args:
      v: H⁻¹g [P];  w: H⁻¹b [P].
      q: gᵀH⁻¹g;  r: gᵀH⁻¹b;  s: bᵀH⁻¹b (scalars).
      c: constraint value at x = 0 (positive: violated).
      b_norm_sq: ‖b‖², to detect a vanishing cost gradient.
      delta: trust-region size δ.

    Returns:
      CPOStep. With ν(λ) = max(0, λc + r) / s the primal solution is x = (v − ν w) / λ, and λ maximises
        f_a(λ) = −½ (A/λ + Bλ) + rc/s   on {λ ≥ 0: λc + r > 0}     (constraint active, ν > 0)
        f_b(λ) = −½ (q/λ + 2δλ)         on {λ ≥ 0: λc + r ≤ 0}     (ν = 0)
      with A = q − r²/s and B = 2δ − c²/s; each maximum is the unconstrained one (√(A/B), √(q/2δ))
      projected on its interval. B < 0 means the constraint's boundary misses the trust region: the whole
      region is feasible (c < 0, plain TRPO step) or infeasible (c > 0, recovery step −√(2δ/s)·w, the
      largest decrease of the linearised cost in the trust region).
      (The paper's appendix writes λc − r; with r = gᵀH⁻¹b as here the sign is +, which is also what
      safety-starter-agents computes with its loss gradient −g.)
    """
    s_safe = s + _EPS
    a_coef = q - r ** 2 / s_safe
    b_coef = 2.0 * delta - c ** 2 / s_safe
    no_cost_gradient = (b_norm_sq <= 1e-8) & (c < 0)
    case = jnp.where(no_cost_gradient, 4,
                     jnp.where((c < 0) & (b_coef < 0), 3,
                               jnp.where((c < 0) & (b_coef >= 0), 2,
                                         jnp.where((c >= 0) & (b_coef >= 0), 1, 0)))).astype(jnp.int32)

    # Cases 1, 2: the two candidate λ. The boundary λc + r = 0 sits at λ = −r/c; for c < 0 the ν > 0 side
    # is λ < −r/c, for c > 0 it is λ > −r/c.
    c_safe = jnp.where(jnp.abs(c) < _EPS, jnp.where(c < 0, -_EPS, _EPS), c)
    boundary = -r / c_safe
    low_a = jnp.where(c < 0, 0.0, boundary)
    high_a = jnp.where(c < 0, boundary, jnp.inf)
    low_b = jnp.where(c < 0, boundary, 0.0)
    high_b = jnp.where(c < 0, jnp.inf, boundary)

    def project(x, low, high):
        return jnp.maximum(jnp.maximum(low, 0.0), jnp.minimum(high, x))

    lam_a = project(jnp.sqrt(jnp.maximum(a_coef, 0.0) / jnp.maximum(b_coef, _EPS)), low_a, high_a)
    lam_b = project(jnp.sqrt(q / (2.0 * delta)), low_b, high_b)
    f_a = -0.5 * (a_coef / (lam_a + _EPS) + b_coef * lam_a) + r * c / s_safe
    f_b = -0.5 * (q / (lam_b + _EPS) + 2.0 * delta * lam_b)
    lam_12 = jnp.where(f_a >= f_b, lam_a, lam_b)
    nu_12 = jnp.maximum(0.0, lam_12 * c + r) / s_safe

    trpo_lam = jnp.sqrt(q / (2.0 * delta))
    recovery_nu = jnp.sqrt(2.0 * delta / s_safe)
    lam = jnp.where(case >= 3, trpo_lam, jnp.where(case >= 1, lam_12, 0.0))
    nu = jnp.where(case >= 3, 0.0, jnp.where(case >= 1, nu_12, recovery_nu))
    step = jnp.where(case >= 1, (v - nu * w) / (lam + _EPS), -nu * w)
    return CPOStep(step=step, case=case, lam=lam, nu=nu)


def make_on_policy_learner(cfg: RunConfig, observation_size: int, action_size: int,
                           episode_length: int) -> OnPolicyLearner:
    """The learner of `cfg.algo` (one of ALGORITHMS) for the rollout trainer."""
    algo = cfg.algo
    if algo not in ALGORITHMS:
        raise ValueError(f"algo={algo!r} is not an on-policy baseline of this module ({', '.join(ALGORITHMS)})")
    o = cfg.onpolicy
    hidden = tuple(int(h) for h in cfg.network.hidden)
    policy_net = GaussianPolicyNet(hidden=hidden, action_size=action_size, covariance=cfg.network.covariance)
    value_net = MLP(hidden, 1)
    policy_optimizer = optax.adam(o.actor_lr)
    value_optimizer = optax.adam(o.value_lr)
    gains = gains_from_config(cfg.lagrange)
    uses_lagrange = algo in ("ppo_lag", "trpo_lag")

    def values(params: dict, obs: jax.Array) -> jax.Array:  # [*S, O] -> [*S]
        return value_net.apply(params, obs)[..., 0]

    def init(key: jax.Array) -> OnPolicyState:
        policy_key, reward_key, cost_key = jax.random.split(key, 3)
        obs = jnp.zeros((1, observation_size), jnp.float32)
        params = OnPolicyParams(policy=policy_net.init(policy_key, obs),
                                reward_value=value_net.init(reward_key, obs),
                                cost_value=value_net.init(cost_key, obs))
        policy_opt_state = policy_optimizer.init(params.policy) if algo == "ppo_lag" else optax.EmptyState()
        return OnPolicyState(
            params=params, policy_opt_state=policy_opt_state,
            value_opt_state=value_optimizer.init((params.reward_value, params.cost_value)),
            pid=init_pid(gains, cfg.lagrange.initial), episode_cost=jnp.float32(0.0), num_updates=jnp.int32(0))

    def act(params: OnPolicyParams, obs: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """[N, O] -> actions [N, A] inside the action box (the mean when deterministic)."""
        dist = policy_net.apply(params.policy, obs)
        action = dist.mean if deterministic else gaussian.sample(dist, key, 1)[:, 0]
        return jnp.clip(action, -1.0, 1.0)

    def explore(state: OnPolicyState, obs: jax.Array, key: jax.Array, settings: MemberSettings):
        """[E, O] -> (unclipped sample [E, A], its log-probability [E], no metrics)."""
        dist = policy_net.apply(state.params.policy, obs)
        action = gaussian.sample(dist, key, 1)[:, 0]
        return action, gaussian.log_prob(dist, action), {}

    def minibatch_plan(num_samples: int, num_minibatches: int) -> tuple[int, int]:
        """(minibatch size, minibatches per pass); the remainder of a shuffled pass is left out."""
        size = max(1, num_samples // num_minibatches)
        return size, num_samples // size

    def fit_values(state: OnPolicyState, obs: jax.Array, reward_returns: jax.Array, cost_returns: jax.Array,
                   key: jax.Array):
        """`value_epochs` shuffled passes of minibatch Adam steps on the squared error to the λ-returns.

        obs [N, O], returns [N]. Returns (reward params, cost params, Adam state, final losses).
        """
        n = obs.shape[0]
        size, per_pass = minibatch_plan(n, o.num_minibatches)

        def loss(value_params, idx):
            reward_params, cost_params = value_params
            batch = obs[idx]
            reward_loss = jnp.mean(jnp.square(values(reward_params, batch) - reward_returns[idx]))
            cost_loss = jnp.mean(jnp.square(values(cost_params, batch) - cost_returns[idx]))
            return reward_loss + cost_loss

        def step(carry, s):
            value_params, opt_state = carry
            perm = jax.random.permutation(jax.random.fold_in(key, s // per_pass), n)
            idx = jax.lax.dynamic_slice_in_dim(perm, (s % per_pass) * size, size)
            grads = jax.grad(loss)(value_params, idx)
            updates, opt_state = value_optimizer.update(grads, opt_state, value_params)
            return (optax.apply_updates(value_params, updates), opt_state), None

        (value_params, opt_state), _ = jax.lax.scan(
            step, ((state.params.reward_value, state.params.cost_value), state.value_opt_state),
            jnp.arange(o.value_epochs * per_pass))
        reward_params, cost_params = value_params
        reward_loss = jnp.mean(jnp.square(values(reward_params, obs) - reward_returns))
        cost_loss = jnp.mean(jnp.square(values(cost_params, obs) - cost_returns))
        return reward_params, cost_params, opt_state, reward_loss, cost_loss

    def ppo_step(state: OnPolicyState, obs, action, old_log_prob, advantage, old_dist, key):
        """Clipped-surrogate Adam steps over shuffled minibatches; stop once mean KL(old ‖ new) > 1.5·δ.

        obs [N, O], action [N, A], old_log_prob [N], advantage [N]. Returns (params, Adam state, metrics).
        """
        n = obs.shape[0]
        size, per_pass = minibatch_plan(n, o.num_minibatches)
        total = o.ppo_epochs * per_pass

        def loss(params, idx):
            dist = policy_net.apply(params, obs[idx])
            ratio = jnp.exp(gaussian.log_prob(dist, action[idx]) - old_log_prob[idx])
            adv = advantage[idx]
            clipped = jnp.clip(ratio, 1.0 - o.ppo_clip, 1.0 + o.ppo_clip)
            surrogate = jnp.mean(jnp.minimum(ratio * adv, clipped * adv))
            return -(surrogate + o.entropy_coef * jnp.mean(gaussian.entropy(dist)))

        def mean_kl(params):
            return jnp.mean(gaussian.kl(old_dist, policy_net.apply(params, obs)))

        def cond(carry):
            s, _, _, kl = carry
            return (s < total) & (kl <= 1.5 * o.target_kl)

        def body(carry):
            s, params, opt_state, _ = carry
            perm = jax.random.permutation(jax.random.fold_in(key, s // per_pass), n)
            idx = jax.lax.dynamic_slice_in_dim(perm, (s % per_pass) * size, size)
            grads = jax.grad(loss)(params, idx)
            updates, opt_state = policy_optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return s + 1, params, opt_state, mean_kl(params)

        steps, params, opt_state, kl = jax.lax.while_loop(
            cond, body, (jnp.int32(0), state.params.policy, state.policy_opt_state, jnp.float32(0.0)))
        dist = policy_net.apply(params, obs)
        ratio = jnp.exp(gaussian.log_prob(dist, action) - old_log_prob)
        metrics = {
            "policy/kl": kl,
            "policy/steps_fraction": steps.astype(jnp.float32) / total,  # < 1: stopped early on the KL
            "policy/clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > o.ppo_clip).astype(jnp.float32)),
        }
        return params, opt_state, metrics

    def natural_gradient_step(state: OnPolicyState, obs, action, old_log_prob, advantage, cost_advantage,
                              old_dist, c):
        """TRPO on `advantage` (c unused), or CPO with the cost surrogate E[ratio·cost_advantage] ≤ −c.

        obs [N, O], action [N, A], old_log_prob/advantage/cost_advantage [N], c []. Returns (params, metrics).
        """
        flat, unravel = ravel_pytree(state.params.policy)  # [P]

        def new_dist(flat_params):
            return policy_net.apply(unravel(flat_params), obs)

        def ratio(dist):
            return jnp.exp(gaussian.log_prob(dist, action) - old_log_prob)

        def reward_surrogate(flat_params):
            dist = new_dist(flat_params)
            return jnp.mean(ratio(dist) * advantage) + o.entropy_coef * jnp.mean(gaussian.entropy(dist))

        def cost_surrogate(flat_params):
            return jnp.mean(ratio(new_dist(flat_params)) * cost_advantage)

        def mean_kl(flat_params):
            return jnp.mean(gaussian.kl(old_dist, new_dist(flat_params)))

        reward_old, g = jax.value_and_grad(reward_surrogate)(flat)
        fvp = ng.fisher_vector_product(mean_kl, flat, o.cg_damping)
        v = ng.conjugate_gradient(fvp, g, o.cg_iterations)  # F⁻¹g
        q = jnp.dot(v, fvp(v))  # gᵀF⁻¹g through the (approximate) solution, as the reference codes
        delta = o.target_kl
        metrics = {}
        if algo == "cpo":
            cost_old, b = jax.value_and_grad(cost_surrogate)(flat)
            w = ng.conjugate_gradient(fvp, b, o.cg_iterations)  # F⁻¹b
            r, s = jnp.dot(g, w), jnp.dot(w, fvp(w))
            solution = cpo_step(v, w, q, r, s, c, jnp.dot(b, b), delta)
            full_step, case = solution.step, solution.case

            def accept(candidate):
                kl = mean_kl(candidate)
                improved = (reward_surrogate(candidate) > reward_old) | (case <= 1)
                cost_ok = cost_surrogate(candidate) - cost_old <= jnp.maximum(-c, 0.0)
                return jnp.isfinite(kl) & (kl <= delta) & improved & cost_ok

            metrics.update({"cpo/case": case.astype(jnp.float32), "cpo/lambda": solution.lam,
                            "cpo/nu": solution.nu, "cpo/c": c})
        else:
            # Scale the direction so the quadratic model of the KL equals δ: ½ xᵀFx = δ.
            full_step = jnp.sqrt(2.0 * delta / (q + _EPS)) * v

            def accept(candidate):
                kl = mean_kl(candidate)
                return jnp.isfinite(kl) & (kl <= delta) & (reward_surrogate(candidate) > reward_old)

        new_flat, step_index = ng.backtracking_line_search(flat, full_step, accept, o.line_search_steps,
                                                           o.backtrack_coeff)
        metrics.update({
            "policy/kl": mean_kl(new_flat),
            "policy/line_search_step": step_index.astype(jnp.float32),  # −1: every candidate rejected
            "policy/accepted": (step_index >= 0).astype(jnp.float32),
            "policy/surrogate_improvement": reward_surrogate(new_flat) - reward_old,
            "policy/cost_surrogate_change": cost_surrogate(new_flat) - cost_surrogate(flat),
        })
        return unravel(new_flat), metrics

    def update(state: OnPolicyState, rollout: Rollout, episode_cost: jax.Array, settings: MemberSettings,
               key: jax.Array):
        """One policy step and the value fit on a rollout [T, E]; `episode_cost` NaN when no episode ended."""
        params = state.params
        reward_values = values(params.reward_value, rollout.obs)  # [T, E]
        cost_values = values(params.cost_value, rollout.obs)
        reward_adv, reward_returns = gae(rollout.reward, reward_values, values(params.reward_value, rollout.next_obs),
                                         rollout.terminal, rollout.truncated, o.gamma, o.gae_lambda)
        cost_adv, cost_returns = gae(rollout.cost, cost_values, values(params.cost_value, rollout.next_obs),
                                     rollout.terminal, rollout.truncated, o.gamma, o.gae_lambda)

        # λ and J_c move only when episodes ended in this rollout.
        have_episodes = jnp.isfinite(episode_cost)
        safe_cost = jnp.where(have_episodes, episode_cost, 0.0)
        pid = jax.tree.map(lambda new, old: jnp.where(have_episodes, new, old),
                           pid_update(state.pid, safe_cost, settings.cost_limit, gains), state.pid)
        cost_estimate = jnp.where(have_episodes, episode_cost, state.episode_cost)
        lam = pid.multiplier if uses_lagrange else jnp.float32(0.0)

        def flat(x):
            return x.reshape((-1,) + x.shape[2:])

        obs, action, old_log_prob = flat(rollout.obs), flat(rollout.action), flat(rollout.log_prob)
        reward_adv_n = normalise(flat(reward_adv))
        old_dist = jax.lax.stop_gradient(policy_net.apply(params.policy, obs))
        policy_key, value_key = jax.random.split(key)
        policy_opt_state = state.policy_opt_state
        if algo == "cpo":
            cost_adv_c = flat(cost_adv) - jnp.mean(cost_adv)  # centred only: the constraint is in cost units
            c = (cost_estimate - settings.cost_limit) / episode_length
            policy_params, policy_metrics = natural_gradient_step(
                state, obs, action, old_log_prob, reward_adv_n, cost_adv_c, old_dist, c)
        else:
            cost_adv_n = normalise(flat(cost_adv))
            combined = (reward_adv_n - lam * cost_adv_n) / (1.0 + lam)
            if algo == "ppo_lag":
                policy_params, policy_opt_state, policy_metrics = ppo_step(
                    state, obs, action, old_log_prob, combined, old_dist, policy_key)
            else:
                policy_params, policy_metrics = natural_gradient_step(
                    state, obs, action, old_log_prob, combined, cost_adv_n, old_dist, jnp.float32(0.0))

        reward_params, cost_params, value_opt_state, reward_loss, cost_loss = fit_values(
            state, obs, flat(reward_returns), flat(cost_returns), value_key)
        new_params = OnPolicyParams(policy=policy_params, reward_value=reward_params, cost_value=cost_params)
        new_state = OnPolicyState(params=new_params, policy_opt_state=policy_opt_state,
                                  value_opt_state=value_opt_state, pid=pid, episode_cost=cost_estimate,
                                  num_updates=state.num_updates + 1)
        entropy = jnp.mean(gaussian.entropy(policy_net.apply(policy_params, obs)))
        metrics = {
            **policy_metrics,
            "lagrange/lambda": lam,
            "policy/entropy": entropy,
            "value/reward_loss": reward_loss,
            "value/cost_loss": cost_loss,
            "value/reward_return": jnp.mean(reward_returns),
            "value/cost_return": jnp.mean(cost_returns),
            "rollout/episode_cost": cost_estimate,
        }
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return OnPolicyLearner(init=init, act=act, explore=explore, update=update)
