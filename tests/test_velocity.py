"""Safety-Gymnasium's velocity tasks on brax's MJX robots (envs/velocity.py).

One compiled robot (the Hopper: reset and step jitted once, shared by every test); the other robots' reset and
step are traced only (shapes, keys, dtypes), and their velocity measures are checked on hand-made states.
`-m slow` adds a compiled, vmapped Ant rollout.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax import envs
from cvpo_jax.envs import velocity

# The spec's table (safety_gymnasium 1.0.0, tasks/safe_velocity/*_v1.py).
SPEC_V1 = {"hopper": 0.7402, "walker2d": 2.3415, "halfcheetah": 3.2096, "swimmer": 0.2282, "ant": 2.6222,
           "humanoid": 1.4149}
TASKS = ["ant_velocity", "halfcheetah_velocity", "hopper_velocity", "humanoid_velocity", "walker2d_velocity"]


@pytest.fixture(scope="module")
def hopper():
    env = envs.make("hopper_velocity")
    reset, step = jax.jit(env.reset), jax.jit(env.step)
    return env, reset(jax.random.PRNGKey(0)), step


def _with_joints(state, qpos=None, qvel=None):
    """`state` with the robot's qpos/qvel replaced (brax keeps copies in q/qd)."""
    ps = state.pipeline_state
    if qpos is not None:
        ps = ps.replace(qpos=jnp.asarray(qpos, jnp.float32), q=jnp.asarray(qpos, jnp.float32))
    if qvel is not None:
        ps = ps.replace(qvel=jnp.asarray(qvel, jnp.float32), qd=jnp.asarray(qvel, jnp.float32))
    return state.replace(pipeline_state=ps)


