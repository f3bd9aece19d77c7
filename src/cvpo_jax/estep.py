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
  the value (no autodiff pass).  The loop takes the platform's shape, decided when the program is compiled
  (`SolverSettings.loop`, `_lbfgsb`): on the CPU each solve runs to tolerance and vmapped solves run one
  after another (`lax.map`), which measured fastest there; on an accelerator all solves of a vmapped batch
  (members, or states of the per-state form) run together for a fixed budget of iterations, a loop of known
  trip count, because there every data-dependent iteration and every branch is a host round trip.
- Optionally (`solver="newton"`) a projected Newton method with the analytic 2×2 Hessian and a vectorised
  line search: a fixed number of iterations, no data-dependent loop and no branch on any platform.
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
    "SolverSettings",
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
# Its budget where it runs as a fixed-count loop: the safeguarded Newton from the Gaussian start reached the
# tolerance in 2-5 iterations on the test and benchmark problems (`tests/test_estep.py` checks 8 suffice).
_MINCOST_FIXED_ITER = 8


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
    iterations: Array  # [] / [B]  solver iterations used (≤ max_iter, or ≤ fixed_iter in lockstep/Newton)
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


def _min_cost_in_kl_ball(c: Array, eps: Array, fixed_count: bool = False) -> Array:
    """Minimum of mean_b E_q[c_b] over q with mean_b KL(q_b‖uniform) ≤ ε (scaled units); [B, K] -> [].

    The minimiser is q_b ∝ exp(−c_b/τ) with one τ for the batch such that mean KL = ε (or τ → 0 if even the
    greedy q is within the ball).  KL is decreasing in τ, d KL / d log τ = −mean Var_q(c)/τ², so τ is found
    by Newton's method in log τ, safeguarded by bisection on a bracket [τ_lo, τ_hi] where τ_hi satisfies
    KL ≤ range²/(8τ²) ≤ ε (Hoeffding's lemma). fixed_count: run `_MINCOST_FIXED_ITER` iterations (masked
    once converged) instead of a loop to tolerance (the accelerator shape, see `_lbfgsb`).
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

    def unfinished(carry):
        it, _, _, _, f, _, _ = carry
        return (f_lo > 0) & (jnp.abs(f) > _MINCOST_RTOL * eps)

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
    if fixed_count:
        # A loop of known trip count (no host round trip per iteration on an accelerator); a solve that has
        # converged keeps its point.
        def masked(_, carry):
            return jax.tree.map(lambda old, new: jnp.where(unfinished(carry), new, old), carry, body(carry))

        carry = jax.lax.fori_loop(0, _MINCOST_FIXED_ITER, masked, carry)
    else:
        carry = jax.lax.while_loop(lambda c: unfinished(c) & (c[0] < _MINCOST_MAX_ITER), body, carry)
    cost_at_root = carry[6]
    # Even the most concentrated q we allow is inside the ball: the minimum is (nearly) the greedy one.
    return jnp.where(f_lo <= 0, cost_lo, cost_at_root)


class _ScaledSolution(NamedTuple):
    eta: Array  # []
    lam: Array  # []
    iterations: Array
    converged: Array
    infeasible: Array


def _solve_scaled(sc: _Scaled, eps: Array, init: Array | None, how: "SolverSettings") -> _ScaledSolution:
    """Batch-form solve in scaled units; init: None or [2] scaled (η̃, λ̃)."""
    dtype = sc.r.dtype
    # η̃* ≤ max_b range_b(r − λc)/sqrt(8ε) by Hoeffding's lemma (at that η every state is inside the ball),
    # so this upper bound never cuts off the optimum.
    r_range = jnp.max(-jnp.min(sc.r, axis=-1))
    c_range = jnp.max(jnp.max(sc.c, axis=-1))
    eta_hi = jnp.maximum((r_range + _LAM_MAX * c_range) / jnp.sqrt(8.0 * eps) * 1.01, 10 * _ETA_LO)
    # A cost with no spread within any state (a collapsed cost critic: Q_c the same for every action) cannot
    # be traded against reward: λ moves no weight, the dual is linear in it with slope ε1 − min cost ≥ 0
    # (after the relaxation below), so λ* = 0. Pinning it there leaves the well-posed problem in η alone; left
    # free, L-BFGS-B walks a flat valley from a warm-started λ and, vmapped, returned NaN (point_traps, CVPO).
    lam_hi = jnp.where(c_range > 0, jnp.asarray(_LAM_MAX, dtype), jnp.zeros((), dtype))
    lower = jnp.asarray([_ETA_LO, 0.0], dtype)
    upper = jnp.stack([eta_hi, lam_hi]).astype(dtype)

    # Default start: λ = 0 and the Gaussian approximation of the KL-active temperature at λ = 0,
    # KL ≈ mean Var(r)/(2η²) with mean Var(r) = 1 in scaled units.
    default = jnp.stack([1.0 / jnp.sqrt(2.0 * eps), jnp.zeros((), dtype)]).astype(dtype)
    init = default if init is None else jnp.where(jnp.isfinite(init), init, default)
    init = jnp.clip(init, lower, upper)

    def solve(lockstep: bool, init, lower, upper, r, c, eps1, eps):
        min_cost = _min_cost_in_kl_ball(c, eps, fixed_count=lockstep)
        infeasible = eps1 < min_cost
        # Only an infeasible problem is relaxed: a feasible one keeps its ε1 however small its margin (its
        # λ may then be large and its convergence slower, but its constraint is met).
        eps1 = jnp.where(infeasible, min_cost + _SLATER_MARGIN, eps1)
        if how.solver == "newton":
            params, iterations, error = _newton(init, lower, upper, r, c, eps1, eps, how.fixed_iter, how.tol)
        elif lockstep:
            params, iterations, error = _lbfgsb(how).fixed_budget(init, lower, upper, r, c, eps1, eps)
        else:
            params, iterations, error = _lbfgsb(how).to_tolerance(init, lower, upper, r, c, eps1, eps)
        return params, iterations, error, infeasible

    args = (init, lower, upper, sc.r, sc.c, sc.eps1, eps)
    if how.loop == "auto":
        # Decided when the program is compiled for its platform (see `_lbfgsb`).
        result = jax.lax.platform_dependent(*args, cpu=functools.partial(solve, False),
                                            default=functools.partial(solve, True))
    else:
        result = solve(how.loop == "lockstep", *args)
    params, iterations, error, infeasible = result
    return _ScaledSolution(eta=params[0], lam=params[1], iterations=iterations, converged=error <= how.tol,
                           infeasible=infeasible)


def _projected_gradient_error(x: Array, grad: Array, lower: Array, upper: Array) -> Array:
    """‖clip(x − ∇g, lower, upper) − x‖_∞, the stationarity measure of a box-constrained problem (jaxopt's)."""
    return jnp.max(jnp.abs(jnp.clip(x - grad, lower, upper) - x))


# Step lengths the projected Newton tries at once (one vectorised evaluation); 0 keeps the point, so an
# iteration never increases the dual. Beside them, projected-gradient steps over ten decades: they move a
# point where the Newton model is useless (a degenerate, kinked dual, e.g. Q_c ∝ Q_r, where the Hessian
# vanishes at the bound of η and Newton's step overshoots at every length).
_NEWTON_STEPS = (1.0, 0.5, 0.25, 0.125, 1.0 / 16, 1.0 / 64, 1.0 / 256, 0.0)
_GRADIENT_STEPS = tuple(4.0**k for k in range(-14, 3))


def _dual_derivatives(x: Array, r: Array, c: Array, eps1: Array, eps: Array):
    """g̃, ∇g̃ and the 2×2 Hessian at x = (η̃, λ̃) in scaled units (see `_scaled_dual_and_grad`).

    With z = (r − λc)/η and q = softmax_k(z): ∂²g/∂η² = mean_b Var_q(r − λc)/η³, ∂²g/∂η∂λ =
    mean_b Cov_q(r − λc, c)/η², ∂²g/∂λ² = mean_b Var_q(c)/η (derivatives of the softmax moments).
    """
    eta, lam = x[0], x[1]
    st = _stats(eta, lam, r, c)
    w = jnp.exp(st.log_weights)  # [B, K]
    u = r - lam * c
    du = u - jnp.sum(w * u, axis=-1, keepdims=True)
    dc = c - st.cost[:, None]
    var_u = jnp.mean(jnp.sum(w * du * du, axis=-1))
    cov_uc = jnp.mean(jnp.sum(w * du * dc, axis=-1))
    var_c = jnp.mean(jnp.sum(w * dc * dc, axis=-1))
    value = lam * eps1 + eta * eps + jnp.mean(st.x_max) + eta * jnp.mean(st.lse)
    grad = jnp.stack([eps - jnp.mean(st.kl), eps1 - jnp.mean(st.cost)])
    hess = jnp.stack([jnp.stack([var_u / eta**3, cov_uc / eta**2]), jnp.stack([cov_uc / eta**2, var_c / eta])])
    return value, grad, hess


def _newton_direction(x: Array, grad: Array, hess: Array, lower: Array, upper: Array) -> Array:
    """Projected Newton direction: coordinates at a bound that the gradient pushes outwards stay fixed, the
    free ones take the Newton step of their sub-Hessian (a 2×2 solve written out; a diagonal step where the
    sub-Hessian is not safely positive definite, e.g. for constant Q rows)."""
    at_lower = (x <= lower) & (grad > 0)
    at_upper = (x >= upper) & (grad < 0)
    free = ~(at_lower | at_upper)  # [2]
    g = jnp.where(free, grad, 0.0)
    tiny = jnp.asarray(1e-12, x.dtype)
    h_eta, h_cross, h_lam = hess[0, 0], hess[0, 1], hess[1, 1]
    h_eta = jnp.maximum(h_eta, tiny)
    h_lam = jnp.maximum(h_lam, tiny)
    both = free[0] & free[1]
    det = h_eta * h_lam - h_cross**2
    definite = det > 1e-6 * h_eta * h_lam
    full = jnp.stack([(h_lam * g[0] - h_cross * g[1]), (h_eta * g[1] - h_cross * g[0])]) / jnp.where(
        definite, det, 1.0)
    diagonal = g / jnp.stack([h_eta, h_lam])
    return -jnp.where(both & definite, full, diagonal)


def _newton(init, lower, upper, r, c, eps1, eps, num_iter: int, tol: float):
    """Projected Newton on the scaled dual, `num_iter` iterations (a loop of known trip count).

    Each iteration computes the Newton direction from the analytic gradient and Hessian, then evaluates the
    dual at all of `_NEWTON_STEPS` along the projected Newton path and at `_GRADIENT_STEPS` along the
    projected gradient path at once, and keeps the longest Newton step with sufficient decrease, or the best
    gradient step when no Newton step decreases the dual (a vectorised line search: no data-dependent loop,
    no conditional); then the derivatives at the kept point. An iteration is two passes over the [B, K]
    values: the candidates' values, and the kept point's gradient and Hessian. A solve that has reached `tol` keeps
    its point. Returns (params [2], iterations until `tol` [], final projected-gradient error []).
    """
    steps = jnp.asarray(_NEWTON_STEPS, r.dtype)  # [S]
    gradient_steps = jnp.asarray(_GRADIENT_STEPS, r.dtype)  # [G]
    num_newton = len(_NEWTON_STEPS)
    evaluate = jax.vmap(lambda x: _scaled_dual_and_grad(x, r, c, eps1, eps)[0])  # values only

    def iteration(_, carry):
        x, value, grad, hess, iterations = carry
        error = _projected_gradient_error(x, grad, lower, upper)
        active = error > tol
        direction = _newton_direction(x, grad, hess, lower, upper)
        newton = jnp.clip(x[None] + steps[:, None] * direction[None], lower, upper)  # [S, 2]
        gradient = jnp.clip(x[None] - gradient_steps[:, None] * grad[None], lower, upper)  # [G, 2]
        candidates = jnp.concatenate([newton, gradient])
        values = evaluate(candidates)
        values = jnp.where(jnp.isfinite(values), values, jnp.inf)
        # The longest Newton step with sufficient decrease (Armijo, c = 1e-4). The slack of a few float32 ulps
        # of the value lets the full step through near the optimum, where the decrease it brings is below the
        # rounding of the value and a strict comparison would freeze the point short of `tol`.
        slack = 1e-6 * (1.0 + jnp.abs(value))
        sufficient = values[:num_newton] <= value + 1e-4 * steps * jnp.dot(grad, direction) + slack
        longest = jnp.argmax(sufficient)  # the step 0 always qualifies
        # Only where no Newton step moves: the gradient step of lowest value, if it lowers the dual.
        best_gradient = num_newton + jnp.argmin(values[num_newton:])
        stalled = (steps[longest] == 0) & (values[best_gradient] < value)
        new_x = candidates[jnp.where(stalled, best_gradient, longest)]
        new_value, new_grad, new_hess = _dual_derivatives(new_x, r, c, eps1, eps)
        keep = lambda old, new: jnp.where(active, new, old)  # noqa: E731
        return (keep(x, new_x), keep(value, new_value), keep(grad, new_grad), keep(hess, new_hess),
                iterations + active.astype(jnp.int32))

    value, grad, hess = _dual_derivatives(init, r, c, eps1, eps)
    carry = (init, value, grad, hess, jnp.zeros((), jnp.int32))
    x, _, grad, _, iterations = jax.lax.fori_loop(0, num_iter, iteration, carry)
    return x, iterations, _projected_gradient_error(x, grad, lower, upper)


class SolverSettings(NamedTuple):
    """How the dual is solved (hashable: a static argument of the jitted solve).

    solver: "lbfgsb" (jaxopt's projected L-BFGS-B, the default) or "newton" (`_newton`).
    loop: "auto" (by the platform compiled for: "tolerance" on the CPU, "lockstep" elsewhere), "tolerance"
      (L-BFGS-B runs until `tol` or `max_iter`, problems one after another when vmapped) or "lockstep" (all
      problems together for `fixed_iter` iterations, masked once converged; no data-dependent outer loop).
    max_iter: L-BFGS-B's cap in the "tolerance" loop. fixed_iter: the budget of the "lockstep" loop and of
      the Newton solver (which always runs in lockstep). tol: on the projected gradient (both solvers).
    """

    solver: str = "lbfgsb"
    loop: str = "auto"
    max_iter: int = 50
    fixed_iter: int = 10
    tol: float = 1e-5


SOLVERS = ("lbfgsb", "newton")
LOOPS = ("auto", "tolerance", "lockstep")


@functools.lru_cache(maxsize=None)
def _lbfgsb(how: SolverSettings):
    """jaxopt's L-BFGS-B, in the two loop shapes of `SolverSettings.loop`.

    "tolerance" (the CPU's): each problem runs jaxopt's own loop until it converges, and a vmap of it runs
    the problems one after another (`lax.map`, via `sequential_vmap`). Two measured reasons (this 2-core
    CPU, float32, tol 1e-5, medians of 7 after compilation):
    1. With implicit_diff=False, jaxopt's default unroll="auto" turns its loops into `lax.scan`s of maxiter
       (and, in the zoom line search, maxls = 30) steps around `lax.cond`; under vmap the conds become
       selects, so every problem pays for every step: 16 problems B 300 K 32 took 4.7 s with vmap against
       14 ms with lax.map.  Hence unroll=False (a `lax.while_loop`) here.
    2. Even with while loops, vmapped L-BFGS-B runs in lockstep until the slowest problem is done and
       evaluates both sides of every branch.  16 problems B 300 K 32: vmap 36-67 ms, lax.map 12-24 ms;
       B 4096 K 32: vmap 0.24 s, lax.map 0.30 s (within the noise of the shared machine); per-state form
       (300 problems of one state): vmap 170-190 ms, lax.map 60-120 ms.

    "lockstep" (accelerators'): there every iteration of a data-dependent loop and every `lax.cond` costs a
    device-to-host round trip, and problems run one after another multiply the launches by their number.
    So all problems run together (a plain vmap, also for a single problem, so that jaxopt's internal conds
    become selects) for a budget of `fixed_iter` iterations, a loop of known trip count (no round trip per
    iteration); a problem that has converged keeps its point (a masked update). Only jaxopt's line search
    and Cauchy-point loops stay data-dependent. `python -m cvpo_jax.bench gpu` prices the program.
    """
    solver = jaxopt.LBFGSB(
        fun=_scaled_dual_and_grad,
        value_and_grad=True,
        maxiter=how.max_iter,
        tol=how.tol,
        implicit_diff=False,  # the E-step treats Q as constants: nothing differentiates through the solve
        jit=True,
        unroll=False,
    )

    def to_tolerance(init, lower, upper, r, c, eps1, eps):  # [2], [2], [2], [B, K], [B, K], [], []
        params, state = solver.run(init, (lower, upper), r, c, eps1, eps)
        return params, state.iter_num.astype(jnp.int32), state.error

    def fixed_budget(init, lower, upper, r, c, eps1, eps):
        bounds = (lower, upper)
        state = solver.init_state(init, bounds, r, c, eps1, eps)

        def iteration(_, carry):
            params, state = carry
            new = solver.update(params, state, bounds, r, c, eps1, eps)
            done = state.error <= how.tol
            return jax.tree.map(lambda old, new: jnp.where(done, old, new), (params, state), tuple(new))

        params, state = jax.lax.fori_loop(0, how.fixed_iter, iteration, (init, state))
        return params, state.iter_num.astype(jnp.int32), state.error

    def fixed_budget_batched(*args):
        # Unbatched, give the problem a batch axis of 1 so jaxopt's conds still become selects; under an
        # outer vmap this vmap nests inside it.
        return jax.tree.map(lambda x: x[0], jax.vmap(fixed_budget)(*(a[None] for a in args)))

    return _LbfgsbRuns(to_tolerance=jax.custom_batching.sequential_vmap(to_tolerance),
                       fixed_budget=fixed_budget_batched)


class _LbfgsbRuns(NamedTuple):
    to_tolerance: object
    fixed_budget: object


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
    solver: str = "lbfgsb",
    loop: str = "auto",
    fixed_iter: int = 10,
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
      max_iter: L-BFGS-B iteration cap of the "tolerance" loop; every solve stops by then (see
        `iterations`, `converged`).
      tol: tolerance on the projected gradient of the scaled dual, which is the pair of constraint
        residuals (ε − KL, (ε1 − E_q[Q_c]) / std(Q_c)) where the constraints are active.  1e-5 is reachable
        in float32.
      solver: "lbfgsb" (jaxopt's projected L-BFGS-B) or "newton" (projected Newton with the analytic
        Hessian, `fixed_iter` iterations).
      loop: "auto", "tolerance" or "lockstep" (`SolverSettings`): by default the CPU solves each problem to
        tolerance, one after another when vmapped, and an accelerator solves all of them together within a
        budget of `fixed_iter` iterations.
      fixed_iter: the iteration budget of the lockstep loop and of the Newton solver.

    Returns:
      A `DualSolution` (eta, lam, iterations, converged, infeasible are [B] for per_state, else scalars).
      Infeasible problems (the cost-minimising q with KL ≤ ε still has expected cost above ε1) are solved
      with ε1 raised to that minimum plus 0.01 within-state std of Q_c: (η, λ) stay finite, the weights
      nearly minimise the expected cost inside the KL ball (among such q they maximise the reward), and
      `infeasible` is set; `dual_value` is then g at the returned point with the given ε1, not a bound.
      The same relaxation applies to a feasible problem whose margin is below 0.01 std(Q_c): its expected
      cost then exceeds ε1 by less than 0.01 std(Q_c).

    Jitted (all but the arrays are static) and vmappable over leading axes, e.g. q_r, q_c [S, B, K] with
    cost_threshold [S] for S seeds: vmapped, the CPU's solves run one after another (`lax.map`), which
    measured faster there than jaxopt's lockstep batching, and an accelerator's in lockstep (see
    `_lbfgsb`).  Inputs are treated as constants (stop_gradient).
    """
    for name, value in (("kl_bound", kl_bound), ("cost_threshold", cost_threshold)):
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if isinstance(kl_bound, (int, float)) and kl_bound <= 0:
        raise ValueError(f"kl_bound must be positive, got {kl_bound}")
    if max_iter < 1 or fixed_iter < 1:
        raise ValueError(f"max_iter and fixed_iter must be at least 1, got {max_iter}, {fixed_iter}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}; got {loop!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    return _solve_dual(
        q_r, q_c, cost_threshold, kl_bound, init, per_state=bool(per_state),
        how=SolverSettings(solver=solver, loop=loop, max_iter=int(max_iter), fixed_iter=int(fixed_iter),
                           tol=float(tol)),
    )


@functools.partial(jax.jit, static_argnames=("per_state", "how"))
def _solve_dual(q_r, q_c, cost_threshold, kl_bound, init, *, per_state, how) -> DualSolution:
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
        sol = jax.vmap(lambda s, i: _solve_scaled(s, eps, i, how))(sc, init_s)
    else:
        sc = _scale(q_r, q_c, eps1)
        init_s = _init_to_scaled(init, sc.s_r, sc.s_c, dtype)  # [2] or None
        sol = _solve_scaled(sc, eps, init_s, how)

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
