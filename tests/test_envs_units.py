"""Env-suite pieces that need no physics compile: registry, config checks, lidar, layout sampling, MJCF."""

import math

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

from cvpo_jax import envs
from cvpo_jax.envs import layouts, lidar, mjcf, robots

# Observation sizes of Safety-Gymnasium's tasks (PointGoal1 60, CarGoal1 72, PointButton1 76, CarButton1 88,
# PointCircle 28, CarCircle 40) and the CVPO variants (its Goal has no gremlins: Point 60, Car 72).
EXPECTED_OBS = {
    "point_goal": 60, "car_goal": 72, "point_button": 76, "car_button": 88,
    "point_circle": 28, "car_circle": 40,
    "point_goal1": 60, "car_goal1": 72, "point_button1": 76, "car_button1": 88,
    "point_button2": 76, "car_button2": 88,
    "point_circle1": 28, "car_circle1": 40, "point_circle2": 28, "car_circle2": 40,
    "point_traps": 45, "car_traps": 57,  # presets checked in test_traps.py
}


def test_names_cover_the_suite():
    assert set(envs.mjx_names()) == set(EXPECTED_OBS)
    assert set(envs.mjx_names()) <= set(envs.names())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        envs.make("point_gaol")
    msg = str(err.value)
    assert "\n" not in msg and "point_goal" in msg and "car_circle1" in msg


def test_unknown_override_names_allowed_keys():
    with pytest.raises(ValueError) as err:
        envs.make("point_goal", episode_lenght=10)
    assert "episode_lenght" in str(err.value) and "episode_length" in str(err.value)


@pytest.mark.parametrize("name", sorted(EXPECTED_OBS))
def test_observation_size_and_presets(name):
    cfg = envs.default_config(name)
    env = envs.make(name)
    assert env.observation_size == EXPECTED_OBS[name]
    assert env.action_size == 2 and env.backend == "mjx"
    if name.endswith("_traps"):
        return  # the CSC tasks' presets (500 steps, chi 0.05, SGym timesteps): test_traps.py
    cvpo = not name[-1].isdigit()
    circle = "circle" in name
    assert env.episode_length == (300 if circle else 400) if cvpo else env.episode_length == (
        500 if circle else 1000)
    assert env.cost_limit == ((20.0 if circle else 10.0) if cvpo else 25.0)
    robot = robots.get(cfg.robot)
    assert cfg.timestep == (robot.cvpo_timestep if cvpo else robot.sgym_timestep)
    assert cfg.frame_skip == 10


def test_overrides_apply():
    env = envs.make("point_goal", episode_length=7, cost_limit=3.0)
    assert env.episode_length == 7 and env.cost_limit == 3.0


def _lidar_reference(ego_points, max_dist, num_bins=16):
    """Safety-Gym's pseudo-lidar, written out object by object."""
    obs = np.zeros(num_bins)
    bin_size = 2 * np.pi / num_bins
    for x, y in ego_points:
        z = complex(x, y)
        dist, angle = abs(z), np.angle(z) % (2 * np.pi)
        b = int(angle / bin_size)
        sensor = max(0.0, max_dist - dist) / max_dist
        obs[b] = max(obs[b], sensor)
        alias = (angle - b * bin_size) / bin_size
        obs[(b + 1) % num_bins] = max(obs[(b + 1) % num_bins], alias * sensor)
        obs[(b - 1) % num_bins] = max(obs[(b - 1) % num_bins], (1 - alias) * sensor)
    return obs


def test_lidar_worked_example():
    out = np.asarray(lidar.pseudo_lidar_ego(jnp.array([[1.0, 0.1]]), 3.0))
    np.testing.assert_allclose(out[[0, 1, 15]], [0.665, 0.1688, 0.4962], atol=5e-4)
    assert np.count_nonzero(out) == 3


