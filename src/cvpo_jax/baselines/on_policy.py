"""The on-policy baselines PPO-Lagrangian, TRPO-Lagrangian, CPO and unconstrained TRPO.

All four share the policy network of CVPO (`GaussianPolicyNet`, same `network.hidden`; `network.covariance`
defaults to diag for them, see `algorithms._ON_POLICY`), a reward value V_r and a cost value V_c (`MLP(hidden, 1)` each), GAE advantages for
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

The update is built from module-level pure functions, each tested on its own (tests/test_on_policy.py):
`value_fit.fit_values` (the value fit, shared with CSC), `ppo_step`, `trpo_policy_step` and
`cpo_policy_step`, the last two on `natural_gradient.natural_gradient` / `natural_gradient_step` (CSC's policy
step uses those too). The factories `make_ppo_lag_learner`, `make_trpo_lag_learner`, `make_cpo_learner` and
`make_trpo_learner` (named in `cvpo_jax.algorithms`) only wire them to the networks and the config.

Shape legend: T = rollout length, E = environments, N = T·E samples, O = observation size, A = action size,
P = flat policy parameters.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from cvpo_jax import policy as gaussian
from cvpo_jax.baselines import natural_gradient as ng
from cvpo_jax.baselines.advantages import gae, normalise
from cvpo_jax.baselines.pid_lagrangian import PIDState, gains_from_config, init_pid, pid_update
from cvpo_jax.baselines.value_fit import ValueFitSettings, fit_values, minibatch_indices, minibatch_plan
from cvpo_jax.config import RunConfig
from cvpo_jax.core.contracts import MemberSettings, OnPolicyLearner, Rollout
from cvpo_jax.core.gradients import gradient_step
from cvpo_jax.networks import MLP, GaussianPolicyNet

_EPS = 1e-8
# The variants `_make_learner` builds (the public factories at the end of the module name one each).
_PPO_LAG, _TRPO_LAG, _CPO, _TRPO = "ppo_lag", "trpo_lag", "cpo", "trpo"


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


# ----------------------------------------------------------------------------------------------------------
# The policy steps as pure functions (tested on their own in tests/test_on_policy.py).


class PolicyBatch(NamedTuple):
    """A rollout flattened to N samples, as the policy steps read it (everything held constant)."""

    obs: jax.Array  # [N, O]
    action: jax.Array  # [N, A] as sampled
    old_log_prob: jax.Array  # [N] log π_old(action | obs)
    advantage: jax.Array  # [N] what the surrogate ascends (Â_r, or the combined Lagrangian advantage)
    cost_advantage: jax.Array  # [N] Â_c: CPO's constraint; only logged by TRPO, ignored by PPO
    old_dist: gaussian.Gaussian  # π_old at obs: mean [N, A], scale_tril [N, A, A]


def mean_kl(apply_policy: Callable, params: Any, obs: jax.Array, old_dist: gaussian.Gaussian) -> jax.Array:
    """mean_n KL(π_old(·|s_n) ‖ π_params(·|s_n)), []. apply_policy(params, obs [N, O]) -> Gaussian [N]."""
    return jnp.mean(gaussian.kl(old_dist, apply_policy(params, obs)))


def clipped_surrogate(ratio: jax.Array, advantage: jax.Array, clip: float) -> jax.Array:
    """PPO's mean_n min(ρ_n·A_n, clip(ρ_n, 1 − ε, 1 + ε)·A_n). ratio ρ [N], advantage A [N] -> []."""
    clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    return jnp.mean(jnp.minimum(ratio * advantage, clipped * advantage))


def ppo_loss(params: Any, apply_policy: Callable, batch: PolicyBatch, idx: jax.Array,
             settings: ng.PolicyStepSettings) -> jax.Array:
    """−(clipped surrogate + entropy_coef · mean entropy) on the rows idx [M] of `batch`, [].

    apply_policy(params, obs [M, O]) -> Gaussian [M]; ρ = exp(log π_params(a|s) − log π_old(a|s)).
    """
    dist = apply_policy(params, batch.obs[idx])
    ratio = jnp.exp(gaussian.log_prob(dist, batch.action[idx]) - batch.old_log_prob[idx])
    surrogate = clipped_surrogate(ratio, batch.advantage[idx], settings.ppo_clip)
    return -(surrogate + settings.entropy_coef * jnp.mean(gaussian.entropy(dist)))


