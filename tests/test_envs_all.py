"""Every registered env: jit reset/step, observation size, finite values, determinism for a fixed key.

The four envs tested in depth in test_envs.py are smoke-tested there, point_traps in test_traps.py. Of the
other twelve, each task the paper trains on, and each Point task of levels 0-1, compiles and runs its step
here (one XLA compile each, 10-50 s on a 2-core CPU without a warm compilation cache).

The remaining variants (the Car at levels 1-2 and car_traps, the Point at level 2) run the same task and
robot code as those, with more or differently placed objects, so the default suite runs their reset for
real and traces and lowers their step (every shape, key and dtype of the step, a few seconds each) without
paying for a compile of the same graph again. Their compiled smoke test is marked slow:
`python -m pytest -m slow`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax import envs
from test_envs import smoke  # shares test_envs' compiled-function cache
from test_envs_units import EXPECTED_OBS

COVERED_IN_TEST_ENVS = ("point_goal", "car_button", "point_goal1", "point_circle1")
COVERED_IN_TEST_TRAPS = ("point_traps",)  # compiled and smoke-tested in test_traps.py
# The same task and robot code as a compiled-here task, with other object counts or placements (car_traps:
# the traps code compiled in test_traps.py with the Car robot code compiled here).
VARIANTS = ("car_goal1", "car_button1", "car_button2", "car_circle1", "car_circle2", "point_button2",
            "point_circle2", "car_traps")
COMPILED_HERE = [n for n in envs.mjx_names() if n not in COVERED_IN_TEST_ENVS + COVERED_IN_TEST_TRAPS + VARIANTS]


@pytest.mark.parametrize("name", COMPILED_HERE)
def test_env_smoke(name):
    states = smoke(name)
    assert states[0].obs.shape == (EXPECTED_OBS[name],)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_resets_and_its_step_lowers(name):
    env = envs.make(name)
    reset = jax.jit(env.reset)
    state, again, other = reset(jax.random.PRNGKey(0)), reset(jax.random.PRNGKey(0)), reset(jax.random.PRNGKey(1))
    assert state.obs.shape == (EXPECTED_OBS[name],) and np.all(np.isfinite(state.obs))
    np.testing.assert_array_equal(state.obs, again.obs)
    assert float(state.reward) == 0.0 and float(state.done) == 0.0 and float(state.info["cost"]) in (0.0, 1.0)
    if env.config.randomize_layout:  # levels 1-2 redraw layouts (car_traps' is fixed)
        assert not np.array_equal(state.pipeline_state.qpos, other.pipeline_state.qpos)
    action = jnp.zeros((env.action_size,))
    traced = jax.jit(env.step).trace(state, action)
    stepped = traced.out_info  # shapes and dtypes of the stepped state
    assert stepped.obs.shape == state.obs.shape and stepped.reward.shape == ()
    assert set(stepped.metrics) == set(state.metrics) and set(stepped.info) >= {"cost", "goal_reached"}
    traced.lower()  # raises if the step does not lower to XLA


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_smoke_compiled(name):
    states = smoke(name)
    assert states[0].obs.shape == (EXPECTED_OBS[name],)