def test_lidar_worked_example_in_world_frame():
    # Robot at (0.5, -0.3) turned by 2 rad: the object sits at body-frame (1, 0.1).
    yaw = 2.0
    rot = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    robot = np.array([0.5, -0.3, 0.1])
    obj = robot[:2] + rot[:2, :2] @ np.array([1.0, 0.1])
    out = np.asarray(lidar.pseudo_lidar(jnp.asarray(robot), jnp.asarray(rot), jnp.asarray(obj[None]), 3.0))
    np.testing.assert_allclose(out[[0, 1, 15]], [0.665, 0.1688, 0.4962], atol=5e-4)


def test_lidar_matches_reference_on_random_points():
    rng = np.random.default_rng(0)
    for n in (1, 3, 8):
        pts = rng.uniform(-4, 4, (n, 2))
        np.testing.assert_allclose(lidar.pseudo_lidar_ego(jnp.asarray(pts), 3.0), _lidar_reference(pts, 3.0),
                                   atol=1e-5)


def test_lidar_visibility_mask_and_empty():
    pts = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    assert float(jnp.max(lidar.pseudo_lidar_ego(pts, 3.0, visible=jnp.zeros(2)))) == 0.0
    assert lidar.pseudo_lidar_ego(jnp.zeros((0, 2)), 3.0).shape == (16,)


def test_layout_respects_keepouts_and_extents():
    items = (layouts.Item("robot", 1, 0.4), layouts.Item("goal", 1, 0.305),
             layouts.Item("hazards", 8, 0.18), layouts.Item("vases", 1, 0.15))
    extents = (-1.5, -1.5, 1.5, 1.5)
    sample = jax.jit(jax.vmap(lambda k: layouts.sample_layout(k, items, extents)))
    placed, ok = sample(jax.random.split(jax.random.PRNGKey(0), 64))
    assert bool(np.all(ok))
    xy = np.concatenate([placed[i.name] for i in items], axis=1)  # [64, 11, 2]
    keep = np.concatenate([[i.keepout] * i.count for i in items])
    dist = np.linalg.norm(xy[:, :, None] - xy[:, None], axis=-1)
    need = keep[:, None] + keep[None, :]
    off_diag = ~np.eye(len(keep), dtype=bool)
    assert np.all(dist[:, off_diag] >= need[off_diag] - 1e-6)
    assert np.all(np.abs(xy) <= 1.5 - keep[None, :, None] + 1e-6)
    # Different keys give different layouts.
    assert np.std(xy[:, 0, 0]) > 0.1


@pytest.mark.parametrize("name", ["point_goal1", "point_button1"])
def test_level_layouts_complete(name):
    """Button layouts complete only ~1 attempt in 20: the whole-layout redraw loop must get there."""
    env = envs.make(name)
    c = env.config
    sample = jax.jit(jax.vmap(lambda k: layouts.sample_layout(k, env._layout_items(), c.extents,
                                                              c.placement_tries, c.layout_tries)))
    placed, ok = sample(jax.random.split(jax.random.PRNGKey(0), 64))
    assert bool(np.all(ok))
    items = env._layout_items()
    xy = np.concatenate([placed[i.name] for i in items], axis=1)  # [64, n, 2]
    keep = np.concatenate([[i.keepout] * i.count for i in items])
    dist = np.linalg.norm(xy[:, :, None] - xy[:, None], axis=-1)
    off_diag = ~np.eye(len(keep), dtype=bool)
    assert np.all(dist[:, off_diag] >= (keep[:, None] + keep[None, :])[off_diag] - 1e-6)


def test_layout_fixed_locations_are_kept():
    items = (layouts.Item("robot", 1, 0.4), layouts.Item("buttons", 2, 0.2, ((1.0, 1.0), (-1.0, 1.0))))
    placed, ok = layouts.sample_layout(jax.random.PRNGKey(3), items, (-2, -2, 2, 2))
    assert bool(ok)
    np.testing.assert_allclose(placed["buttons"], [[1.0, 1.0], [-1.0, 1.0]])
    assert np.min(np.linalg.norm(placed["buttons"] - placed["robot"], axis=1)) >= 0.6 - 1e-6


