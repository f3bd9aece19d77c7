"""The CSC trap-navigation tasks (envs/traps.py): health counter, failure cost, termination, observation.

One compile of point_traps' reset and step (shared with test_envs' cache, ~20 s on a cold cache); car_traps
is only built here (no compile): its step is lowered in test_envs_all.py's variant test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cvpo_jax.envs import base, robots, traps
from test_envs import compiled, smoke, teleport

from cvpo_jax import envs

TRAP = (0.1, -0.6)  # a trap centre of the lower barrier
CLEAR = (0.0, -1.5)  # the start: outside every trap


@pytest.fixture(scope="module")
def point():
    env, reset, step = compiled("point_traps")
    return env, reset(jax.random.PRNGKey(0)), step


def _health(state) -> float:
    return float(state.pipeline_state.userdata[base._UD_HEALTH])


def _with_health(state, health: float):
    ud = state.pipeline_state.userdata.at[base._UD_HEALTH].set(health)
    return state.replace(pipeline_state=state.pipeline_state.replace(userdata=ud))


def test_registry_and_presets():
    assert {"point_traps", "car_traps"} <= set(envs.mjx_names()) <= set(envs.names())
    for name, obs in (("point_traps", 45), ("car_traps", 57)):
        env = envs.make(name)
        cfg = env.config
        assert isinstance(env, traps.TrapsEnv) and env.name == name
        assert env.observation_size == obs and env.action_size == 2
        assert env.episode_length == 500 and env.cost_limit == 0.05
        assert cfg.timestep == robots.get(cfg.robot).sgym_timestep and cfg.frame_skip == 10
        assert cfg.trap_health == 25 and cfg.num_hazards == 14 and cfg.hazard_size == 0.25
        assert not cfg.randomize_layout and bool(env._fixed["ok"])
    assert envs.make("point_traps", trap_health=5).config.trap_health == 5


def test_smoke_and_fixed_layout(point):
    env, s0, _ = point
    smoke("point_traps")
    s1 = compiled("point_traps")[1](jax.random.PRNGKey(1))
    np.testing.assert_array_equal(s0.pipeline_state.qpos, s1.pipeline_state.qpos)
    d = s0.pipeline_state
    np.testing.assert_allclose(env.objects_xy(d, "hazards"), np.array(traps.TRAPS_LOCATIONS), atol=1e-6)
    np.testing.assert_allclose(env.objects_xy(d, "goal")[0], traps.TRAPS_GOAL, atol=1e-6)
    np.testing.assert_allclose(env.robot_xy(d), traps.TRAPS_ROBOT, atol=1e-6)
    # Reset: full health, observed as the last entry (health / 25), nothing terminated.
    assert _health(s0) == 25.0 and float(s0.obs[-1]) == 1.0
    assert float(s0.done) == 0.0 and float(s0.info["cost"]) == 0.0
    assert set(s0.metrics) == {"cost", "cost/failure", "goal_reached", "nan_action", "reward/distance",
                               "reward/goal"}


def test_health_drops_one_per_step_inside_a_trap_only(point):
    env, s0, step = point
    zero = jnp.zeros(2)
    s = teleport(env, s0, TRAP)
    for expected in (24.0, 23.0, 22.0):
        s = step(s, zero)
        assert _health(s) == expected and float(s.obs[-1]) == pytest.approx(expected / 25)
        assert float(s.info["cost"]) == 0.0 and float(s.done) == 0.0  # inside but alive: no cost
    s = teleport(env, s, CLEAR)
    for _ in range(2):
        s = step(s, zero)
        assert _health(s) == 22.0 and float(s.info["cost"]) == 0.0 and float(s.done) == 0.0


def test_death_costs_one_and_terminates_on_that_step_only(point):
    env, s0, step = point
    zero = jnp.zeros(2)
    alive = step(_with_health(teleport(env, s0, TRAP), 2.0), zero)
    assert _health(alive) == 1.0 and float(alive.info["cost"]) == 0.0 and float(alive.done) == 0.0
    outside = step(_with_health(teleport(env, s0, CLEAR), 1.0), zero)
    assert _health(outside) == 1.0 and float(outside.info["cost"]) == 0.0 and float(outside.done) == 0.0
    dead = step(alive, zero)
    assert _health(dead) == 0.0 and float(dead.obs[-1]) == 0.0
    assert float(dead.info["cost"]) == 1.0 and float(dead.metrics["cost/failure"]) == 1.0
    assert float(dead.metrics["cost"]) == 1.0 and float(dead.done) == 1.0
    # Stepped past its end (a trainer would reset): still done, health stays 0, the failure counted once.
    after = step(dead, zero)
    assert _health(after) == 0.0 and float(after.done) == 1.0 and float(after.info["cost"]) == 0.0


def test_straight_run_to_the_first_goal_dies_in_the_second_barrier(point):
    """Full forward from the start, heading +y: the barriers cost ~31 steps of health, so the robot dies
    on the way (cost 0 before, 1 and done on the death step), while inside the upper barrier."""
    env, s0, step = point
    s = teleport(env, s0, traps.TRAPS_ROBOT, yaw=np.pi / 2)
    costs, dones, healths = [], [], []
    for _ in range(150):
        s = step(s, jnp.array([1.0, 0.0]))
        costs.append(float(s.info["cost"]))
        dones.append(float(s.done))
        healths.append(_health(s))
        if dones[-1]:
            break
    assert dones[-1] == 1.0 and costs[-1] == 1.0 and healths[-1] == 0.0
    assert sum(costs) == 1.0 and sum(dones) == 1.0
    assert np.all(np.diff([25.0] + healths) <= 0)
    assert float(env.robot_xy(s.pipeline_state)[1]) > 0.3  # past the lower barrier, in the upper one
