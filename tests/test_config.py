"""Configuration: overrides, presets and one-line errors (no JAX compiles here)."""

import numpy as np
import pytest

from cvpo_jax.config import ConfigError, RunConfig, load_config, to_yaml
from cvpo_jax.core.members import SweepMembers, one_member

NAMES = ["point_goal", "car_circle", "speed_limit"]


def test_defaults_follow_paper_table_1():
    cfg = load_config([], NAMES)
    c = cfg.cvpo
    assert cfg.network.hidden == [256, 256]
    assert (c.gamma, c.polyak, c.batch_size, c.num_particles, c.mstep_iterations) == (0.99, 0.995, 300, 32, 6)
    # ε_Σ as the authors' released config (1e-3); Table 1 prints 1e-4 (see config.CVPOConfig.kl_cov_bound).
    assert (c.critic_lr, c.actor_lr, c.kl_bound, c.kl_mean_bound, c.kl_cov_bound) == (1e-3, 2e-3, 0.1, 1e-3, 1e-3)
    # The authors' schedule: 4000 random steps, then 2000 updates, then 0.133 updates per env step; 20 evaluations.
    assert (cfg.warmup_env_steps, cfg.warmup_updates, cfg.eval_episodes) == (4000, None, 20)
    assert cfg.updates_per_iteration / cfg.num_envs == pytest.approx(40 / 300)


def test_off_policy_baselines_follow_the_authors_released_code():
    from cvpo_jax.config import warmup_updates

    for algo in ("sac_lag", "td3_lag", "ddpg_lag"):
        cfg = load_config([f"algo={algo}"], NAMES)
        o = cfg.offpolicy
        assert (o.multiplier, o.qc_pid_kp, o.qc_pid_ki, o.qc_pid_kd) == ("qc_pid", 0.1, 0.003, 0.001)
        assert (o.sac_initial_alpha, o.sac_tune_alpha, o.normalize_by_multiplier) == (0.0085, False, False)
        assert cfg.replay_capacity == 20_000 and o.batch_size == 300 and warmup_updates(cfg) == 2000
        assert o.actor_lr == (3e-4 if algo == "ddpg_lag" else 1e-3)
    # On-policy methods keep their own settings: no replay-protocol presets.
    ppo = load_config(["algo=ppo_lag"], NAMES)
    assert (ppo.num_envs, ppo.updates_per_iteration, ppo.replay_capacity) == (8, 1, 80_000)


def test_nested_overrides_and_types():
    cfg = load_config(["cvpo.kl_bound=0.05", "num_seeds=3", "network.hidden=[64,32]", "cvpo.per_state_dual=true"],
                      NAMES)
    assert cfg.cvpo.kl_bound == 0.05 and cfg.num_seeds == 3 and cfg.network.hidden == [64, 32]
    assert cfg.cvpo.per_state_dual is True


def test_env_preset_then_user_override():
    assert load_config(["env=car_circle"], NAMES).cvpo.num_particles == 64
    assert load_config(["env=car_circle", "cvpo.num_particles=8"], NAMES).cvpo.num_particles == 8
    assert load_config(["env=point_goal"], NAMES).cvpo.num_particles == 32


def test_car_circle_preset_is_the_authors_circle_protocol_for_every_off_policy_method():
    for algo in ("cvpo", "sac_lag", "ddpg_lag"):
        cfg = load_config(["env=car_circle", f"algo={algo}"], NAMES)
        assert (cfg.warmup_env_steps, cfg.replay_capacity) == (2000, 8000)  # the env preset beats the algo's
        assert cfg.updates_per_iteration / cfg.num_envs == pytest.approx(28 / 300, rel=0.01)
        assert (cfg.offpolicy.actor_lr, cfg.offpolicy.critic_lr) == (6.4e-3, 1.5e-3)
    cvpo = load_config(["env=car_circle"], NAMES).cvpo
    assert (cvpo.num_particles, cvpo.mstep_iterations, cvpo.actor_lr, cvpo.critic_lr) == (64, 29, 6.4e-3, 1.5e-3)
    assert load_config(["env=car_circle", "algo=trpo"], NAMES).warmup_env_steps == 4000  # not an off-policy one
    assert load_config(["env=car_circle", "algo=sac_lag", "replay_capacity=5000"], NAMES).replay_capacity == 5000


