"""The E-step's accelerator shapes, run on the CPU: L-BFGS-B in lockstep with a fixed budget, and the projected
Newton solver; checked against SciPy (the same references as test_estep.py) and against the CPU's loop.

Compile budget: the solves use the shapes [16, 8] and [1, 8] with `init` always given, so each solver shape
compiles a few times.
"""

from __future__ import annotations

import math

import cvpo_jax  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_estep import (B, COLD, EPS, K, _edge_cases, assert_finite, feasible_problems, make_problem,  # noqa: F401
                        np_dual, np_kl_and_cost, np_min_cost_in_kl_ball, np_weights, solve)

from cvpo_jax import estep
from cvpo_jax.estep import solve_dual

# A budget that the cold-started test problems never exhaust (they take ≤ 25 L-BFGS-B iterations), so the
# lockstep loop must land exactly where the loop to tolerance does.
BUDGET = 40
SHAPES = {
    "lbfgsb_lockstep": {"solver": "lbfgsb", "loop": "lockstep", "fixed_iter": BUDGET},
    "newton": {"solver": "newton", "fixed_iter": 20},
}


@pytest.fixture(scope="module")
def problems(feasible_problems):  # noqa: F811 (the fixture imported above)
    """A third of test_estep.py's SciPy-solved problems (slack and tight): enough for the two shapes."""
    return feasible_problems[:8]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_scipy(problems, shape):
    for p in problems:
        sol = solve(p["q_r"], p["q_c"], p["eps1"], p["eps"], **SHAPES[shape])
        assert bool(sol.converged) and not bool(sol.infeasible)
        eta, lam = float(sol.eta), float(sol.lam)
        g_ours = np_dual([eta, lam], p["q_r"], p["q_c"], p["eps1"], p["eps"])[0]
        assert abs(g_ours - p["g"]) <= 1e-5 * abs(p["g"]), (shape, g_ours, p["g"])
        kl, cost = np_kl_and_cost(np_weights(p["q_r"], p["q_c"], eta, lam), p["q_c"])
        assert kl == pytest.approx(p["eps"], abs=2e-5)
        tol_cost = 2e-5 * p["q_c"].std()
        assert cost <= p["eps1"] + tol_cost
        if p["kind"] == "slack":
            assert lam == 0.0
        else:
            assert cost == pytest.approx(p["eps1"], abs=tol_cost)
            assert lam == pytest.approx(p["lam"], rel=2e-2)


def test_lockstep_lands_where_the_tolerance_loop_does(problems):
    """With a budget it does not exhaust, the masked fixed-count loop makes the same L-BFGS-B iterations."""
    for p in problems:
        ref = solve(p["q_r"], p["q_c"], p["eps1"], p["eps"], loop="tolerance")
        got = solve(p["q_r"], p["q_c"], p["eps1"], p["eps"], **SHAPES["lbfgsb_lockstep"])
        assert int(got.iterations) == int(ref.iterations) < BUDGET
        np.testing.assert_allclose(np.asarray(got.weights), np.asarray(ref.weights), atol=1e-6)
        assert float(got.eta) == pytest.approx(float(ref.eta), rel=1e-5)


def test_budget_bounds_iterations():
    rng = np.random.default_rng(9)
    q_r, q_c, eps1, eps = make_problem(rng, "tight")
    for shape in ({"loop": "lockstep", "fixed_iter": 2}, {"solver": "newton", "fixed_iter": 1}):
        sol = solve(q_r, q_c, eps1, eps, **shape)
        assert int(sol.iterations) == shape["fixed_iter"] and not bool(sol.converged)
        assert_finite(sol)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_infeasible(shape):
    rng = np.random.default_rng(11)
    for _ in range(2):
        q_r, q_c, eps1, eps = make_problem(rng, "infeasible")
        c_min = np_min_cost_in_kl_ball(q_c, eps)
        sol = solve(q_r, q_c, eps1, eps, **SHAPES[shape])
        assert_finite(sol)
        assert bool(sol.infeasible) and bool(sol.converged)
        std_c = math.sqrt(np.mean(q_c.var(axis=1)))
        kl, cost = np_kl_and_cost(np_weights(q_r, q_c, float(sol.eta), float(sol.lam)), q_c)
        assert kl <= eps + 2e-5
        assert c_min - 1e-4 <= cost <= c_min + 0.011 * std_c


