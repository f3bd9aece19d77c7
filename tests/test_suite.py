"""The experiment suite's report functions against NumPy, and its command-line errors (no compiles here).

The end-to-end suite run (train, skip, continue, refuse other settings) is in test_trainer.py, where it
shares the compiled CVPO chunk of the trainer tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from cvpo_jax import suite


def _data(costs: np.ndarray, rewards: np.ndarray, steps: np.ndarray, episodes: float = 5.0) -> dict:
    """metrics.csv columns for M members × T evaluations (rows ordered as a run writes them)."""
    m, t = costs.shape
    member = np.tile(np.arange(m), t).astype(float)
    env_steps = np.repeat(steps, m).astype(float)
    train_cost = costs.T.ravel() + 1.0
    train_eps = np.where(env_steps > 0, episodes, np.nan)
    return {"env_steps": env_steps, "member": member, "cost_limit": np.full(m * t, 10.0),
            "eval/episode_cost": costs.T.ravel(), "eval/episode_reward": rewards.T.ravel(),
            "train/episode_cost": np.where(env_steps > 0, train_cost, np.nan), "train/episodes": train_eps}


def test_convergence_costs_are_the_last_fifth_of_training_of_all_seeds():
    steps = np.arange(0, 11) * 100  # evaluations at 0 .. 1000
    rng = np.random.default_rng(0)
    costs, rewards = rng.uniform(0, 20, (3, 11)), rng.uniform(0, 30, (3, 11))
    data = _data(costs, rewards, steps)
    got = np.sort(suite.convergence_costs(data))
    expected = np.sort(costs[:, steps >= 800].ravel())  # 800, 900, 1000 for each of the 3 seeds
    np.testing.assert_array_equal(got, expected)

    row = suite.summary_row(data)
    assert row["seeds"] == 3 and row["env_steps"] == 1000 and row["cost_limit"] == 10
    assert row["final_reward_mean"] == pytest.approx(np.mean(rewards[:, -1]))
    assert row["final_reward_std"] == pytest.approx(np.std(rewards[:, -1]))
    assert row["convergence_cost_median"] == pytest.approx(np.median(expected))
    assert row["convergence_cost_q3"] == pytest.approx(np.percentile(expected, 75))
    # Cumulative cost: each evaluation period's mean training episode cost × its 5 episodes, summed.
    assert row["cumulative_cost_mean"] == pytest.approx(np.mean(np.sum((costs[:, 1:] + 1.0) * 5.0, axis=1)))


def test_training_and_original_plot_convergence_costs_by_hand():
    steps = np.arange(0, 13) * 100  # evaluations at 0 .. 1200
    rng = np.random.default_rng(2)
    costs = rng.uniform(0, 20, (2, 13))
    data = _data(costs, costs, steps)
    data["train/episodes"][(data["env_steps"] == 1100) & (data["member"] == 1)] = 0.0  # no episode ended there
    # Training episodes (logged as eval cost + 1 by _data) in the periods ending at 1000, 1100, 1200, but
    # member 1's period ending at 1100 has no episode.
    expected = [costs[0, 10:] + 1.0, costs[1, [10, 12]] + 1.0]
    np.testing.assert_allclose(np.sort(suite.training_convergence_costs(data)), np.sort(np.concatenate(expected)))
    # The authors' plot script: each evaluation averaged with the one before, at evaluations past 2/3 of 1200,
    # i.e. 900 .. 1200 (800 is not past it).
    by_hand = [(costs[m, k] + costs[m, k - 1]) / 2 for m in range(2) for k in range(9, 13)]
    np.testing.assert_allclose(np.sort(suite.original_plot_convergence_costs(data)), np.sort(by_hand))
    row = suite.summary_row(data)
    assert row["original_plot_convergence_cost_q3"] == pytest.approx(np.percentile(by_hand, 75))
    assert row["training_convergence_cost_median"] == pytest.approx(np.median(np.concatenate(expected)))


def test_training_curves_skip_periods_in_which_no_episode_ended():
    steps = np.arange(0, 5) * 100
    costs = np.full((2, 5), 4.0)
    data = _data(costs, costs, steps)
    last = data["env_steps"] == 400
    data["train/episodes"][last & (data["member"] == 0)] = 0.0  # member 0's last period: no episode ended,
    data["train/episode_cost"][last & (data["member"] == 0)] = 0.0  # logged as 0 before bb847b3
    got_steps, got = suite.training_series(data, "train/episode_cost")
    np.testing.assert_array_equal(got_steps, [100, 200, 300, 400])  # the row before any training is left out
    assert np.isnan(got[0, -1]) and got[1, -1] == 5.0
    np.testing.assert_array_equal(got[:, :-1], 5.0)


def test_report_writes_every_figure_and_the_table(tmp_path):
    import csv

    steps = np.arange(0, 6) * 200
    rng = np.random.default_rng(1)
    for algo in ("cvpo", "sac_lag"):
        data = _data(rng.uniform(0, 20, (2, 6)), rng.uniform(0, 30, (2, 6)), steps)
        run_dir = tmp_path / f"point_goal-{algo}"
        run_dir.mkdir()
        with open(run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(data))
            writer.writeheader()
            for i in range(len(data["env_steps"])):
                writer.writerow({k: ("" if np.isnan(v[i]) else v[i]) for k, v in data.items()})
    written = suite.write_report(str(tmp_path), ["point_goal", "car_goal"], ["cvpo", "sac_lag"])
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == ["convergence_cost_boxplot.png", "curves_point_goal.png", "reward_vs_cumulative_cost.png",
                     "summary.csv", "summary.md"]
    table = (tmp_path / "report" / "summary.md").read_text()
    assert "| point_goal | cvpo | 2 | 1000 |" in table and "car_goal" not in table

    # A suite run one task at a time still reports every run there is (the given ones first).
    assert suite.report_scope(str(tmp_path), ["car_goal"], ["cvpo"]) == (["car_goal", "point_goal"],
                                                                         ["cvpo", "sac_lag"])
    (tmp_path / "not-a-run").mkdir()
    assert suite.report_scope(str(tmp_path), ["point_goal"], ["sac_lag"]) == (["point_goal"], ["sac_lag", "cvpo"])


@pytest.mark.parametrize("argv, words", [
    (["tasks=point_goal,nope"], ["tasks", "nope", "point_goal"]),
    (["algos=cvpo,sacc_lag"], ["algos", "sacc_lag", "sac_lag"]),
    (["scale=huge"], ["scale=huge", "cpu, paper"]),
    (["env=point_goal"], ["env=", "tasks="]),
    (["report_only=yes"], ["report_only", "true, false"]),
    (["cvpo.kl_bound=-1"], ["cvpo.kl_bound", "> 0"]),
    (["novalue"], ["key=value"]),
])
def test_bad_options_exit_2_with_one_line(argv, words, capsys, tmp_path):
    assert suite.main(argv + [f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    for word in words:
        assert word in err[0]


def test_scales_are_the_paper_scale_and_a_cpu_scale():
    options = suite.parse(["scale=paper"])
    cfg = suite.run_config(options, "point_goal", "cvpo")
    assert (cfg.num_seeds, cfg.total_env_steps, cfg.network.hidden, cfg.cvpo.batch_size) == (10, 2_400_000,
                                                                                              [256, 256], 300)
    cpu = suite.run_config(suite.parse(["scale=cpu", "num_seeds=2"]), "car_circle", "sac_lag")
    assert (cpu.num_seeds, cpu.network.hidden, cpu.offpolicy.batch_size, cpu.total_env_steps) == (2, [64, 64], 128,
                                                                                                  1_000_000)
    assert cpu.replay_capacity == 8000 and cpu.episode_length == 300 and cpu.run_name == "car_circle-sac_lag"


def test_gpu_scale_keeps_each_methods_updates_per_env_step():
    paper = suite.parse(["scale=paper"])
    gpu = suite.parse(["scale=gpu"])
    for task, algo in (("point_goal", "cvpo"), ("car_circle", "cvpo"), ("point_goal", "sac_lag")):
        p, g = suite.run_config(paper, task, algo), suite.run_config(gpu, task, algo)
        assert g.num_envs == 8 * p.num_envs and g.updates_per_iteration == 8 * p.updates_per_iteration
        assert g.num_seeds == 10 and g.total_env_steps == 2_400_000 and g.network.hidden == [256, 256]
    assert suite.run_config(gpu, "point_goal", "cvpo").num_envs == 120
    on_policy = suite.run_config(gpu, "point_goal", "ppo_lag")
    assert on_policy.num_envs == suite.run_config(paper, "point_goal", "ppo_lag").num_envs
    user = suite.run_config(suite.parse(["scale=gpu", "num_envs=64"]), "point_goal", "cvpo")
    assert user.num_envs == 64  # the user's loop wins