@pytest.mark.parametrize("arg, words", [
    ("cvpo.num_particle=3", ["unknown option 'cvpo.num_particle'", "cvpo.num_particles"]),
    ("cvpo.num_particles=abc", ["cvpo.num_particles=abc", "int"]),
    ("num_seeds=1.5", ["num_seeds", "int"]),
    ("cvpo.num_particles=0", ["cvpo.num_particles", ">= 1"]),
    ("cvpo.kl_bound=0", ["cvpo.kl_bound", "> 0"]),
    ("cvpo.kl_bound=-0.1", ["cvpo.kl_bound", "> 0"]),
    ("cost_limit=-1", ["cost_limit", ">= 0"]),
    ("env=nope", ["env=nope", "point_goal", "car_circle"]),
    ("network.covariance=weird", ["network.covariance", "full, diag"]),
    ("cvpo.dual_solver=bfgs", ["cvpo.dual_solver", "lbfgsb, newton"]),
    ("cvpo.dual_loop=gpu", ["cvpo.dual_loop", "auto, tolerance, lockstep"]),
    ("cvpo.dual_fixed_iter=0", ["cvpo.dual_fixed_iter", ">= 1"]),
    ("cvpo.gamma=1.5", ["cvpo.gamma", "(0, 1)"]),
    ("sweep.cost_limits=[5,-1]", ["sweep.cost_limits", ">= 0"]),
    ("replay_capacity=100", ["replay_capacity", "cvpo.batch_size"]),
    ("algo=sac_lag replay_capacity=100", ["replay_capacity", "offpolicy.batch_size"]),
    ("algo=sacc_lag", ["algo", "sac_lag"]),
    ("lagrange.kp=-1", ["lagrange.kp", ">= 0"]),
    ("onpolicy.gae_lambda=2", ["onpolicy.gae_lambda", "[0, 1]"]),
    ("offpolicy.multiplier=lagrange", ["offpolicy.multiplier", "qc_pid, episodic_pid"]),
    ("warmup_updates=-1", ["warmup_updates", ">= 0"]),
    ("warmup_env_steps=0 warmup_updates=10", ["warmup_updates", "warmup_env_steps > 0"]),
    ("checkpoints_kept=0", ["checkpoints_kept", ">= 1"]),
    ("novalue", ["key=value"]),
])
def test_bad_values_give_one_line_errors(arg, words):
    with pytest.raises(ConfigError) as info:
        load_config(arg.split(), NAMES)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_sweep_members_cross_limits_with_seeds():
    cfg = load_config(["num_seeds=2", "seed=3", "sweep.cost_limits=[5,10,20]", "episode_length=400",
                       "cost_limit=10"], NAMES)
    members = SweepMembers.from_config(cfg)
    assert members.size == 6
    assert members.cost_limits == (5.0, 5.0, 10.0, 10.0, 20.0, 20.0)  # seeds vary fastest
    assert members.seeds == (3, 4, 3, 4, 3, 4)
    # ε1 = limit (1 − γ^T) / (T (1 − γ)) with CVPO's γ 0.99 and T 400 (Appendix B.1).
    expected = [limit * (1 - 0.99 ** 400) / (400 * 0.01) for limit in members.cost_limits]
    np.testing.assert_allclose(members.cost_thresholds, expected, rtol=1e-12)
    settings = members.settings()
    np.testing.assert_allclose(settings.cost_limit, members.cost_limits)
    np.testing.assert_allclose(settings.kl_bound, [0.1] * 6)
    keys = np.asarray(members.keys())
    assert keys.shape == (6, 2) and (keys[0] == keys[2]).all() and not (keys[0] == keys[1]).all()
    first, later = np.asarray(members.eval_keys(0)), np.asarray(members.eval_keys(10))
    assert not (first == later).all() and not (first[0] == keys[0]).all()
    assert members.labels()[5] == "member 5 (seed 4, cost limit 20)"
    fifth = one_member(settings, 5)  # the slice every saved-run tool takes of stacked state
    assert float(fifth.cost_limit) == 20.0 and float(fifth.cost_threshold) == pytest.approx(expected[5])
    assert one_member({"w": np.arange(12).reshape(6, 2)}, 4)["w"].tolist() == [8, 9]


def test_sweep_members_use_the_algorithms_own_discount():
    cfg = load_config(["algo=sac_lag", "offpolicy.gamma=0.9", "episode_length=10", "cost_limit=1"], NAMES)
    assert SweepMembers.from_config(cfg).cost_thresholds[0] == pytest.approx((1 - 0.9 ** 10) / (10 * 0.1))
    with pytest.raises(ValueError, match="fill_task_presets"):
        SweepMembers.from_config(load_config([], NAMES))


def test_yaml_round_trip(tmp_path):
    from cvpo_jax.config import from_yaml_file

    cfg = load_config(["cvpo.kl_bound=0.2", "network.hidden=[8]", "cost_limit=3"], NAMES)
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert from_yaml_file(str(path)) == cfg
    assert isinstance(from_yaml_file(str(path)), RunConfig)


def test_task_presets_fill_only_what_is_unset():
    from types import SimpleNamespace

    from cvpo_jax.config import fill_task_presets, load_config

    task = SimpleNamespace(episode_length=400, cost_limit=10.0)
    cfg = fill_task_presets(load_config(["env=point_goal"], ["point_goal"]), task)
    assert (cfg.episode_length, cfg.cost_limit) == (400, 10.0)
    cfg = fill_task_presets(load_config(["env=point_goal", "episode_length=50", "cost_limit=3"], ["point_goal"]), task)
    assert (cfg.episode_length, cfg.cost_limit) == (50, 3.0)


def test_tool_options_are_key_value_over_defaults_with_one_line_errors():
    from cvpo_jax.cli import parse_options

    defaults = {"run": "", "episodes": "8"}
    assert parse_options(["episodes=3"], defaults) == {"run": "", "episodes": "3"}
    assert defaults == {"run": "", "episodes": "8"}  # the defaults are not changed
    for bad in (["episode=3"], ["run"]):
        with pytest.raises(ValueError, match=r"allowed: run=\.\.\., episodes=\.\.\.") as info:
            parse_options(bad, defaults)
        assert bad[0] in str(info.value) and "\n" not in str(info.value)


def test_bad_tool_input_exits_2_with_one_line(capsys):
    from cvpo_jax.cli import exit_on_bad_input, parse_options

    with pytest.raises(SystemExit) as info:
        with exit_on_bad_input():
            parse_options(["nope=1"], {"run": ""})
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: bad argument 'nope=1'; allowed: run=..."
