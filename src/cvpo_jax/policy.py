"""Multivariate Gaussian policy distribution: log-density, reparameterised sampling, entropy and the KL terms.

A `Gaussian` is parameterised by its mean and the lower Cholesky factor L of its covariance (Σ = L Lᵀ), so
every density, KL and entropy below is computed with triangular solves against L and the log-diagonal of L:
no matrix is ever inverted or has its determinant taken.

Shape legend: S = batch shape of the distribution (usually [B] states), P = particle shape (usually [K]),
A = action size.

The decoupled KL terms follow MPO (Abdolmaleki et al. 2018) as used by CVPO, Appendix B.1 eq. (78):
for old = N(μ_old, Σ_old) and new = N(μ, Σ),

    C_μ = KL(N(μ_old, Σ_old) ‖ N(μ, Σ_old))     = ½ (μ − μ_old)ᵀ Σ_old⁻¹ (μ − μ_old)
    C_Σ = KL(N(μ_old, Σ_old) ‖ N(μ_old, Σ))     = ½ [tr(Σ⁻¹ Σ_old) − n + ln(|Σ| / |Σ_old|)]

C_μ depends only on the new *mean*, C_Σ only on the new *covariance*. Their sum equals the full
KL(old ‖ new) = C_Σ + ½ (μ − μ_old)ᵀ Σ⁻¹ (μ − μ_old) exactly when μ = μ_old or Σ = Σ_old; otherwise the
mean term of the full KL is weighted by the new Σ⁻¹, not Σ_old⁻¹ (eq. (78) is exact only to that order).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_LOG_2PI = math.log(2.0 * math.pi)


class Gaussian(NamedTuple):
    """A batch of multivariate normal distributions N(mean, scale_tril · scale_trilᵀ)."""

    mean: jax.Array  # [*S, A]
    scale_tril: jax.Array  # [*S, A, A], lower triangular with a positive diagonal


def _solve_lower(tril: jax.Array, vec: jax.Array) -> jax.Array:
    """tril⁻¹ · vec by forward substitution, broadcasting leading axes. # [..., A, A], [..., A] -> [..., A]

    Written out with elementwise ops (a static loop over the A action dimensions, not over data) rather
    than `jax.scipy.linalg.solve_triangular`: on CPU that lowers to OpenBLAS `trsm` custom calls, and two of
    them on large right-hand sides (e.g. [4, 3, 30000], or B·K = 3000·64 particles) scheduled concurrently
    by XLA deadlock inside multithreaded OpenBLAS (jaxlib 0.10.2, OpenBLAS 0.3.30; OPENBLAS_NUM_THREADS=1
    avoids it). For the tiny A of these tasks the substitution also fuses into the surrounding kernel.
    """
    size = vec.shape[-1]
    solution = []
    for i in range(size):
        acc = vec[..., i]
        for j in range(i):
            acc = acc - tril[..., i, j] * solution[j]
        solution.append(acc / tril[..., i, i])
    return jnp.stack(solution, axis=-1)


def _half_log_det(scale_tril: jax.Array) -> jax.Array:
    """½ ln|Σ| = Σ_i ln|L_ii|. # [*S, A, A] -> [*S]"""
    return jnp.sum(jnp.log(jnp.abs(jnp.diagonal(scale_tril, axis1=-2, axis2=-1))), axis=-1)


def log_prob(dist: Gaussian, actions: jax.Array) -> jax.Array:
    """Log-density of `actions` under `dist`.

    Broadcasting: the distribution's batch shape S must broadcast against the *leading* axes of `actions`,
    and any further axes of `actions` before the last are particle axes, each evaluated under the same
    distribution. E.g. dist over B states (mean [B, A], scale_tril [B, A, A]) with particles [B, K, A] gives
    log-probs [B, K]; with actions [B, A] it gives [B]; an unbatched dist (mean [A]) with actions [N, A]
    gives [N]. (Particle axes trail the batch axes, unlike torch's sample_shape-first convention.)

    Args:
      dist: mean [*S, A], scale_tril [*S, A, A].
      actions: [*S, *P, A].

    Returns:
      log N(actions | mean, Σ), [*S, *P].
    """
    num_batch = dist.mean.ndim - 1
    particle_axes = tuple(range(num_batch, actions.ndim - 1))  # where *P sits in [*S, *P, A]
    # Singleton particle axes let each state's distribution broadcast over all of its particles.
    mean = jnp.expand_dims(dist.mean, particle_axes)  # [*S, 1.., A]
    scale_tril = jnp.expand_dims(dist.scale_tril, particle_axes)  # [*S, 1.., A, A]
    z = _solve_lower(scale_tril, actions - mean)  # L⁻¹ (a − μ), [*S, *P, A]
    half_log_det = jnp.expand_dims(_half_log_det(dist.scale_tril), particle_axes)  # ½ ln|Σ|, [*S, 1..]
    action_size = dist.mean.shape[-1]
    return -0.5 * jnp.sum(jnp.square(z), axis=-1) - half_log_det - 0.5 * action_size * _LOG_2PI


