"""Compiled env tests on one representative of each task kind and robot.

  point_goal    the CVPO Goal (ButtonEnv, fixed layout): the trainer's first task, tested in depth
  car_button    the CVPO Button with the Car (gremlins, free-joint robot, wheels on the floor)
  point_goal1   Safety-Gymnasium GoalLevel1 (GoalEnv, layout redrawn every reset, goal resampling)
  point_circle1 Safety-Gymnasium CircleLevel1, driven through brax's training wrappers

Each env is compiled once (reset and step jitted) and shared by every test in this module; the remaining
twelve registered envs are covered by test_envs_all.py (a compiled smoke test for five of them, a real reset
and a lowered step for the seven variants).
"""

import dataclasses

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest
from brax.envs.wrappers import training as brax_training

from cvpo_jax import envs
from cvpo_jax.envs import base, mjcf

_COMPILED = {}


def compiled(name: str, **overrides):
    """(env, jit(reset), jit(step)), built once per (name, overrides) for the whole module."""
    key = (name, tuple(sorted(overrides.items())))
    if key not in _COMPILED:
        env = envs.make(name, **overrides)
        _COMPILED[key] = (env, jax.jit(env.reset), jax.jit(env.step))
    return _COMPILED[key]


def smoke(name: str):
    """Reset + a few steps: shapes, finite values, done == 0, determinism for a fixed key."""
    env, reset, step = compiled(name)
    actions = jax.random.uniform(jax.random.PRNGKey(7), (4, env.action_size), minval=-1, maxval=1)

    def rollout(key):
        state = reset(key)
        states = [state]
        for a in actions:
            state = step(state, a)
            states.append(state)
        return states

    states = rollout(jax.random.PRNGKey(0))
    again = rollout(jax.random.PRNGKey(0))
    for s, s2 in zip(states, again):
        assert s.obs.shape == (env.observation_size,)
        assert np.all(np.isfinite(s.obs)) and np.isfinite(float(s.reward))
        assert float(s.done) == 0.0
        np.testing.assert_array_equal(s.obs, s2.obs)
        np.testing.assert_array_equal(s.pipeline_state.qpos, s2.pipeline_state.qpos)
        assert float(s.info["cost"]) in (0.0, 1.0) and float(s.info["goal_reached"]) in (0.0, 1.0)
        assert s.metrics["cost"] == s.info["cost"] and s.metrics["goal_reached"] == s.info["goal_reached"]
    assert set(states[0].metrics) == set(states[-1].metrics)
    assert {"cost", "goal_reached", "nan_action"} <= set(states[0].metrics)
    assert any(k.startswith("reward/") for k in states[0].metrics)
    # The robot moved.
    assert not np.allclose(states[0].pipeline_state.qpos, states[-1].pipeline_state.qpos)
    return states


def teleport(env, state, xy, yaw=0.0, vel=(0.0, 0.0)):
    """State with the robot moved to xy (heading yaw, planar velocity vel) by editing qpos/qvel."""
    d = state.pipeline_state
    if env.robot.free_root:
        qpos = d.qpos.at[:7].set(jnp.array([xy[0], xy[1], 0.1, np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)]))
        qvel = jnp.zeros_like(d.qvel).at[:2].set(jnp.asarray(vel))
    else:
        qpos = d.qpos.at[:3].set(jnp.array([xy[0], xy[1], yaw]))
        qvel = jnp.zeros_like(d.qvel).at[:2].set(jnp.asarray(vel))
    return state.replace(pipeline_state=d.replace(qpos=qpos, qvel=qvel))


# ----- point_goal: the CVPO Goal task ------------------------------------------------------------------


def test_point_goal_smoke():
    states = smoke("point_goal")
    assert states[0].obs.shape == (60,)


def test_point_goal_fixed_layout_and_random_goal_button():
    env, reset, _ = compiled("point_goal")
    s0, s1 = reset(jax.random.PRNGKey(0)), reset(jax.random.PRNGKey(1))
    # Fixed layout: robot start and every object identical across resets.
    np.testing.assert_array_equal(s0.pipeline_state.qpos, s1.pipeline_state.qpos)
    np.testing.assert_allclose(env.objects_xy(s0.pipeline_state, "hazards"), np.array(
        envs.button.CVPO_GOAL_HAZARDS), atol=1e-6)
    np.testing.assert_allclose(env.objects_xy(s0.pipeline_state, "buttons"), np.array(
        envs.button.CVPO_GOAL_BUTTONS), atol=1e-6)
    # ... but the goal button is drawn per reset.
    goals = {int(reset(jax.random.PRNGKey(k)).pipeline_state.userdata[base._UD_GOAL_BUTTON]) for k in range(12)}
    assert len(goals) > 1


