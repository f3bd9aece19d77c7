"""CVPO M-step: KL-regularised weighted maximum likelihood with decoupled mean/covariance trust regions.

Appendix B.1 of the paper, eqs. (78)-(83). Given the E-step's non-parametric distribution q*(a_k | s_b)
(particles a_bk drawn from the old policy with weights q_bk, Σ_k q_bk = 1), the policy θ maximises

    L(θ, α_μ, α_Σ) = E_b Σ_k q_bk [log N(a_bk | μθ(s_b), Σ_old) + log N(a_bk | μ_old, Σθ(s_b))]
                     + α_μ (ε_μ − C_μ) + α_Σ (ε_Σ − C_Σ)                                    (79)

by gradient descent-ascent (80): the multipliers take a gradient step on their own dual loss
α·(ε − C) (81-82), the policy a gradient step on −L with the multipliers held fixed (83). The
log-likelihood is split as in MPO: the mean is fitted with the old covariance and the covariance with the
old mean, so each KL term limits exactly the head it constrains.

`stop_gradient` placement (as in acme's MPO loss): in `mstep_loss` the multipliers are constants, so the
policy sees only the penalty; in `update_duals` the KL values are constants, so the multipliers see only
their dual loss and no gradient can reach the policy through them. The old policy, particles and weights
are constants everywhere.

Shape legend: B states, K particles per state, A action size, O observation size, M M-step iterations.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cvpo_jax import policy
from cvpo_jax.core.gradients import gradient_step
from cvpo_jax.policy import Gaussian

# apply_policy(policy_params, obs [B, O]) -> Gaussian(mean [B, A], scale_tril [B, A, A]); e.g.
# `networks.policy.apply` with the flax variable dict as policy_params.
ApplyPolicy = Callable[[object, jax.Array], Gaussian]


class MStepDuals(NamedTuple):
    """Persistent M-step Lagrange multipliers (eq. (79)'s β_μ, β_Σ); they carry over between updates."""

    alpha_mean: jax.Array  # [] α_μ ≥ 0, multiplier of C_μ ≤ ε_μ
    alpha_cov: jax.Array  # [] α_Σ ≥ 0, multiplier of C_Σ ≤ ε_Σ


def init_mstep_duals() -> MStepDuals:
    """ORIG starts both multipliers at 0.0."""
    return MStepDuals(alpha_mean=jnp.zeros((), jnp.float32), alpha_cov=jnp.zeros((), jnp.float32))


def mstep_loss(
    policy_params,
    apply_policy: ApplyPolicy,
    obs: jax.Array,
    particles: jax.Array,
    weights: jax.Array,
    old: Gaussian,
    duals: MStepDuals,
    *,
    kl_mean_bound: float,
    kl_cov_bound: float,
    average_over_particles: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The policy's M-step loss: −(79) with the multipliers held constant.

        loss = − mean_b Σ_k q_bk [log N(a_bk | μθ(s_b), Σ_old(s_b)) + log N(a_bk | μ_old(s_b), Σθ(s_b))]
               + α_μ (C_μ − ε_μ) + α_Σ (C_Σ − ε_Σ),

    C_μ = mean_b kl_mean(old_b, θ_b) and C_Σ = mean_b kl_covariance(old_b, θ_b) (eq. (78)).

    Args:
      policy_params: parameters θ of the current policy.
      apply_policy: θ, obs [B, O] -> Gaussian over B states.
      obs: [B, O] replay states.
      particles: [B, K, A] actions sampled from the old policy (the E-step's support).
      weights: [B, K] E-step weights q*(a_bk | s_b), each row summing to 1 (not renormalised here).
      old: Gaussian(mean [B, A], scale_tril [B, A, A]) of the old (target) policy at `obs`.
      duals: current multipliers; used as constants (zero gradient).
      kl_mean_bound, kl_cov_bound: ε_μ, ε_Σ.
      average_over_particles: False (default) takes the expectation under q (Σ_k q_bk ·), as eq. (79)
        writes it. True divides the likelihood term by K, reproducing ORIG's `torch.mean` over (K, B):
        the same optimum for the ML term, but K times more weight on the KL penalties relative to it.

    Returns:
      (loss [], aux) with aux: "ml_loss" (the negative weighted log-likelihood term, as scaled in the loss),
      "kl_mean" (C_μ), "kl_cov" (C_Σ), "entropy" (mean entropy of πθ), "loss".
    """
    # Constants of this M-step: what the old policy proposed and how the E-step weighted it.
    old = jax.tree.map(jax.lax.stop_gradient, old)
    particles = jax.lax.stop_gradient(particles)  # [B, K, A]
    weights = jax.lax.stop_gradient(weights)  # [B, K]
    # The policy sees the multipliers only as fixed penalty coefficients (eq. (83)); they are trained by
    # their own dual loss in `update_duals` (eqs. (81)-(82)).
    alpha_mean = jax.lax.stop_gradient(duals.alpha_mean)
    alpha_cov = jax.lax.stop_gradient(duals.alpha_cov)

    new = apply_policy(policy_params, obs)  # mean [B, A], scale_tril [B, A, A]

    # Decoupled likelihood (MPO): the mean head is fitted under the old covariance, the covariance head
    # around the old mean, so neither can exploit the other to raise the likelihood.
    log_p_mean = policy.log_prob(Gaussian(new.mean, old.scale_tril), particles)  # [B, K]
    log_p_cov = policy.log_prob(Gaussian(old.mean, new.scale_tril), particles)  # [B, K]
    weighted_log_p = jnp.sum(weights * (log_p_mean + log_p_cov), axis=-1)  # [B]
    if average_over_particles:
        weighted_log_p = weighted_log_p / particles.shape[-2]
    ml_loss = -jnp.mean(weighted_log_p)  # []

    c_mean = jnp.mean(policy.kl_mean(old, new))  # [] C_μ, eq. (78), averaged over states
    c_cov = jnp.mean(policy.kl_covariance(old, new))  # [] C_Σ
    loss = ml_loss + alpha_mean * (c_mean - kl_mean_bound) + alpha_cov * (c_cov - kl_cov_bound)
    aux = {
        "loss": loss,
        "ml_loss": ml_loss,
        "kl_mean": c_mean,
        "kl_cov": c_cov,
        "entropy": jnp.mean(policy.entropy(new)),
    }
    return loss, aux


def mstep_dual_loss(
    duals: MStepDuals,
    kl_mean: jax.Array,
    kl_cov: jax.Array,
    *,
    kl_mean_bound: float,
    kl_cov_bound: float,
) -> jax.Array:
    """The multipliers' own loss α_μ (ε_μ − C_μ) + α_Σ (ε_Σ − C_Σ), KLs held constant. # []

    Its gradient in α is (ε − C): descending it raises α while the KL exceeds its bound (eqs. (81)-(82)).
    The stop_gradient on the KLs means no gradient reaches the policy through the dual update.
    """
    kl_mean = jax.lax.stop_gradient(kl_mean)
    kl_cov = jax.lax.stop_gradient(kl_cov)
    return duals.alpha_mean * (kl_mean_bound - kl_mean) + duals.alpha_cov * (kl_cov_bound - kl_cov)


def update_duals(
    duals: MStepDuals,
    kl_mean: jax.Array,
    kl_cov: jax.Array,
    *,
    kl_mean_bound: float,
    kl_cov_bound: float,
    lr_mean: float = 1.0,
    lr_cov: float = 100.0,
    max_mean: float = 0.1,
    max_cov: float = 10.0,
) -> MStepDuals:
    """One projected gradient step on `mstep_dual_loss`, eqs. (81)-(82):

        α_μ ← clip(α_μ − lr_μ (ε_μ − C_μ), 0, max_mean),   α_Σ ← clip(α_Σ − lr_Σ (ε_Σ − C_Σ), 0, max_cov).

    Defaults: Table 1 learning rates (1, 100) and ORIG's clip ranges [0, 0.1], [0, 10].

    Args:
      kl_mean, kl_cov: [] C_μ, C_Σ of the current policy (treated as constants).
    """
    grads = jax.grad(
        functools.partial(mstep_dual_loss, kl_mean_bound=kl_mean_bound, kl_cov_bound=kl_cov_bound)
    )(duals, kl_mean, kl_cov)  # = (ε_μ − C_μ, ε_Σ − C_Σ)
    return MStepDuals(
        alpha_mean=jnp.clip(duals.alpha_mean - lr_mean * grads.alpha_mean, 0.0, max_mean),
        alpha_cov=jnp.clip(duals.alpha_cov - lr_cov * grads.alpha_cov, 0.0, max_cov),
    )


def _policy_kl_terms(policy_params, apply_policy: ApplyPolicy, obs: jax.Array, old: Gaussian):
    """(C_μ, C_Σ) of the policy at `policy_params` against `old`, averaged over states. # [], []"""
    new = apply_policy(policy_params, obs)
    return jnp.mean(policy.kl_mean(old, new)), jnp.mean(policy.kl_covariance(old, new))


class MStepSettings(NamedTuple):
    """The M-step's settings (paper Table 1 and ORIG; `from_config` reads them from `cvpo.*`)."""

    kl_mean_bound: float  # ε_μ
    kl_cov_bound: float  # ε_Σ
    lr_mean: float = 1.0  # learning rate of α_μ (eq. 81)
    lr_cov: float = 100.0  # learning rate of α_Σ (eq. 82)
    max_mean: float = 0.1  # upper clip of α_μ (ORIG)
    max_cov: float = 10.0  # upper clip of α_Σ (ORIG)
    max_grad_norm: float | None = 0.01  # torch-style global-norm clip of the policy gradient; None: none
    average_over_particles: bool = False  # see `mstep_loss`

    @classmethod
    def from_config(cls, c) -> "MStepSettings":
        """From a `config.CVPOConfig`."""
        return cls(kl_mean_bound=c.kl_mean_bound, kl_cov_bound=c.kl_cov_bound, lr_mean=c.dual_lr_mean,
                   lr_cov=c.dual_lr_cov, max_mean=c.dual_max_mean, max_cov=c.dual_max_cov,
                   max_grad_norm=c.actor_grad_clip, average_over_particles=c.mstep_mean_over_particles)


class MStepTargets(NamedTuple):
    """What the E-step hands the M-step: q*(a | s) on particles, and the old policy they came from."""

    obs: jax.Array  # [B, O] replay states
    particles: jax.Array  # [B, K, A] actions drawn from the old policy
    weights: jax.Array  # [B, K] q*(a_bk | s_b), rows summing to 1
    old: Gaussian  # the old (target) policy at obs: mean [B, A], scale_tril [B, A, A]


def mstep_update(
    policy_params,
    opt_state: optax.OptState,
    duals: MStepDuals,
    optimizer: optax.GradientTransformation,
    apply_policy: ApplyPolicy,
    targets: MStepTargets,
    settings: MStepSettings,
    num_steps: int,
) -> tuple[object, optax.OptState, MStepDuals, dict[str, jax.Array]]:
    """M iterations of gradient descent-ascent on eq. (79) with a `lax.scan` (num_steps static).

    Each iteration, in ORIG's order: (1) the multipliers step on the KL of the current θ (eqs. (81)-(82));
    (2) the policy takes one optimizer step on `mstep_loss` with the updated multipliers (eq. (83)),
    its gradient first clipped to global norm `settings.max_grad_norm` (ORIG: 0.01; None disables the clip,
    torch's clip_grad_norm_ rule). `optimizer` is the actor's optax optimizer (ORIG: Adam at the actor lr).

    In practice the multipliers' caps (0.1, 10) cannot hold ε_μ = 1e-3 by themselves: at the optimum of
    ML + α_μ C_μ the mean still moves most of the way to the weighted particles. What keeps each update
    small is the few Adam steps at a small learning rate (Adam moves every parameter by about lr per step,
    whatever the clipped gradient's norm); `metrics["kl_mean_rel"]` shows how far past the bound it went.

    Args:
      policy_params, opt_state: policy θ and its optimizer state.
      duals: multipliers carried over from the previous update.
      targets: the E-step's particles, weights and old policy (see `MStepTargets`, `mstep_loss`).
      settings: bounds, multiplier steps and clips (see `MStepSettings`, `update_duals`).
      num_steps: M (static).

    Returns:
      (policy_params, opt_state, duals, metrics). metrics are scalars from the last iteration
      ("loss", "ml_loss", "kl_mean", "kl_cov" measured before its step, "entropy", "grad_norm" before
      clipping, "alpha_mean", "alpha_cov"), plus "kl_mean_final"/"kl_cov_final" of the returned policy
      and their ratios to the bounds "kl_mean_rel"/"kl_cov_rel" (1 = on the bound).
    """
    obs, old = targets.obs, targets.old
    loss_fn = functools.partial(
        mstep_loss,
        apply_policy=apply_policy,
        obs=obs,
        particles=targets.particles,
        weights=targets.weights,
        old=old,
        kl_mean_bound=settings.kl_mean_bound,
        kl_cov_bound=settings.kl_cov_bound,
        average_over_particles=settings.average_over_particles,
    )

    def step(carry, _):
        params, opt_state, duals = carry
        # (81)-(82): the multipliers react to the trust-region violation of the current θ. (This forward
        # pass is the same computation as the one inside the loss below; XLA shares it.)
        c_mean, c_cov = _policy_kl_terms(params, apply_policy, obs, old)
        duals = update_duals(
            duals, c_mean, c_cov,
            kl_mean_bound=settings.kl_mean_bound, kl_cov_bound=settings.kl_cov_bound,
            lr_mean=settings.lr_mean, lr_cov=settings.lr_cov, max_mean=settings.max_mean, max_cov=settings.max_cov,
        )
        # (83): one policy step on the penalised weighted maximum likelihood.
        fit = gradient_step(loss_fn, params, opt_state, optimizer, has_aux=True,
                            max_grad_norm=settings.max_grad_norm, duals=duals)
        metrics = dict(fit.aux, grad_norm=fit.grad_norm, alpha_mean=duals.alpha_mean, alpha_cov=duals.alpha_cov)
        return (fit.params, fit.opt_state, duals), metrics

    (policy_params, opt_state, duals), history = jax.lax.scan(
        step, (policy_params, opt_state, duals), None, length=num_steps
    )  # history: dict of [M]
    metrics = jax.tree.map(lambda x: x[-1], history)
    final_mean, final_cov = _policy_kl_terms(policy_params, apply_policy, obs, jax.lax.stop_gradient(old))
    metrics.update(
        kl_mean_final=final_mean,
        kl_cov_final=final_cov,
        kl_mean_rel=final_mean / settings.kl_mean_bound,
        kl_cov_rel=final_cov / settings.kl_cov_bound,
    )
    return policy_params, opt_state, duals, metrics
