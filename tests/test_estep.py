"""Tests of the E-step dual solve against independent NumPy/SciPy computations.

Compile budget: every solve below uses one of a few shapes ([16, 8] mostly, [1, 8] for single states,
[16, 1] for K = 1) and always passes `init` (NaN pairs mean "cold start"), so the whole file compiles the
solver about ten times.
"""

from __future__ import annotations

import math

import cvpo_jax  # noqa: F401  (filters jaxopt's import-time deprecation warning before jaxopt loads)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq, minimize
from scipy.special import logsumexp, softmax

from cvpo_jax.core.members import cost_threshold_from_episode_limit
from cvpo_jax.estep import DualSolution, dual_function, solve_dual

B, K = 16, 8
EPS = 0.1
MAX_ITER = 50
COLD = (float("nan"), float("nan"))  # non-finite init = the default first start (keeps one compile)


# ----------------------------------------------------------------------------------------------------------
# Independent reference implementations (float64 NumPy / SciPy)


def np_dual(p, q_r, q_c, eps1, eps):
    """g(η, λ) and its gradient, written directly from the paper's formula."""
    eta, lam = float(p[0]), float(p[1])
    x = q_r - lam * q_c
    lse = logsumexp(x / eta, axis=1)
    g = lam * eps1 + eta * eps + eta * np.mean(lse - math.log(q_r.shape[1]))
    q = softmax(x / eta, axis=1)
    d_eta = eps + np.mean(lse - math.log(q_r.shape[1])) - np.mean(np.sum(q * x, axis=1)) / eta
    d_lam = eps1 - np.mean(np.sum(q * q_c, axis=1))
    return g, np.array([d_eta, d_lam])


def scipy_solve(q_r, q_c, eps1, eps, starts=((1.0, 1.0), (0.1, 0.1))):
    """Best of SLSQP and L-BFGS-B (float64, tight tolerances, several starts): (g*, η*, λ*)."""
    bounds = [(1e-8, 1e6), (0.0, 1e6)]
    best = None
    for x0 in starts:
        for method, options in (
            ("SLSQP", {"ftol": 1e-14, "maxiter": 1000}),
            ("L-BFGS-B", {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000}),
        ):
            res = minimize(
                np_dual, np.asarray(x0, float), args=(q_r, q_c, eps1, eps), jac=True, method=method,
                bounds=bounds, options=options,
            )
            if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
                best = res
    return float(best.fun), float(best.x[0]), float(best.x[1])


def np_weights(q_r, q_c, eta, lam):
    return softmax((q_r - lam * q_c) / eta, axis=1)


def np_kl_and_cost(w, q_c):
    k = w.shape[1]
    kl = np.sum(np.where(w > 0, w * np.log(np.maximum(w, 1e-300) * k), 0.0), axis=1)
    return float(np.mean(kl)), float(np.mean(np.sum(w * q_c, axis=1)))


def np_min_cost_in_kl_ball(q_c, eps):
    """min mean_b E_q[Q_c] s.t. mean_b KL(q_b‖uniform) ≤ ε: q_b ∝ exp(−Q_c/τ), mean KL(τ) = ε (brentq)."""
    def kl_minus_eps(log_tau):
        return np_kl_and_cost(softmax(-q_c / math.exp(log_tau), axis=1), q_c)[0] - eps

    if kl_minus_eps(-12.0) <= 0:  # even (nearly) greedy q is inside the ball
        return float(np.mean(q_c.min(axis=1)))
    log_tau = brentq(kl_minus_eps, -12.0, 12.0, xtol=1e-13)
    return np_kl_and_cost(softmax(-q_c / math.exp(log_tau), axis=1), q_c)[1]