def test_point_goal_hazard_cost():
    env, reset, step = compiled("point_goal")
    s = reset(jax.random.PRNGKey(0))
    zero = jnp.zeros(2)
    inside = step(teleport(env, s, (0.3 + 0.15, 0.1)), zero)  # hazard at (0.3, 0.1), size 0.22
    assert float(inside.info["cost"]) == 1.0 and float(inside.metrics["cost/hazards"]) == 1.0
    outside = step(teleport(env, s, (0.3 + 0.25, 0.1)), zero)
    assert float(outside.info["cost"]) == 0.0


def _press(env, step, state, button: int, speed=1.0):
    """Drive the Point into `button` from just outside it (approaching along +x)."""
    bxy = np.asarray(env.objects_xy(state.pipeline_state, "buttons"))[button]
    s = teleport(env, state, (bxy[0] - 0.25, bxy[1]), yaw=0.0, vel=(speed, 0.0))
    return step(s, jnp.array([1.0, 0.0]))


def _with_goal_button(state, goal: int, timer: float = 0.0):
    ud = state.pipeline_state.userdata.at[base._UD_GOAL_BUTTON].set(goal).at[base._UD_TIMER].set(timer)
    return state.replace(pipeline_state=state.pipeline_state.replace(userdata=ud))


def test_point_goal_pressing_goal_button_rewards_and_starts_timer():
    env, reset, step = compiled("point_goal")
    s = _with_goal_button(reset(jax.random.PRNGKey(0)), 3)
    pressed = _press(env, step, s, 3)
    assert float(pressed.metrics["reward/goal"]) == 1.0
    assert float(pressed.info["goal_reached"]) == 1.0
    assert float(pressed.metrics["cost/buttons"]) == 0.0
    d = pressed.pipeline_state
    assert float(d.userdata[base._UD_TIMER]) == 10.0
    # The goal marker moved onto the new goal button, and the buttons lidar (obs 12:28) went dark.
    new_goal = int(d.userdata[base._UD_GOAL_BUTTON])
    np.testing.assert_allclose(env.objects_xy(d, "goal")[0], env.objects_xy(d, "buttons")[new_goal])
    assert float(jnp.max(pressed.obs[12:28])) == 0.0
    # Timer: buttons stay hidden for 10 observations, then reappear.
    s = teleport(env, pressed, (0.0, -0.5))
    seen = []
    for _ in range(11):
        s = step(s, jnp.zeros(2))
        seen.append(float(jnp.max(s.obs[12:28])) > 0)
    assert seen == [False] * 9 + [True] * 2


def test_point_goal_wrong_button_costs_unless_timer_runs():
    env, reset, step = compiled("point_goal")
    s = _with_goal_button(reset(jax.random.PRNGKey(0)), 3)
    wrong = _press(env, step, s, 0)
    assert float(wrong.metrics["cost/buttons"]) == 1.0 and float(wrong.info["cost"]) == 1.0
    assert float(wrong.metrics["reward/goal"]) == 0.0 and float(wrong.info["goal_reached"]) == 0.0
    during_timer = _press(env, step, _with_goal_button(s, 3, timer=5.0), 0)
    assert float(during_timer.metrics["cost/buttons"]) == 0.0


def test_point_goal_action_clipping_and_nan():
    env, reset, step = compiled("point_goal")
    s = reset(jax.random.PRNGKey(0))
    big = step(s, jnp.array([5.0, -7.0]))
    unit = step(s, jnp.array([1.0, -1.0]))
    np.testing.assert_array_equal(big.obs, unit.obs)
    # NaN components act as 0 and are flagged; the state stays finite.
    nan = step(s, jnp.array([jnp.nan, 0.5]))
    zero = step(s, jnp.array([0.0, 0.5]))
    np.testing.assert_array_equal(nan.obs, zero.obs)
    assert float(nan.metrics["nan_action"]) == 1.0 and float(zero.metrics["nan_action"]) == 0.0
    assert np.all(np.isfinite(nan.pipeline_state.qpos))