@pytest.mark.parametrize("shape", list(SHAPES))
def test_edge_cases(shape):
    for name, (q_r, q_c, eps1, expect_infeasible) in _edge_cases().items():
        if name.startswith("single_particle"):
            continue  # K = 1 is a third shape to compile; its weights are 1 whatever the solver
        sol = solve(q_r, q_c, eps1, EPS, **SHAPES[shape])
        assert_finite(sol)
        w = np.asarray(sol.weights)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5, err_msg=name)
        assert float(sol.eta) > 0 and float(sol.lam) >= 0, name
        assert float(sol.kl) <= EPS + 1e-4, name
        if expect_infeasible is not None:
            assert bool(sol.infeasible) == expect_infeasible, name
        if name.startswith("all_zero_cost") or name == "constant_cost_feasible":
            assert float(sol.lam) == 0.0, name
            assert float(sol.kl) == pytest.approx(EPS, abs=1e-5), name
        if name == "everything_constant":
            np.testing.assert_array_equal(w, np.full_like(w, 1.0 / K))


def test_newton_derivatives_match_finite_differences():
    """The analytic gradient and Hessian of `_dual_derivatives` against central differences of NumPy's g."""
    rng = np.random.default_rng(2)
    q_r, q_c, eps1, eps = make_problem(rng, "tight")
    with jax.enable_x64(True):
        for x in ([0.7, 0.0], [1.5, 0.8], [4.0, 3.0]):
            value, grad, hess = estep._dual_derivatives(jnp.asarray(x, jnp.float64), jnp.asarray(q_r),
                                                        jnp.asarray(q_c), jnp.asarray(eps1), jnp.asarray(eps))
            g_ref, grad_ref = np_dual(x, q_r, q_c, eps1, eps)
            assert float(value) == pytest.approx(g_ref, rel=1e-9)
            np.testing.assert_allclose(np.asarray(grad), grad_ref, rtol=1e-8, atol=1e-10)
            h = 1e-5
            fd = np.stack([(np_dual(np.add(x, h * e), q_r, q_c, eps1, eps)[1]
                            - np_dual(np.subtract(x, h * e), q_r, q_c, eps1, eps)[1]) / (2 * h)
                           for e in np.eye(2)])
            np.testing.assert_allclose(np.asarray(hess), fd, rtol=1e-5, atol=1e-7)


def test_vmapped_lockstep_matches_single_solves():
    """jit(vmap) over members, the trainer's form, in both accelerator shapes."""
    rng = np.random.default_rng(21)
    probs = [make_problem(rng, kind) for kind in ("tight", "slack", "infeasible")]
    q_r = jnp.asarray(np.stack([p[0] for p in probs]), jnp.float32)
    q_c = jnp.asarray(np.stack([p[1] for p in probs]), jnp.float32)
    eps1 = jnp.asarray([p[2] for p in probs], jnp.float32)
    eps = jnp.asarray([p[3] for p in probs], jnp.float32)
    for shape in SHAPES.values():
        batched = jax.jit(jax.vmap(lambda r, c, e1, e, kw=shape: solve_dual(
            r, c, cost_threshold=e1, kl_bound=e, init=COLD, **kw)))(q_r, q_c, eps1, eps)
        for s in range(len(probs)):
            single = solve(q_r[s], q_c[s], float(eps1[s]), float(eps[s]), **shape)
            np.testing.assert_allclose(np.asarray(batched.weights)[s], np.asarray(single.weights), atol=1e-5)
            assert np.asarray(batched.iterations)[s] == np.asarray(single.iterations)
            assert np.asarray(batched.infeasible)[s] == np.asarray(single.infeasible)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_per_state_in_lockstep(shape):
    rng = np.random.default_rng(8)
    q_r, q_c, _, eps = make_problem(rng, "tight")
    eps1 = float(np.median(q_c))
    ref = solve(q_r, q_c, eps1, eps, per_state=True, loop="tolerance")
    sol = solve(q_r, q_c, eps1, eps, per_state=True, **SHAPES[shape])
    assert_finite(sol)
    np.testing.assert_array_equal(np.asarray(sol.infeasible), np.asarray(ref.infeasible))
    assert np.all(np.asarray(sol.converged))
    np.testing.assert_allclose(np.asarray(sol.weights), np.asarray(ref.weights), atol=2e-4)