def test_goal_resample_keeps_clear():
    others = jnp.array([[0.0, 0.0], [0.5, 0.5]])
    keep = jnp.array([0.4, 0.18])
    xy, ok = jax.jit(jax.vmap(lambda k: layouts.resample_point(k, (-1.5, -1.5, 1.5, 1.5), 0.305, others,
                                                             keep)))(jax.random.split(jax.random.PRNGKey(1), 32))
    assert bool(np.all(ok))
    d = np.linalg.norm(np.asarray(xy)[:, None] - np.asarray(others)[None], axis=-1)
    assert np.all(d >= np.asarray(keep) + 0.305 - 1e-6)


def test_robot_masses_match_safety_gym():
    point = mjcf.compile_model(mjcf.SceneSpec(robot="point"))
    car = mjcf.compile_model(mjcf.SceneSpec(robot="car"))
    assert math.isclose(point.body_subtreemass[point.body("robot").id], 0.005189, rel_tol=1e-3)
    assert math.isclose(car.body_subtreemass[car.body("robot").id], 0.030445, rel_tol=1e-3)


def test_point_and_car_speeds_in_mujoco():
    """Straight-line speed and turn rate of the MJCF at the spec's timesteps, with MuJoCo C (the MJX port is
    compared with MuJoCo C on the same MJCF in test_envs.py)."""
    def run(robot, dt, ctrl, seconds):
        m = mjcf.compile_model(mjcf.SceneSpec(robot=robot, timestep=dt, iterations=10, ls_iterations=5))
        d = mujoco.MjData(m)
        d.ctrl[:] = ctrl
        for _ in range(int(round(seconds / dt))):
            mujoco.mj_step(m, d)
        return d
    for dt in (0.002, 0.006):
        d = run("point", dt, [1.0, 0.0], 4.0)
        assert 1.45 <= np.linalg.norm(d.qvel[:2]) <= 1.51
        d = run("point", dt, [0.0, 1.0], 2.0)
        assert 2.9 <= d.qvel[2] <= 3.05
        # Commands beyond 0.05 saturate the forward motor: 0.05 and 1 drive identically.
        a, b = run("point", dt, [0.05, 0.3], 1.0), run("point", dt, [1.0, 0.3], 1.0)
        np.testing.assert_allclose(a.qpos, b.qpos, atol=1e-9)
    for dt in (0.004, 0.01):
        d = run("car", dt, [1.0, 1.0], 6.0)
        assert 0.74 <= np.linalg.norm(d.qvel[:2]) <= 0.80
        assert d.qvel[1] < 0  # the Car's front is -y


@pytest.mark.parametrize("name", ["point_goal", "car_button", "car_goal1"])
def test_solver_budget_matches_safety_gym_budget_in_mujoco(name):
    """The env's reduced solver budget (10 iterations, few line-search steps, see robots.py) against
    Safety-Gym's MuJoCo defaults (100 iterations, 50 line-search steps), both in MuJoCo C (float64) so that
    only the budget differs: 60 random env steps, then 40 straight ones, from a scene at rest. Measured max
    |xy| gap: Point 0, Car under 3e-6 m (timestep 0.01 and 0.004)."""
    import dataclasses

    env = envs.make(name)
    rng = np.random.default_rng(0)
    actions = np.concatenate([rng.uniform(-1, 1, (60, 2)), np.ones((40, 2))])
    qpos = robots.initial_qpos(env.robot, np.asarray(env.mj_model.qpos0), np.array([0.0, -0.5]), 0.3)

    def rollout(spec):
        m = mjcf.compile_model(spec)
        d = mujoco.MjData(m)
        d.qpos[:] = qpos
        d.mocap_pos[:, :2] = np.stack([np.linspace(-1.2, 1.2, m.nmocap), np.full(m.nmocap, 1.0)], 1)
        out = []
        for a in actions:
            d.ctrl[:] = a
            for _ in range(env.config.frame_skip):
                mujoco.mj_step(m, d)
            out.append(d.qpos[:2].copy())
        return np.array(out)

    ours = rollout(env.scene)
    sgym = rollout(dataclasses.replace(env.scene, iterations=100, ls_iterations=50))
    assert np.max(np.linalg.norm(sgym - sgym[0], axis=1)) > 0.5  # it really drove
    assert np.max(np.abs(ours - sgym)) < 1e-4


