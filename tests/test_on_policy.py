"""The on-policy baselines: GAE, the natural-gradient core, CPO's step, the value fit and the PPO, TRPO and
CPO policy steps against NumPy, and learning on `speed_limit`.

The learning tests train each method through `cvpo_jax.run.main` with one shared tiny configuration (only
`algo` differs), so reruns hit the persistent compilation cache; unconstrained TRPO is trained once per module
and serves as the reference the constrained methods must beat on cost.
"""

from __future__ import annotations

import csv
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize

from cvpo_jax import policy as gaussian
from cvpo_jax import run
from cvpo_jax.baselines.advantages import gae
from cvpo_jax.baselines.natural_gradient import (PolicyStepSettings, backtracking_line_search, conjugate_gradient,
                                                 fisher_vector_product, natural_gradient_step)
from cvpo_jax.baselines.on_policy import (PolicyBatch, clipped_surrogate, cpo_policy_step, cpo_step, ppo_loss,
                                          ppo_step, trpo_policy_step)
from cvpo_jax.baselines.value_fit import ValueFitSettings, fit_values, minibatch_plan
from cvpo_jax.networks import GaussianPolicyNet


# --------------------------------------------------------------------------------------------------- GAE


def _gae_loop(rewards, values, next_values, terminals, truncations, gamma, lam):
    """The textbook backward recursion, one environment and one step at a time."""
    steps, num_envs = rewards.shape
    advantages = np.zeros_like(rewards)
    for e in range(num_envs):
        running = 0.0
        for t in reversed(range(steps)):
            bootstrap = 0.0 if terminals[t, e] else next_values[t, e]
            delta = rewards[t, e] + gamma * bootstrap - values[t, e]
            if terminals[t, e] or truncations[t, e]:
                running = 0.0  # the data after this step belong to another episode
            running = delta + gamma * lam * running
            advantages[t, e] = running
    return advantages, advantages + values


def test_gae_matches_python_loop_with_terminals_and_truncations_inside_the_window():
    rng = np.random.default_rng(0)
    steps, num_envs = 9, 3
    rewards, values, next_values = (rng.normal(size=(steps, num_envs)).astype(np.float32) for _ in range(3))
    terminals = np.zeros((steps, num_envs), np.float32)
    truncations = np.zeros((steps, num_envs), np.float32)
    terminals[3, 0] = 1  # mid-window terminal
    truncations[5, 1] = 1  # mid-window time limit
    terminals[2, 2], truncations[6, 2] = 1, 1  # both kinds in one env
    terminals[8, 0] = 1  # terminal on the window's last step
    advantages, returns = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(next_values),
                              jnp.asarray(terminals), jnp.asarray(truncations), 0.9, 0.8)
    expected_adv, expected_ret = _gae_loop(rewards, values, next_values, terminals, truncations, 0.9, 0.8)
    np.testing.assert_allclose(advantages, expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, expected_ret, rtol=1e-5, atol=1e-5)
    # The truncated step still bootstraps (its δ uses V(next)), the terminal one does not.
    assert advantages[5, 1] == pytest.approx(rewards[5, 1] + 0.9 * next_values[5, 1] - values[5, 1], rel=1e-5)
    # The terminal step neither bootstraps nor takes in the advantage of the (next episode's) step after it.
    assert advantages[3, 0] == pytest.approx(rewards[3, 0] - values[3, 0], rel=1e-5)


# ------------------------------------------------------------------------------------ natural gradient


def test_conjugate_gradient_matches_dense_solve():
    rng = np.random.default_rng(1)
    size = 12
    m = rng.normal(size=(size, size))
    matrix = (m @ m.T + 0.5 * np.eye(size)).astype(np.float32)  # symmetric positive definite
    b = rng.normal(size=size).astype(np.float32)
    x = jax.jit(lambda b: conjugate_gradient(lambda v: jnp.asarray(matrix) @ v, b, iterations=size * 3))(b)
    np.testing.assert_allclose(x, np.linalg.solve(matrix, b), rtol=2e-3, atol=2e-3)
    # Few iterations give a partial solve, but still a descent on the quadratic ½xᵀAx − bᵀx.
    partial = conjugate_gradient(lambda v: jnp.asarray(matrix) @ v, jnp.asarray(b), iterations=2)
    assert 0.5 * partial @ matrix @ partial - b @ partial < 0.0


def _tiny_policy():
    net = GaussianPolicyNet(hidden=(5,), action_size=2, covariance="full")
    obs = jax.random.normal(jax.random.PRNGKey(0), (7, 3))
    params = net.init(jax.random.PRNGKey(1), obs)
    flat, unravel = ravel_pytree(params)
    return net, obs, flat, unravel