def make_problem(rng, kind, b=B, k=K):
    """Synthetic Q values: Q_r = per-state mean (offset so that g is well away from 0) + noise; Q_c ≥ 0,
    partly correlated with Q_r so that the constraint trades reward against cost.

    kind: "slack" (ε1 above the cost of the unconstrained solution), "tight" (between the minimum reachable
    cost and that), "infeasible" (below the minimum reachable cost).
    """
    scale_r = rng.uniform(0.5, 2.0)
    q_r = 3.0 + rng.normal(0, 1, (b, 1)) + scale_r * rng.normal(size=(b, k))
    q_c = np.maximum(
        rng.uniform(0, 3, (b, 1)) + rng.normal(size=(b, k)) + rng.uniform(0, 1) * (q_r - q_r.mean(1, keepdims=True)),
        0.0,
    )
    eps = float(rng.choice([0.01, 0.1, 0.5]))
    c_min = np_min_cost_in_kl_ball(q_c, eps)
    # cost of the λ = 0 solution
    g0 = minimize(lambda e: np_dual([e[0], 0.0], q_r, q_c, 0.0, eps)[0], [1.0], bounds=[(1e-8, 1e6)]).x[0]
    c_free = np_kl_and_cost(np_weights(q_r, q_c, g0, 0.0), q_c)[1]
    if kind == "slack":
        eps1 = c_free + rng.uniform(0.05, 1.0)
    elif kind == "tight":
        eps1 = c_min + rng.uniform(0.05, 0.95) * (c_free - c_min)
    else:
        eps1 = c_min - rng.uniform(0.05, 1.0)
    return q_r, q_c, float(eps1), eps


def solve(q_r, q_c, eps1, eps, dtype=jnp.float32, **kw):
    kw.setdefault("init", COLD)
    return solve_dual(jnp.asarray(q_r, dtype), jnp.asarray(q_c, dtype), cost_threshold=eps1, kl_bound=eps, **kw)


def assert_finite(sol: DualSolution):
    for name, value in sol._asdict().items():
        assert np.all(np.isfinite(np.asarray(value, dtype=float))), name




@pytest.fixture(scope="module")
def feasible_problems():
    rng = np.random.default_rng(1234)
    problems = []
    for i in range(24):
        kind = "slack" if i % 4 == 0 else "tight"
        q_r, q_c, eps1, eps = make_problem(rng, kind)
        g, eta, lam = scipy_solve(q_r, q_c, eps1, eps)
        problems.append(dict(kind=kind, q_r=q_r, q_c=q_c, eps1=eps1, eps=eps, g=g, eta=eta, lam=lam))
    return problems


# ----------------------------------------------------------------------------------------------------------


def test_cost_threshold_from_episode_limit():
    assert cost_threshold_from_episode_limit(10, 400, 0.99) == pytest.approx(2.455, abs=5e-4)
    assert cost_threshold_from_episode_limit(20, 300, 0.99) == pytest.approx(6.34, abs=5e-3)
    ref = 10 * sum(0.99**t for t in range(400)) / 400  # the same thing as a discounted sum
    assert cost_threshold_from_episode_limit(10, 400, 0.99) == pytest.approx(ref, rel=1e-12)
    assert cost_threshold_from_episode_limit(10, 400, 1.0) == pytest.approx(10 / 400)
    with pytest.raises(ValueError):
        cost_threshold_from_episode_limit(10, 0, 0.99)


def test_dual_function_matches_numpy():
    rng = np.random.default_rng(0)
    q_r, q_c, eps1, eps = make_problem(rng, "tight")
    for eta, lam in [(0.05, 0.0), (1.0, 2.0), (30.0, 0.3)]:
        got = float(dual_function(eta, lam, jnp.asarray(q_r), jnp.asarray(q_c), eps1, eps))
        assert got == pytest.approx(np_dual([eta, lam], q_r, q_c, eps1, eps)[0], rel=1e-5)
    # per-state form: mean over states of ḡ_b(η_b, λ_b)
    etas, lams = rng.uniform(0.5, 3, B), rng.uniform(0, 2, B)
    ref = np.mean([np_dual([e, l], q_r[b : b + 1], q_c[b : b + 1], eps1, eps)[0] for b, (e, l) in enumerate(zip(etas, lams))])
    got = float(dual_function(jnp.asarray(etas), jnp.asarray(lams), jnp.asarray(q_r), jnp.asarray(q_c), eps1, eps))
    assert got == pytest.approx(ref, rel=1e-5)


