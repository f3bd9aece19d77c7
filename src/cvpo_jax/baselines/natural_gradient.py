"""The natural-gradient core of TRPO, CPO and CSC on flat parameter vectors.

Parameters are flattened with `jax.flatten_util.ravel_pytree`, so every function here sees one vector [P]:
the Fisher matrix F is never formed, only its products with vectors (a Hessian-vector product of the mean
KL), and F⁻¹g comes from a fixed number of conjugate-gradient iterations. All loops are `lax` loops, so the
functions jit and vmap over sweep members.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


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