def test_fisher_vector_product_matches_explicit_kl_hessian():
    net, obs, flat, unravel = _tiny_policy()
    # Evaluate the Hessian away from the old parameters too: the product must be the exact Hessian there.
    old_dist = net.apply(unravel(flat), obs)

    def mean_kl(flat_params):
        return jnp.mean(gaussian.kl(old_dist, net.apply(unravel(flat_params), obs)))

    damping = 0.1
    point = flat + 0.05 * jax.random.normal(jax.random.PRNGKey(2), flat.shape)
    vectors = jax.random.normal(jax.random.PRNGKey(10), (3,) + flat.shape)
    # Jitted: op-by-op, the Hessian's many small primitives each compile separately and take seconds.
    products = jax.jit(lambda where: jax.vmap(fisher_vector_product(mean_kl, where, damping))(vectors))
    hessian_at = jax.jit(jax.hessian(mean_kl))
    for where in (flat, point):
        hessian = hessian_at(where)  # [P, P]
        np.testing.assert_allclose(products(where), vectors @ hessian.T + damping * vectors, rtol=1e-3, atol=1e-4)
    # At the old parameters the KL's Hessian is the Fisher matrix: symmetric positive semi-definite.
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessian_at(flat), np.float64))
    assert eigenvalues.min() > -1e-4


def test_line_search_returns_the_first_accepted_step():
    params, step = jnp.array([1.0, -2.0]), jnp.array([4.0, 8.0])

    def accept(candidate):  # accepts the candidates whose first coordinate moved by less than 1.1
        return jnp.abs(candidate[0] - 1.0) < 1.1

    new, index = jax.jit(lambda p, s: backtracking_line_search(p, s, accept, steps=10, coeff=0.5))(params, step)
    # 4, 2, 1 -> the third candidate (j = 2) is the first with a move below 1.1.
    assert int(index) == 2
    np.testing.assert_allclose(new, params + 0.25 * step)
    # Later candidates (j = 3, 4, ...) would be accepted too; only the first counts.


def test_line_search_rejects_when_no_step_is_accepted_and_keeps_the_params():
    params, step = jnp.array([1.0, -2.0]), jnp.array([jnp.nan, 8.0])
    new, index = backtracking_line_search(params, step, lambda c: jnp.all(jnp.isfinite(c)), steps=5, coeff=0.8)
    assert int(index) == -1
    np.testing.assert_array_equal(new, params)


def test_line_search_vmaps_over_members_with_different_outcomes():
    params = jnp.zeros((3, 2))
    steps = jnp.array([[1.0, 0.0], [8.0, 0.0], [100.0, 0.0]])
    search = jax.vmap(lambda p, s: backtracking_line_search(p, s, lambda c: c[0] <= 1.0, steps=5, coeff=0.5))
    new, index = search(params, steps)
    np.testing.assert_array_equal(index, [0, 3, -1])  # 1; 8·0.5³ = 1; 100·0.5⁴ = 6.25 > 1
    np.testing.assert_allclose(new[:, 0], [1.0, 1.0, 0.0])


# ----------------------------------------------------------------------------------------- CPO's step


def _qp_problem(seed: int):
    rng = np.random.default_rng(seed)
    size = 4
    m = rng.normal(size=(size, size))
    fisher = m @ m.T + 0.3 * np.eye(size)
    g, b = rng.normal(size=size), rng.normal(size=size)
    return fisher, g, b


def _cpo_from_dense(fisher, g, b, c, delta):
    v, w = np.linalg.solve(fisher, g), np.linalg.solve(fisher, b)
    q, r, s = g @ v, g @ w, b @ w
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return cpo_step(f32(v), f32(w), f32(q), f32(r), f32(s), f32(c), f32(b @ b), delta), s


def _scipy_qp(fisher, g, b, c, delta):
    """max gᵀx s.t. bᵀx + c ≤ 0 and ½ xᵀFx ≤ δ, solved numerically (SLSQP) from several starts."""
    best = None
    constraints = [{"type": "ineq", "fun": lambda x: -(b @ x + c), "jac": lambda x: -b},
                   {"type": "ineq", "fun": lambda x: delta - 0.5 * x @ fisher @ x, "jac": lambda x: -fisher @ x}]
    rng = np.random.default_rng(0)
    for _ in range(5):
        result = minimize(lambda x: -g @ x, rng.normal(size=g.shape) * 0.1, jac=lambda x: -g, method="SLSQP",
                          constraints=constraints, options={"ftol": 1e-12, "maxiter": 500})
        if result.success and (best is None or result.fun < best.fun):
            best = result
    assert best is not None
    return best.x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c_fraction,expected_case", [(-3.0, 3), (-0.3, 2), (0.3, 1)])