def _check_against_scipy(sol, p, rel_g, tol_kl, tol_cost):
    """Optimum agreement and KKT conditions, all from NumPy recomputations."""
    assert bool(sol.converged)
    assert not bool(sol.infeasible)
    assert int(sol.iterations) <= MAX_ITER
    eta, lam = float(sol.eta), float(sol.lam)
    g_ours = np_dual([eta, lam], p["q_r"], p["q_c"], p["eps1"], p["eps"])[0]
    assert abs(g_ours - p["g"]) <= rel_g * abs(p["g"]), (g_ours, p["g"])
    assert float(sol.dual_value) == pytest.approx(g_ours, rel=rel_g)
    kl, cost = np_kl_and_cost(np_weights(p["q_r"], p["q_c"], eta, lam), p["q_c"])
    # The KL bound is active at the optimum (ε < log K here, so η > 0 binds).
    assert kl == pytest.approx(p["eps"], abs=tol_kl)
    assert cost <= p["eps1"] + tol_cost
    if p["kind"] == "slack":
        assert lam == 0.0  # λ never leaves its bound when the cost constraint is slack
    else:
        assert lam > 0.0 and p["lam"] > 0.0
        assert cost == pytest.approx(p["eps1"], abs=tol_cost)  # complementary slackness
        assert lam == pytest.approx(p["lam"], rel=2e-2)


def test_matches_scipy_float64(feasible_problems):
    with jax.enable_x64(True):
        for p in feasible_problems:
            sol = solve(p["q_r"], p["q_c"], p["eps1"], p["eps"], dtype=jnp.float64, tol=1e-9, max_iter=MAX_ITER)
            assert sol.eta.dtype == jnp.float64
            _check_against_scipy(sol, p, rel_g=1e-7, tol_kl=1e-7, tol_cost=1e-7)


def test_matches_scipy_float32(feasible_problems):
    # float32 with the default tol 1e-5: the dual value to 1e-5 relative, the constraints to ~1e-5.
    for p in feasible_problems:
        sol = solve(p["q_r"], p["q_c"], p["eps1"], p["eps"], max_iter=MAX_ITER)
        assert sol.eta.dtype == jnp.float32
        _check_against_scipy(sol, p, rel_g=1e-5, tol_kl=2e-5, tol_cost=2e-5 * p["q_c"].std())


def test_weights_recomputed_from_untouched_q():
    rng = np.random.default_rng(7)
    q_r, q_c, eps1, eps = make_problem(rng, "tight")
    q_r32, q_c32 = q_r.astype(np.float32), q_c.astype(np.float32)
    keep_r, keep_c = q_r32.copy(), q_c32.copy()
    sol = solve(q_r32, q_c32, eps1, eps)
    eta, lam = float(sol.eta), float(sol.lam)
    assert lam > 0.1  # the guard below is only meaningful when λ·Q_c matters
    np.testing.assert_array_equal(q_r32, keep_r)
    np.testing.assert_array_equal(q_c32, keep_c)
    ref = np_weights(keep_r.astype(float), keep_c.astype(float), eta, lam)
    np.testing.assert_allclose(np.asarray(sol.weights), ref, atol=2e-6, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(sol.weights).sum(axis=1), 1.0, atol=1e-5)
    # The FSRL 0.1.0 defect (weights from Q_r − 2λ·Q_c) would be caught by the comparison above.
    doubled = np_weights(keep_r.astype(float), keep_c.astype(float), eta, 2 * lam)
    assert np.max(np.abs(doubled - ref)) > 1e-2
    kl, cost = np_kl_and_cost(ref, keep_c.astype(float))
    assert float(sol.kl) == pytest.approx(kl, abs=1e-5)
    assert float(sol.expected_cost) == pytest.approx(cost, abs=1e-5 * max(1.0, abs(cost)))


