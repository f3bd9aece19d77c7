"""CVPO E-step: the dual of the non-parametric variational problem and its solve.

Shape legend: B states in the replay batch, K particles (actions sampled from the old policy per state).

Given Q values of K particles per state, the E-step finds the variational distribution q*(a_k|s_b) that
maximises E_q[Q_r] subject to KL(q‖uniform over the particles) ≤ ε and E_q[Q_c] ≤ ε1.  Its closed form is
q* = softmax_k((Q_r − λ·Q_c)/η) with (η, λ) minimising the convex dual (paper eq. (9); batch form g of
Remark 4, one (η, λ) for the whole batch, so both constraints hold on average over the states):

    g(η, λ) = λ·ε1 + η·ε + η · mean_b [ logsumexp_k((Q_r − λ·Q_c)/η) − log K ],   η > 0, λ ≥ 0.

The per-state form ḡ (one (η_b, λ_b) per state) is the same problem with B = 1, solved for every state.

Solver design (see `solve_dual`):
- The problem is rescaled to be scale-free: per state, Q_r is shifted by its max and Q_c by its min (neither
  changes the weights; the Q_c shift moves ε1 by the batch mean of the shifts), and both are divided by
  their root-mean-square within-state standard deviation.  In these units the optimal temperature is
  O(1/sqrt(2ε)), the gradient of g is (ε − KL, ε1 − E_q[Q_c]) and so the tolerance is a tolerance on the
  constraint residuals whatever the scale of the critics.  (η, λ) are mapped back at the end.
- jaxopt's L-BFGS-B with the analytic gradient, whose two components come out of the same softmax pass as
  the value (no autodiff pass).  Under `jax.vmap` the L-BFGS-B runs go one after another (`lax.map`),
  which measured faster than jaxopt's lockstep batching (see `_lbfgsb`).
- Infeasibility (no q in the KL ball meets ε1, the dual is then unbounded below) is detected up front by
  solving the 1-D problem "minimum mean cost reachable in the KL ball" (a safeguarded Newton solve for one
  temperature).  An infeasible batch is solved with ε1 raised to that minimum plus a small margin, which
  keeps (η, λ) bounded and returns the reward-maximising distribution among those whose cost is within
  the margin of the minimum inside the KL ball.  (Detecting λ at a cap instead would need a huge cap, the
  thing that makes float32 L-BFGS-B fail, and cannot tell "infeasible" from "feasible with a large λ".)
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jaxopt

__all__ = [
    "DualSolution",
    "dual_function",
    "solve_dual",
]

Array = jax.Array

# Box for the scaled dual variables (units: within-state std of Q_r for η, ratio of the Q_r and Q_c stds for
# λ).  η_lo: at η̃ = 1e-3 the weights are one-hot to within exp(-1000) for O(1) gaps, so a smaller η only
# matters when ε is within a hair of its maximum log K.  λ_max: a safety cap.  λ̃* grows like
# 1/sqrt(margin) as the margin ε1 − (min reachable cost) shrinks, so only a feasible problem with a margin
# of roughly 1e-6 std(Q_c) or less reaches it; infeasible ones are relaxed (below) and ended at λ̃* ≈ 4-16
# in the problems tried.
_ETA_LO = 1e-3
_LAM_MAX = 1e3
# Slater margin, in units of the within-state std of Q_c: an infeasible problem's ε1 is raised to (min
# reachable cost + margin), so its relaxed dual has a bounded optimum.  The optimal λ grows like
# 1/sqrt(margin) and the dual's valley narrows with it: at 1e-3, the infeasible ones among per-state
# problems (B 300, K 32, float32; 11% of all) stalled at a projected gradient of ~2e-5 for 50 iterations;
# at 1e-2 all converge to 1e-5 in ≤ 24 iterations.
_SLATER_MARGIN = 1e-2
# 1-D minimum-cost solve: Newton iterations cap and the KL residual it stops at (relative to ε).
_MINCOST_MAX_ITER = 30
_MINCOST_RTOL = 1e-4


class DualSolution(NamedTuple):
    """Result of `solve_dual` (a pytree; under `jax.vmap` every field gets the leading axis).

    Shapes: batch form (per_state=False) / per-state form (per_state=True).
    """

    eta: Array  # [] / [B]   temperature η > 0, in the units of Q_r
    lam: Array  # [] / [B]   cost multiplier λ ≥ 0, in units of Q_r per unit of Q_c
    weights: Array  # [B, K]  q*(a_k|s_b) = softmax_k((Q_r − λ·Q_c)/η), recomputed from the given Q arrays
    dual_value: Array  # []  g(η, λ) with the given ε1 (per-state form: mean over states of ḡ_b)
    kl: Array  # []          mean over states of KL(q*(·|s_b) ‖ uniform over the K particles)
    expected_cost: Array  # []  mean over states of E_q*[Q_c], to compare with ε1
    iterations: Array  # [] / [B]  L-BFGS-B iterations used (≤ max_iter)
    converged: Array  # [] / [B]  projected-gradient residual ≤ tol at the end
    infeasible: Array  # [] / [B]  no q with KL ≤ ε reaches E_q[Q_c] ≤ ε1 (weights then ≈ minimise cost)


def dual_function(
    eta: Array | float,
    lam: Array | float,
    q_r: Array,
    q_c: Array,
    cost_threshold: Array | float,
    kl_bound: Array | float,
) -> Array:
    """The dual g(η, λ) of the E-step, in the units of the inputs (a plain evaluation, for checks).

    Args:
      eta, lam: scalars (batch form g) or [B] (per-state form: returns the mean over states of ḡ_b(η_b, λ_b)).
      q_r, q_c: [B, K] reward and cost Q values of K particles in each of B states.
      cost_threshold: ε1.  kl_bound: ε.
    Returns:
      [] the dual value.
    """
    q_r = jnp.asarray(q_r)
    q_c = jnp.asarray(q_c)
    eta = jnp.asarray(eta)
    lam = jnp.asarray(lam)
    log_k = math.log(q_r.shape[-1])
    x = q_r - lam[..., None] * q_c  # [B, K]
    x_max = jnp.max(x, axis=-1)  # [B]
    # η·logsumexp(x/η) = max x + η·log Σ exp((x − max x)/η): never exponentiates a positive number.
    lse = jnp.log(jnp.sum(jnp.exp((x - x_max[..., None]) / eta[..., None]), axis=-1))  # [B]
    per_state = lam * cost_threshold + eta * kl_bound + x_max + eta * (lse - log_k)  # [B]
    return jnp.mean(per_state)


class _Scaled(NamedTuple):
    """The problem in scale-free units (see module docstring)."""

    r: Array  # [B, K]  (Q_r − max_k Q_r) / s_r  ≤ 0
    c: Array  # [B, K]  (Q_c − min_k Q_c) / s_c  ≥ 0
    eps1: Array  # []   (ε1 − mean_b min_k Q_c) / s_c
    s_r: Array  # []
    s_c: Array  # []


def _rms_within_state_std(q: Array) -> Array:
    """[B, K] -> []: sqrt(mean_b Var_k q); 1 where it is zero (constant rows are all zeros once shifted)."""
    var = jnp.mean(jnp.var(q, axis=-1))
    std = jnp.sqrt(var)
    return jnp.where(std > 0, std, jnp.ones_like(std))


def _scale(q_r: Array, q_c: Array, cost_threshold: Array) -> _Scaled:
    s_r = _rms_within_state_std(q_r)
    s_c = _rms_within_state_std(q_c)
    c_min = jnp.min(q_c, axis=-1)  # [B]
    # Shifting by the per-state max/min (not the mean) makes constant rows exactly zero, free of rounding
    # noise, and keeps the largest exponent at 0 for λ = 0.
    r = (q_r - jnp.max(q_r, axis=-1, keepdims=True)) / s_r
    c = (q_c - c_min[:, None]) / s_c
    eps1 = (cost_threshold - jnp.mean(c_min)) / s_c
    return _Scaled(r=r, c=c, eps1=eps1, s_r=s_r, s_c=s_c)


class _Stats(NamedTuple):
    log_weights: Array  # [B, K]
    lse: Array  # [B]   log Σ_k exp((x − max x)/η) − log K, so η·(this) + max x = η·(LSE(x/η) − log K)
    x_max: Array  # [B]
    kl: Array  # [B]    KL(q_b ‖ uniform)
    cost: Array  # [B]  E_q[c]


def _stats(eta: Array, lam: Array, r: Array, c: Array) -> _Stats:
    """Softmax statistics for x = r − λ·c at temperature η; eta, lam broadcast against [B]."""
    log_k = math.log(r.shape[-1])
    x = r - jnp.asarray(lam)[..., None] * c  # [B, K]
    x_max = jnp.max(x, axis=-1, keepdims=True)  # [B, 1]
    z = (x - x_max) / jnp.asarray(eta)[..., None]  # [B, K] ≤ 0
    log_sum = jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True))  # [B, 1] in [0, log K]
    log_w = z - log_sum  # [B, K]
    w = jnp.exp(log_w)
    # KL(q‖u) = Σ q log q + log K; written with log_w (finite), so no 0·log 0.
    kl = jnp.sum(w * log_w, axis=-1) + log_k
    cost = jnp.sum(w * c, axis=-1)
    return _Stats(log_w, log_sum[:, 0] - log_k, x_max[:, 0], jnp.maximum(kl, 0.0), cost)


def _scaled_dual_and_grad(params: Array, r: Array, c: Array, eps1: Array, eps: Array):
    """g̃ and its gradient in scaled units; params [2] = (η̃, λ̃).

    ∂g/∂η = ε − mean KL and ∂g/∂λ = ε1 − mean E_q[c] (the constraint residuals), computed directly.
    The constant mean_b max_k r is left out of g̃ (it is added back in `solve_dual`).
    """
    eta, lam = params[0], params[1]
    st = _stats(eta, lam, r, c)
    value = lam * eps1 + eta * eps + jnp.mean(st.x_max) + eta * jnp.mean(st.lse)
    grad = jnp.stack([eps - jnp.mean(st.kl), eps1 - jnp.mean(st.cost)])
    return value, grad


def _min_cost_in_kl_ball(c: Array, eps: Array) -> Array:
    """Minimum of mean_b E_q[c_b] over q with mean_b KL(q_b‖uniform) ≤ ε (scaled units); [B, K] -> [].

    The minimiser is q_b ∝ exp(−c_b/τ) with one τ for the batch such that mean KL = ε (or τ → 0 if even the
    greedy q is within the ball).  KL is decreasing in τ, d KL / d log τ = −mean Var_q(c)/τ², so τ is found
    by Newton's method in log τ, safeguarded by bisection on a bracket [τ_lo, τ_hi] where τ_hi satisfies
    KL ≤ range²/(8τ²) ≤ ε (Hoeffding's lemma).
    """
    dtype = c.dtype
    c_range = jnp.max(jnp.max(c, axis=-1))  # c ≥ 0 with a 0 in every row
    u_lo = jnp.log(jnp.asarray(_ETA_LO, dtype))
    u_hi = jnp.log(jnp.maximum(c_range / jnp.sqrt(8.0 * eps), 10 * _ETA_LO) * 1.01)

    def residual(u):
        tau = jnp.exp(u)
        st = _stats(tau, jnp.ones((), dtype), jnp.zeros_like(c), c)
        w = jnp.exp(st.log_weights)
        var = jnp.sum(w * jnp.square(c - st.cost[:, None]), axis=-1)
        f = jnp.mean(st.kl) - eps
        df = -jnp.mean(var) / jnp.square(tau)
        return f, df, jnp.mean(st.cost)

    f_lo, _, cost_lo = residual(u_lo)
    # Start from the Gaussian approximation KL ≈ mean Var(c)/(2τ²), mean Var(c) = 1 in scaled units.
    u0 = jnp.clip(-0.5 * jnp.log(2.0 * eps), u_lo, u_hi)

    def cond(carry):
        it, _, _, _, f, _, _ = carry
        return (f_lo > 0) & (it < _MINCOST_MAX_ITER) & (jnp.abs(f) > _MINCOST_RTOL * eps)

    def body(carry):
        it, lo, hi, u, f, df, _ = carry
        newton = u - f / jnp.where(df < 0, df, -1.0)
        u_new = jnp.where((df < 0) & (newton > lo) & (newton < hi), newton, 0.5 * (lo + hi))
        f_new, df_new, cost_new = residual(u_new)
        lo = jnp.where(f_new > 0, u_new, lo)  # KL too large: τ must grow
        hi = jnp.where(f_new > 0, hi, u_new)
        return it + 1, lo, hi, u_new, f_new, df_new, cost_new

    f0, df0, cost0 = residual(u0)
    lo = jnp.where(f0 > 0, u0, u_lo)
    hi = jnp.where(f0 > 0, u_hi, u0)
    carry = (jnp.zeros((), jnp.int32), lo, hi, u0, f0, df0, cost0)
    carry = jax.lax.while_loop(cond, body, carry)
    cost_at_root = carry[6]
    # Even the most concentrated q we allow is inside the ball: the minimum is (nearly) the greedy one.
    return jnp.where(f_lo <= 0, cost_lo, cost_at_root)


class _ScaledSolution(NamedTuple):
    eta: Array  # []
    lam: Array  # []
    iterations: Array
    converged: Array
    infeasible: Array


def _solve_scaled(
    sc: _Scaled, eps: Array, init: Array | None, max_iter: int, tol: float
) -> _ScaledSolution:
    """Batch-form solve in scaled units; init: None or [2] scaled (η̃, λ̃)."""
    dtype = sc.r.dtype
    min_cost = _min_cost_in_kl_ball(sc.c, eps)
    infeasible = sc.eps1 < min_cost
    # Only an infeasible problem is relaxed: a feasible one keeps its ε1 however small its margin (its λ
    # may then be large and its convergence slower, but its constraint is met).
    eps1 = jnp.where(infeasible, min_cost + _SLATER_MARGIN, sc.eps1)

    # η̃* ≤ max_b range_b(r − λc)/sqrt(8ε) by Hoeffding's lemma (at that η every state is inside the ball),
    # so this upper bound never cuts off the optimum.
    r_range = jnp.max(-jnp.min(sc.r, axis=-1))
    c_range = jnp.max(jnp.max(sc.c, axis=-1))
    eta_hi = jnp.maximum((r_range + _LAM_MAX * c_range) / jnp.sqrt(8.0 * eps) * 1.01, 10 * _ETA_LO)
    lower = jnp.asarray([_ETA_LO, 0.0], dtype)
    upper = jnp.stack([eta_hi, jnp.asarray(_LAM_MAX, dtype)]).astype(dtype)

    # Default start: λ = 0 and the Gaussian approximation of the KL-active temperature at λ = 0,
    # KL ≈ mean Var(r)/(2η²) with mean Var(r) = 1 in scaled units.
    default = jnp.stack([1.0 / jnp.sqrt(2.0 * eps), jnp.zeros((), dtype)]).astype(dtype)
    init = default if init is None else jnp.where(jnp.isfinite(init), init, default)
    init = jnp.clip(init, lower, upper)

    params, iterations, error = _lbfgsb(max_iter, tol)(init, lower, upper, sc.r, sc.c, eps1, eps)
    return _ScaledSolution(
        eta=params[0],
        lam=params[1],
        iterations=iterations,
        converged=error <= tol,
        infeasible=infeasible,
    )


@functools.lru_cache(maxsize=None)
def _lbfgsb(max_iter: int, tol: float):
    """The L-BFGS-B run; batched by a loop (`lax.map`) rather than vectorised when it is vmapped.

    Two measured reasons (this 2-core CPU, float32, tol 1e-5, medians of 7 after compilation):
    1. With implicit_diff=False, jaxopt's default unroll="auto" turns its loops into `lax.scan`s of maxiter
       (and, in the zoom line search, maxls = 30) steps around `lax.cond`; under vmap the conds become
       selects, so every problem pays for every step: 16 problems B 300 K 32 took 4.7 s with vmap against
       14 ms with lax.map.  Hence unroll=False (a `lax.while_loop`) here.
    2. Even with while loops, vmapped L-BFGS-B runs in lockstep until the slowest problem is done and
       evaluates both sides of every branch.  16 problems B 300 K 32: vmap 36-67 ms, lax.map 12-24 ms;
       B 4096 K 32: vmap 0.24 s, lax.map 0.30 s (within the noise of the shared machine); per-state form
       (300 problems of one state): vmap 170-190 ms, lax.map 60-120 ms.  So any vmap of this function, the
       per-state form's and a caller's over seeds alike, becomes a `lax.map` (`sequential_vmap`); the cheap
       vectorised parts around it (scaling, the 1-D minimum-cost solve, the weights) stay vmapped.
    """
    solver = jaxopt.LBFGSB(
        fun=_scaled_dual_and_grad,
        value_and_grad=True,
        maxiter=max_iter,
        tol=tol,
        implicit_diff=False,  # the E-step treats Q as constants: nothing differentiates through the solve
        jit=True,
        unroll=False,
    )

    def run(init, lower, upper, r, c, eps1, eps):  # [2], [2], [2], [B, K], [B, K], [], []
        params, state = solver.run(init, (lower, upper), r, c, eps1, eps)
        return params, state.iter_num.astype(jnp.int32), state.error

    return jax.custom_batching.sequential_vmap(run)


def _init_to_scaled(init, s_r: Array, s_c: Array, dtype) -> Array | None:
    """(η, λ) in the caller's units -> [..., 2] scaled; None stays None (the default start is used)."""
    if init is None:
        return None
    if isinstance(init, DualSolution):
        eta, lam = init.eta, init.lam
    else:
        eta, lam = init
    eta = jnp.broadcast_to(jnp.asarray(eta, dtype), s_r.shape)
    lam = jnp.broadcast_to(jnp.asarray(lam, dtype), s_r.shape)
    return jnp.stack([eta / s_r, lam * s_c / s_r], axis=-1)


def solve_dual(
    q_r: Array,
    q_c: Array,
    *,
    cost_threshold: Array | float,
    kl_bound: Array | float,
    init: DualSolution | tuple[Array | float, Array | float] | None = None,
    per_state: bool = False,
    max_iter: int = 50,
    tol: float = 1e-5,
) -> DualSolution:
    """Solve the CVPO E-step dual and return the optimal particle weights.

    Args:
      q_r: [B, K] reward Q values of K particles (actions sampled from the old policy) in each of B states.
      q_c: [B, K] cost Q values of the same particles.
      cost_threshold: ε1, a scalar (per-state discounted cost threshold, see
        `core.members.cost_threshold_from_episode_limit`).
      kl_bound: ε > 0, a scalar: the bound on KL(q ‖ old policy) (paper: 0.1).
      init: warm start: a previous `DualSolution` of the same form, or an (η, λ) pair in the units of the Q
        values (scalars; [B] or scalars for per_state).  Non-finite values select the default start, so a
        `lax.scan` carry can hold (nan, nan) before the first solve and keep one structure throughout.
        Default (first start): λ = 0 and η = sqrt(mean_b Var_k Q_r / (2ε)), the temperature at which a
        Gaussian spread of Q_r would use up the KL bound.  (ORIG starts from η = λ = 0.1 whatever the
        scale of Q; here the start scales with Q like the solution does.)
      per_state: solve one (η_b, λ_b) per state (the paper's ḡ) instead of one pair for the batch.
      max_iter: L-BFGS-B iteration cap; every solve stops by then (see `iterations`, `converged`).
      tol: tolerance on the projected gradient of the scaled dual, which is the pair of constraint
        residuals (ε − KL, (ε1 − E_q[Q_c]) / std(Q_c)) where the constraints are active.  1e-5 is reachable
        in float32.

    Returns:
      A `DualSolution` (eta, lam, iterations, converged, infeasible are [B] for per_state, else scalars).
      Infeasible problems (the cost-minimising q with KL ≤ ε still has expected cost above ε1) are solved
      with ε1 raised to that minimum plus 0.01 within-state std of Q_c: (η, λ) stay finite, the weights
      nearly minimise the expected cost inside the KL ball (among such q they maximise the reward), and
      `infeasible` is set; `dual_value` is then g at the returned point with the given ε1, not a bound.
      The same relaxation applies to a feasible problem whose margin is below 0.01 std(Q_c): its expected
      cost then exceeds ε1 by less than 0.01 std(Q_c).

    Jitted (per_state, max_iter and tol are static) and vmappable over leading axes, e.g. q_r, q_c
    [S, B, K] with cost_threshold [S] for S seeds: vmapped, the solves run one after another (`lax.map`),
    which measured faster than jaxopt's lockstep batching (see `_lbfgsb`).  Inputs are treated as
    constants (stop_gradient).
    """
    for name, value in (("kl_bound", kl_bound), ("cost_threshold", cost_threshold)):
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if isinstance(kl_bound, (int, float)) and kl_bound <= 0:
        raise ValueError(f"kl_bound must be positive, got {kl_bound}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    return _solve_dual(
        q_r, q_c, cost_threshold, kl_bound, init, per_state=bool(per_state), max_iter=int(max_iter),
        tol=float(tol),
    )


@functools.partial(jax.jit, static_argnames=("per_state", "max_iter", "tol"))
def _solve_dual(q_r, q_c, cost_threshold, kl_bound, init, *, per_state, max_iter, tol) -> DualSolution:
    q_r = jax.lax.stop_gradient(jnp.asarray(q_r))
    q_c = jax.lax.stop_gradient(jnp.asarray(q_c))
    # Keep the caller's precision: float32 by default, float64 when x64 is enabled and the inputs are.
    dtype = jnp.result_type(q_r.dtype, q_c.dtype, jnp.float32)
    q_r = q_r.astype(dtype)
    q_c = q_c.astype(dtype)
    if q_r.ndim != 2 or q_r.shape != q_c.shape or q_r.shape[-1] < 1:
        raise ValueError(f"q_r and q_c must both be [B, K] (vmap for more axes); got {q_r.shape}, {q_c.shape}")
    eps1 = jax.lax.stop_gradient(jnp.asarray(cost_threshold, dtype))
    if eps1.ndim != 0:
        raise ValueError(f"cost_threshold must be a scalar (vmap for one per problem); got {eps1.shape}")
    eps = jax.lax.stop_gradient(jnp.asarray(kl_bound, dtype))
    if eps.ndim != 0:
        raise ValueError(f"kl_bound must be a scalar (vmap for one per problem); got {eps.shape}")
    # A traced ε ≤ 0 cannot be rejected here; a floor keeps it from turning the bounds into NaN (ε → 0
    # means uniform weights, which is what a tiny ε gives).
    eps = jnp.maximum(eps, jnp.asarray(1e-12, dtype))

    if per_state:
        # B independent problems with B = 1, each with its own scales.
        sc = jax.vmap(lambda r, c: _scale(r[None], c[None], eps1))(q_r, q_c)  # leaves [B, ...]
        init_s = _init_to_scaled(init, sc.s_r, sc.s_c, dtype)  # [B, 2] or None
        sol = jax.vmap(lambda s, i: _solve_scaled(s, eps, i, max_iter, tol))(sc, init_s)
    else:
        sc = _scale(q_r, q_c, eps1)
        init_s = _init_to_scaled(init, sc.s_r, sc.s_c, dtype)  # [2] or None
        sol = _solve_scaled(sc, eps, init_s, max_iter, tol)

    eta = sol.eta * sc.s_r
    lam = sol.lam * sc.s_r / sc.s_c
    # Everything reported is recomputed from the caller's Q arrays with the returned (η, λ): the weights
    # the M-step will use are exactly softmax((Q_r − λ·Q_c)/η), with nothing carried over from the solve.
    st = _stats(eta, lam, q_r, q_c)
    return DualSolution(
        eta=eta,
        lam=lam,
        weights=jnp.exp(st.log_weights),
        dual_value=dual_function(eta, lam, q_r, q_c, eps1, eps),
        kl=jnp.mean(st.kl),
        expected_cost=jnp.mean(st.cost),
        iterations=sol.iterations,
        converged=sol.converged,
        infeasible=sol.infeasible,
    )
