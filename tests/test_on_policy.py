"""The on-policy baselines: GAE, the natural-gradient core, CPO's step, and learning on `speed_limit`.

The learning tests train each method through `cvpo_jax.run.main` with one shared tiny configuration (only
`algo` differs), so reruns hit the persistent compilation cache; unconstrained TRPO is trained once per module
and serves as the reference the constrained methods must beat on cost.
"""

from __future__ import annotations

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize

from cvpo_jax import policy as gaussian
from cvpo_jax import run
from cvpo_jax.baselines.advantages import gae
from cvpo_jax.baselines.natural_gradient import (backtracking_line_search, conjugate_gradient,
                                                 fisher_vector_product)
from cvpo_jax.baselines.on_policy import cpo_step
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
    from cvpo_jax.trainer import member_keys

    cfg = run.resolve([f"resume={run_dir}"])
    trainer = make_trainer(cfg, envs.make(cfg.env), cfg.episode_length)
    like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(trainer.init, member_keys(cfg)))
    return checkpoint.restore(run_dir, checkpoint.latest_iteration(run_dir), like).learner.params


@pytest.fixture(scope="module")
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
