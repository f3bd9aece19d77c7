"""The MJX Safety-Gym task suite (installed as cvpo_jax.envs).

    from cvpo_jax import envs
    env = envs.make("point_goal")          # a brax.envs.base.Env stepping mujoco.mjx
    envs.names()                            # every registered task
See envs/README.md for the tasks, what differs from Safety-Gymnasium, and measured speeds.
"""

from cvpo_jax import import_mjx_quietly

import_mjx_quietly()  # before .base imports mujoco.mjx: drops its "Failed to import warp" lines

from .base import Config, SafetyEnv  # noqa: E402
from .registry import default_config, make, mjx_names, names  # noqa: E402

__all__ = ["Config", "SafetyEnv", "default_config", "make", "mjx_names", "names"]