def _c_rollout(env, state, actions):
    """Step the env's own MJCF with MuJoCo C (float64) from the same state: robot xy after each env step."""
    m = env.mj_model
    d = mujoco.MjData(m)
    ps = state.pipeline_state
    d.qpos[:], d.qvel[:] = np.asarray(ps.qpos), np.asarray(ps.qvel)
    d.mocap_pos[:], d.mocap_quat[:] = np.asarray(ps.mocap_pos), np.asarray(ps.mocap_quat)
    d.userdata[:] = np.asarray(ps.userdata)
    n_grem = env.config.num_gremlins
    gsl = env.slices["gremlins"]
    centres = np.asarray(ps.userdata[base._UD_GREMLINS:]).reshape(n_grem, 2)
    out = []
    for a in actions:
        d.ctrl[:] = np.clip(np.asarray(a), -1, 1)
        for _ in range(env.config.frame_skip):
            if n_grem:
                d.mocap_pos[gsl, :2] = centres + env.config.gremlin_travel * np.array([np.sin(d.time), np.cos(d.time)])
            mujoco.mj_step(m, d)
        mujoco.mj_forward(m, d)
        out.append(d.xpos[env._robot_body, :2].copy())
    return np.array(out)


def _mjx_rollout(step, state, actions):
    out = []
    for a in actions:
        state = step(state, a)
        out.append(np.asarray(state.pipeline_state.xpos[1, :2]))  # body 1 is the robot
    return np.array(out), state


# Measured gaps between MJX (float32) and MuJoCo C (float64) on the same MJCF, same actions. Point, 50
# random env steps (3 s): max |xy| gap ~1e-5 m. Car, 20 random env steps: ~2e-5 m; Car driving straight
# (wheels keep bouncing off the floor, so contact forces matter every step): ~2e-3 m after 1 s, ~4 cm after
# 2 s, ~11 cm (3% of 3.7 m travelled) after 6 s. The gap is float32 rounding in the contact solve, not
# the port: MJX with jax_enable_x64 matches MuJoCo C to 1e-12 in qacc (README). Tolerances leave headroom.
POINT_TOL, CAR_TOL = 2e-3, 1e-2


def test_point_goal_physics_matches_mujoco_c():
    env, reset, step = compiled("point_goal")
    s = reset(jax.random.PRNGKey(0))
    actions = jax.random.uniform(jax.random.PRNGKey(3), (50, 2), minval=-1, maxval=1)
    mjx_xy, _ = _mjx_rollout(step, s, actions)
    c_xy = _c_rollout(env, s, np.asarray(actions))
    print("point MJX vs C max |xy| gap:", np.max(np.abs(mjx_xy - c_xy)))
    assert np.max(np.abs(mjx_xy - c_xy)) < POINT_TOL
    assert np.max(np.linalg.norm(c_xy - c_xy[0], axis=1)) > 0.1  # it really moved


def _check_sensors_against_c(env, state):
    """Observation sensors from mjx.Data vs MuJoCo C's sensordata after mj_forward on the same state."""
    spec = dataclasses.replace(env.scene, with_sensors=True)
    m = mjcf.compile_model(spec)
    d = mujoco.MjData(m)
    ps = state.pipeline_state
    for field in ("qpos", "qvel", "ctrl", "mocap_pos", "mocap_quat", "qacc_warmstart"):
        getattr(d, field)[:] = np.asarray(getattr(ps, field))
    d.time = float(ps.time)
    mujoco.mj_forward(m, d)
    expected = []
    for name in ("accelerometer", "velocimeter", "gyro", "magnetometer"):
        expected.append(d.sensor(name).data)
    for j in env.robot.ball_joints:
        expected.append(d.sensor(f"ballangvel_{j}").data)
    for j in env.robot.ball_joints:
        quat = d.sensor(f"ballquat_{j}").data
        mat = np.zeros(9)
        mujoco.mju_quat2Mat(mat, quat / np.linalg.norm(quat))
        expected.append(mat)
    expected = np.concatenate(expected)
    got = np.asarray(state.obs[:env.robot.sensor_size])
    np.testing.assert_allclose(got, expected, atol=2e-3 * max(1.0, np.max(np.abs(expected))), rtol=1e-2)


def test_point_goal_sensors_match_mujoco_c():
    env, reset, step = compiled("point_goal")
    s = reset(jax.random.PRNGKey(0))
    for a in ([1.0, 0.5], [0.3, -1.0], [-1.0, 0.2]):
        s = step(s, jnp.asarray(a))
    assert float(jnp.linalg.norm(s.obs[3:6])) > 0.1  # moving: velocimeter and accelerometer are non-trivial
    _check_sensors_against_c(env, s)