class PPOStep(NamedTuple):
    params: Any  # policy params after the epochs
    opt_state: Any  # the policy optimiser's state
    metrics: dict  # "policy/kl", "policy/steps_fraction", "policy/clip_fraction" ([] each)


def ppo_step(apply_policy: Callable, optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
             batch: PolicyBatch, key: jax.Array, settings: ng.PolicyStepSettings) -> PPOStep:
    """Clipped-surrogate optimiser steps over shuffled minibatches; stop once mean KL(old ‖ new) > 1.5·δ.

    Up to `ppo_epochs` passes of the minibatches of `value_fit.minibatch_plan(N, num_minibatches)`, pass e
    shuffled by `fold_in(key, e)` (`value_fit.minibatch_indices`). After each step the KL on all N samples is
    measured, and no further step is taken once it exceeds 1.5·δ (the step that crossed it is kept).

    Args:
      apply_policy: (params, obs [*S, O]) -> Gaussian [*S].
      optimizer: the policy's optimiser; opt_state its state.
      params: policy params at π_old (batch.old_dist is π_old at batch.obs).
      batch: PolicyBatch; `advantage` is ascended, `cost_advantage` unused.
      key: shuffles the passes.
      settings: ppo_epochs, num_minibatches, ppo_clip, entropy_coef, target_kl.

    Returns:
      PPOStep. metrics: "policy/kl" the last measured KL, "policy/steps_fraction" steps taken / planned (< 1:
      stopped early), "policy/clip_fraction" the fraction of samples with |ρ − 1| > ε after the steps.
    """
    n = batch.obs.shape[0]
    size, per_pass = minibatch_plan(n, settings.num_minibatches)
    total = settings.ppo_epochs * per_pass

    def cond(carry):
        s, _, _, kl = carry
        return (s < total) & (kl <= 1.5 * settings.target_kl)

    def body(carry):
        s, params, opt_state, _ = carry
        idx = minibatch_indices(key, s, n, size, per_pass)
        stepped = gradient_step(ppo_loss, params, opt_state, optimizer, apply_policy, batch, idx, settings)
        return s + 1, stepped.params, stepped.opt_state, mean_kl(apply_policy, stepped.params, batch.obs,
                                                                 batch.old_dist)

    steps, params, opt_state, kl = jax.lax.while_loop(cond, body, (jnp.int32(0), params, opt_state,
                                                                   jnp.float32(0.0)))
    dist = apply_policy(params, batch.obs)
    ratio = jnp.exp(gaussian.log_prob(dist, batch.action) - batch.old_log_prob)
    metrics = {
        "policy/kl": kl,
        "policy/steps_fraction": steps.astype(jnp.float32) / total,  # < 1: stopped early on the KL
        "policy/clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > settings.ppo_clip).astype(jnp.float32)),
    }
    return PPOStep(params=params, opt_state=opt_state, metrics=metrics)


class FlatObjectives(NamedTuple):
    """The functions of flat policy params [P] -> [] that TRPO and CPO take (`flat_objectives`)."""

    reward_surrogate: Callable  # mean_n ρ_n·advantage_n + entropy_coef · mean entropy
    cost_surrogate: Callable  # mean_n ρ_n·cost_advantage_n
    kl: Callable  # mean KL(old ‖ new)