def test_infeasible_returns_bounded_cost_minimising_solution():
    rng = np.random.default_rng(11)
    for _ in range(3):
        q_r, q_c, eps1, eps = make_problem(rng, "infeasible")
        c_min = np_min_cost_in_kl_ball(q_c, eps)
        assert eps1 < c_min
        sol = solve(q_r, q_c, eps1, eps, max_iter=MAX_ITER)
        assert_finite(sol)
        assert bool(sol.infeasible)
        assert 1 <= int(sol.iterations) <= MAX_ITER
        std_c = math.sqrt(np.mean(q_c.var(axis=1)))
        std_r = math.sqrt(np.mean(q_r.var(axis=1)))
        # bounded: far inside the solver's own box (η ≤ ~1e3 std(Q_r)/sqrt(ε), λ ≤ 1e3 std(Q_r)/std(Q_c))
        assert 0 < float(sol.eta) < 100 * std_r / math.sqrt(eps)
        assert 0 < float(sol.lam) < 100 * std_r / std_c
        kl, cost = np_kl_and_cost(np_weights(q_r, q_c, float(sol.eta), float(sol.lam)), q_c)
        assert kl <= eps + 2e-5
        # cost-minimising within the KL ball up to the documented margin of 0.01 std(Q_c)
        assert c_min - 1e-4 <= cost <= c_min + 0.011 * std_c
        assert float(sol.expected_cost) == pytest.approx(cost, abs=1e-4)


def test_barely_feasible_is_not_flagged():
    rng = np.random.default_rng(5)
    q_r, q_c, _, eps = make_problem(rng, "tight")
    c_min = np_min_cost_in_kl_ball(q_c, eps)
    std_c = math.sqrt(np.mean(q_c.var(axis=1)))
    sol = solve(q_r, q_c, c_min + 0.02 * std_c, eps, max_iter=MAX_ITER)
    assert not bool(sol.infeasible)
    assert float(sol.expected_cost) <= c_min + 0.02 * std_c + 1e-4 * std_c
    sol = solve(q_r, q_c, c_min - 0.02 * std_c, eps, max_iter=MAX_ITER)
    assert bool(sol.infeasible)


def _edge_cases():
    rng = np.random.default_rng(3)
    q_r = rng.normal(size=(B, K))
    q_c = np.abs(rng.normal(size=(B, K)))
    return {
        # name: (q_r, q_c, ε1, expected infeasible flag or None when not asserted)
        "constant_cost_feasible": (q_r, np.full((B, K), 2.0), 3.0, False),
        "constant_cost_infeasible": (q_r, np.full((B, K), 2.0), 1.0, True),
        "reward_proportional_to_cost": (q_r, 3.0 * q_r, 0.0, None),
        "reward_anti_proportional_to_cost": (q_r, -3.0 * q_r, -1.0, None),
        "all_zero_cost": (q_r, np.zeros((B, K)), 0.0, False),
        "all_zero_cost_negative_threshold": (q_r, np.zeros((B, K)), -1.0, True),
        "everything_constant": (np.ones((B, K)), np.zeros((B, K)), 1.0, False),
        "huge_scale": (1e4 * q_r, 1e4 * q_c, 1e4 * 0.7, None),
        "tiny_scale": (1e-4 * q_r, 1e-4 * q_c, 1e-4 * 0.7, None),
        "huge_offset": (1e4 + q_r, q_c, 0.7, None),
        "single_state": (q_r[:1], q_c[:1], 0.7, None),
        "single_particle": (q_r[:, :1], q_c[:, :1], float(q_c[:, 0].mean()) + 0.1, False),
        "single_particle_infeasible": (q_r[:, :1], q_c[:, :1], float(q_c[:, 0].mean()) - 0.1, True),
    }


@pytest.mark.parametrize("name", list(_edge_cases()))
def test_edge_cases(name):
    q_r, q_c, eps1, expect_infeasible = _edge_cases()[name]
    sol = solve(q_r, q_c, eps1, EPS, max_iter=MAX_ITER)
    assert_finite(sol)
    assert 1 <= int(sol.iterations) <= MAX_ITER
    w = np.asarray(sol.weights)
    assert w.shape == q_r.shape and np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    assert float(sol.eta) > 0 and float(sol.lam) >= 0
    assert float(sol.kl) <= EPS + 1e-4
    if expect_infeasible is not None:
        assert bool(sol.infeasible) == expect_infeasible
    if name.startswith("all_zero_cost") or name.startswith("constant_cost"):
        assert float(sol.lam) == 0.0
        assert float(sol.kl) == pytest.approx(EPS, abs=1e-5)
    if name.startswith("single_particle") or name == "everything_constant":
        np.testing.assert_array_equal(w, np.full_like(w, 1.0 / w.shape[1]))