def _assert_same_layout(a, b):
    """Reset and step states have one pytree layout (trainers select between them with jnp.where)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(a)] == [(x.shape, x.dtype) for x in jax.tree.leaves(b)]


def test_registry_lists_and_builds_the_tasks():
    assert set(TASKS) <= set(envs.names())
    assert not set(TASKS) & set(envs.mjx_names())  # mjx_names() are the Config-built Safety-Gym tasks
    assert sorted(velocity.TASKS) == TASKS
    env = envs.make("hopper_velocity")
    assert isinstance(env, velocity.VelocityEnv)
    assert (env.episode_length, env.cost_limit, env.backend) == (1000, 25.0, "mjx")
    assert (env.observation_size, env.action_size) == (11, 3)
    with pytest.raises(ValueError, match="hopper_velocity takes no overrides, got episode_length") as err:
        envs.make("hopper_velocity", episode_length=5)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown env 'hopper_speed'; valid names: .*ant_velocity") as err:
        envs.make("hopper_speed")
    assert "\n" not in str(err.value)


def test_threshold_table_is_the_specs():
    assert velocity.VELOCITY_THRESHOLDS == SPEC_V1
    assert set(velocity.ROBOTS) <= set(SPEC_V1)


def test_cost_function():
    v = jnp.asarray([-5.0, 0.0, 0.7401, 0.7402, 0.7403, 9.0])
    np.testing.assert_array_equal(velocity.velocity_cost(v, 0.7402), [0, 0, 0, 0, 1, 1])
    assert velocity.velocity_cost(v, 0.7402).dtype == jnp.float32


@pytest.mark.parametrize("task", ["ant_velocity", "halfcheetah_velocity", "humanoid_velocity",
                                  "walker2d_velocity"])
def test_traced_api(task):
    """Reset and step traced (not compiled): sizes, keys, scalar float32 fields; actions map to the ctrl range."""
    env = envs.make(task)
    assert (env.episode_length, env.cost_limit, env.backend) == (1000, 25.0, "mjx")
    s0 = jax.eval_shape(env.reset, jax.random.PRNGKey(0))
    s1 = jax.eval_shape(env.step, s0, jax.ShapeDtypeStruct((env.action_size,), jnp.float32))
    assert s0.obs.shape == s1.obs.shape == (env.observation_size,)
    for s in (s0, s1):
        assert {"cost", "goal_reached", "velocity", "nan_action", "x_velocity"} <= set(s.metrics)
        assert {"cost", "goal_reached"} <= set(s.info)
        for x in [s.reward, s.done, *s.metrics.values(), s.info["cost"], s.info["goal_reached"]]:
            assert (x.shape, x.dtype) == ((), jnp.float32)
    _assert_same_layout(s0, s1)
    ctrl = np.asarray(env.brax_env.sys.actuator_ctrlrange)
    if env.spec.brax_rescales_actions:
        assert task == "humanoid_velocity"  # brax's Humanoid maps [-1, 1] to its ±0.4 itself
    else:
        np.testing.assert_array_equal(ctrl, np.tile([-1.0, 1.0], (env.action_size, 1)))


def test_xy_speeds_against_numpy():
    """Ant: xy speed of the torso body; Humanoid: of the mass-weighted centre of all bodies."""
    rng = np.random.default_rng(0)
    ant, humanoid = envs.make("ant_velocity"), envs.make("humanoid_velocity")
    nbody = len(ant.brax_env.sys.body_mass)
    a, b = (types.SimpleNamespace(xpos=rng.normal(size=(nbody, 3)).astype(np.float32)) for _ in range(2))
    torso = ant.brax_env.sys.mj_model.body("torso").id
    want = np.hypot(*(b.xpos[torso, :2] - a.xpos[torso, :2])) / ant.dt
    np.testing.assert_allclose(ant.measured_velocity(a, b), want, rtol=1e-5)

    mass = np.asarray(humanoid.brax_env.sys.body_mass, np.float64)
    a, b = (types.SimpleNamespace(xipos=rng.normal(size=(len(mass), 3)).astype(np.float32)) for _ in range(2))
    com = [(mass[:, None] * s.xipos).sum(0)[:2] / mass.sum() for s in (a, b)]
    want = np.hypot(*(com[1] - com[0])) / humanoid.dt
    np.testing.assert_allclose(humanoid.measured_velocity(a, b), want, rtol=1e-4)


def test_hopper_state_fields(hopper):
    env, s0, step = hopper
    s1 = step(s0, jnp.zeros(3))
    for s in (s0, s1):
        assert s.obs.shape == (env.observation_size,)
        assert set(s.metrics) == set(s0.metrics)
        assert {"cost", "goal_reached", "velocity", "nan_action", "x_velocity", "reward_forward"} <= set(s.metrics)
        for x in [s.reward, s.done, *s.metrics.values(), s.info["cost"], s.info["goal_reached"]]:
            assert (x.shape, x.dtype) == ((), jnp.float32)
    _assert_same_layout(s0, s1)
    assert float(s1.done) == 0.0  # a healthy step does not terminate
    assert float(s1.info["goal_reached"]) == float(s1.metrics["goal_reached"]) == 0.0
    # measured as Safety-Gymnasium does: (qpos[0] after - before) / dt
    want = (s1.pipeline_state.qpos[0] - s0.pipeline_state.qpos[0]) / env.dt
    np.testing.assert_allclose(s1.metrics["velocity"], want, rtol=1e-6)


@pytest.mark.parametrize("offset, cost", [(-1e-3, 0.0), (1e-3, 1.0)])
def test_hopper_cost_just_below_and_above_threshold(hopper, offset, cost):
    """The reset Hopper is in the air with no contact; with every other velocity 0 and no torque its x velocity
    stays what we set over one step (to ~1e-5 m/s), so the cost flips across the threshold."""
    env, s0, step = hopper
    v = env.velocity_threshold + offset
    s1 = step(_with_joints(s0, qvel=np.eye(6)[0] * v), jnp.zeros(3))
    assert abs(float(s1.metrics["velocity"]) - v) < 1e-4
    assert float(s1.info["cost"]) == float(s1.metrics["cost"]) == cost
    assert float(s1.done) == 0.0


def test_hopper_fall_terminates(hopper):
    env, s0, step = hopper
    qpos = np.array(s0.pipeline_state.qpos)
    qpos[1] = -0.75  # rootz: torso at 0.5 m, below the healthy range z > 0.7
    s1 = step(_with_joints(s0, qpos=qpos), jnp.zeros(3))
    assert float(s1.pipeline_state.x.pos[0, 2]) < 0.7
    assert float(s1.done) == 1.0
    qpos = np.array(s0.pipeline_state.qpos)
    qpos[2] = 0.5  # rooty: torso tilted beyond the healthy angle |angle| < 0.2
    assert float(step(_with_joints(s0, qpos=qpos), jnp.zeros(3)).done) == 1.0


def test_hopper_nan_action_is_zero_and_flagged(hopper):
    env, s0, step = hopper
    nan_step = step(s0, jnp.asarray([jnp.nan, 0.5, -0.5]))
    zero_step = step(s0, jnp.asarray([0.0, 0.5, -0.5]))
    assert float(nan_step.metrics["nan_action"]) == 1.0
    assert float(zero_step.metrics["nan_action"]) == 0.0
    assert np.all(np.isfinite(nan_step.obs)) and np.isfinite(float(nan_step.reward))
    np.testing.assert_array_equal(nan_step.obs, zero_step.obs)
    np.testing.assert_array_equal(nan_step.pipeline_state.qpos, zero_step.pipeline_state.qpos)


@pytest.mark.slow
def test_ant_vmapped_rollout():
    """Compiled Ant, 4 envs under jit(vmap): the cost agrees with brax's own torso velocity metrics."""
    env = envs.make("ant_velocity")
    n = 4
    reset = jax.jit(jax.vmap(env.reset))
    step = jax.jit(jax.vmap(env.step))
    s = reset(jax.random.split(jax.random.PRNGKey(0), n))
    key = jax.random.PRNGKey(1)
    for _ in range(5):
        key, k = jax.random.split(key)
        s = step(s, jax.random.uniform(k, (n, env.action_size), minval=-1.0, maxval=1.0))
        speed = np.hypot(s.metrics["x_velocity"], s.metrics["y_velocity"])
        np.testing.assert_allclose(s.metrics["velocity"], speed, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(s.info["cost"], (speed > env.velocity_threshold).astype(np.float32))
        assert s.obs.shape == (n, env.observation_size) and s.done.shape == (n,)
