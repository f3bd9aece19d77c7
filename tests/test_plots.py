"""The comparison figure's cumulative cost against a hand computation, and the compare CLI."""

from __future__ import annotations

import numpy as np

from cvpo_jax import plots


def _write_metrics(path, rows):
    header = "env_steps,member,cost_limit,eval/episode_reward,eval/episode_cost,train/episode_cost,train/episodes"
    path.write_text(header + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")


def test_cumulative_cost_sums_mean_episode_cost_times_episodes(tmp_path):
    csv = tmp_path / "metrics.csv"
    # The first row is the evaluation before training: no training columns yet.
    _write_metrics(csv, [
        (0, 0, 10, 0.0, 30.0, "", ""), (0, 1, 10, 0.0, 20.0, "", ""),
        (100, 0, 10, 1.0, 12.0, 15.0, 4), (100, 1, 10, 2.0, 8.0, 5.0, 2),
        (200, 0, 10, 3.0, 9.0, 2.5, 4), (200, 1, 10, 4.0, 1.0, 0.0, 2),
    ])
    data = plots.read_csv(str(csv))
    steps, paid = plots.cumulative_training_cost(data, 0)
    np.testing.assert_allclose(steps, [0, 100, 200])
    np.testing.assert_allclose(paid, [0.0, 60.0, 70.0])
    _, paid_1 = plots.cumulative_training_cost(data, 1)
    np.testing.assert_allclose(paid_1, [0.0, 10.0, 10.0])

    out = tmp_path / "cmp.png"
    assert plots.main(["compare", f"out={out}", "max_env_steps=150", f"a={tmp_path}", f"b={csv}"]) == 0
    assert out.stat().st_size > 10_000
    assert plots.main(["compare", f"out={out}", f"a={tmp_path / 'missing'}"]) == 2
    assert plots.main(["compare", "max_env_steps=lots", f"a={csv}"]) == 2


def test_env_step_ticks_are_short():
    assert [plots.format_env_steps(v) for v in (0, 500, 50_000, 400_000, 1_200_000)] == \
        ["0", "500", "50k", "400k", "1.2M"]
