"""CSC (baselines/csc.py): the CQL(ζ) penalty, the rejection rule, the λ step, and learning on `speed_limit`."""

from __future__ import annotations

import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvpo_jax import policy as gaussian
from cvpo_jax import run
from cvpo_jax.baselines import csc
from cvpo_jax.learner import MemberSettings
from cvpo_jax.networks import GaussianPolicyNet, SingleQ


def _linear_q(w, obs, actions):
    """Q(s, a) = [s, a]·w, broadcasting obs [B, O] over particle axes of actions [B, (K,) A]."""
    if actions.ndim == obs.ndim + 1:
        obs = jnp.broadcast_to(obs[:, None, :], actions.shape[:-1] + obs.shape[-1:])
    return jnp.concatenate([obs, actions], axis=-1) @ w


def test_cql_loss_value_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    b, k, o, a = 7, 5, 3, 2
    obs = rng.normal(size=(b, o)).astype(np.float32)
    data_action = rng.uniform(-1, 1, size=(b, a)).astype(np.float32)
    policy_action = rng.uniform(-1, 1, size=(b, k, a)).astype(np.float32)
    target = rng.normal(size=(b,)).astype(np.float32)
    w = rng.normal(size=(o + a,)).astype(np.float32)
    alpha = 0.5

    (loss, aux), grad = jax.value_and_grad(csc.safety_critic_loss, has_aux=True)(
        jnp.asarray(w), _linear_q, obs, data_action, policy_action, target, alpha)

    x_data = np.concatenate([obs, data_action], axis=1)  # [B, O + A]
    x_policy = np.concatenate([np.repeat(obs[:, None], k, axis=1), policy_action], axis=2)  # [B, K, O + A]
    q_data, q_policy = x_data @ w, x_policy @ w
    penalty = -q_policy.mean() + q_data.mean()  # eq. 2's bracket
    expected_loss = alpha * penalty + 0.5 * np.mean((q_data - target) ** 2)
    expected_grad = alpha * (x_data.mean(0) - x_policy.reshape(-1, o + a).mean(0)) \
        + ((q_data - target)[:, None] * x_data).mean(0)
    np.testing.assert_allclose(float(aux["penalty"]), penalty, rtol=1e-5)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-6)

    # The sign: descending α·penalty raises Q on the policy's actions and lowers it on the data's.
    step = -np.asarray(jax.grad(lambda w: alpha * csc.cql_penalty(_linear_q(w, obs, policy_action),
                                                                   _linear_q(w, obs, data_action)))(jnp.asarray(w)))
    assert (x_policy.reshape(-1, o + a).mean(0) - x_data.mean(0)) @ step > 0

    # α = 0 is plain regression: ½ MSE and its gradient.
    (loss0, _), grad0 = jax.value_and_grad(csc.safety_critic_loss, has_aux=True)(
        jnp.asarray(w), _linear_q, obs, data_action, policy_action, target, 0.0)
    np.testing.assert_allclose(float(loss0), 0.5 * np.mean((q_data - target) ** 2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad0), ((q_data - target)[:, None] * x_data).mean(0), rtol=1e-4,
                               atol=1e-6)