def test_car_mass_matrix_is_sparse_and_point_dense():
    """The Car's MJX model keeps LAPACK out of its mass-matrix factorisations (jacobian="sparse"): with
    dense ones, batches above ~450 envs deadlocked XLA's intra-op thread pool on 2 cores (robots.py)."""
    for name in ("car_goal", "car_button1", "car_circle"):
        assert envs.make(name).mj_model.opt.jacobian == mujoco.mjtJacobian.mjJAC_SPARSE
    # The Point's factorisations are far below jaxlib's split size; dense is MJX's default there.
    assert envs.make("point_goal").mj_model.opt.jacobian == mujoco.mjtJacobian.mjJAC_AUTO


def test_obstacles_collide_only_with_the_robot():
    m = mjcf.compile_model(mjcf.SceneSpec(robot="car", goal_size=0.3, num_hazards=3, num_buttons=4,
                                          num_gremlins=2, num_vases=1))
    hazard_or_goal = [m.geom(n).id for n in ("goal", "hazard0", "hazard1", "hazard2")]
    assert all(m.geom_contype[g] == 0 and m.geom_conaffinity[g] == 0 for g in hazard_or_goal)
    wheels = [m.geom("robot_left_wheel").id, m.geom("robot_right_wheel").id]
    # Wheels (cylinders) touch the floor only: MJX has no cylinder-box collision.
    assert all(m.geom_contype[g] == robots.FLOOR_BIT for g in wheels)
    for name in ("button0", "gremlin0", "vase0"):
        assert m.geom_contype[m.geom(name).id] == 0  # obstacles never collide with each other


@pytest.mark.parametrize("argv", [["envs=point_gaol"], ["batches=1,x"], ["steps=0"], ["bogus"], ["colour=red"],
                                  ["iterations=-1"], ["iterations=ten"]])
def test_env_benchmark_bad_options_exit_2(argv, capsys):
    from cvpo_jax.benchmarks import env as env_bench

    assert env_bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["env=nope"], ["steps=abc"], ["size=3"], ["backend=vulkan"]])
def test_render_cli_bad_options_exit_2(argv, capsys):
    from cvpo_jax.envs import render

    assert render.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_env_benchmark_solver_budget_override_is_parsed():
    from cvpo_jax.benchmarks import env as env_bench

    assert env_bench._parse(["envs=car_goal1", "iterations=0"])["iterations"] == 0
    assert env_bench._parse(["envs=car_goal1"])["iterations"] is None  # each robot's own budget


def test_env_benchmark_compares_each_task_with_its_safety_gymnasium_counterpart():
    import json
    import pathlib

    from cvpo_jax.benchmarks import env as env_bench

    assert env_bench.sgym_counterpart("point_goal1")[0] == "SafetyPointGoal1"
    assert env_bench.sgym_counterpart("car_button2")[0] == "SafetyCarButton1"
    assert env_bench.sgym_counterpart("car_circle")[0] == "SafetyCarCircle1"
    assert env_bench.sgym_counterpart("speed_limit") is None
    # The constants are the committed measurement (experiments/sgym_reference.py), rounded.
    measured = json.loads((pathlib.Path(__file__).parents[1] / "experiments/results/sgym_reference_cpu.json").read_text())
    for result in measured["results"]:
        key = result["task"].removesuffix("-v0")
        assert env_bench.SGYM_SINGLE_ENV_STEPS_PER_S[key] == round(result["steps_per_s"])
