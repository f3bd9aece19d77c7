"""Conservative Safety Critics (CSC; Bharadhwaj, Kumar, Rhinehart, Levine, Garg, Shkurti, ICLR 2021).

One epoch of Algorithm 1 is one rollout of the rollout trainer (`rollout_trainer.py`):

* acting (`explore`, Algorithm 1 lines 5-6): draw a ~ π_old(s) and execute it iff Q_C(s, a) ≤ ε with
  ε = (1 − γ)(χ − V̂_C); otherwise draw again, at most `csc.max_resamples` draws (paper A.4: 100);
* `update` on the rollout: insert it into the replay buffer D_env (kept in the learner state), record the
  observed episodic cost V̂_C (line 10), take `csc.critic_updates` steps of CQL(ζ) on D_env (eq. 2, line 13),
  fit the reward value V_r on GAE λ-returns, take one natural-gradient policy step with backtracking
  (eqs. 7-8, line 12), then one step of the multiplier λ (eq. 9, line 14).

Design decisions (the paper's setting is a binary failure indicator that ends the episode; most tasks here
have a per-step cost indicator with an episodic limit):

Units of χ and V̂_C (`csc.cost_units`). Q_C is a discounted cost-to-go (target y = c + γ Q'_C(s', a' ~ π(s'))).
In the paper's setting the cost is a binary failure indicator that ends the episode, so the episodic cost is a
probability of failure, Q_C is one too (the paper caps it at 1), and χ and V̂_C ("average episodic failures in
the previous epoch") meet Q_C as they are: `episodic`, the default of a task with `env.cost_is_failure` (the
traps tasks). With a per-step cost and an episodic limit (the Safety-Gym tasks) Q_C counts discounted cost
per state instead, and an episodic χ would be ~T(1 − γ)/(1 − γ^T) times too loose: `per_state` (the default
elsewhere) converts both with `core.members.cost_threshold_from_episode_limit`, an episodic cost C spread
evenly over the T steps of an episode being worth C·(1 − γ^T)/(T(1 − γ)) per state. Either way χ = the
episodic limit (`settings.cost_limit`, with the on-policy γ and T = `cfg.episode_length`) in those units, V̂_C
= the mean episodic cost of the training episodes that ended in the last rollout (kept when none ended; V̂_C
= χ before the first episodes, Algorithm 1 line 2), and ε = (1 − γ)(χ − V̂_C) exactly as Algorithm 1 line 5.

All draws rejected. The draws are i.i.d., so the `max_resamples` draws are taken at once and the executed one
is the first with Q_C ≤ ε, which is what the sequential loop of line 6 would execute. When none passes, the
paper's loop stops after 100 draws (A.4) and executes the last one, a plain sample of π
(`csc.when_all_rejected=last_draw`, the default). `safest` executes the draw with the lowest Q_C instead,
which looks safer but feeds the critic's own choice back into it: the executed actions are then the tail of π
the critic deems safest, π/μ grows, and the CQL lift with it (see "Conservatism compounds" below). On
point_traps it made Q_C climb to ~70 (a probability of failure is at most 1), every draw was rejected from
100k env steps on and the policy stopped learning (experiments/README.md, "CSC on point_traps"). ε is small
by construction ((1 − γ) times a probability or a per-state value) and negative once the observed cost
exceeds the limit, so the fallback is common early on and whenever the training cost is over the limit;
`csc/all_rejected` reports how often.

Cost advantage and the policy step (eqs. 5, 7-8). Â_C(s, a) = Q_C(s, a) − E_{a'~π_old}Q_C(s, a'), the
advantage under the over-estimating critic, the expectation over `csc.num_particles` draws. The objective of
eq. 43 is E_s E_{a~π_old}[ratio·(A_R − λ′Â_C)] with λ′ = λ/(1 − γ). A_R exists only at the executed actions
(GAE(γ, λ) on the rewards with V_r, centred over the rollout but not scaled, so that λ′ keeps its meaning).
The Â_C term is an expectation over a ~ π_old too, and with a learned Q_C it is taken over fresh draws from
π_old at the rollout states, not over the executed actions: those passed the rejection filter, so they would
hide exactly the unsafe part of π from the gradient. The step is F⁻¹g scaled so ½xᵀFx = δ (eq. 7), then
backtracking by `onpolicy.backtrack_coeff` for `onpolicy.line_search_steps` candidates, accepting the first with mean
KL(old ‖ new) ≤ δ and an improved surrogate (A.2: otherwise φ ← φ_old).

The multiplier (eq. 9). The constraint of eqs. 4-5 is V_C^{π_old}(μ) + (1/(1−γ))·E_{s~ρ_old, a~π}[Â_C] ≤ χ,
on the cost of the *policy*. The observed episodes measure the filtered behaviour instead, which the
rejection rule keeps cheap whatever π does (with ε this small the executed action is mostly the lowest-Q_C
draw), so a λ driven by them stays at zero while π itself drifts over the limit. So the λ step takes
V̂_C^{π_old} = mean over the rollout states of E_{a~π_old}Q_C(s, a): the conservative critic's (over-)estimate
of the policy's own cost in Q_C's units, comparable with χ. The advantage term is evaluated at the policy after
this epoch's step (Algorithm 1 runs line 14 after line 12; at a ~ π_old it would be zero by construction):
E_{a~π_new}[Â_C] = mean over the K draws of ratio·Â_C. The update is projected gradient descent on eq. 5's
Lagrangian in λ:

    λ ← max(0, λ + η_λ·((1/(1 − γ))·E[Â_C] − χ′)),   χ′ = χ − V̂_C^{π_old}.

Eq. 9 as printed, λ ← λ − η_λ((1/(1−γ))E[Â_C] − χ′), has the bracket's sign reversed with respect to eq. 5
(it would lower λ when the estimated cost is over the limit, χ′ < 0); descending −λ(V̂_C + … − χ) raises it.
The observed V̂_C is still what sets the acting threshold ε, as line 5 says: it is the exploration budget.

Conservatism compounds. CQL(ζ) lifts Q_C by about α(π/μ − 1) where π puts more mass than the data, and the
Bellman target bootstraps from π's actions, so the lift is carried forward ~1/(1 − γ) times; with the filter
executing the tail of π that the critic deems safest, π/μ is large. E_π Q_C then sits above π's true cost
and λ keeps rising slowly while it does (a safer, less rewarding policy than the constraint asks for). A
smaller α (the paper found 0.05, 0.5 and 5 alike) keeps the lift small; the speed_limit test uses 0.05.

Failures per episode. `csc/failures_per_episode` counts cost events (steps with cost > 0) per training
episode that ended in the rollout, the paper's V̂_C in our units; `csc/failed_episodes` is the fraction of
those episodes with at least one cost event. Both keep their last value when no episode ended.

Shape legend: T = rollout length, E = environments, N = T·E, K = particles, M = max_resamples, B = critic
batch, O = observation size, A = action size, P = flat policy parameters.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from cvpo_jax import critics
from cvpo_jax import policy as gaussian
from cvpo_jax.baselines.advantages import gae
from cvpo_jax.baselines.natural_gradient import PolicyStepSettings, TrustRegionStep, natural_gradient_step
from cvpo_jax.baselines.value_fit import ValueFitSettings, fit_values
from cvpo_jax.config import RunConfig
from cvpo_jax.core import replay
from cvpo_jax.core.contracts import MemberSettings, OnPolicyLearner, Rollout
from cvpo_jax.core.gradients import gradient_step
from cvpo_jax.core.members import cost_threshold_from_episode_limit
from cvpo_jax.networks import MLP, GaussianPolicyNet, SingleQ

# ----------------------------------------------------------------------------------------------------------
# Pure pieces (tested on their own in tests/test_csc.py). The value fit (`value_fit.fit_values`) and the
# natural-gradient step (`on_policy.natural_gradient_step`) are the ones the other on-policy methods use.


def cql_penalty(q_policy: jax.Array, q_data: jax.Array) -> jax.Array:
    """The bracket of CQL(ζ), eq. 2: −E_{s~D, a~π}[Q_C(s, a)] + E_{(s,a)~D}[Q_C(s, a)].

    Minimising α times it raises Q_C on the policy's actions above the data's (the sign reversed from CQL(H),
    so Q_C over-estimates). Negative when Q_C already sits higher on the policy's actions.

    Args:
      q_policy: Q_C at actions drawn from π at the buffer states, [B, K].
      q_data: Q_C at the buffer's (executed) actions, [B].

    Returns:
      [] the penalty.
    """
    return -jnp.mean(q_policy) + jnp.mean(q_data)


def safety_critic_loss(params, apply_q: Callable, obs: jax.Array, data_action: jax.Array,
                       policy_action: jax.Array, target: jax.Array, alpha: float):
    """CQL(ζ), eq. 2: α·cql_penalty + ½·E_D[(Q_C(s, a) − B̂^π Q̂_C(s, a))²].

    Args:
      params: safety-critic parameters; apply_q(params, obs [B, O], actions [B, (K,) A]) -> [B, (K)].
      obs: [B, O]. data_action: [B, A] executed (clipped) actions. policy_action: [B, K, A] draws from π
        (clipped). target: [B] Bellman targets (held constant). alpha: α ≥ 0.

    Returns:
      (loss [], aux) with aux "penalty" (cql_penalty), "bellman" (½ mean squared error), "q_data", "q_policy".
    """
    q_data = apply_q(params, obs, data_action)  # [B]
    q_policy = apply_q(params, obs, policy_action)  # [B, K]
    penalty = cql_penalty(q_policy, q_data)
    bellman = 0.5 * jnp.mean(jnp.square(q_data - jax.lax.stop_gradient(target)))
    loss = alpha * penalty + bellman
    return loss, {"penalty": penalty, "bellman": bellman, "q_data": jnp.mean(q_data),
                  "q_policy": jnp.mean(q_policy)}


def episodic_cost_scale(cost_units: Any, episode_length: int, gamma: float) -> float:
    """The factor taking an episodic cost (χ, V̂_C) to Q_C's units: 1 for `episodic`, the per-state value of a
    unit episodic cost spread over the episode for `per_state` (module doc, "Units of χ and V̂_C")."""
    if cost_units == "episodic":
        return 1.0
    if cost_units == "per_state":
        return float(cost_threshold_from_episode_limit(1.0, episode_length, gamma))
    raise ValueError(f"csc.cost_units={cost_units!r}: expected episodic or per_state, resolved from the task by "
                     "config.fill_task_presets")


def rejection_threshold(chi: jax.Array, cost_value: jax.Array, gamma: float) -> jax.Array:
    """ε = (1 − γ)(χ − V̂_C), Algorithm 1 line 5 (χ and V̂_C in Q_C's units, see the module doc)."""
    return (1.0 - gamma) * (chi - cost_value)


class Selection(NamedTuple):
    action: jax.Array  # [E, A] the executed draw
    index: jax.Array  # [E] int32, which of the M draws
    num_draws: jax.Array  # [E] int32, draws a sequential loop would have taken (index + 1, or M)
    accepted: jax.Array  # [E] bool, False: all M rejected (the fallback draw is executed)


def select_action(draws: jax.Array, q_c: jax.Array, threshold: jax.Array, when_all_rejected: str = "last_draw"
                  ) -> Selection:
    """Rejection sampling of line 6 over pre-drawn candidates: the first draw with Q_C ≤ ε, else the last draw
    (the paper's loop, stopped after M draws) or, with when_all_rejected="safest", the lowest Q_C.

    Args:
      draws: [E, M] candidate actions [E, M, A] in draw order. q_c: Q_C of each, [E, M] (NaN counts as
        rejected). threshold: ε, [] or [E]. when_all_rejected: "last_draw" or "safest".

    Returns:
      Selection (see the class).
    """
    num = draws.shape[1]
    ok = q_c <= jnp.asarray(threshold)[..., None]  # [E, M]; NaN compares False
    any_ok = jnp.any(ok, axis=1)  # [E]
    first = jnp.argmax(ok, axis=1)  # [E] the first True (0 when none, unused then)
    if when_all_rejected == "safest":
        fallback = jnp.argmin(jnp.where(jnp.isnan(q_c), jnp.inf, q_c), axis=1)  # [E]
    elif when_all_rejected == "last_draw":
        fallback = jnp.full(any_ok.shape, num - 1)
    else:
        raise ValueError(f"when_all_rejected={when_all_rejected!r}: allowed: last_draw, safest")
    index = jnp.where(any_ok, first, fallback).astype(jnp.int32)
    action = jnp.take_along_axis(draws, index[:, None, None], axis=1)[:, 0]  # [E, A]
    num_draws = jnp.where(any_ok, first + 1, num).astype(jnp.int32)
    return Selection(action=action, index=index, num_draws=num_draws, accepted=any_ok)


def lambda_update(lam: jax.Array, cost_advantage: jax.Array, chi: jax.Array, cost_value: jax.Array,
                  gamma: float, lr: float) -> jax.Array:
    """Eq. 9 as projected descent on eq. 5's Lagrangian.

    λ ← max(0, λ + η_λ(E[Â_C]/(1 − γ) − (χ − V̂_C))).

    Args:
      lam: λ ≥ 0. cost_advantage: E_{s~ρ_old, a~π}[Â_C(s, a)] (see the module doc for which π). chi: χ.
      cost_value: V̂_C (in χ's units). gamma: γ. lr: η_λ.

    Returns:
      [] the new λ ≥ 0.
    """
    chi_prime = chi - cost_value
    return jnp.maximum(0.0, lam + lr * (cost_advantage / (1.0 - gamma) - chi_prime))


def insert_rollout(buffer: replay.ReplayState, rollout: Rollout) -> replay.ReplayState:
    """Append the rollout [T, E] to D_env one env step ([E] rows) at a time (the capacity is a multiple of E).

    Actions are stored clipped to the action box, as executed by the environment.
    """
    steps = replay.Transition(obs=rollout.obs, action=jnp.clip(rollout.action, -1.0, 1.0),
                              reward=rollout.reward, cost=rollout.cost, next_obs=rollout.next_obs,
                              terminal=rollout.terminal, truncated=rollout.truncated,
                              terminated=rollout.terminated)
    buffer, _ = jax.lax.scan(lambda b, step: (replay.insert(b, step), None), buffer, steps)
    return buffer


class FailureCounts(NamedTuple):
    running_cost: jax.Array  # [E] cost of each env's unfinished episode after the rollout
    ended: jax.Array  # [] episodes that ended in the rollout
    events: jax.Array  # [] summed cost of those episodes (cost events, for a 0/1 cost)
    failed: jax.Array  # [] those of them with a positive cost


def count_failures(running_cost: jax.Array, cost: jax.Array, episode_end: jax.Array) -> FailureCounts:
    """Carry each env's episode cost through a rollout and count the episodes that ended in it.

    Args:
      running_cost: [E] cost of each env's episode so far (from the previous rollouts).
      cost: [T, E] per-step cost. episode_end: [T, E], > 0 where the episode ended after the step (truncated or
        terminated; a reached goal is `terminal` for the reward but the episode goes on).

    Returns:
      FailureCounts; an ended episode's running cost restarts at 0.
    """
    def step(running, t):
        step_cost, done = t
        running = running + step_cost
        ended = done > 0
        out = (jnp.sum(ended), jnp.sum(jnp.where(ended, running, 0.0)), jnp.sum(ended & (running > 0)))
        return jnp.where(ended, 0.0, running), out

    running, (ended, events, failed) = jax.lax.scan(step, running_cost, (cost, episode_end))
    return FailureCounts(running_cost=running, ended=jnp.sum(ended), events=jnp.sum(events),
                         failed=jnp.sum(failed))


class CriticSettings(NamedTuple):
    """The safety-critic settings (static Python numbers)."""

    updates: int  # N: CQL(ζ) steps per epoch
    batch_size: int  # B: replay minibatch
    num_particles: int  # K: draws from π per buffer state for the CQL(ζ) term
    cql_alpha: float  # α
    polyak: float  # target averaging weight ρ
    gamma: float  # discount of the Bellman target

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "CriticSettings":
        """From `cfg.csc` and the on-policy discount `cfg.onpolicy.gamma`."""
        c = cfg.csc
        return cls(updates=int(c.critic_updates), batch_size=int(c.batch_size), num_particles=int(c.num_particles),
                   cql_alpha=float(c.cql_alpha), polyak=float(c.polyak), gamma=float(cfg.onpolicy.gamma))


class CriticUpdate(NamedTuple):
    params: Any  # the safety critic Q_C after the steps
    target: Any  # its polyak-averaged target
    opt_state: Any  # the critic optimiser's state
    aux: dict  # [] means over the steps: "penalty", "bellman", "q_data", "q_policy", "loss", "target"


def critic_updates(apply_q: Callable, apply_policy: Callable, optimizer: optax.GradientTransformation,
                   params: Any, target: Any, opt_state: Any, policy_params: Any, buffer: replay.ReplayState,
                   key: jax.Array, settings: CriticSettings) -> CriticUpdate:
    """`settings.updates` CQL(ζ) steps on D_env minibatches (eq. 2, line 13), each followed by the polyak step.

    Each step samples B buffer rows, the Bellman target y = c + γ Q'_C(s', a' ~ π(s')) (unmasked, as CVPO's
    cost critic; `critics.cost_target`) and K clipped draws of π at the buffer states for the penalty, then
    takes one optimiser step on `safety_critic_loss`.

    Args:
      apply_q: (params, obs [B, O], actions [B, (K,) A]) -> [B, (K)], the raw critic (actions are clipped here).
      apply_policy: (policy params, obs [B, O]) -> Gaussian [B]. policy_params: π (held constant).
      optimizer: the critic's optimiser; opt_state its state. params, target: Q_C and its target.
      buffer: D_env (executed, clipped actions). key: one split per step (sample, next action, particles).
      settings: CriticSettings.

    Returns:
      CriticUpdate.
    """
    def one(carry, k):
        params, target, opt_state = carry
        sample_key, next_key, policy_key = jax.random.split(k, 3)
        batch = replay.sample(buffer, sample_key, settings.batch_size)
        next_action = gaussian.sample(apply_policy(policy_params, batch.next_obs), next_key, 1)[:, 0]
        next_q = apply_q(target, batch.next_obs, jnp.clip(next_action, -1.0, 1.0))
        # Nothing is paid after a termination (the paper's failure ends the episode); a reached goal goes on.
        target_q = critics.cost_target(batch.cost, batch.terminated, next_q, settings.gamma, mask_done=True)  # [B]
        policy_action = jnp.clip(gaussian.sample(apply_policy(policy_params, batch.obs), policy_key,
                                                 settings.num_particles), -1.0, 1.0)  # [B, K, A]
        stepped = gradient_step(safety_critic_loss, params, opt_state, optimizer, apply_q, batch.obs,
                                batch.action, policy_action, target_q, settings.cql_alpha, has_aux=True)
        target = critics.polyak_update(target, stepped.params, settings.polyak)
        aux = {**stepped.aux, "loss": stepped.loss, "target": jnp.mean(target_q)}
        return (stepped.params, target, stepped.opt_state), aux

    (params, target, opt_state), aux = jax.lax.scan(one, (params, target, opt_state),
                                                    jax.random.split(key, settings.updates))
    return CriticUpdate(params=params, target=target, opt_state=opt_state, aux=jax.tree.map(jnp.mean, aux))


class CSCPolicyBatch(NamedTuple):
    """The rollout flattened to N samples, and K fresh draws of π_old per state, for the policy step."""

    obs: jax.Array  # [N, O]
    action: jax.Array  # [N, A] executed (the filter's choice, unclipped)
    old_log_prob: jax.Array  # [N] log π_old(action | obs)
    reward_advantage: jax.Array  # [N] Â_R (centred)
    particles: jax.Array  # [N, K, A] draws from π_old
    particle_log_prob: jax.Array  # [N, K] log π_old of them
    cost_advantage: jax.Array  # [N, K] Â_C(s, particle)


def csc_surrogate(dist: gaussian.Gaussian, batch: CSCPolicyBatch, lam_prime: jax.Array,
                  entropy_coef: float) -> tuple[jax.Array, jax.Array]:
    """Eq. 43's objective at the policy `dist` (Gaussian [N]): E[ρ·Â_R] − λ′·E_{a~π_old}[ρ·Â_C] + entropy.

    ρ is π/π_old at the executed actions for the reward term and at the particles for the cost term; the
    entropy bonus is entropy_coef · mean entropy of `dist`.

    Returns:
      (objective [], cost term [] = mean_{n,k} ρ_nk·Â_C,nk). At π_old the ratios are 1, so the cost term is
      the mean of Â_C, zero by construction.
    """
    reward_term = jnp.mean(jnp.exp(gaussian.log_prob(dist, batch.action) - batch.old_log_prob)
                           * batch.reward_advantage)
    cost_ratio = jnp.exp(gaussian.log_prob(dist, batch.particles) - batch.particle_log_prob)  # [N, K]
    cost_term = jnp.mean(cost_ratio * batch.cost_advantage)
    entropy = jnp.mean(gaussian.entropy(dist))
    return reward_term - lam_prime * cost_term + entropy_coef * entropy, cost_term


def policy_step(apply_policy: Callable, params: Any, batch: CSCPolicyBatch, lam_prime: jax.Array,
                settings: PolicyStepSettings) -> TrustRegionStep:
    """Eqs. 7-8: `on_policy.natural_gradient_step` on `csc_surrogate`, backtracking on the KL and the surrogate.

    Args:
      apply_policy: (params, obs [N, O]) -> Gaussian [N]. params: π_old's (the KL is taken from it).
      batch: CSCPolicyBatch (held constant). lam_prime: λ′ = λ/(1 − γ) [].
      settings: target_kl δ, entropy_coef and the natural-gradient settings.

    Returns:
      TrustRegionStep; metrics "policy/kl", "policy/line_search_step" (−1: all rejected), "policy/accepted",
      "policy/surrogate_improvement", and "csc/cost_advantage_new" = E_{a~π_new}[Â_C] (the change of the cost
      term; > 0 means the step made the policy riskier).
    """
    flat, unravel = ravel_pytree(params)  # [P]
    old_dist = jax.lax.stop_gradient(apply_policy(params, batch.obs))

    def surrogate(flat_params):
        return csc_surrogate(apply_policy(unravel(flat_params), batch.obs), batch, lam_prime,
                             settings.entropy_coef)

    def kl(flat_params):
        return jnp.mean(gaussian.kl(old_dist, apply_policy(unravel(flat_params), batch.obs)))

    # β of eq. 7 with j = 0: the quadratic model of the KL equals δ at the full step.
    step = natural_gradient_step(surrogate, kl, flat, settings, has_aux=True)
    metrics = {
        "policy/kl": step.kl,
        "policy/line_search_step": step.step_index.astype(jnp.float32),  # −1: every candidate rejected
        "policy/accepted": (step.step_index >= 0).astype(jnp.float32),
        "policy/surrogate_improvement": step.value_new - step.value_old,
        # E_{a~π_new}[Â_C] (the cost term is zero at φ_old): > 0 means the step made the policy riskier.
        "csc/cost_advantage_new": step.aux_new - step.aux_old,
    }
    return TrustRegionStep(params=unravel(step.params), full_step=step.full_step, metrics=metrics)


# ----------------------------------------------------------------------------------------------------------
# The learner.


class CSCParams(NamedTuple):
    """What evaluation and checkpoints read: the policy, the reward value V_r and the safety critic Q_C."""

    policy: dict
    reward_value: dict
    safety_critic: dict


@struct.dataclass
class CSCState:
    params: CSCParams
    target_safety_critic: dict  # polyak average of Q_C, for the Bellman targets
    critic_opt_state: optax.OptState
    value_opt_state: optax.OptState
    lam: jax.Array  # λ ≥ 0 of eq. 9
    episode_cost: jax.Array  # mean episodic cost of the last rollout's ended episodes; NaN before any
    replay: replay.ReplayState  # D_env, executed (clipped) actions
    running_cost: jax.Array  # [E] cost of each env's episode so far (for the failure counts)
    failures_per_episode: jax.Array  # last value of the metric (kept when no episode ends)
    failed_episodes: jax.Array  # likewise
    num_updates: jax.Array  # int32


def make_csc_learner(cfg: RunConfig, observation_size: int, action_size: int) -> OnPolicyLearner:
    """CSC for the rollout trainer; needs `cfg.episode_length` resolved (run.resolve fills it)."""
    if cfg.episode_length is None:
        raise ValueError("csc needs cfg.episode_length to convert episodic costs to per-state values")
    o, c = cfg.onpolicy, cfg.csc
    gamma = float(o.gamma)
    policy_settings = PolicyStepSettings.from_config(o)
    value_settings = ValueFitSettings.from_config(o)
    critic_settings = CriticSettings.from_config(cfg)
    # χ and V̂_C are (episodic cost) × this factor, in Q_C's units (module doc, "Units of χ and V̂_C").
    cost_scale = episodic_cost_scale(c.cost_units, int(cfg.episode_length), gamma)
    hidden = tuple(int(h) for h in cfg.network.hidden)
    policy_net = GaussianPolicyNet(hidden=hidden, action_size=action_size, covariance=cfg.network.covariance)
    value_net = MLP(hidden, 1)
    critic_net = SingleQ(hidden=hidden)
    critic_optimizer = optax.adam(c.safety_critic_lr)
    value_optimizer = optax.adam(o.value_lr)
    num_envs = cfg.num_envs
    capacity = replay.rounded_capacity(cfg.replay_capacity, num_envs)

    def q_c(params, obs, actions):  # [*S, O], [*S, *P, A] -> [*S, *P]; the env clips, so Q_C sees clipped
        return critic_net.apply(params, obs, jnp.clip(actions, -1.0, 1.0))

    def values(params, obs):  # [*S, O] -> [*S]
        return value_net.apply(params, obs)[..., 0]

    def chi_of(settings: MemberSettings) -> jax.Array:
        return settings.cost_limit * cost_scale

    def cost_value_of(state: CSCState, settings: MemberSettings) -> jax.Array:
        """V̂_C in Q_C's units; χ itself before any episode ended (Algorithm 1 line 2)."""
        episodic = jnp.where(jnp.isnan(state.episode_cost), settings.cost_limit, state.episode_cost)
        return episodic * cost_scale

    def init(key: jax.Array) -> CSCState:
        policy_key, value_key, critic_key = jax.random.split(key, 3)
        obs = jnp.zeros((1, observation_size), jnp.float32)
        actions = jnp.zeros((1, action_size), jnp.float32)
        params = CSCParams(policy=policy_net.init(policy_key, obs), reward_value=value_net.init(value_key, obs),
                           safety_critic=critic_net.init(critic_key, obs, actions))
        example = replay.Transition(obs=obs[0], action=actions[0], reward=jnp.zeros(()), cost=jnp.zeros(()),
                                    next_obs=obs[0], terminal=jnp.zeros(()), truncated=jnp.zeros(()),
                                    terminated=jnp.zeros(()))
        return CSCState(
            params=params, target_safety_critic=params.safety_critic,
            critic_opt_state=critic_optimizer.init(params.safety_critic),
            value_opt_state=value_optimizer.init(params.reward_value),
            lam=jnp.float32(0.0), episode_cost=jnp.float32(jnp.nan), replay=replay.init(example, capacity),
            running_cost=jnp.zeros((num_envs,), jnp.float32), failures_per_episode=jnp.float32(0.0),
            failed_episodes=jnp.float32(0.0), num_updates=jnp.int32(0))

    def act(params: CSCParams, obs: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """Evaluation: the policy alone (no safety filter), [N, O] -> [N, A] in the action box."""
        return gaussian.action_in_box(policy_net.apply(params.policy, obs), key, deterministic)

    def explore(state: CSCState, obs: jax.Array, key: jax.Array, settings: MemberSettings):
        """Safe exploration (line 6): [E, O] -> (executed draw [E, A] unclipped, log π_old of it [E], metrics)."""
        dist = policy_net.apply(state.params.policy, obs)
        draws = gaussian.sample(dist, key, c.max_resamples)  # [E, M, A]
        q = q_c(state.params.safety_critic, obs, draws)  # [E, M]
        threshold = rejection_threshold(chi_of(settings), cost_value_of(state, settings), gamma)
        chosen = select_action(draws, q, threshold, c.when_all_rejected)
        executed_q = jnp.take_along_axis(q, chosen.index[:, None], axis=1)[:, 0]  # [E]
        metrics = {
            "csc/rejection_threshold": threshold,
            "csc/resamples": jnp.mean(chosen.num_draws.astype(jnp.float32)),
            "csc/all_rejected": jnp.mean(1.0 - chosen.accepted.astype(jnp.float32)),
            "csc/q_c_executed": jnp.mean(executed_q),
        }
        return chosen.action, gaussian.log_prob(dist, chosen.action), metrics

    def update(state: CSCState, rollout: Rollout, episode_cost: jax.Array, settings: MemberSettings,
               key: jax.Array):
        """One epoch of Algorithm 1 (lines 8-16) on a rollout [T, E]; `episode_cost` NaN when none ended."""
        critic_key, particle_key, value_key = jax.random.split(key, 3)
        params = state.params

        # Line 8 and line 10: D_env ← D_env ∪ rollout; V̂_C ← this epoch's mean episodic cost.
        buffer = insert_rollout(state.replay, rollout)
        episode_cost_estimate = jnp.where(jnp.isfinite(episode_cost), episode_cost, state.episode_cost)
        counts = count_failures(state.running_cost, rollout.cost, jnp.maximum(rollout.truncated, rollout.terminated))
        have = counts.ended > 0
        failures_per_episode = jnp.where(have, counts.events / jnp.maximum(counts.ended, 1),
                                         state.failures_per_episode)
        failed_episodes = jnp.where(have, counts.failed / jnp.maximum(counts.ended, 1), state.failed_episodes)
        state = state.replace(replay=buffer, episode_cost=episode_cost_estimate, running_cost=counts.running_cost)
        chi = chi_of(settings)
        cost_value = cost_value_of(state, settings)

        # Line 13 first, so the advantages below use a critic that has seen this rollout.
        critic = critic_updates(critic_net.apply, policy_net.apply, critic_optimizer, params.safety_critic,
                                state.target_safety_critic, state.critic_opt_state, params.policy, state.replay,
                                critic_key, critic_settings)

        def flat(x):
            return x.reshape((-1,) + x.shape[2:])

        obs, action, old_log_prob = flat(rollout.obs), flat(rollout.action), flat(rollout.log_prob)

        # Â_R by GAE on the rewards (eq. 48), then the V_r fit on the λ-returns.
        reward_adv, reward_returns = gae(rollout.reward, values(params.reward_value, rollout.obs),
                                         values(params.reward_value, rollout.next_obs), rollout.terminal,
                                         rollout.truncated, gamma, o.gae_lambda)
        value_fit = fit_values(values, value_optimizer, params.reward_value, state.value_opt_state, obs,
                               flat(reward_returns), value_key, value_settings)

        # Â_C(s, a) = Q_C(s, a) − E_{a'~π_old}Q_C(s, a') on K fresh draws from π_old per rollout state.
        old_dist = policy_net.apply(params.policy, obs)
        particles = gaussian.sample(old_dist, particle_key, c.num_particles)  # [N, K, A]
        particle_log_prob = gaussian.log_prob(old_dist, particles)  # [N, K]
        q_particles = q_c(critic.params, obs, particles)  # [N, K]
        expected_q = jnp.mean(q_particles, axis=1)  # [N] E_{π_old}Q_C(s, ·)
        cost_adv = q_particles - expected_q[:, None]  # [N, K]

        # Line 12 with the current λ, then line 14. Â_R is centred (not scaled: λ′ weighs it in its own
        # units): the executed actions are the filter's choice, not draws of π_old, so a common offset of Â_R
        # would not average out in E[∇log π·Â_R]; it would pull π towards or away from whatever the filter
        # picked according to the sign of the value fit's error.
        lam_prime = state.lam / (1.0 - gamma)
        reward_adv = flat(reward_adv) - jnp.mean(reward_adv)
        batch = CSCPolicyBatch(obs=obs, action=action, old_log_prob=old_log_prob, reward_advantage=reward_adv,
                               particles=jax.lax.stop_gradient(particles),
                               particle_log_prob=jax.lax.stop_gradient(particle_log_prob),
                               cost_advantage=jax.lax.stop_gradient(cost_adv))
        step = policy_step(policy_net.apply, params.policy, batch, lam_prime, policy_settings)
        policy_params, policy_metrics = step.params, step.metrics
        policy_cost_value = jnp.mean(expected_q)  # V̂_C^{π_old} for λ (module doc)
        lam = lambda_update(state.lam, policy_metrics["csc/cost_advantage_new"], chi, policy_cost_value, gamma,
                            c.lambda_lr)

        new_state = state.replace(
            params=CSCParams(policy=policy_params, reward_value=value_fit.params, safety_critic=critic.params),
            target_safety_critic=critic.target, critic_opt_state=critic.opt_state,
            value_opt_state=value_fit.opt_state, lam=lam, failures_per_episode=failures_per_episode,
            failed_episodes=failed_episodes, num_updates=state.num_updates + 1)
        metrics = {
            **policy_metrics,
            "csc/lambda": lam,
            "csc/chi": chi,
            "csc/cost_value": cost_value,  # V̂_C of the observed (filtered) episodes, sets ε
            "csc/q_c": policy_cost_value,  # E_{π_old}Q_C at the rollout states: V̂_C^{π_old} of the λ step
            "csc/next_rejection_threshold": rejection_threshold(chi, cost_value, gamma),
            "csc/cql_penalty": critic.aux["penalty"],
            "csc/critic_bellman_loss": critic.aux["bellman"],
            "csc/critic_target": critic.aux["target"],
            "csc/failures_per_episode": failures_per_episode,
            "csc/failed_episodes": failed_episodes,
            "value/reward_loss": value_fit.losses,
            "value/reward_return": jnp.mean(reward_returns),
            "policy/entropy": jnp.mean(gaussian.entropy(policy_net.apply(policy_params, obs))),
        }
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return OnPolicyLearner(init=init, act=act, explore=explore, update=update)