def test_cpo_step_matches_a_numerical_qp_solution(seed, c_fraction, expected_case):
    """Feasible cases (the constraint inactive or cutting the trust region) and the recoverable infeasible
    one; c is set relative to the largest |bᵀx| reachable in the trust region, √(2δ s)."""
    delta = 0.01
    fisher, g, b = _qp_problem(seed)
    s = b @ np.linalg.solve(fisher, b)
    c = c_fraction * np.sqrt(2 * delta * s)
    solution, _ = _cpo_from_dense(fisher, g, b, c, delta)
    assert int(solution.case) == expected_case
    expected = _scipy_qp(fisher, g, b, c, delta)
    x = np.asarray(solution.step, np.float64)
    np.testing.assert_allclose(x, expected, rtol=2e-2, atol=2e-3)
    # The step satisfies both constraints (to float32 accuracy) and attains the optimum.
    assert b @ x + c <= 1e-4
    assert 0.5 * x @ fisher @ x <= delta * 1.001
    assert g @ x == pytest.approx(g @ expected, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpo_recovery_step_when_the_whole_trust_region_is_infeasible(seed):
    """c beyond the reach of the trust region: CPO steps to decrease the linearised cost as far as it can,
    i.e. argmin bᵀx s.t. ½ xᵀFx ≤ δ, whatever the reward gradient says."""
    delta = 0.01
    fisher, g, b = _qp_problem(seed)
    s = b @ np.linalg.solve(fisher, b)
    c = 2.0 * np.sqrt(2 * delta * s)
    solution, _ = _cpo_from_dense(fisher, g, b, c, delta)
    assert int(solution.case) == 0
    constraint = [{"type": "ineq", "fun": lambda x: delta - 0.5 * x @ fisher @ x, "jac": lambda x: -fisher @ x}]
    result = minimize(lambda x: b @ x, np.zeros_like(b) + 1e-3, jac=lambda x: b, method="SLSQP",
                      constraints=constraint, options={"ftol": 1e-12, "maxiter": 500})
    assert result.success
    x = np.asarray(solution.step, np.float64)
    np.testing.assert_allclose(x, result.x, rtol=2e-2, atol=2e-3)
    assert b @ x + c > 0  # still infeasible after the step: no point of the region was feasible
    assert 0.5 * x @ fisher @ x == pytest.approx(delta, rel=1e-3)


def test_cpo_without_cost_gradient_is_the_trpo_step():
    delta = 0.02
    fisher, g, _ = _qp_problem(3)
    b = np.zeros_like(g)
    solution, _ = _cpo_from_dense(fisher, g, b, -1.0, delta)
    v = np.linalg.solve(fisher, g)
    assert int(solution.case) == 4
    np.testing.assert_allclose(solution.step, np.sqrt(2 * delta / (g @ v)) * v, rtol=1e-4)


# ------------------------------------------------------------------------------------------- value fit


def _linear_value(params, obs):
    """V(s) = s·w + b, [N, O] -> [N]."""
    return obs @ params["w"] + params["b"]


def _numpy_sgd_step(params, obs, returns, lr):
    """One gradient-descent step on mean (s·w + b − R)², float64."""
    residual = obs @ params["w"] + params["b"] - returns
    return {"w": params["w"] - lr * 2.0 * obs.T @ residual / len(obs), "b": params["b"] - lr * 2.0 * residual.mean()}


def _fit_jitted(optimizer, settings):
    return jax.jit(lambda params, obs, returns, key: fit_values(
        _linear_value, optimizer, params, optimizer.init(params), obs, returns, key, settings))


def test_minibatch_plan_leaves_the_remainder_of_a_pass_out():
    assert minibatch_plan(16, 4) == (4, 4)
    assert minibatch_plan(10, 3) == (3, 3)  # the 10th sample of each pass is left out
    assert minibatch_plan(5, 8) == (1, 5)  # more minibatches than samples: one sample each


def test_value_fit_of_two_nets_is_one_numpy_gradient_step_each_and_independent():
    rng = np.random.default_rng(0)
    n, o, lr = 12, 3, 0.1
    obs = rng.normal(size=(n, o))
    returns = (rng.normal(size=n), 3.0 + rng.normal(size=n))
    params = tuple({"w": rng.normal(size=o), "b": rng.normal(size=())} for _ in range(2))
    f32 = functools.partial(jax.tree.map, lambda x: jnp.asarray(x, jnp.float32))
    fit = _fit_jitted(optax.sgd(lr), ValueFitSettings(epochs=1, num_minibatches=1))  # one step on all rows
    result = fit(f32(params), f32(obs), f32(returns), jax.random.PRNGKey(0))
    for fitted, loss, start, target in zip(result.params, result.losses, params, returns):
        expected = _numpy_sgd_step(start, obs, target, lr)
        np.testing.assert_allclose(fitted["w"], expected["w"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fitted["b"], expected["b"], rtol=1e-5, atol=1e-6)
        # The reported loss is the mean squared error on all rows after the fit.
        expected_loss = np.mean((obs @ expected["w"] + expected["b"] - target) ** 2)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    # The losses are summed, so each net only sees its own: other cost returns leave the reward net as it was.
    other = fit(f32(params), f32(obs), f32((returns[0], -returns[1])), jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves(other.params[0]), jax.tree.leaves(result.params[0])):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(other.params[1]["w"], result.params[1]["w"])


def test_value_fit_minibatch_passes_match_a_numpy_loop():
    """Two passes of three minibatches of 3 of the 10 rows (the remainder left out), each pass shuffled by the
    permutation of fold_in(key, pass); one network with one array of returns (CSC's use)."""
    rng = np.random.default_rng(1)
    n, o, lr, epochs = 10, 2, 0.05, 2
    obs, returns = rng.normal(size=(n, o)), rng.normal(size=n)
    start = {"w": rng.normal(size=o), "b": np.zeros(())}
    key = jax.random.PRNGKey(3)
    fit = _fit_jitted(optax.sgd(lr), ValueFitSettings(epochs=epochs, num_minibatches=3))
    result = fit(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), start), jnp.asarray(obs, jnp.float32),
                 jnp.asarray(returns, jnp.float32), key)
    expected = start
    for epoch in range(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        for j in range(3):
            rows = perm[3 * j:3 * (j + 1)]
            expected = _numpy_sgd_step(expected, obs[rows], returns[rows], lr)
    np.testing.assert_allclose(result.params["w"], expected["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.params["b"], expected["b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.losses, np.mean((obs @ expected["w"] + expected["b"] - returns) ** 2),
                               rtol=1e-5)


# ------------------------------------------------------- policy steps on a linear-Gaussian policy (NumPy twin)

LIN_O, LIN_A, LIN_N = 3, 2, 40
LIN_SIGMA = np.array([0.5, 0.8])  # fixed: the mean KL is then exactly quadratic in θ, with Hessian F below
LIN_P = (LIN_O + 1) * LIN_A


def _linear_policy(theta, obs):
    """π_θ(·|s) = N([s, 1]·θ, diag σ²), θ [O + 1, A] or flat [P] (row-major)."""
    theta = jnp.reshape(theta, (LIN_O + 1, LIN_A))
    mean = jnp.concatenate([obs, jnp.ones(obs.shape[:-1] + (1,), obs.dtype)], axis=-1) @ theta
    scale_tril = jnp.broadcast_to(jnp.diag(jnp.asarray(LIN_SIGMA, mean.dtype)), mean.shape + (LIN_A,))
    return gaussian.Gaussian(mean=mean, scale_tril=scale_tril)


def _np_features(obs):
    return np.concatenate([obs, np.ones(obs.shape[:-1] + (1,))], axis=-1)


def _np_mean(theta, obs):
    return _np_features(obs) @ np.reshape(theta, (LIN_O + 1, LIN_A))


def _np_log_prob(theta, obs, action):
    z = (action - _np_mean(theta, obs)) / LIN_SIGMA
    return -0.5 * np.sum(z ** 2, -1) - np.sum(np.log(LIN_SIGMA)) - 0.5 * LIN_A * np.log(2 * np.pi)


def _np_kl(reference, theta, obs):
    """mean_n KL(π_reference ‖ π_θ) = mean_n ½ Σ_a ((μ_θ − μ_ref)/σ)²."""
    return np.mean(0.5 * np.sum(((_np_mean(theta, obs) - _np_mean(reference, obs)) / LIN_SIGMA) ** 2, -1))


def _np_fisher(obs):
    """The dense Hessian of the mean KL in flat θ: kron(mean_n x̃x̃ᵀ, diag σ⁻²), x̃ = [s, 1]."""
    x = _np_features(obs)
    return np.kron(x.T @ x / len(x), np.diag(1.0 / LIN_SIGMA ** 2))


def _np_score(theta, obs, action, weights):
    """mean_n weights_n ∇_θ log π_θ(a_n|s_n) as a flat [P]; ∇_{θ_ij} log π = x̃_i (a_j − μ_j)/σ_j²."""
    residual = (action - _np_mean(theta, obs)) / LIN_SIGMA ** 2
    return (_np_features(obs).T @ (weights[:, None] * residual) / len(obs)).ravel()


def _np_ratio_surrogate(theta, p, weights):
    return np.mean(np.exp(_np_log_prob(theta, p.obs, p.action) - p.old_log_prob) * weights)


class _Problem(NamedTuple):
    obs: np.ndarray  # [N, O]
    theta: np.ndarray  # [P] π_old
    action: np.ndarray  # [N, A] drawn from π_old
    old_log_prob: np.ndarray  # [N]
    advantage: np.ndarray  # [N]
    cost_advantage: np.ndarray  # [N]


def _problem(seed: int) -> _Problem:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(LIN_N, LIN_O))
    theta = 0.3 * rng.normal(size=LIN_P)
    action = _np_mean(theta, obs) + LIN_SIGMA * rng.normal(size=(LIN_N, LIN_A))
    noise = (action - _np_mean(theta, obs))[:, 0]
    return _Problem(obs, theta, action, _np_log_prob(theta, obs, action), rng.normal(size=LIN_N),
                    rng.normal(size=LIN_N) + 0.5 * noise)


def _batch(p: _Problem) -> PolicyBatch:
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return PolicyBatch(obs=f32(p.obs), action=f32(p.action), old_log_prob=f32(p.old_log_prob),
                       advantage=f32(p.advantage), cost_advantage=f32(p.cost_advantage),
                       old_dist=_linear_policy(f32(p.theta), f32(p.obs)))


def _settings(**overrides) -> PolicyStepSettings:
    base = dict(target_kl=0.01, entropy_coef=0.0, cg_iterations=3 * LIN_P, cg_damping=0.1, line_search_steps=10,
                backtrack_coeff=0.8, ppo_epochs=5, num_minibatches=4, ppo_clip=0.2)
    return PolicyStepSettings(**{**base, **overrides})


def _np_trpo_full_step(fisher, g, damping, delta):
    """√(2δ / gᵀ(F + dI)⁻¹g)·(F + dI)⁻¹g, the exact solution CG approximates (damping included)."""
    v = np.linalg.solve(fisher + damping * np.eye(len(g)), g)
    return np.sqrt(2.0 * delta / (g @ v)) * v


def _np_first_accepted(theta, full_step, accept, steps, coeff):
    for j in range(steps):
        if accept(theta + coeff ** j * full_step):
            return j
    return -1


def test_ppo_loss_matches_numpy_value_and_gradient():
    p = _problem(0)
    rng = np.random.default_rng(5)
    # The current policy moved from π_old and a perturbed old log-prob spread the ratios over both clip edges.
    theta = p.theta + 0.1 * rng.normal(size=LIN_P)
    p = p._replace(old_log_prob=p.old_log_prob + 0.4 * rng.normal(size=LIN_N))
    idx = np.arange(0, LIN_N, 2)
    settings = _settings(entropy_coef=0.01, ppo_clip=0.2)
    loss, grad = jax.jit(jax.value_and_grad(lambda t, b, i: ppo_loss(t, _linear_policy, b, i, settings)))(
        jnp.asarray(theta, jnp.float32), _batch(p), jnp.asarray(idx))

    obs, action, adv = p.obs[idx], p.action[idx], p.advantage[idx]
    ratio = np.exp(_np_log_prob(theta, obs, action) - p.old_log_prob[idx])
    assert np.any(ratio > 1.2) and np.any(ratio < 0.8) and np.any(np.abs(ratio - 1) < 0.2)
    surrogate = np.mean(np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv))
    entropy = np.sum(np.log(LIN_SIGMA)) + 0.5 * LIN_A * (1 + np.log(2 * np.pi))
    np.testing.assert_allclose(loss, -(surrogate + 0.01 * entropy), rtol=1e-5)
    np.testing.assert_allclose(clipped_surrogate(jnp.asarray(ratio), jnp.asarray(adv), 0.2), surrogate, rtol=1e-5)
    # Only the samples whose unclipped term is the minimum pass a gradient (ρA ∇log π).
    clipped_out = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    expected_grad = -_np_score(theta, obs, action, np.where(clipped_out, 0.0, ratio * adv))
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_ppo_stops_at_the_step_a_python_loop_stops():
    """The epochs stop after the first step whose mean KL on all samples exceeds 1.5·δ, as a plain loop does."""
    p = _problem(1)
    optimizer = optax.adam(0.05)
    num_samples, per_pass = LIN_N, 4
    size, key = LIN_N // per_pass, jax.random.PRNGKey(7)

    @jax.jit
    def one_step(theta, opt_state, idx):
        grads = jax.grad(ppo_loss)(theta, _linear_policy, _batch(p), idx, _settings())
        updates, opt_state = optimizer.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    def python_loop(stop_kl):
        theta, opt_state, kls = jnp.asarray(p.theta, jnp.float32), optimizer.init(jnp.asarray(p.theta, jnp.float32)), []
        for s in range(5 * per_pass):
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, s // per_pass), num_samples))
            theta, opt_state = one_step(theta, opt_state, jnp.asarray(perm[(s % per_pass) * size:][:size]))
            kls.append(_np_kl(p.theta, np.asarray(theta, np.float64), p.obs))
            if kls[-1] > stop_kl:
                break
        return theta, kls

    _, kls = python_loop(np.inf)  # the KL after each of the 20 planned steps
    # A stop threshold between the largest KL of the first 6 steps and the first later one above it.
    first_over = next(s for s in range(6, len(kls)) if kls[s] > max(kls[:6]) * 1.01)
    threshold = 0.5 * (max(kls[:6]) + kls[first_over])
    expected_theta, stopped_kls = python_loop(threshold)
    assert len(stopped_kls) == first_over + 1 < 20

    settings = _settings(target_kl=threshold / 1.5)
    step = jax.jit(lambda t, s, b, k: ppo_step(_linear_policy, optimizer, t, s, b, k, settings))(
        jnp.asarray(p.theta, jnp.float32), optimizer.init(jnp.asarray(p.theta, jnp.float32)), _batch(p), key)
    assert round(float(step.metrics["policy/steps_fraction"]) * 20) == first_over + 1
    np.testing.assert_allclose(step.params, expected_theta, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(step.metrics["policy/kl"], stopped_kls[-1], rtol=1e-3)
    # Without the stop every planned step is taken.
    unstopped = jax.jit(lambda t, s, b, k: ppo_step(_linear_policy, optimizer, t, s, b, k, _settings(target_kl=1e9)))(
        jnp.asarray(p.theta, jnp.float32), optimizer.init(jnp.asarray(p.theta, jnp.float32)), _batch(p), key)
    assert float(unstopped.metrics["policy/steps_fraction"]) == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_trpo_step_is_the_dense_natural_gradient_step(seed):
    """x = √(2δ / gᵀ(F + dI)⁻¹g)·(F + dI)⁻¹g with F the dense Hessian of the mean KL and d the CG damping;
    the line search then takes the candidate a NumPy check of KL ≤ δ and the surrogate's improvement takes."""
    p, settings = _problem(seed), _settings(target_kl=0.02)
    step = jax.jit(lambda t, b: trpo_policy_step(_linear_policy, t, b, settings))(
        jnp.asarray(p.theta, jnp.float32), _batch(p))
    fisher = _np_fisher(p.obs)
    g = _np_score(p.theta, p.obs, p.action, p.advantage)  # ∇ mean(ρ·A) at π_old
    full_step = _np_trpo_full_step(fisher, g, settings.cg_damping, settings.target_kl)
    np.testing.assert_allclose(step.full_step, full_step, rtol=2e-3, atol=1e-6)
    # The damping makes the step shorter than the trust region's edge: ½xᵀFx = δ·xᵀFx / xᵀ(F + dI)x < δ.
    assert 0.5 * full_step @ fisher @ full_step < settings.target_kl

    old_value = _np_ratio_surrogate(p.theta, p, p.advantage)
    j = _np_first_accepted(p.theta, full_step, lambda t: _np_kl(p.theta, t, p.obs) <= settings.target_kl
                           and _np_ratio_surrogate(t, p, p.advantage) > old_value, 10, 0.8)
    assert int(step.metrics["policy/line_search_step"]) == j
    new_theta = p.theta + 0.8 ** j * full_step
    np.testing.assert_allclose(step.params, new_theta, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(step.metrics["policy/kl"], _np_kl(p.theta, new_theta, p.obs), rtol=5e-3)
    np.testing.assert_allclose(step.metrics["policy/surrogate_improvement"],
                               _np_ratio_surrogate(new_theta, p, p.advantage) - old_value, rtol=5e-3)
    np.testing.assert_allclose(step.metrics["policy/cost_surrogate_change"],
                               _np_ratio_surrogate(new_theta, p, p.cost_advantage)
                               - _np_ratio_surrogate(p.theta, p, p.cost_advantage), rtol=5e-3, atol=1e-6)


# The generic step on a log-likelihood surrogate mean_n w_n (log π_θ(a_n) − log π_old(a_n)) and a mean KL from a
# reference policy π_ref = π_{θ − shift·x}: its Hessian is F whatever the reference, but a reference behind θ
# along x makes the KL reject the longer candidates, and positive weights make the surrogate concave so that a
# large δ overshoots its maximum.
@pytest.mark.parametrize("delta,positive_weights,shift,expect", [
    (0.01, False, 0.0, "first"),  # a small step: the first candidate
    (3.0, True, 0.0, "backtracked"),  # overshoots the concave surrogate's maximum: backtracks on the surrogate
    (0.05, False, 0.3, "backtracked"),  # starts at KL 0.09·δ, the full step ends at 1.6·δ: backtracks on the KL
    (0.05, False, 1.2, "none"),  # starts at KL 1.4·δ, outside the trust region: every candidate rejected
])
def test_natural_gradient_line_search_accepts_as_numpy_says(delta, positive_weights, shift, expect):
    p, settings = _problem(2), _settings(target_kl=delta)
    weights = 1.0 + 0.1 * np.abs(p.advantage) if positive_weights else p.advantage
    fisher = _np_fisher(p.obs)
    full_step = _np_trpo_full_step(fisher, _np_score(p.theta, p.obs, p.action, weights), settings.cg_damping, delta)
    reference = p.theta - shift * full_step
    obs, action, old_log_prob = (jnp.asarray(x, jnp.float32) for x in (p.obs, p.action, p.old_log_prob))
    reference_dist = _linear_policy(jnp.asarray(reference, jnp.float32), obs)

    def surrogate(flat):
        return jnp.mean(jnp.asarray(weights, jnp.float32)
                        * (gaussian.log_prob(_linear_policy(flat, obs), action) - old_log_prob))

    def kl(flat):
        return jnp.mean(gaussian.kl(reference_dist, _linear_policy(flat, obs)))

    step = jax.jit(lambda t: natural_gradient_step(surrogate, kl, t, settings))(jnp.asarray(p.theta, jnp.float32))
    np.testing.assert_allclose(step.full_step, full_step, rtol=2e-3, atol=1e-6)

    def np_surrogate(theta):
        return np.mean(weights * (_np_log_prob(theta, p.obs, p.action) - p.old_log_prob))

    j = _np_first_accepted(p.theta, full_step, lambda t: _np_kl(reference, t, p.obs) <= delta
                           and np_surrogate(t) > np_surrogate(p.theta), 10, 0.8)
    assert {"first": j == 0, "backtracked": j > 0, "none": j == -1}[expect], j
    assert int(step.step_index) == j
    np.testing.assert_allclose(step.params, p.theta + (0.8 ** j * full_step if j >= 0 else 0.0), rtol=2e-3,
                               atol=1e-5)
    np.testing.assert_allclose(step.value_new - step.value_old,
                               np_surrogate(np.asarray(step.params, np.float64)) - np_surrogate(p.theta),
                               rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("c_fraction,expected_case,expected_index", [(-3.0, 3, 0), (-0.1, 2, 2), (0.3, 1, 0),
                                                                      (2.0, 0, 0)])
def test_cpo_policy_step_takes_cpo_steps_solution_and_keeps_the_cost_condition(c_fraction, expected_case,
                                                                              expected_index):
    """The proposed step is `cpo_step` on the dense (F + dI)⁻¹g and (F + dI)⁻¹b; the accepted candidate is the
    first a NumPy check of KL ≤ δ, the cost-surrogate condition and (cases ≥ 2) the reward improvement takes.
    The cost advantage follows the reward advantage, so in case 2 (the constraint cuts the trust region) the
    cost surrogate's curvature pushes the first candidates past the condition."""
    p, settings = _problem(1), _settings(target_kl=0.02)
    p = p._replace(cost_advantage=p.advantage + 0.5 * np.random.default_rng(51).normal(size=LIN_N))
    damping, delta = settings.cg_damping, settings.target_kl
    damped = _np_fisher(p.obs) + damping * np.eye(LIN_P)
    g = _np_score(p.theta, p.obs, p.action, p.advantage)
    b = _np_score(p.theta, p.obs, p.action, p.cost_advantage)
    v, w = np.linalg.solve(damped, g), np.linalg.solve(damped, b)
    c = c_fraction * np.sqrt(2 * delta * (b @ w))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    expected = cpo_step(f32(v), f32(w), f32(g @ v), f32(g @ w), f32(b @ w), f32(c), f32(b @ b), delta)
    assert int(expected.case) == expected_case

    step = jax.jit(lambda t, batch, c: cpo_policy_step(_linear_policy, t, batch, c, settings))(
        f32(p.theta), _batch(p), f32(c))
    assert int(step.metrics["cpo/case"]) == expected_case
    np.testing.assert_allclose(step.full_step, expected.step, rtol=5e-3, atol=1e-5)
    np.testing.assert_allclose(step.metrics["cpo/lambda"], expected.lam, rtol=5e-3)
    np.testing.assert_allclose(step.metrics["cpo/nu"], expected.nu, rtol=5e-3, atol=1e-6)

    full_step = np.asarray(expected.step, np.float64)
    reward_old = _np_ratio_surrogate(p.theta, p, p.advantage)
    cost_old = _np_ratio_surrogate(p.theta, p, p.cost_advantage)

    def cost_ok(theta):
        return _np_ratio_surrogate(theta, p, p.cost_advantage) - cost_old <= max(-c, 0.0)

    def accept(theta):
        improved = _np_ratio_surrogate(theta, p, p.advantage) > reward_old or expected_case <= 1
        return _np_kl(p.theta, theta, p.obs) <= delta and improved and cost_ok(theta)

    j = _np_first_accepted(p.theta, full_step, accept, 10, 0.8)
    assert j == expected_index
    assert int(step.metrics["policy/line_search_step"]) == j
    if j > 0:
        assert not cost_ok(p.theta + full_step)  # the rejections were the cost condition's
    if j >= 0:
        new_theta = np.asarray(step.params, np.float64)
        np.testing.assert_allclose(new_theta, p.theta + 0.8 ** j * full_step, rtol=5e-3, atol=1e-5)
        assert cost_ok(new_theta)
        np.testing.assert_allclose(step.metrics["policy/cost_surrogate_change"],
                                   _np_ratio_surrogate(new_theta, p, p.cost_advantage) - cost_old, rtol=5e-3,
                                   atol=1e-6)
    else:
        np.testing.assert_array_equal(step.params, np.float32(p.theta))


# ------------------------------------------------------------------------------- learning on speed_limit

# 12000 env steps per method: 30 rollouts of one 50-step episode in each of 8 envs, 6 chunks of 5 rollouts;
# evaluations only before training and at the end.
LEARN = ["env=speed_limit", "network.hidden=[32,32]", "num_envs=8", "chunk_env_steps=2000",
         "total_env_steps=12000", "eval_every_env_steps=12000", "checkpoint_every_env_steps=12000",
         "eval_episodes=4", "progress=false", "onpolicy.gamma=0.95"]


def _train(algo: str, out_dir) -> dict:
    """Run `algo` and return the first and last evaluation rows of member 0."""
    assert run.main(LEARN + [f"algo={algo}", f"out_dir={out_dir}", f"run_name={algo}"]) == 0
    with open(os.path.join(out_dir, algo, "metrics.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["member"] == "0"]
    rows.sort(key=lambda r: int(r["env_steps"]))
    first, last = rows[0], rows[-1]
    assert int(first["env_steps"]) == 0 and int(last["env_steps"]) == 12000
    return {"first": {k: float(v) for k, v in first.items() if v != ""},
            "last": {k: float(v) for k, v in last.items() if v != ""},
            "dir": os.path.join(out_dir, algo)}


def _final_params(run_dir: str):
    from cvpo_jax import checkpoint, envs
    from cvpo_jax.algorithms import make_trainer
    from cvpo_jax.core.members import SweepMembers

    cfg = run.resolve([f"resume={run_dir}"])
    trainer = make_trainer(cfg, envs.make(cfg.env))
    keys = SweepMembers.from_config(cfg).keys()
    like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(trainer.init, keys))
    return checkpoint.restore(run_dir, checkpoint.latest_iteration(run_dir), like).learner.params


@pytest.fixture(scope="session")  # session: computed once per xdist worker
def trpo_run(tmp_path_factory):
    return _train("trpo", tmp_path_factory.mktemp("trpo"))


def test_unconstrained_trpo_learns_to_speed_past_the_cost_limit(trpo_run):
    first, last = trpo_run["first"], trpo_run["last"]
    assert last["eval/episode_cost"] > 5.0  # the limit of speed_limit
    assert last["eval/episode_reward"] > first["eval/episode_reward"] + 20.0
    assert last["lagrange/lambda"] == 0.0
    assert last["policy/accepted"] > 0.5  # most line searches found a step
    assert last["policy/kl"] <= 0.01 + 1e-6


@pytest.mark.parametrize("algo", ["ppo_lag", "trpo_lag", "cpo"])
def test_constrained_method_trades_reward_for_cost(algo, trpo_run, tmp_path):
    result = _train(algo, tmp_path)
    first, last, reference = result["first"], result["last"], trpo_run["last"]
    # Lower cost than the unconstrained method, in evaluation and in training ...
    assert last["eval/episode_cost"] < reference["eval/episode_cost"]
    assert last["train/episode_cost"] < reference["train/episode_cost"]
    # ... while still learning to move forward.
    assert last["eval/episode_reward"] > first["eval/episode_reward"] + 5.0
    if algo in ("ppo_lag", "trpo_lag"):
        assert last["lagrange/lambda"] > 0.0  # the PID multiplier is what holds the cost down
    else:
        assert last["cpo/case"] <= 2.0  # the cost constraint was active in CPO's steps


def test_resumed_run_matches_the_uninterrupted_one(trpo_run, tmp_path, capsys):
    """Half the steps, then a resume to the full length: the same parameters bit for bit, since the whole
    state (learner, environments, key) is checkpointed; then the evaluation command reads the run."""
    from cvpo_jax import evaluate

    args = LEARN + ["algo=trpo", f"out_dir={tmp_path}", "run_name=halves", "total_env_steps=6000"]
    assert run.main(args) == 0
    assert run.main([f"resume={tmp_path / 'halves'}", "total_env_steps=12000"]) == 0
    for a, b in zip(jax.tree.leaves(_final_params(str(tmp_path / "halves"))),
                    jax.tree.leaves(_final_params(trpo_run["dir"]))):
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()
    assert evaluate.main([f"run={trpo_run['dir']}", "episodes=2", f"picture={tmp_path / 'rollout.png'}"]) == 0
    assert "trpo on speed_limit" in capsys.readouterr().out


def test_non_finite_parameters_stop_an_on_policy_run(trpo_run, tmp_path, monkeypatch, capsys):
    """NaN value-network weights (as a diverged fit would leave them) must stop the run before the chunk is
    checkpointed: the trainer's `nonfinite` flag covers the on-policy learners too."""
    import shutil

    from cvpo_jax import checkpoint

    run_dir = tmp_path / "poisoned"
    shutil.copytree(trpo_run["dir"], run_dir)
    before = checkpoint.latest_iteration(str(run_dir))
    real_restore = checkpoint.restore

    def restore_with_nan_values(*args, **kwargs):
        state = real_restore(*args, **kwargs)
        params = state.learner.params
        poisoned = params._replace(reward_value=jax.tree.map(lambda x: x * np.nan, params.reward_value))
        return state.replace(learner=state.learner.replace(params=poisoned))

    monkeypatch.setattr(checkpoint, "restore", restore_with_nan_values)
    capsys.readouterr()
    assert run.main([f"resume={run_dir}", "total_env_steps=14000"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0]
    assert checkpoint.latest_iteration(str(run_dir)) == before