def test_point_goal_render_png(tmp_path):
    from cvpo_jax.envs import render

    env, reset, step = compiled("point_goal")
    states = [reset(jax.random.PRNGKey(0))]
    for a in jax.random.uniform(jax.random.PRNGKey(5), (30, 2), minval=-1, maxval=1):
        states.append(step(states[-1], a))
    traj = render.trajectory_from_states(env, states)
    assert traj.robot_xy.shape == (31, 2) and traj.mocap_xy.shape[0] == 31
    np.testing.assert_allclose(traj.robot_xy[0], np.asarray(states[0].pipeline_state.qpos[:2]), atol=1e-6)
    path = render.render_rollout(env, traj, str(tmp_path / "point_goal.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----- car_button: the CVPO Button task with the Car ---------------------------------------------------


def test_car_button_smoke():
    states = smoke("car_button")
    assert states[0].obs.shape == (88,)


def test_car_button_physics_and_sensors_match_mujoco_c():
    env, reset, step = compiled("car_button")
    s = reset(jax.random.PRNGKey(0))
    actions = jax.random.uniform(jax.random.PRNGKey(4), (20, 2), minval=-1, maxval=1)
    mjx_xy, last = _mjx_rollout(step, s, actions)
    c_xy = _c_rollout(env, s, np.asarray(actions))
    print("car MJX vs C max |xy| gap, 20 random steps:", np.max(np.abs(mjx_xy - c_xy)))
    assert np.max(np.abs(mjx_xy - c_xy)) < CAR_TOL
    _check_sensors_against_c(env, last)
    # Driving straight for 5 s: the same distance covered within 5%.
    drive = jnp.ones((50, 2))
    mjx_xy, _ = _mjx_rollout(step, s, drive)
    c_xy = _c_rollout(env, s, np.asarray(drive))
    travel_mjx, travel_c = np.linalg.norm(mjx_xy[-1] - mjx_xy[0]), np.linalg.norm(c_xy[-1] - c_xy[0])
    print("car straight 5 s: travelled MJX %.3f m, C %.3f m" % (travel_mjx, travel_c))
    assert travel_c > 2.5 and abs(travel_mjx - travel_c) < 0.05 * travel_c


def test_car_button_gremlins_circle_their_layout_position():
    env, reset, step = compiled("car_button")
    s = reset(jax.random.PRNGKey(0))
    centres = np.array(envs.button.CVPO_BUTTON_GREMLINS)
    positions = []
    for _ in range(4):
        s = step(s, jnp.zeros(2))
        positions.append(np.asarray(env.objects_xy(s.pipeline_state, "gremlins")))
    positions = np.array(positions)  # [4, 4, 2]
    np.testing.assert_allclose(np.linalg.norm(positions - centres, axis=-1), 0.3, atol=1e-5)
    assert np.min(np.linalg.norm(positions[0] - positions[-1], axis=-1)) > 0.05  # they move (1 rad/s)
    # All in phase: the same offset (sin t, cos t) * travel, t = time of the last physics step.
    t = float(s.pipeline_state.time) - env.config.timestep
    np.testing.assert_allclose(positions[-1] - centres, 0.3 * np.array([np.sin(t), np.cos(t)]) + 0 * centres,
                               atol=1e-4)


def test_car_button_gremlin_contact_costs():
    env, reset, step = compiled("car_button")
    s = step(reset(jax.random.PRNGKey(0)), jnp.zeros(2))
    g = np.asarray(env.objects_xy(s.pipeline_state, "gremlins"))[0]
    # Car 0.35 m east of a gremlin, its front (-y in the body frame) turned to face west, driving at it: a
    # kinematic gremlin pushes back, so contact lasts only while the car pushes; cost must show up.
    s = teleport(env, s, (g[0] + 0.35, g[1]), yaw=-np.pi / 2)
    hits = []
    for _ in range(8):
        s = step(s, jnp.ones(2))
        hits.append(float(s.metrics["cost/gremlins"]))
        assert float(s.info["cost"]) >= hits[-1]
    assert max(hits) == 1.0
    # Negative control: parked in open floor, nothing costs.
    clear = step(teleport(env, s, (0.6, 0.6)), jnp.zeros(2))
    assert float(clear.info["cost"]) == 0.0


# ----- point_goal1: Safety-Gymnasium GoalLevel1 --------------------------------------------------------


def test_point_goal1_smoke_and_layouts_differ():
    states = smoke("point_goal1")
    assert states[0].obs.shape == (60,)
    env, reset, _ = compiled("point_goal1")
    a, b = reset(jax.random.PRNGKey(0)), reset(jax.random.PRNGKey(1))
    assert not np.allclose(env.objects_xy(a.pipeline_state, "hazards"), env.objects_xy(b.pipeline_state, "hazards"))


def test_point_goal1_reaching_goal_resamples_it():
    env, reset, step = compiled("point_goal1")
    s = reset(jax.random.PRNGKey(2))
    goal = np.asarray(env.objects_xy(s.pipeline_state, "goal")[0])
    reached = step(teleport(env, s, goal + 0.1), jnp.zeros(2))
    assert float(reached.metrics["reward/goal"]) == 1.0 and float(reached.info["goal_reached"]) == 1.0
    d = reached.pipeline_state
    new_goal = np.asarray(env.objects_xy(d, "goal")[0])
    assert np.linalg.norm(new_goal - goal) > 0.05
    robot = np.asarray(d.xpos[1, :2])
    assert np.linalg.norm(new_goal - robot) >= 0.4 + 0.305 - 1e-5
    hazards = np.asarray(env.objects_xy(d, "hazards"))
    assert np.min(np.linalg.norm(hazards - new_goal, axis=1)) >= 0.18 + 0.305 - 1e-5
    # last distance now refers to the new goal: standing still earns ~0 distance reward next step.
    still = step(reached, jnp.zeros(2))
    assert abs(float(still.metrics["reward/distance"])) < 1e-3
    assert float(still.metrics["reward/goal"]) == 0.0


def test_point_goal1_hazard_cost():
    env, reset, step = compiled("point_goal1")
    s = reset(jax.random.PRNGKey(0))
    h = np.asarray(env.objects_xy(s.pipeline_state, "hazards"))[0]
    assert float(step(teleport(env, s, h + 0.1), jnp.zeros(2)).info["cost"]) == 1.0


# ----- point_circle1 through brax's training wrappers --------------------------------------------------


@pytest.fixture(scope="module")
def wrapped_circle():
    # A narrow arena (walls at |x| = 0.3) so that costs happen, and 6-step episodes.
    env = envs.make("point_circle1", wall_x=0.3)
    wrapped = brax_training.VmapWrapper(
        brax_training.AutoResetWrapper(brax_training.EpisodeWrapper(env, episode_length=6, action_repeat=1)))
    return env, wrapped, jax.jit(wrapped.reset), jax.jit(wrapped.step)


def test_brax_wrappers_truncate_sum_cost_and_reset(wrapped_circle):
    env, wrapped, reset, step = wrapped_circle
    state = reset(jax.random.split(jax.random.PRNGKey(0), 3))
    first_qpos = np.asarray(state.pipeline_state.qpos)
    actions = jnp.tile(jnp.array([[1.0, 0.0]]), (3, 1))
    costs, rewards = [], []
    for t in range(6):
        state = step(state, actions)
        costs.append(np.asarray(state.metrics["cost"]))
        rewards.append(np.asarray(state.reward))
        assert state.obs.shape == (3, 28)
        assert np.all(state.done == (1.0 if t == 5 else 0.0))
    costs, rewards = np.array(costs), np.array(rewards)
    assert costs.sum() > 0  # the narrow arena makes costs happen
    np.testing.assert_allclose(state.info["episode_metrics"]["cost"], costs.sum(0), atol=1e-6)
    np.testing.assert_allclose(state.info["episode_metrics"]["sum_reward"], rewards.sum(0), atol=1e-5)
    assert np.all(state.info["truncation"] == 1.0)
    # AutoResetWrapper put the first state back.
    np.testing.assert_allclose(state.pipeline_state.qpos, first_qpos)
    state = step(state, actions)
    assert np.all(state.done == 0.0) and np.all(state.info["steps"] == 1)


def test_circle_wall_cost_and_reward_direction(wrapped_circle):
    env, _, _, _ = wrapped_circle
    # Use the plain env functions through the wrapper's compiled step: x beyond the wall costs.
    _, wrapped, reset, step = wrapped_circle
    state = reset(jax.random.split(jax.random.PRNGKey(1), 3))
    d = state.pipeline_state
    # Robot 0 outside (x = 0.5), robot 1 inside (x = 0), robot 2 on the circle moving counter-clockwise.
    qpos = d.qpos.at[:, :3].set(jnp.array([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, -1.5, 0.0]]))
    qvel = jnp.zeros_like(d.qvel).at[2, 0].set(1.0)
    state = state.replace(pipeline_state=d.replace(qpos=qpos, qvel=qvel))
    state = step(state, jnp.zeros((3, 2)))
    np.testing.assert_array_equal(np.asarray(state.metrics["cost"]), [1.0, 0.0, 0.0])
    assert float(state.metrics["reward/circle"][2]) > 0.05  # +x at (0, -1.5) is counter-clockwise