@pytest.mark.parametrize("solver,loop", [("lbfgsb", "auto"), ("lbfgsb", "lockstep"), ("newton", "auto")])
def test_collapsed_cost_critic_pins_lambda_at_zero_vmapped_and_warm_started(solver, loop):
    """Q_c the same for every action of every state (a cost critic collapsed to a constant, seen in a CVPO run
    on point_traps): λ cannot move any weight, so λ* = 0 and η is the KL-active temperature of Q_r alone.
    Vmapped over members and warm-started at a large λ, L-BFGS-B used to return NaN here."""
    rng = np.random.default_rng(5)
    q_r = -0.8 + 0.01 * rng.normal(size=(3, B, K))
    q_c = np.full((3, B, K), 0.0193)
    eps1 = np.asarray([0.0099, 0.05, 0.0099])  # over, under, over the constant cost
    init = (jnp.asarray([0.023, 0.023, 0.5]), jnp.asarray([11.9, 0.0, 1e4]))
    sol = jax.jit(jax.vmap(lambda r, c, e1, eta, lam: solve_dual(
        r, c, cost_threshold=e1, kl_bound=EPS, init=(eta, lam), solver=solver, loop=loop)))(
        jnp.asarray(q_r, jnp.float32), jnp.asarray(q_c, jnp.float32), jnp.asarray(eps1, jnp.float32), *init)
    assert_finite(sol)
    np.testing.assert_array_equal(np.asarray(sol.lam), 0.0)
    assert list(np.asarray(sol.infeasible)) == [True, False, True]
    for m in range(3):
        # Independent: the temperature at which mean_b KL(softmax(Q_r/η) ‖ uniform) = ε, by brentq.
        log_eta = brentq(lambda t: np_kl_and_cost(softmax(q_r[m] / math.exp(t), axis=1), q_c[m])[0] - EPS,
                         -12.0, 6.0, xtol=1e-12)
        assert float(sol.eta[m]) == pytest.approx(math.exp(log_eta), rel=2e-3)
        np.testing.assert_allclose(np.asarray(sol.weights[m]), softmax(q_r[m] / math.exp(log_eta), axis=1),
                                   atol=2e-4)