def flat_objectives(apply_policy: Callable, unravel: Callable, batch: PolicyBatch,
                    entropy_coef: float) -> FlatObjectives:
    """The surrogates and the mean KL of `batch` as functions of flat params (unravel: [P] -> params)."""
    def new_dist(flat_params):
        return apply_policy(unravel(flat_params), batch.obs)

    def ratio(dist):  # [N]
        return jnp.exp(gaussian.log_prob(dist, batch.action) - batch.old_log_prob)

    def reward_surrogate(flat_params):
        dist = new_dist(flat_params)
        return jnp.mean(ratio(dist) * batch.advantage) + entropy_coef * jnp.mean(gaussian.entropy(dist))

    def cost_surrogate(flat_params):
        return jnp.mean(ratio(new_dist(flat_params)) * batch.cost_advantage)

    def kl(flat_params):
        return jnp.mean(gaussian.kl(batch.old_dist, new_dist(flat_params)))

    return FlatObjectives(reward_surrogate=reward_surrogate, cost_surrogate=cost_surrogate, kl=kl)


def _line_search_metrics(objectives: FlatObjectives, flat: jax.Array, new_flat: jax.Array,
                         step_index: jax.Array, reward_old: jax.Array, reward_new: jax.Array,
                         kl: jax.Array) -> dict:
    return {
        "policy/kl": kl,
        "policy/line_search_step": step_index.astype(jnp.float32),  # −1: every candidate rejected
        "policy/accepted": (step_index >= 0).astype(jnp.float32),
        "policy/surrogate_improvement": reward_new - reward_old,
        "policy/cost_surrogate_change": objectives.cost_surrogate(new_flat) - objectives.cost_surrogate(flat),
    }


def trpo_policy_step(apply_policy: Callable, params: Any, batch: PolicyBatch,
                     settings: ng.PolicyStepSettings) -> ng.TrustRegionStep:
    """TRPO (and TRPO-Lag) on batch.advantage: `ng.natural_gradient_step` on the reward surrogate.

    Args:
      apply_policy: (params, obs [N, O]) -> Gaussian [N].
      params: policy params at π_old (batch.old_dist).
      batch: PolicyBatch; cost_advantage only enters the logged "policy/cost_surrogate_change".
      settings: target_kl, entropy_coef and the natural-gradient settings.

    Returns:
      ng.TrustRegionStep; metrics "policy/kl", "policy/line_search_step" (−1: all rejected), "policy/accepted",
      "policy/surrogate_improvement", "policy/cost_surrogate_change".
    """
    flat, unravel = ravel_pytree(params)  # [P]
    objectives = flat_objectives(apply_policy, unravel, batch, settings.entropy_coef)
    step = ng.natural_gradient_step(objectives.reward_surrogate, objectives.kl, flat, settings)
    metrics = _line_search_metrics(objectives, flat, step.params, step.step_index, step.value_old,
                                   step.value_new, step.kl)
    return ng.TrustRegionStep(params=unravel(step.params), full_step=step.full_step, metrics=metrics)


