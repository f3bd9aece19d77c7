"""PID Lagrangian against hand-computed values, and SAC-Lag / TD3-Lag / DDPG-Lag learning on `speed_limit`.

Each learning run trains a constrained member (limit 5) next to an unconstrained one (limit 1000) in one
program, as the CVPO trainer test does, so the contrast comes from λ alone.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from cvpo_jax import run
from cvpo_jax.baselines.pid_lagrangian import PIDGains, init_pid, pid_update


def _run_pid(errors, gains, initial=0.0, limit=10.0):
    state = init_pid(gains, initial)
    multipliers = []
    for e in errors:
        state = pid_update(state, limit + e, limit, gains)
        multipliers.append(float(state.multiplier))
    return multipliers, state


def test_pid_matches_hand_computed_sequence():
    gains = PIDGains(kp=0.5, ki=0.1, kd=2.0, max_multiplier=100.0)
    # e:          4     6     1      -3     -5
    # I:          4    10    11       8      3
    # D:          4     2     0       0      0        (only rises count)
    # λ: 2+0.4+8=10.4, 3+1+4=8, 0.5+1.1=1.6, -1.5+0.8<0 -> 0, -2.5+0.3 -> 0
    multipliers, state = _run_pid([4.0, 6.0, 1.0, -3.0, -5.0], gains)
    np.testing.assert_allclose(multipliers, [10.4, 8.0, 1.6, 0.0, 0.0], rtol=1e-6, atol=1e-6)
    assert float(state.integral) == pytest.approx(3.0)


def test_pid_integral_never_negative_and_clip_holds():
    gains = PIDGains(kp=0.0, ki=1.0, kd=0.0, max_multiplier=2.5)
    multipliers, state = _run_pid([-4.0, -4.0, 1.0, 1.0, 1.0, 1.0], gains)
    # A long safe stretch builds no credit: the first violations raise λ at once; λ stops at its cap.
    np.testing.assert_allclose(multipliers, [0.0, 0.0, 1.0, 2.0, 2.5, 2.5])
    assert float(state.integral) == pytest.approx(4.0)


def test_pid_with_integral_only_is_projected_gradient_ascent_and_keeps_initial_value():
    gains = PIDGains(kp=0.0, ki=0.05, kd=0.0, max_multiplier=100.0)
    errors = [3.0, -1.0, 2.0, -10.0, 0.0]
    multipliers, _ = _run_pid(errors, gains, initial=0.2)
    lam, expected = 0.2, []
    for e in errors:
        lam = max(0.0, lam + 0.05 * e)
        expected.append(lam)
    np.testing.assert_allclose(multipliers, expected, rtol=1e-6, atol=1e-7)
    held, _ = _run_pid([0.0, 0.0], gains, initial=0.7)
    np.testing.assert_allclose(held, [0.7, 0.7], rtol=1e-6)


TINY_OFF_POLICY = [
    "env=speed_limit", "network.hidden=[32,32]", "offpolicy.batch_size=64", "num_envs=4", "chunk_env_steps=400",
    "warmup_env_steps=200", "offpolicy.gamma=0.9", "offpolicy.polyak=0.95", "eval_episodes=4", "progress=false",
    "sweep.cost_limits=[5,1000]", "total_env_steps=4000", "eval_every_env_steps=1000",
    "checkpoint_every_env_steps=4000",
]


def _final_rows(run_dir: str) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    final = max(int(r["env_steps"]) for r in rows)
    return {int(r["member"]): r for r in rows if int(r["env_steps"]) == final}


@pytest.mark.parametrize("algo", ["sac_lag", "td3_lag", "ddpg_lag"])
def test_lagrangian_baseline_learns_under_the_limit(algo, tmp_path):
    assert run.main(TINY_OFF_POLICY + [f"algo={algo}", f"out_dir={tmp_path}", "run_name=r"]) == 0
    last = _final_rows(str(tmp_path / "r"))
    constrained, unconstrained = last[0], last[1]
    # Unconstrained, the method drives over the speed limit every step; λ stays 0 there.
    assert float(unconstrained["eval/episode_cost"]) > 30.0
    assert float(unconstrained["lagrange/lambda"]) == 0.0
    # The PID multiplier rose for the constrained member and the policy ends under its limit with reward.
    assert float(constrained["lagrange/lambda"]) > 0.1
    assert float(constrained["eval/episode_cost"]) <= 5.0
    assert float(constrained["eval/episode_reward"]) > 5.0


def test_squashed_log_density_is_the_change_of_variables_of_the_gaussian():
    import jax
    import jax.numpy as jnp
    from scipy import stats

    from cvpo_jax.baselines.off_policy import squashed_sample
    from cvpo_jax.policy import Gaussian

    mean = jnp.array([[0.3, -0.8], [0.95, 0.0]])  # the network's (deterministic) action, inside the box
    tril = jnp.array([[[0.5, 0.0], [0.2, 0.3]], [[0.1, 0.0], [-0.05, 1.2]]])
    action, log_prob = squashed_sample(Gaussian(mean, tril), jax.random.PRNGKey(3))
    action, log_prob = np.asarray(action, np.float64), np.asarray(log_prob, np.float64)
    assert np.all(np.abs(action) < 1.0)
    for b in range(2):
        u = np.arctanh(action[b])
        cov = np.asarray(tril[b], np.float64) @ np.asarray(tril[b], np.float64).T
        gaussian = stats.multivariate_normal(np.arctanh(np.asarray(mean[b], np.float64)), cov).logpdf(u)
        expected = gaussian - np.sum(np.log1p(-np.tanh(u) ** 2))
        assert log_prob[b] == pytest.approx(expected, rel=1e-3, abs=1e-3)
