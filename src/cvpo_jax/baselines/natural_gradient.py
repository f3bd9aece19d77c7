"""The natural-gradient core of TRPO, CPO and CSC on flat parameter vectors.

Parameters are flattened with `jax.flatten_util.ravel_pytree`, so every function here sees one vector [P]:
the Fisher matrix F is never formed, only its products with vectors (a Hessian-vector product of the mean
KL), and F⁻¹g comes from a fixed number of conjugate-gradient iterations. All loops are `lax` loops, so the
functions jit and vmap over sweep members.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

_EPS = 1e-8


def conjugate_gradient(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, iterations: int,
                       residual_tol: float = 1e-10) -> jax.Array:
    """Approximately solve A x = b for a symmetric positive-definite A given only x ↦ A x.

    Args:
      matvec: v [P] -> A v [P].
      b: right-hand side [P].
      iterations: maximum number of CG iterations (exact after P in exact arithmetic).
      residual_tol: stop once the squared residual ‖b − A x‖² falls below this; also guards the
        divisions, which would be 0/0 once the residual vanishes.

    Returns:
      x [P], starting from x = 0.
    """
    def cond(carry):
        i, _, _, _, r_dot_r = carry
        return (i < iterations) & (r_dot_r > residual_tol)

    def body(carry):
        i, x, r, p, r_dot_r = carry
        a_p = matvec(p)
        alpha = r_dot_r / (jnp.dot(p, a_p) + 1e-30)  # +tiny: a direction with p·Ap = 0 steps nowhere, not NaN
        x = x + alpha * p
        r = r - alpha * a_p
        new_r_dot_r = jnp.dot(r, r)
        p = r + (new_r_dot_r / r_dot_r) * p
        return i + 1, x, r, p, new_r_dot_r

    x0 = jnp.zeros_like(b)
    carry = (jnp.int32(0), x0, b, b, jnp.dot(b, b))
    _, x, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return x


def fisher_vector_product(kl_of_flat_params: Callable[[jax.Array], jax.Array], flat_params: jax.Array,
                          damping: float) -> Callable[[jax.Array], jax.Array]:
    """v ↦ (H + damping·I) v with H the Hessian of the mean KL at `flat_params`.

    At the old parameters the KL(old ‖ new) and its gradient vanish and its Hessian is the Fisher matrix of
    the policy, so this is the Fisher-vector product TRPO needs; the damping keeps CG well conditioned when
    the batch Fisher matrix is near singular.

    Args:
      kl_of_flat_params: new flat params [P] -> mean KL(old ‖ new) []; the *old* distribution must be a
        constant inside it (computed beforehand or behind `stop_gradient`), otherwise the Hessian changes.
      flat_params: the old parameters [P], where the Hessian is taken.
      damping: added multiple of the identity.

    Returns:
      matvec: v [P] -> F v + damping·v [P]. The gradient is linearised once, so each product is one
      forward-over-reverse pass.
    """
    _, hvp = jax.linearize(jax.grad(kl_of_flat_params), flat_params)

    def matvec(v: jax.Array) -> jax.Array:
        return hvp(v) + damping * v

    return matvec


def backtracking_line_search(flat_params: jax.Array, full_step: jax.Array,
                             accept: Callable[[jax.Array], jax.Array], steps: int,
                             coeff: float) -> tuple[jax.Array, jax.Array]:
    """First acceptable point of params + coeff^j · full_step, j = 0 .. steps − 1.

    Args:
      flat_params: current parameters [P].
      full_step: the proposed step [P].
      accept: candidate params [P] -> bool []; e.g. "KL within the trust region and the surrogate improved".
      steps: number of candidates tried (a static int).
      coeff: shrink factor in (0, 1).

    Returns:
      (new params [P], j int32 []): the first accepted candidate and its index, or the old parameters and
      j = −1 when none is accepted. A `while_loop` stops at the first acceptance (under vmap it runs until
      every member has stopped, keeping each member's own result).
    """
    def cond(carry):
        j, found = carry
        return (j < steps) & (found < 0)

    def body(carry):
        j, found = carry
        ok = accept(flat_params + coeff ** j.astype(full_step.dtype) * full_step)
        return j + 1, jnp.where(ok, j, found)

    _, found = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.int32(-1)))
    accepted = flat_params + coeff ** jnp.maximum(found, 0).astype(full_step.dtype) * full_step
    # A select rather than a zero scale, so a rejected non-finite step cannot leak NaN into the params.
    return jnp.where(found >= 0, accepted, flat_params), found


# ----------------------------------------------------------------------------------------------------------
# The trust-region policy step shared by TRPO, TRPO-Lag (on_policy.py) and CSC (csc.py).


class PolicyStepSettings(NamedTuple):
    """The policy-step settings of `cfg.onpolicy` (static Python numbers, the same for every member)."""

    target_kl: float  # δ: trust region of the natural-gradient steps; PPO stops its epochs past 1.5·δ
    entropy_coef: float  # weight of the mean entropy added to every surrogate
    cg_iterations: int  # conjugate-gradient iterations for F⁻¹g
    cg_damping: float  # multiple of the identity added to the Fisher matrix
    line_search_steps: int  # backtracking candidates j = 0 .. line_search_steps − 1
    backtrack_coeff: float  # candidate j is old + backtrack_coeff^j · full step
    ppo_epochs: int  # PPO: shuffled passes over the N samples
    num_minibatches: int  # PPO: minibatches per pass
    ppo_clip: float  # PPO: ratio clip ε

    @classmethod
    def from_config(cls, onpolicy) -> "PolicyStepSettings":
        """From `cfg.onpolicy` (`config.OnPolicyConfig`)."""
        return cls(target_kl=float(onpolicy.target_kl), entropy_coef=float(onpolicy.entropy_coef),
                   cg_iterations=int(onpolicy.cg_iterations), cg_damping=float(onpolicy.cg_damping),
                   line_search_steps=int(onpolicy.line_search_steps),
                   backtrack_coeff=float(onpolicy.backtrack_coeff), ppo_epochs=int(onpolicy.ppo_epochs),
                   num_minibatches=int(onpolicy.num_minibatches), ppo_clip=float(onpolicy.ppo_clip))


class NaturalGradient(NamedTuple):
    """What every natural-gradient step starts from (traced values; `fvp` is a function, so not jit output)."""

    value: jax.Array  # [] the surrogate at the old parameters
    aux: Any  # its auxiliary output (None unless has_aux)
    gradient: jax.Array  # g [P]
    direction: jax.Array  # v ≈ (F + damping·I)⁻¹g [P], by `cg_iterations` of conjugate gradient
    curvature: jax.Array  # [] vᵀ(F + damping·I)v through the approximate solution (≈ gᵀF⁻¹g), as the
    #                       reference codes compute it
    fvp: Callable  # u [P] -> (F + damping·I)u [P], F the Hessian of the mean KL at the old parameters


def natural_gradient(surrogate: Callable, kl: Callable, flat_params: jax.Array, settings: PolicyStepSettings,
                     has_aux: bool = False) -> NaturalGradient:
    """g = ∇surrogate and v ≈ (F + damping·I)⁻¹g at the old parameters `flat_params` [P].

    Args:
      surrogate: flat params [P] -> [] (or ([], aux) when has_aux), the objective to ascend.
      kl: flat params [P] -> [] mean KL(old ‖ new), with the old distribution held constant.
      flat_params: [P] the old parameters.
      settings: cg_damping, cg_iterations.
    """
    if has_aux:
        (value, aux), gradient = jax.value_and_grad(surrogate, has_aux=True)(flat_params)
    else:
        (value, gradient), aux = jax.value_and_grad(surrogate)(flat_params), None
    fvp = fisher_vector_product(kl, flat_params, settings.cg_damping)
    direction = conjugate_gradient(fvp, gradient, settings.cg_iterations)  # F⁻¹g
    return NaturalGradient(value=value, aux=aux, gradient=gradient, direction=direction,
                           curvature=jnp.dot(direction, fvp(direction)), fvp=fvp)


class NaturalGradientStep(NamedTuple):
    params: jax.Array  # [P] after the line search (the old parameters when every candidate was rejected)
    full_step: jax.Array  # [P] √(2δ / vᵀ(F + damping·I)v)·v, the first candidate
    step_index: jax.Array  # int32 [] the accepted candidate j, −1 when none was
    value_old: jax.Array  # [] surrogate at the old parameters
    value_new: jax.Array  # [] surrogate at `params`
    aux_old: Any  # the surrogate's aux at the old parameters (None unless has_aux)
    aux_new: Any  # and at `params`
    kl: jax.Array  # [] mean KL(old ‖ new) at `params`


def natural_gradient_step(surrogate: Callable, kl: Callable, flat_params: jax.Array,
                          settings: PolicyStepSettings, has_aux: bool = False) -> NaturalGradientStep:
    """TRPO's step: v = F⁻¹g scaled so the quadratic model of the KL is δ, ½ xᵀFx = δ, then backtracking.

    The candidates old + backtrack_coeff^j · x, j = 0 .. line_search_steps − 1, are tried in order and the
    first with a finite mean KL ≤ δ and a surrogate above its old value is taken (none: the old parameters).
    Used by TRPO / TRPO-Lag (`trpo_policy_step`) and CSC's policy step.

    Args:
      surrogate: flat params [P] -> [] (or ([], aux) when has_aux), the objective to ascend.
      kl: flat params [P] -> [] mean KL(old ‖ new), with the old distribution held constant.
      flat_params: [P] the old parameters.
      settings: target_kl (δ), cg_damping, cg_iterations, line_search_steps, backtrack_coeff.

    Returns:
      NaturalGradientStep.
    """
    start = natural_gradient(surrogate, kl, flat_params, settings, has_aux)
    delta = settings.target_kl
    # Scale the direction so the quadratic model of the KL equals δ: ½ xᵀFx = δ.
    full_step = jnp.sqrt(2.0 * delta / (start.curvature + _EPS)) * start.direction

    def value_of(candidate):
        return surrogate(candidate)[0] if has_aux else surrogate(candidate)

    def accept(candidate):
        candidate_kl = kl(candidate)
        return jnp.isfinite(candidate_kl) & (candidate_kl <= delta) & (value_of(candidate) > start.value)

    new_flat, step_index = backtracking_line_search(flat_params, full_step, accept, settings.line_search_steps,
                                                       settings.backtrack_coeff)
    value_new, aux_new = surrogate(new_flat) if has_aux else (surrogate(new_flat), None)
    return NaturalGradientStep(params=new_flat, full_step=full_step, step_index=step_index, value_old=start.value,
                               value_new=value_new, aux_old=start.aux, aux_new=aux_new, kl=kl(new_flat))


class TrustRegionStep(NamedTuple):
    params: Any  # policy params after the step
    full_step: jax.Array  # [P] the first line-search candidate minus the old flat params
    metrics: dict  # [] each