def test_platform_decides_the_loop():
    """loop="auto" compiles the CPU's loop here: the same result as "tolerance", not as a short lockstep."""
    rng = np.random.default_rng(4)
    q_r, q_c, eps1, eps = make_problem(rng, "tight")
    auto = solve(q_r, q_c, eps1, eps, fixed_iter=2)
    tolerance = solve(q_r, q_c, eps1, eps, loop="tolerance", fixed_iter=2)
    assert int(auto.iterations) == int(tolerance.iterations) > 2


def test_invalid_solver_options():
    q = jnp.zeros((B, K))
    with pytest.raises(ValueError, match="solver"):
        solve_dual(q, q, cost_threshold=1.0, kl_bound=0.1, solver="bfgs")
    with pytest.raises(ValueError, match="loop"):
        solve_dual(q, q, cost_threshold=1.0, kl_bound=0.1, loop="gpu")
    with pytest.raises(ValueError, match="fixed_iter"):
        solve_dual(q, q, cost_threshold=1.0, kl_bound=0.1, fixed_iter=0)


@pytest.mark.parametrize("options", [["cvpo.dual_loop=lockstep", "cvpo.dual_fixed_iter=3"],
                                     ["cvpo.dual_solver=newton", "cvpo.dual_fixed_iter=3"]])
def test_cvpo_update_runs_the_chosen_shape(options):
    """The config reaches the E-step: a tiny CVPO update on a noise batch stays within the budget."""
    from cvpo_jax.config import load_config
    from cvpo_jax.core.members import SweepMembers
    from cvpo_jax.core.replay import Transition
    from cvpo_jax.cvpo import make_cvpo

    cfg = load_config(["env=point_goal", "network.hidden=[8,8]", "cvpo.batch_size=16", "cvpo.num_particles=4",
                       "cvpo.mstep_iterations=1", "episode_length=400", "cost_limit=10"] + options, ["point_goal"])
    learner, _ = make_cvpo(cfg, 6, 2)
    settings = jax.tree.map(lambda x: x[0], SweepMembers.from_config(cfg).settings())
    rng = np.random.default_rng(0)
    batch = Transition(obs=jnp.asarray(rng.normal(size=(16, 6)), jnp.float32),
                       action=jnp.asarray(rng.uniform(-1, 1, size=(16, 2)), jnp.float32),
                       reward=jnp.asarray(rng.normal(size=16), jnp.float32), cost=jnp.zeros(16),
                       next_obs=jnp.asarray(rng.normal(size=(16, 6)), jnp.float32), terminal=jnp.zeros(16),
                       truncated=jnp.zeros(16), terminated=jnp.zeros(16))
    state, metrics = jax.jit(learner.update)(learner.init(jax.random.PRNGKey(0)), batch, settings,
                                             jax.random.PRNGKey(1))
    assert 1 <= float(metrics["estep/iterations"]) <= 3
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert np.all(np.isfinite(np.asarray(state.dual_warm_start)))