def sample(dist: Gaussian, key: jax.Array, num_samples: int) -> jax.Array:
    """Reparameterised samples a = μ + L ξ, ξ ~ N(0, I): gradients flow to mean and scale_tril.

    Args:
      dist: mean [*S, A], scale_tril [*S, A, A].
      key: PRNG key.
      num_samples: K, a static Python int.

    Returns:
      [*S, K, A] samples (the particle axis follows the batch axes, as `log_prob` expects).
    """
    batch = jnp.broadcast_shapes(dist.mean.shape[:-1], dist.scale_tril.shape[:-2])
    action_size = dist.mean.shape[-1]
    noise = jax.random.normal(key, batch + (num_samples, action_size), dtype=dist.mean.dtype)  # [*S, K, A]
    return dist.mean[..., None, :] + jnp.einsum("...ij,...kj->...ki", dist.scale_tril, noise)


def action_in_box(dist: Gaussian, key: jax.Array, deterministic: bool) -> jax.Array:
    """What a Gaussian policy executes: its mean (evaluation) or one draw, clipped to the action box [-1, 1].

    dist: mean [N, A], scale_tril [N, A, A]. Returns [N, A].
    """
    action = dist.mean if deterministic else sample(dist, key, 1)[:, 0]
    return jnp.clip(action, -1.0, 1.0)


def entropy(dist: Gaussian) -> jax.Array:
    """Differential entropy ½ n (1 + ln 2π) + ½ ln|Σ|. # [*S]"""
    action_size = dist.mean.shape[-1]
    return 0.5 * action_size * (1.0 + _LOG_2PI) + _half_log_det(dist.scale_tril)


def kl_mean(old: Gaussian, new: Gaussian) -> jax.Array:
    """C_μ = ½ (μ − μ_old)ᵀ Σ_old⁻¹ (μ − μ_old) = KL(N(μ_old, Σ_old) ‖ N(μ, Σ_old)), eq. (78).

    Uses the *old* covariance (as ORIG and MPO do), so it depends on `new` only through its mean and a
    gradient through it never reaches the covariance head. `new.scale_tril` is ignored.

    Returns: [*S].
    """
    z = _solve_lower(old.scale_tril, new.mean - old.mean)  # L_old⁻¹ (μ − μ_old), [*S, A]
    return 0.5 * jnp.sum(jnp.square(z), axis=-1)


def kl_covariance(old: Gaussian, new: Gaussian) -> jax.Array:
    """C_Σ = ½ [tr(Σ⁻¹ Σ_old) − n + ln(|Σ| / |Σ_old|)] = KL(N(μ_old, Σ_old) ‖ N(μ_old, Σ)), eq. (78).

    Σ = new covariance, Σ_old = old covariance; depends on `new` only through its scale_tril (`new.mean`
    is ignored). tr(Σ⁻¹ Σ_old) = ‖L⁻¹ L_old‖²_F with one triangular solve.

    Returns: [*S].
    """
    action_size = old.mean.shape[-1]
    # Rows of the result are L⁻¹ applied to the columns of L_old: (L⁻¹ L_old)ᵀ, same Frobenius norm.
    ratio = _solve_lower(new.scale_tril[..., None, :, :], jnp.swapaxes(old.scale_tril, -1, -2))  # [*S, A, A]
    trace = jnp.sum(jnp.square(ratio), axis=(-2, -1))  # [*S]
    log_det_ratio = 2.0 * (_half_log_det(new.scale_tril) - _half_log_det(old.scale_tril))  # ln |Σ|/|Σ_old|
    return 0.5 * (trace - action_size + log_det_ratio)


def kl(old: Gaussian, new: Gaussian) -> jax.Array:
    """Full KL(old ‖ new) = C_Σ + ½ (μ − μ_old)ᵀ Σ⁻¹ (μ − μ_old), with Σ the *new* covariance. # [*S]"""
    z = _solve_lower(new.scale_tril, new.mean - old.mean)  # L⁻¹ (μ − μ_old), [*S, A]
    return kl_covariance(old, new) + 0.5 * jnp.sum(jnp.square(z), axis=-1)
