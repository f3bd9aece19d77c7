"""PID Lagrangian against hand-computed values, and SAC-Lag / TD3-Lag / DDPG-Lag learning on `speed_limit`.

Each learning run trains a constrained member (limit 5) next to an unconstrained one (limit 1000) in one
program, as the CVPO trainer test does, so the contrast comes from λ alone.
"""

from __future__ import annotations

import csv
import os

import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax import run
from cvpo_jax.baselines.pid_lagrangian import PIDGains, QcPIDGains, init_pid, pid_update, qc_pid_update


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


def test_qc_pid_matches_the_authors_controller_by_hand():
    """cvpo-safe-rl's pid_controller.py: e = mean(Q_c − ε1); I = relu(I + e); D = relu(e − e_prev);
    λ = relu(Kp·relu(e) + Ki·I + Kd·D), one step per actor update."""
    gains = QcPIDGains(kp=0.5, ki=0.1, kd=2.0)
    threshold = 2.0
    state = init_pid(PIDGains(0.0, 0.0, 0.0, 1.0), 0.0)
    # batch Q_c means: 6 -> e 4; 4 -> e 2; 1 -> e -1; 2.5 -> e 0.5
    # I: 4, 6, 5, 5.5      D: 4, 0, 0, 1.5
    # λ: 2+0.4+8=10.4, 1+0.6+0=1.6, 0+0.5+0=0.5, 0.25+0.55+3=3.8
    expected = [10.4, 1.6, 0.5, 3.8]
    for q_mean, want in zip([6.0, 4.0, 1.0, 2.5], expected):
        q_c = jnp.asarray([q_mean - 1.0, q_mean + 1.0])  # the controller sees the batch mean
        state = qc_pid_update(state, q_c, jnp.float32(threshold), gains)
        assert float(state.multiplier) == pytest.approx(want, rel=1e-6)
    assert float(state.integral) == pytest.approx(5.5) and float(state.previous_error) == pytest.approx(0.5)
    # Safe for long: the integral drains to 0 and stays there (no credit), λ is 0.
    for _ in range(20):
        state = qc_pid_update(state, jnp.zeros(2), jnp.float32(threshold), gains)
    assert float(state.integral) == 0.0 and float(state.multiplier) == 0.0


TINY_OFF_POLICY = [
    "env=speed_limit", "network.hidden=[32,32]", "offpolicy.batch_size=64", "num_envs=4", "chunk_env_steps=400",
    "updates_per_iteration=1", "warmup_env_steps=200", "offpolicy.gamma=0.9", "offpolicy.polyak=0.95",
    "eval_episodes=4", "progress=false", "sweep.cost_limits=[5,1000]", "eval_every_env_steps=1000",
    "total_env_steps=6000", "checkpoint_every_env_steps=6000",
]


def _rows(run_dir: str, member: int) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["member"]) == member]
    return sorted(rows, key=lambda r: int(r["env_steps"]))


def _training_cost(rows: list[dict]) -> float:
    """Cost paid in training: each period's mean episodic cost times its episodes."""
    return sum(float(r["train/episode_cost"]) * float(r["train/episodes"]) for r in rows if r["train/episodes"])


@pytest.mark.parametrize("algo", ["sac_lag", "td3_lag", "ddpg_lag"])
def test_lagrangian_baseline_with_the_authors_controller_trades_cost_for_reward(algo, tmp_path):
    """The defaults (the authors' Q_c PID). On this toy it holds the cost down but swings around the limit
    (its integral drains at Ki 0.003 per update, then the cost comes back), so the test asks what it
    reliably does in 6000 steps rather than where the last evaluation lands. Two seeds: with one, whether the
    constrained member has learned to move by then depends on the draw (TD3-Lag's seed 0 ends at reward 3,
    seeds 1 and 2 at 14-16)."""
    assert run.main(TINY_OFF_POLICY + [f"algo={algo}", "num_seeds=2", f"out_dir={tmp_path}", "run_name=r"]) == 0
    # Members: seeds vary fastest, so 0 and 1 have the limit 5, 2 and 3 the limit 1000.
    final_rewards = []
    for seed in range(2):
        constrained, unconstrained = _rows(str(tmp_path / "r"), seed), _rows(str(tmp_path / "r"), 2 + seed)
        # Unconstrained, the method drives over the speed limit every step; λ stays about 0 there (the authors'
        # derivative term Kd·max(0, e − e_prev) reacts to a rising Q_c even far under the threshold: Kd = 0.001).
        assert float(unconstrained[-1]["eval/episode_cost"]) > 30.0
        assert max(float(r["lagrange/lambda"] or 0) for r in unconstrained) < 1e-2
        # The multiplier rose for the constrained member, which paid far less cost.
        assert max(float(r["lagrange/lambda"] or 0) for r in constrained) > 0.1
        assert _training_cost(constrained) < 0.5 * _training_cost(unconstrained)
        final_rewards.append(float(constrained[-1]["eval/episode_reward"]))
        # The authors' schedule: warm-up / 2 = 100 updates once the 50 random iterations are done, then one
        # per iteration of 4 envs for the other 1450.
        assert sum(float(r["train/updates"] or 0) for r in constrained) == 100 + 1450
    # And still learned to move, on average over the seeds.
    assert np.mean(final_rewards) > 5.0, final_rewards


def test_sac_lag_with_the_episodic_controller_ends_under_the_limit(tmp_path):
    """Stooke et al.'s PID on the episodic cost (`offpolicy.multiplier=episodic_pid`), the earlier default."""
    args = TINY_OFF_POLICY + ["algo=sac_lag", "offpolicy.multiplier=episodic_pid", "total_env_steps=4000",
                              f"out_dir={tmp_path}", "run_name=r"]
    assert run.main(args) == 0
    constrained, unconstrained = _rows(str(tmp_path / "r"), 0)[-1], _rows(str(tmp_path / "r"), 1)[-1]
    assert float(unconstrained["eval/episode_cost"]) > 30.0 and float(unconstrained["lagrange/lambda"]) == 0.0
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