def test_scale_invariance():
    """η scales with Q, λ is unchanged, the weights are identical: the internal rescaling is exact."""
    q_r, q_c, eps1, _ = _edge_cases()["huge_scale"]
    ref = solve(q_r / 1e4, q_c / 1e4, eps1 / 1e4, EPS)
    for s in (1e4, 1e-4):
        sol = solve(q_r / 1e4 * s, q_c / 1e4 * s, eps1 / 1e4 * s, EPS)
        assert float(sol.eta) / s == pytest.approx(float(ref.eta), rel=1e-4)
        assert float(sol.lam) == pytest.approx(float(ref.lam), rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(np.asarray(sol.weights), np.asarray(ref.weights), atol=1e-5)
        assert bool(sol.infeasible) == bool(ref.infeasible)


def test_max_iter_bounds_iterations():
    rng = np.random.default_rng(9)
    q_r, q_c, eps1, eps = make_problem(rng, "tight")
    sol = solve(q_r, q_c, eps1, eps, max_iter=3)
    assert int(sol.iterations) == 3 and not bool(sol.converged)
    assert_finite(sol)


def test_jit_and_vmap_match_single_calls():
    rng = np.random.default_rng(21)
    probs = [make_problem(rng, kind) for kind in ("tight", "slack", "tight", "infeasible")]
    q_r = jnp.asarray(np.stack([p[0] for p in probs]), jnp.float32)  # [S, B, K]
    q_c = jnp.asarray(np.stack([p[1] for p in probs]), jnp.float32)
    eps1 = jnp.asarray([p[2] for p in probs], jnp.float32)  # [S]
    eps = jnp.asarray([p[3] for p in probs], jnp.float32)  # [S]

    def one(r, c, e1, e):
        return solve_dual(r, c, cost_threshold=e1, kl_bound=e, init=COLD)

    # jit(vmap(...)): the way a trainer runs many seeds; solve_dual is traced inside an outer jit.
    batched = jax.jit(jax.vmap(one))(q_r, q_c, eps1, eps)
    assert batched.weights.shape == (len(probs), B, K) and batched.eta.shape == (len(probs),)
    for s in range(len(probs)):
        single = solve(q_r[s], q_c[s], float(eps1[s]), float(eps[s]))  # the shared compiled solver
        for name in ("eta", "lam", "weights", "dual_value", "kl", "expected_cost"):
            np.testing.assert_allclose(
                np.asarray(getattr(batched, name))[s], np.asarray(getattr(single, name)), rtol=1e-5, atol=1e-6,
                err_msg=name,
            )
        for name in ("iterations", "converged", "infeasible"):
            assert np.asarray(getattr(batched, name))[s] == np.asarray(getattr(single, name)), name
    assert list(np.asarray(batched.infeasible)) == [False, False, False, True]


def test_warm_start():
    rng = np.random.default_rng(4)
    q_r, q_c, eps1, eps = make_problem(rng, "tight")
    cold = solve(q_r, q_c, eps1, eps)
    # the next update's batch: slightly different Q values
    q_r2 = q_r + 0.05 * rng.normal(size=q_r.shape)
    q_c2 = np.maximum(q_c + 0.05 * rng.normal(size=q_c.shape), 0)
    cold2 = solve(q_r2, q_c2, eps1, eps)
    warm2 = solve(q_r2, q_c2, eps1, eps, init=cold)
    warm_pair = solve(q_r2, q_c2, eps1, eps, init=(float(cold.eta), float(cold.lam)))
    assert bool(warm2.converged) and bool(cold2.converged)
    assert int(warm2.iterations) <= int(cold2.iterations)
    assert int(warm_pair.iterations) == int(warm2.iterations)
    assert float(warm2.dual_value) == pytest.approx(float(cold2.dual_value), rel=1e-5)
    np.testing.assert_allclose(np.asarray(warm2.weights), np.asarray(cold2.weights), atol=1e-3)
    # restarting at the solution: one step, as jaxopt always takes one
    again = solve(q_r, q_c, eps1, eps, init=cold)
    assert int(again.iterations) == 1


def test_per_state_matches_separate_solves():
    rng = np.random.default_rng(8)
    q_r, q_c, _, eps = make_problem(rng, "tight")
    eps1 = float(np.median(q_c))  # a per-state threshold: some states slack, some tight, some infeasible
    sol = solve(q_r, q_c, eps1, eps, per_state=True)
    assert sol.eta.shape == (B,) and sol.iterations.shape == (B,) and sol.weights.shape == (B, K)
    assert_finite(sol)
    infeasible = np.asarray(sol.infeasible)
    assert 0 < infeasible.sum() < B
    for b in range(B):
        one = solve(q_r[b : b + 1], q_c[b : b + 1], eps1, eps)
        assert float(sol.eta[b]) == pytest.approx(float(one.eta), rel=1e-4)
        assert float(sol.lam[b]) == pytest.approx(float(one.lam), rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(np.asarray(sol.weights[b]), np.asarray(one.weights[0]), atol=1e-5)
        assert bool(infeasible[b]) == bool(one.infeasible)
    # each feasible state meets its own constraints; the per-state dual is the mean of the ḡ_b
    w = np_weights(q_r, q_c, np.asarray(sol.eta, float)[:, None], np.asarray(sol.lam, float)[:, None])
    kl_b = np.sum(w * np.log(w * K), axis=1)
    cost_b = np.sum(w * q_c, axis=1)
    np.testing.assert_allclose(kl_b, eps, atol=2e-4)
    assert np.all(cost_b[~infeasible] <= eps1 + 1e-4)
    ref = np.mean([np_dual([sol.eta[b], sol.lam[b]], q_r[b : b + 1], q_c[b : b + 1], eps1, eps)[0] for b in range(B)])
    assert float(sol.dual_value) == pytest.approx(ref, rel=1e-5)


def test_invalid_arguments():
    q = jnp.zeros((B, K))
    with pytest.raises(ValueError, match="kl_bound"):
        solve_dual(q, q, cost_threshold=1.0, kl_bound=0.0)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        solve_dual(q, q[:, :4], cost_threshold=1.0, kl_bound=0.1)
    with pytest.raises(ValueError, match="cost_threshold"):
        solve_dual(q, q, cost_threshold=jnp.ones(3), kl_bound=0.1)
