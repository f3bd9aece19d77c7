"""The trainer end to end on the pure-JAX `speed_limit` task: learning, resume after SIGKILL, NaN stop, CLI.

All runs share one tiny configuration with two sweep members, so they reuse one compiled chunk function
(in-process through the persistent compilation cache, which the subprocesses are pointed at too).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cvpo_jax import checkpoint, run

# 15 chunks of 400 env steps per member; evaluations every 1000.
LEARN = ["sweep.cost_limits=[5,1000]", "total_env_steps=6000", "eval_every_env_steps=1000",
         "checkpoint_every_env_steps=400"]
SHORT_ENV_STEPS = 2000  # the killed-and-resumed run
TINY = [
    "env=speed_limit", "network.hidden=[32,32]", "cvpo.batch_size=64", "cvpo.num_particles=16",
    "num_envs=4", "updates_per_iteration=1", "chunk_env_steps=400", "warmup_env_steps=200", "cvpo.gamma=0.9",
    "cvpo.polyak=0.95",
    "eval_episodes=4", "progress=false", "cvpo.kl_mean_bound=0.01", "cvpo.kl_cov_bound=0.001",
]


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env.update({
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _params(run_dir: str, iteration=None):
    """The policy and critics of every member at checkpoint `iteration` (default: the latest)."""
    cfg = run.resolve([f"resume={run_dir}"])
    from cvpo_jax import envs
    from cvpo_jax.algorithms import make_trainer
    from cvpo_jax.core.members import SweepMembers

    trainer = make_trainer(cfg, envs.make(cfg.env))
    like = jax.eval_shape(trainer.init, SweepMembers.from_config(cfg).keys())
    like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), like)
    iteration = checkpoint.latest_iteration(run_dir) if iteration is None else iteration
    return checkpoint.restore(run_dir, iteration, like).learner.params


@pytest.fixture(scope="session")  # session: xdist may interleave modules, which tears module fixtures down
def learning_run(tmp_path_factory):
    """CVPO (cost limit 5) and the same learner with a limit it never meets (1000), side by side."""
    out = tmp_path_factory.mktemp("runs")
    # Every checkpoint kept, so that a shorter killed-and-resumed run has its uninterrupted reference here.
    code = run.main(TINY + LEARN + [f"out_dir={out}", "run_name=learn", "checkpoints_kept=100"])
    assert code == 0
    return str(out / "learn")


def test_cvpo_keeps_cost_under_limit_where_unconstrained_does_not(learning_run):
    rows = _rows(learning_run)
    final_step = max(int(r["env_steps"]) for r in rows)
    first = {int(r["member"]): r for r in rows if int(r["env_steps"]) == 0}
    last = {int(r["member"]): r for r in rows if int(r["env_steps"]) == final_step}
    constrained, unconstrained = last[0], last[1]
    assert float(constrained["cost_limit"]) == 5.0 and float(unconstrained["cost_limit"]) == 1000.0
    # The unconstrained learner drives over the speed limit; CVPO stays under its episodic limit ...
    assert float(unconstrained["eval/episode_cost"]) > 20.0
    assert float(constrained["eval/episode_cost"]) <= 5.0
    # ... and its reward still rises from the untrained policy's.
    assert float(constrained["eval/episode_reward"]) > float(first[0]["eval/episode_reward"]) + 5.0
    # The E-step's multiplier is what does it.
    assert float(constrained["estep/lambda"]) > 0.0 and float(unconstrained["estep/lambda"]) == 0.0


def test_run_directory_contents(learning_run):
    for name in ("config.yaml", "metrics.csv", "curves.png", "tb", "checkpoints"):
        assert os.path.exists(os.path.join(learning_run, name)), name
    assert checkpoint.latest_iteration(learning_run) == 1500  # 6000 env steps / 4 envs


def test_resume_after_sigkill_matches_uninterrupted_run(learning_run, tmp_path):
    """A run SIGKILLed after its first checkpoint and resumed ends bit for bit where the uninterrupted run
    stood at the same iteration (the whole state is checkpointed: learner, replay, envs, key). It is 2000
    env steps long, a third of the learning run, whose checkpoint at that iteration is the reference."""
    short = [f"total_env_steps={SHORT_ENV_STEPS}"]
    command = [sys.executable, "-m", "cvpo_jax.run", *TINY, *LEARN, *short, f"out_dir={tmp_path}", "run_name=killed"]
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(command, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        ckpts = killed_dir / "checkpoints"
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    end = SHORT_ENV_STEPS // 4  # iterations of 4 envs
    survived = checkpoint.latest_iteration(str(killed_dir))
    assert survived is not None and survived < end

    assert run.main([f"resume={killed_dir}"]) == 0
    assert checkpoint.latest_iteration(str(killed_dir)) == end
    resumed, uninterrupted = _params(str(killed_dir)), _params(learning_run, end)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)
    steps = [int(r["env_steps"]) for r in _rows(str(killed_dir)) if r["member"] == "0"]
    assert steps == sorted(set(steps)), "metrics rows after the checkpoint must not be duplicated on resume"


def test_non_finite_update_stops_the_run_and_keeps_the_checkpoint(learning_run, tmp_path, monkeypatch, capsys):
    import shutil

    run_dir = tmp_path / "poisoned"
    shutil.copytree(learning_run, run_dir)
    before = checkpoint.latest_iteration(str(run_dir))
    real_restore = checkpoint.restore

    def restore_with_nan_rewards(*args, **kwargs):
        state = real_restore(*args, **kwargs)
        data = state.replay.data
        return state.replace(replay=state.replay.replace(data=data.replace(reward=data.reward * np.nan)))

    monkeypatch.setattr(checkpoint, "restore", restore_with_nan_rewards)
    code = run.main([f"resume={run_dir}", "total_env_steps=6400"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "non-finite" in err[0] and "last good checkpoint" in err[0]
    assert "member 0 (seed 0, cost limit 5)" in err[0]  # the message names the members that went bad
    assert checkpoint.latest_iteration(str(run_dir)) == before

    # experiments/find_nonfinite.py replays from that checkpoint and names the first bad iteration: the
    # first one, whose update already learns from the poisoned rewards.
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "find_nonfinite.py")
    spec = importlib.util.spec_from_file_location("find_nonfinite", path)
    find_nonfinite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(find_nonfinite)
    files_before = sorted(os.listdir(run_dir))
    assert find_nonfinite.main([f"run={run_dir}", "max_iterations=3"]) == 1
    out = capsys.readouterr().out
    assert f"first non-finite iteration: {before} " in out and "<-- non-finite" in out
    assert sorted(os.listdir(run_dir)) == files_before and checkpoint.latest_iteration(str(run_dir)) == before


def test_evaluate_cli_reports_and_draws(learning_run, tmp_path, capsys):
    from cvpo_jax import evaluate

    picture = tmp_path / "rollout.png"
    assert evaluate.main([f"run={learning_run}", "episodes=2", f"picture={picture}"]) == 0
    out = capsys.readouterr().out
    assert "episode_reward" in out and "episode_cost" in out
    assert picture.stat().st_size > 1000


def test_bad_input_exits_2_with_one_line_and_no_traceback():
    result = subprocess.run([sys.executable, "-m", "cvpo_jax.run", "env=nope"], capture_output=True, text=True,
                            env=_subprocess_env(), timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "point_goal" in lines[0]


def test_print_config_shows_resolved_presets(capsys):
    assert run.main(["env=point_goal", "print_config=true", "cvpo.kl_bound=0.05"]) == 0
    out = capsys.readouterr().out
    assert "episode_length: 400" in out and "cost_limit: 10.0" in out and "kl_bound: 0.05" in out


def test_members_shard_over_two_fake_devices(tmp_path):
    env = _subprocess_env()
    # Two fake CPU devices; the platform is forced too, or a machine with one GPU would run on it.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "cvpo_jax.run", *TINY, "num_seeds=2", "devices=2", "total_env_steps=800",
         f"out_dir={tmp_path}", "run_name=sharded"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(_rows(str(tmp_path / "sharded"))) == 2 * 2  # evaluations at 0 and 800, two members


def test_experiment_suite_trains_skips_continues_and_refuses_other_settings(learning_run, tmp_path, capsys):
    """`python -m cvpo_jax.suite` end to end on the tiny task (its chunk is the learning run's compile):
    a finished run is skipped, a longer budget continues it from its checkpoint, other settings are refused."""
    from cvpo_jax import suite

    tiny = [a for a in TINY if not a.startswith("env=")]
    args = ["tasks=speed_limit", "algos=cvpo", f"out={tmp_path}", *tiny, "num_seeds=2",
            "eval_every_env_steps=400", "checkpoint_every_env_steps=400"]
    run_dir = tmp_path / "speed_limit-cvpo"
    assert suite.main(args + ["total_env_steps=800"]) == 0
    out = capsys.readouterr().out
    assert "speed_limit-cvpo: starting" in out and (run_dir / suite.DONE).read_text().startswith("800")
    for name in ("curves_speed_limit.png", "reward_vs_cumulative_cost.png", "convergence_cost_boxplot.png",
                 "summary.md", "summary.csv"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    first = (run_dir / "checkpoints").stat().st_mtime_ns

    assert suite.main(args + ["total_env_steps=800"]) == 0  # the same command again: nothing to train
    assert "finished (800 env steps), skipped" in capsys.readouterr().out
    assert (run_dir / "checkpoints").stat().st_mtime_ns == first

    with open(run_dir / "command.txt", "a") as f:  # as an invocation killed before its end leaves it
        f.write(f"python -m cvpo_jax.suite killed\n{suite.STARTED}(killed)\n")
    assert suite.main(args + ["total_env_steps=1200"]) == 0  # a longer budget: continue, not restart
    assert "continuing from its last checkpoint" in capsys.readouterr().out
    assert checkpoint.latest_iteration(str(run_dir)) == 300
    steps = [int(r["env_steps"]) for r in _rows(str(run_dir)) if r["member"] == "0"]
    assert steps == [0, 400, 800, 1200]

    command = (run_dir / "command.txt").read_text().splitlines()  # 3 lines per invocation that trained
    assert len(command) == 9 and command[0].startswith("python -m cvpo_jax.suite tasks=speed_limit algos=cvpo")
    assert command[1].startswith(suite.STARTED) and "commit" in command[1] and "s wall" in command[2]
    assert "stopped before its end" in command[5] and "saved: 20" in command[5]  # the checkpoint's date
    assert "total_env_steps=1200" in command[6] and "iteration 200" in command[7] and "s wall" in command[8]

    assert suite.main(args + ["total_env_steps=1200", "cvpo.kl_bound=0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (cvpo)" in err[0]


def test_period_means_weigh_chunks_by_their_updates():
    """A warm-up chunk (no updates, metrics 0) must not pull a period's update metrics down."""
    period = {"train/updates": [np.array([0, 0]), np.array([10, 30])],
              "train/episodes": [np.array([1, 1]), np.array([2, 2])],
              "train/episode_reward": [np.array([3.0, 3.0]), np.array([10.0, 10.0])],
              "train/episode_cost": [np.array([5.0, 0.0]), np.array([4.0, 2.0])],
              "train/episode_length": [np.array([400, 400]), np.array([800, 500])],
              "train/terminations": [np.array([0, 0]), np.array([0, 1])],
              "train/reused_resets": [np.array([0, 0]), np.array([0, 2])],
              "estep/cost_threshold": [np.array([0.0, 0.0]), np.array([2.455, 2.455])]}
    out = run._mean_period(period)
    np.testing.assert_allclose(out["estep/cost_threshold"], [2.455, 2.455])
    np.testing.assert_allclose(out["train/episode_cost"], [9.0 / 3, 2.0 / 3])
    np.testing.assert_allclose(out["train/updates"], [10, 30])
    # Episode means over the period's episodes; the resets reused are a count.
    np.testing.assert_allclose(out["train/episode_length"], [400, 300])
    np.testing.assert_allclose(out["train/terminated"], [0, 1 / 3])
    np.testing.assert_allclose(out["train/reused_resets"], [0, 2])
    # A member with no episode ended in the period has no episode means (nan), not a free episode (0).
    period["train/episodes"] = [np.array([0, 1]), np.array([0, 2])]
    out = run._mean_period(period)
    assert np.isnan(out["train/episode_cost"][0]) and np.isnan(out["train/episode_reward"][0])
    np.testing.assert_allclose(out["train/episode_cost"][1], 2.0 / 3)
    np.testing.assert_allclose(out["train/episodes"], [0, 3])


def test_discounted_returns_by_hand():
    from cvpo_jax.diagnostics import discounted_returns

    got = discounted_returns(np.array([[1.0], [0.0], [2.0]]), 0.5)
    np.testing.assert_allclose(got[:, 0], [1 + 0.25 * 2, 0.5 * 2, 2.0])


def test_weighted_spread_of_an_exponential_tilt_keeps_the_variance_and_adds_the_shift():
    from cvpo_jax.diagnostics import weighted_spread

    rng = np.random.default_rng(1)
    b, k, sigma = 4, 200_000, np.array([[0.5, 2.0]])
    mean = np.array([[1.0, -3.0]])
    particles = mean[:, None] + sigma[:, None] * rng.normal(size=(b, k, 2))  # [B, K, A]
    g = np.array([0.8, -0.1])  # a score linear in the action: q ∝ exp(g · a)
    logits = particles @ g
    weights = np.exp(logits - logits.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    got = weighted_spread(particles, weights, np.repeat(mean, b, 0), np.repeat(sigma, b, 0))
    # The tilted Gaussian: variance σ², mean moved by σ² g, i.e. σ g in units of σ.
    shift_sq = np.mean((sigma[0] * g) ** 2)
    np.testing.assert_allclose(got["tilted_variance"], 1.0, atol=0.02)
    np.testing.assert_allclose(got["shift_sq"], shift_sq, rtol=0.05)
    np.testing.assert_allclose(got["target_to_old"], 1.0 + shift_sq, rtol=0.02)
    np.testing.assert_allclose(got["uniform_to_old"], 1.0, atol=0.01)
    # A score peaked at the old mean narrows the target: q ∝ exp(−z²/2) halves the variance.
    z = (particles - mean[:, None]) / sigma[:, None]
    peaked = np.exp(-0.5 * np.sum(z**2, -1))
    peaked /= peaked.sum(1, keepdims=True)
    np.testing.assert_allclose(weighted_spread(particles, peaked, np.repeat(mean, b, 0),
                                               np.repeat(sigma, b, 0))["target_to_old"], 0.5, atol=0.02)


def test_action_effect_f_test_matches_a_dummy_variable_regression():
    from scipy.stats import f as f_distribution

    from cvpo_jax.diagnostics import action_effect_f_test

    rng = np.random.default_rng(0)
    k, r = 5, 7
    noise_only = rng.normal(size=(1, r)) * 3 + rng.normal(size=(k, r))  # a shared repeat effect, no action effect
    with_effect = noise_only + np.arange(k)[:, None] * 0.8
    for returns in (noise_only, with_effect):
        # Independently: residual sums of squares of least squares on repeat dummies, with and without actions.
        y = returns.ravel()
        repeat = np.kron(np.ones((k, 1)), np.eye(r))
        action = np.kron(np.eye(k), np.ones((r, 1)))[:, 1:]
        rss = [np.sum((y - x @ np.linalg.lstsq(x, y, rcond=None)[0]) ** 2)
               for x in (repeat, np.hstack([repeat, action]))]
        expected_f = ((rss[0] - rss[1]) / (k - 1)) / (rss[1] / ((k - 1) * (r - 1)))
        f_value, p_value, df_action, df_noise = action_effect_f_test(returns)
        assert (df_action, df_noise) == (k - 1, (k - 1) * (r - 1))
        np.testing.assert_allclose(f_value, expected_f, rtol=1e-9)
        np.testing.assert_allclose(p_value, f_distribution.sf(expected_f, k - 1, (k - 1) * (r - 1)), rtol=1e-9)
    assert action_effect_f_test(noise_only)[1] > 0.05 and action_effect_f_test(with_effect)[1] < 1e-4
    # The permutation test agrees with the F distribution on normal noise and still finds the effect.
    assert abs(action_effect_f_test(noise_only, permutations=4000)[1] - action_effect_f_test(noise_only)[1]) < 0.05
    assert action_effect_f_test(with_effect, permutations=999)[1] == 1 / 1000
    # Pooled over states: each state keeps its own means, the sums of squares and degrees of freedom add up.
    pooled = action_effect_f_test(np.stack([noise_only, noise_only + 10.0]))
    np.testing.assert_allclose(pooled[0], action_effect_f_test(noise_only)[0], rtol=1e-9)
    assert pooled[2:] == (2 * (k - 1), 2 * (k - 1) * (r - 1))
    # Every action gave every repeat the same return: nothing to test against.
    assert np.isnan(action_effect_f_test(np.tile(rng.normal(size=(1, r)), (k, 1)))[0])


def test_critic_check_compares_the_critics_with_monte_carlo_returns(learning_run, capsys):
    from cvpo_jax import diagnostics

    assert diagnostics.main([f"run={learning_run}", "episodes=4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "Monte-Carlo" in out[0] and len(out) == 2 + 2  # header lines + the two members
    rows = diagnostics.critic_check(learning_run, episodes=4)
    # speed_limit, γ 0.9: the unconstrained member (1) pays cost every step, so its Monte-Carlo cost is
    # near 1/(1 − γ) = 10, and its trained critic agrees roughly; the constrained member (0) pays much less.
    assert rows[1]["mc_cost"] > 8.0 and abs(rows[1]["q_c"] - rows[1]["mc_cost"]) < 3.0
    assert rows[0]["mc_cost"] < rows[1]["mc_cost"]
    assert diagnostics.main(["run=/nonexistent"]) == 2


def test_saved_run_restores_the_last_checkpoint_and_says_when_there_is_none(learning_run, tmp_path):
    import shutil

    from cvpo_jax import saved_run

    loaded = saved_run.load(learning_run)
    assert loaded.iteration == checkpoint.latest_iteration(learning_run) > 0 and loaded.members.size == 2
    # The restored state is the checkpoint's, not a fresh one: its replay holds the run's transitions.
    assert int(np.min(np.asarray(loaded.state.replay.size))) > 0
    second = jax.tree.leaves(loaded.member_params(1))
    assert [leaf.shape for leaf in second] == [leaf.shape[1:] for leaf in jax.tree.leaves(loaded.state.learner.params)]
    np.testing.assert_array_equal(second[0], jax.tree.leaves(loaded.state.learner.params)[0][1])
    with pytest.raises(ValueError, match=r"member=2: the run has members 0\.\.1"):
        loaded.member_params(2)
    assert saved_run.load(learning_run, algo="cvpo").iteration == loaded.iteration
    with pytest.raises(ValueError, match="needs a sac_lag run; its config says algo=cvpo"):
        saved_run.load(learning_run, algo="sac_lag")
    with pytest.raises(ValueError, match="no config.yaml"):
        saved_run.load(str(tmp_path))
    shutil.copy(os.path.join(learning_run, "config.yaml"), tmp_path / "config.yaml")
    with pytest.raises(ValueError, match="no checkpoint yet"):
        saved_run.load(str(tmp_path))


def test_replay_estep_solves_on_rows_of_the_members_own_replay(learning_run):
    from cvpo_jax import saved_run
    from cvpo_jax.core.members import one_member
    from cvpo_jax.cvpo import make_cvpo, replay_estep

    loaded = saved_run.load(learning_run, algo="cvpo")
    learner, phases = make_cvpo(loaded.cfg, loaded.env.observation_size, loaded.env.action_size)
    member, settings = one_member(loaded.state, 1), one_member(loaded.members.settings(), 1)
    solve = jax.jit(replay_estep(learner, phases))
    targets, q_r, q_c, solution = jax.device_get(solve(member.learner, member.replay, settings, jax.random.PRNGKey(3)))
    assert targets.obs.shape[0] == learner.batch_size == q_c.shape[0]
    # Every state is a filled row of member 1's buffer (not member 0's, not an empty row).
    filled = np.asarray(member.replay.data.obs)[: int(member.replay.size)]
    assert all(np.any(np.all(filled == row, axis=-1)) for row in targets.obs)
    # q* is the exponential tilt of the particles by the returned (η, λ), recomputed here by hand.
    score = (np.asarray(q_r, np.float64) - float(solution.lam) * np.asarray(q_c, np.float64)) / float(solution.eta)
    expected = np.exp(score - score.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(solution.weights, expected / expected.sum(axis=-1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_a_checkpoint_of_another_state_layout_gets_a_one_line_error(tmp_path):
    import jax.numpy as jnp

    checkpoint.save(str(tmp_path), 3, {"a": jnp.zeros((2,)), "b": jnp.ones(())})
    with pytest.raises(checkpoint.CheckpointMismatch, match="does not fit the training state") as info:
        checkpoint.restore(str(tmp_path), 3, {"a": jnp.zeros((2, 8)), "b": jnp.ones(())})
    assert "\n" not in str(info.value)