def _fit_on_fixed_batch(alpha: float):
    """Train a small Q_C on one fixed batch; return the mean of Q_C − target on the policy's actions."""
    rng = np.random.default_rng(1)
    b, k = 256, 8
    # Four states, each with many data actions, so the behaviour density μ(a|s) is well defined per state.
    obs = np.repeat(rng.uniform(-1, 1, size=(4, 3)), b // 4, axis=0).astype(np.float32)
    # Broad behaviour data covering the policy's actions (so the CQL(ζ) fixed point Q = B̂Q + α(π/μ − 1) is
    # finite), and a policy concentrated inside them: π/μ > 1 there, so Q_C must rise above the target.
    data_action = np.clip(0.3 + 0.4 * rng.normal(size=(b, 2)), -1, 1).astype(np.float32)
    policy_action = np.clip(0.4 + 0.15 * rng.normal(size=(b, k, 2)), -1, 1).astype(np.float32)

    def bellman_target(actions):  # a fixed B̂Q (γ = 0): a smooth cost of the action
        return (0.5 * actions[..., 0] ** 2 + 0.2 * actions[..., 1]).astype(np.float32)

    net = SingleQ(hidden=(32, 32))
    params = net.init(jax.random.PRNGKey(0), obs, data_action)
    optimizer = optax.adam(3e-3)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            grads = jax.grad(lambda p: csc.safety_critic_loss(
                p, net.apply, obs, data_action, policy_action, bellman_target(data_action), alpha)[0])(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=1500)
        return params

    params = train(params)
    q_policy = np.asarray(net.apply(params, obs, policy_action))
    return float(np.mean(q_policy - bellman_target(policy_action)))


def test_cql_over_estimates_on_policy_actions_and_alpha_zero_does_not():
    over = _fit_on_fixed_batch(0.5)
    small = _fit_on_fixed_batch(0.05)
    plain = _fit_on_fixed_batch(0.0)
    assert abs(plain) < 0.05, plain  # plain regression interpolates the target
    # CQL(ζ) with the reversed sign: Q_C above the target where π puts more mass than the data (the tabular
    # fixed point lifts it by α(π/μ − 1), α·3.1 on average here), more so for a larger α.
    assert over > 0.5, over
    assert plain + 0.1 < small < over, (plain, small, over)


def _numpy_rejection(draws, q, thresholds):
    """Line 6 as a plain loop: execute the first draw with Q_C ≤ ε; after all, the lowest Q_C."""
    actions, counts, accepted = [], [], []
    for e in range(draws.shape[0]):
        chosen = None
        for m in range(draws.shape[1]):
            if q[e, m] <= thresholds[e]:
                chosen = m
                break
        if chosen is None:
            actions.append(draws[e, int(np.argmin(q[e]))])
            counts.append(draws.shape[1])
            accepted.append(False)
        else:
            actions.append(draws[e, chosen])
            counts.append(chosen + 1)
            accepted.append(True)
    return np.stack(actions), np.asarray(counts), np.asarray(accepted)


@pytest.mark.parametrize("num_draws", [1, 7, 100])
def test_rejection_rule_matches_a_numpy_loop(num_draws):
    e, a = 6, 2
    dist = gaussian.Gaussian(mean=jnp.linspace(-0.5, 0.5, e * a).reshape(e, a),
                             scale_tril=jnp.broadcast_to(jnp.array([[0.5, 0.0], [0.2, 0.4]]), (e, a, a)))
    key = jax.random.PRNGKey(3)
    draws = gaussian.sample(dist, key, num_draws)  # [E, M, A]
    # Independent draws from the same key: a = μ + L ξ, ξ ~ N(0, I) in draw order.
    noise = np.asarray(jax.random.normal(key, (e, num_draws, a)))
    draws_np = np.asarray(dist.mean)[:, None, :] + np.einsum("eij,emj->emi", np.asarray(dist.scale_tril), noise)
    np.testing.assert_allclose(np.asarray(draws), draws_np, rtol=1e-5, atol=1e-6)
    q = 2.0 * draws_np[..., 0] + draws_np[..., 1]  # any Q_C will do for the rule
    # Per-env thresholds: one accepts almost anything, one nothing, the rest in between.
    thresholds = np.array([10.0, -10.0, 0.0, -0.5, 0.5, -1.5], np.float32)

    chosen = csc.select_action(jnp.asarray(draws_np), jnp.asarray(q), jnp.asarray(thresholds))
    actions, counts, accepted = _numpy_rejection(draws_np, q, thresholds)
    np.testing.assert_allclose(np.asarray(chosen.action), actions, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(chosen.num_draws), counts)
    np.testing.assert_array_equal(np.asarray(chosen.accepted), accepted)
    assert np.all(np.asarray(chosen.num_draws) <= num_draws)  # the cap
    assert not accepted[1] and counts[1] == num_draws  # ε = −10: all rejected, the safest is executed
    np.testing.assert_allclose(np.asarray(chosen.action)[1], draws_np[1, np.argmin(q[1])], rtol=1e-6)
    assert accepted[0] and counts[0] == 1


def test_explore_executes_a_policy_draw_under_the_threshold():
    cfg = run.resolve(["env=speed_limit", "algo=csc", "network.hidden=[16]", "num_envs=5",
                       "csc.max_resamples=9", "onpolicy.gamma=0.9"])
    learner = csc.make_csc_learner(cfg, 3, 2)
    state = learner.init(jax.random.PRNGKey(0))
    obs = jax.random.uniform(jax.random.PRNGKey(1), (5, 3), minval=-1, maxval=1)
    settings = MemberSettings(cost_threshold=jnp.float32(0.0), kl_bound=jnp.float32(0.0),
                                  cost_limit=jnp.float32(5.0))
    key = jax.random.PRNGKey(2)
    action, log_prob, metrics = learner.explore(state, obs, key, settings)

    # Before any episode V̂_C = χ, so ε = (1 − γ)(χ − χ) = 0 (Algorithm 1 line 2).
    assert float(metrics["csc/rejection_threshold"]) == 0.0
    # Rebuild the draws and their Q_C one draw at a time, then run the plain loop.
    policy_dist = GaussianPolicyNet(hidden=(16,), action_size=2).apply(state.params.policy, obs)
    draws = np.asarray(gaussian.sample(policy_dist, key, 9))  # [E, M, A]
    q = np.stack([np.asarray(SingleQ(hidden=(16,)).apply(state.params.safety_critic, obs,
                                                            jnp.clip(draws[:, m], -1, 1))) for m in range(9)], 1)
    expected, counts, accepted = _numpy_rejection(draws, q, np.zeros(5))
    np.testing.assert_allclose(np.asarray(action), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(log_prob), np.asarray(gaussian.log_prob(policy_dist, expected)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["csc/resamples"]), counts.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["csc/all_rejected"]), 1.0 - accepted.mean(), rtol=1e-6)


