"""Task names -> (env class, preset). `make(name, **overrides)` builds one; `names()` lists them."""

from __future__ import annotations

import functools
from typing import Callable

from brax.envs.base import Env

from . import button, circle, goal, toy, traps, velocity
from .base import Config, SafetyEnv, check_overrides

_Entry = tuple[type[SafetyEnv], Callable[[], Config]]

_REGISTRY: dict[str, _Entry] = {}
for _robot in ("point", "car"):
    _REGISTRY.update({
        # The CVPO paper's fixed-layout variants.
        f"{_robot}_goal": (button.ButtonEnv, lambda r=_robot: button.cvpo_goal_config(r)),
        f"{_robot}_button": (button.ButtonEnv, lambda r=_robot: button.cvpo_button_config(r)),
        f"{_robot}_circle": (circle.CircleEnv, lambda r=_robot: circle.cvpo_circle_config(r)),
        # Safety-Gymnasium levels (layouts redrawn every reset).
        f"{_robot}_goal1": (goal.GoalEnv, lambda r=_robot: goal.default_config(r, 1)),
        f"{_robot}_button1": (button.ButtonEnv, lambda r=_robot: button.default_config(r, 1)),
        f"{_robot}_button2": (button.ButtonEnv, lambda r=_robot: button.default_config(r, 2)),
        f"{_robot}_circle1": (circle.CircleEnv, lambda r=_robot: circle.default_config(r, 1)),
        f"{_robot}_circle2": (circle.CircleEnv, lambda r=_robot: circle.default_config(r, 2)),
        # The Conservative Safety Critics paper's trap navigation (fixed layout, terminates on failure).
        f"{_robot}_traps": (traps.TrapsEnv, lambda r=_robot: traps.default_config(r)),
    })


# Pure-JAX tasks without MuJoCo, for tests and quick checks of the learners.
_PLAIN_TASKS: dict[str, Callable[[], Env]] = {"speed_limit": toy.SpeedLimit}
# Safety-Gymnasium's velocity tasks on brax's MJX locomotion robots (envs/velocity.py): no Config either.
_PLAIN_TASKS.update({task: functools.partial(velocity.VelocityEnv, robot, task)
                     for task, robot in velocity.TASKS.items()})


def names() -> list[str]:
    return sorted(_REGISTRY) + sorted(_PLAIN_TASKS)


def default_config(name: str) -> Config:
    """The preset Config of an MJX task (plain tasks have none)."""
    _check_name(name)
    if name in _PLAIN_TASKS:
        raise ValueError(f"{name} has no Config (a plain JAX or velocity task)")
    return _REGISTRY[name][1]()


def mjx_names() -> list[str]:
    """The Safety-Gym MJX tasks built from a Config (names() also lists speed_limit and the *_velocity tasks)."""
    return sorted(_REGISTRY)


def make(name: str, **overrides) -> Env:
    """Build the env `name`; keyword overrides replace fields of its Config (envs/base.py)."""
    _check_name(name)
    if name in _PLAIN_TASKS:
        if overrides:
            raise ValueError(f"{name} takes no overrides, got {', '.join(sorted(overrides))}")
        return _PLAIN_TASKS[name]()
    env_cls, preset = _REGISTRY[name]
    return env_cls(check_overrides(preset(), overrides), name=name)


def _check_name(name: str) -> None:
    if name not in _REGISTRY and name not in _PLAIN_TASKS:
        raise ValueError(f"unknown env {name!r}; valid names: {', '.join(names())}")