def cpo_policy_step(apply_policy: Callable, params: Any, batch: PolicyBatch, c: jax.Array,
                    settings: ng.PolicyStepSettings) -> ng.TrustRegionStep:
    """CPO: max gᵀx s.t. bᵀx + c ≤ 0, ½ xᵀFx ≤ δ (`cpo_step`), then a line search on the true objectives.

    g and b are the gradients of the reward surrogate (on batch.advantage) and the cost surrogate
    E[ρ·batch.cost_advantage]; F⁻¹g and F⁻¹b come from conjugate gradient on the damped Fisher matrix. A
    candidate is accepted when its mean KL is finite and ≤ δ, its cost surrogate rose by at most max(0, −c)
    and, unless the step is a recovery (cases 0, 1), its reward surrogate improved.

    Args:
      apply_policy: (params, obs [N, O]) -> Gaussian [N].
      params: policy params at π_old (batch.old_dist).
      batch: PolicyBatch.
      c: [] the constraint value at x = 0 in per-step cost units (positive: violated).
      settings: target_kl, entropy_coef and the natural-gradient settings.

    Returns:
      ng.TrustRegionStep; metrics "cpo/case", "cpo/lambda", "cpo/nu", "cpo/c" and those of `trpo_policy_step`.
    """
    flat, unravel = ravel_pytree(params)  # [P]
    objectives = flat_objectives(apply_policy, unravel, batch, settings.entropy_coef)
    start = ng.natural_gradient(objectives.reward_surrogate, objectives.kl, flat, settings)
    reward_old, g, v, q, fvp = start.value, start.gradient, start.direction, start.curvature, start.fvp
    delta = settings.target_kl
    cost_old, b = jax.value_and_grad(objectives.cost_surrogate)(flat)
    w = ng.conjugate_gradient(fvp, b, settings.cg_iterations)  # F⁻¹b
    r, s = jnp.dot(g, w), jnp.dot(w, fvp(w))
    solution = cpo_step(v, w, q, r, s, c, jnp.dot(b, b), delta)
    full_step, case = solution.step, solution.case

    def accept(candidate):
        kl = objectives.kl(candidate)
        improved = (objectives.reward_surrogate(candidate) > reward_old) | (case <= 1)
        cost_ok = objectives.cost_surrogate(candidate) - cost_old <= jnp.maximum(-c, 0.0)
        return jnp.isfinite(kl) & (kl <= delta) & improved & cost_ok

    new_flat, step_index = ng.backtracking_line_search(flat, full_step, accept, settings.line_search_steps,
                                                       settings.backtrack_coeff)
    metrics = {"cpo/case": case.astype(jnp.float32), "cpo/lambda": solution.lam, "cpo/nu": solution.nu,
               "cpo/c": c}
    metrics.update(_line_search_metrics(objectives, flat, new_flat, step_index, reward_old,
                                        objectives.reward_surrogate(new_flat), objectives.kl(new_flat)))
    return ng.TrustRegionStep(params=unravel(new_flat), full_step=full_step, metrics=metrics)


# ----------------------------------------------------------------------------------------------------------
# The learners.