def test_rejection_threshold_and_lambda_update_by_hand():
    # ε = (1 − γ)(χ − V̂_C).
    assert float(csc.rejection_threshold(jnp.float32(1.0), jnp.float32(0.25), 0.9)) == pytest.approx(0.075)
    assert float(csc.rejection_threshold(jnp.float32(1.0), jnp.float32(3.0), 0.99)) == pytest.approx(-0.02)
    # λ ← max(0, λ + η(E[Â_C]/(1 − γ) − (χ − V̂_C))).
    # Over the limit: 0.3 + 0.04·(0.02/0.1 − (1.0 − 1.5)) = 0.3 + 0.04·0.7 = 0.328.
    assert float(csc.lambda_update(jnp.float32(0.3), jnp.float32(0.02), jnp.float32(1.0), jnp.float32(1.5),
                                   0.9, 0.04)) == pytest.approx(0.328, abs=1e-6)
    # Under it: 0.3 + 0.04·(−0.01/0.1 − (1.0 − 0.5)) = 0.3 − 0.024 = 0.276.
    assert float(csc.lambda_update(jnp.float32(0.3), jnp.float32(-0.01), jnp.float32(1.0), jnp.float32(0.5),
                                   0.9, 0.04)) == pytest.approx(0.276, abs=1e-6)
    # Projected to λ ≥ 0: 0.01 + 0.04·(0 − 2) < 0.
    assert float(csc.lambda_update(jnp.float32(0.01), jnp.float32(0.0), jnp.float32(2.0), jnp.float32(0.0),
                                   0.99, 0.04)) == 0.0


# A tiny CSC run on speed_limit (episodes of 50 steps, cost limit 5): one rollout of 8 envs per update.
TINY_CSC = [
    "env=speed_limit", "algo=csc", "network.hidden=[32,32]", "num_envs=8", "chunk_env_steps=2000",
    "total_env_steps=10000", "eval_every_env_steps=2000", "eval_episodes=4", "progress=false",
    "replay_capacity=10000", "csc.batch_size=64", "onpolicy.gamma=0.9", "csc.cql_alpha=0.05",
]


def test_csc_learns_speed_limit_within_its_cost_limit(tmp_path):
    start = time.time()
    assert run.main(TINY_CSC + [f"out_dir={tmp_path}", "run_name=csc"]) == 0
    elapsed = time.time() - start
    with open(os.path.join(tmp_path, "csc", "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    first, last = rows[0], rows[-1]
    assert int(last["env_steps"]) == 10000
    # Unconstrained, the task pays ~50 per episode; CSC's policy ends well under that, near its limit of 5 ...
    assert float(last["eval/episode_cost"]) <= 10.0, last
    # ... while earning more than the untrained policy.
    assert float(last["eval/episode_reward"]) > float(first["eval/episode_reward"]) + 5.0, (first, last)
    # The training episodes, behind the safety filter, stay within the limit too.
    assert float(last["train/episode_cost"]) <= 5.0
    for name in ("csc/lambda", "csc/rejection_threshold", "csc/resamples", "csc/all_rejected", "csc/q_c",
                 "csc/cql_penalty", "csc/failures_per_episode", "policy/kl", "policy/line_search_step",
                 "value/reward_loss"):
        assert np.isfinite(float(last[name])), name
    assert 1.0 <= float(last["csc/resamples"]) <= 100.0
    print(f"csc speed_limit run: {elapsed:.1f} s")
