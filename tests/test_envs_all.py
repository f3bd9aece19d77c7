"""Every registered env: jit reset/step, observation size, finite values, determinism for a fixed key.

The four envs tested in depth in test_envs.py are smoke-tested there; this file covers the other twelve,
one compile each (25-70 s apiece on a busy 2-core CPU without a warm compilation cache).
"""

import pytest

from cvpo_jax import envs
from test_envs import smoke  # shares test_envs' compiled-function cache
from test_envs_units import EXPECTED_OBS

COVERED_IN_TEST_ENVS = ("point_goal", "car_button", "point_goal1", "point_circle1")


# One XLA compile per env (25-70 s each on a busy 2-core CPU, ~7 min for all twelve): slow.
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in envs.mjx_names() if n not in COVERED_IN_TEST_ENVS])
def test_env_smoke(name):
    states = smoke(name)
    assert states[0].obs.shape == (EXPECTED_OBS[name],)