def _make_learner(cfg: RunConfig, observation_size: int, action_size: int, variant: str) -> OnPolicyLearner:
    """The learner of `variant` (ppo_lag, trpo_lag, cpo or trpo) for the rollout trainer."""
    if variant == _CPO and cfg.episode_length is None:
        raise ValueError("cpo needs cfg.episode_length to bring the episodic constraint to per-step units")
    o = cfg.onpolicy
    policy_settings = ng.PolicyStepSettings.from_config(o)
    value_settings = ValueFitSettings.from_config(o)
    hidden = tuple(int(h) for h in cfg.network.hidden)
    policy_net = GaussianPolicyNet(hidden=hidden, action_size=action_size, covariance=cfg.network.covariance)
    value_net = MLP(hidden, 1)
    policy_optimizer = optax.adam(o.actor_lr)
    value_optimizer = optax.adam(o.value_lr)
    gains = gains_from_config(cfg.lagrange)
    uses_lagrange = variant in (_PPO_LAG, _TRPO_LAG)

    def values(params: dict, obs: jax.Array) -> jax.Array:  # [*S, O] -> [*S]
        return value_net.apply(params, obs)[..., 0]

    def init(key: jax.Array) -> OnPolicyState:
        policy_key, reward_key, cost_key = jax.random.split(key, 3)
        obs = jnp.zeros((1, observation_size), jnp.float32)
        params = OnPolicyParams(policy=policy_net.init(policy_key, obs),
                                reward_value=value_net.init(reward_key, obs),
                                cost_value=value_net.init(cost_key, obs))
        policy_opt_state = policy_optimizer.init(params.policy) if variant == _PPO_LAG else optax.EmptyState()
        return OnPolicyState(
            params=params, policy_opt_state=policy_opt_state,
            value_opt_state=value_optimizer.init((params.reward_value, params.cost_value)),
            pid=init_pid(gains, cfg.lagrange.initial), episode_cost=jnp.float32(0.0), num_updates=jnp.int32(0))

    def act(params: OnPolicyParams, obs: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """[N, O] -> actions [N, A] inside the action box (the mean when deterministic)."""
        return gaussian.action_in_box(policy_net.apply(params.policy, obs), key, deterministic)

    def explore(state: OnPolicyState, obs: jax.Array, key: jax.Array, settings: MemberSettings):
        """[E, O] -> (unclipped sample [E, A], its log-probability [E], no metrics)."""
        dist = policy_net.apply(state.params.policy, obs)
        action = gaussian.sample(dist, key, 1)[:, 0]
        return action, gaussian.log_prob(dist, action), {}

    def update(state: OnPolicyState, rollout: Rollout, episode_cost: jax.Array, settings: MemberSettings,
               key: jax.Array):
        """One policy step and the value fit on a rollout [T, E]; `episode_cost` NaN when no episode ended."""
        params = state.params
        reward_values = values(params.reward_value, rollout.obs)  # [T, E]
        cost_values = values(params.cost_value, rollout.obs)
        reward_adv, reward_returns = gae(rollout.reward, reward_values, values(params.reward_value, rollout.next_obs),
                                         rollout.terminal, rollout.truncated, o.gamma, o.gae_lambda)
        # The cost value stops only where the task ended the episode: after a reached goal costs go on (see
        # critics.cost_target).
        cost_adv, cost_returns = gae(rollout.cost, cost_values, values(params.cost_value, rollout.next_obs),
                                     rollout.terminated, rollout.truncated, o.gamma, o.gae_lambda)

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
        if variant == _CPO:
            cost_adv_c = flat(cost_adv) - jnp.mean(cost_adv)  # centred only: the constraint is in cost units
            c = (cost_estimate - settings.cost_limit) / int(cfg.episode_length)
            batch = PolicyBatch(obs, action, old_log_prob, reward_adv_n, cost_adv_c, old_dist)
            step = cpo_policy_step(policy_net.apply, params.policy, batch, c, policy_settings)
            policy_params, policy_metrics = step.params, step.metrics
        else:
            cost_adv_n = normalise(flat(cost_adv))
            combined = (reward_adv_n - lam * cost_adv_n) / (1.0 + lam)
            batch = PolicyBatch(obs, action, old_log_prob, combined, cost_adv_n, old_dist)
            if variant == _PPO_LAG:
                step = ppo_step(policy_net.apply, policy_optimizer, params.policy, state.policy_opt_state, batch,
                                policy_key, policy_settings)
                policy_params, policy_opt_state, policy_metrics = step.params, step.opt_state, step.metrics
            else:
                step = trpo_policy_step(policy_net.apply, params.policy, batch, policy_settings)
                policy_params, policy_metrics = step.params, step.metrics

        fitted = fit_values(values, value_optimizer, (params.reward_value, params.cost_value),
                            state.value_opt_state, obs, (flat(reward_returns), flat(cost_returns)), value_key,
                            value_settings)
        (reward_params, cost_params), (reward_loss, cost_loss) = fitted.params, fitted.losses
        new_params = OnPolicyParams(policy=policy_params, reward_value=reward_params, cost_value=cost_params)
        new_state = OnPolicyState(params=new_params, policy_opt_state=policy_opt_state,
                                  value_opt_state=fitted.opt_state, pid=pid, episode_cost=cost_estimate,
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


def make_ppo_lag_learner(cfg: RunConfig, observation_size: int, action_size: int) -> OnPolicyLearner:
    """PPO with the PID Lagrange multiplier (`ppo_step` on the combined advantage)."""
    return _make_learner(cfg, observation_size, action_size, _PPO_LAG)


def make_trpo_lag_learner(cfg: RunConfig, observation_size: int, action_size: int) -> OnPolicyLearner:
    """TRPO with the PID Lagrange multiplier (`trpo_policy_step` on the combined advantage)."""
    return _make_learner(cfg, observation_size, action_size, _TRPO_LAG)


def make_cpo_learner(cfg: RunConfig, observation_size: int, action_size: int) -> OnPolicyLearner:
    """CPO (`cpo_policy_step`); needs `cfg.episode_length` for its per-step constraint value c."""
    return _make_learner(cfg, observation_size, action_size, _CPO)


def make_trpo_learner(cfg: RunConfig, observation_size: int, action_size: int) -> OnPolicyLearner:
    """Unconstrained TRPO: trpo_lag with λ = 0 always (the cost value is still fitted and logged)."""
    return _make_learner(cfg, observation_size, action_size, _TRPO)
