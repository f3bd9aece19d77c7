"""Button tasks: touch the goal button (one of four fixed spheres), avoid hazards, gremlins and the
other buttons.

Used for Safety-Gymnasium's Button levels (layout redrawn every reset) and for the CVPO paper's two
fixed-layout tasks: its "Button" (Safety-Gym Button1 with its fixed locations) and its "Goal" (Button2
with fixed locations and no gremlins, reached by pressing the goal button).

Step order follows Safety-Gym: reward (dense distance + 1 on goal-button contact), costs (wrong button
while the timer is 0, gremlin contact, hazard), timer tick, and on a press a new goal button drawn
uniformly from all four (repeats allowed) with the timer set to `button_delay`. While the timer is
non-zero the buttons lidar reads zero and wrong presses cost nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import layouts, mjcf
from .base import _UD_GOAL_BUTTON, _UD_LAST_DIST, _UD_TIMER, Config, SafetyEnv, robot_preset

# The CVPO paper's fixed layouts (its modified Safety-Gym suite).
CVPO_BUTTON_HAZARDS = ((0.0, -1.9), (0.0, 1.9), (0.0, 0.0), (1.9, 0.0), (-1.9, 0.0))
CVPO_BUTTON_BUTTONS = ((-1.3, -1.3), (1.3, -1.3), (-1.3, 1.3), (1.3, 1.3))
CVPO_BUTTON_GREMLINS = ((0.0, -1.3), (0.0, 1.3), (1.3, 0.0), (-1.3, 0.0))
CVPO_GOAL_HAZARDS = ((0.1, -1.9), (-0.2, 1.7), (0.3, 0.1), (2.0, -0.1), (-1.8, 0.2), (-0.1, -1.2),
                     (0.0, 1.3), (1.1, 0.0), (-1.0, 0.0), (0.2, -0.9), (-1.1, 1.1))
CVPO_GOAL_BUTTONS = ((-1.1, -1.3), (1.8, -1.5), (-1.4, 0.6), (1.0, 1.3))


def default_config(robot: str = "point", level: int = 1) -> Config:
    """Safety-Gymnasium ButtonLevel1/2 (re-drawn layout, SGym timestep, 1000 steps, cost limit 25)."""
    common = dict(**robot_preset(robot, cvpo=False), episode_length=1000, cost_limit=25.0,
                  goal_size=0.2, goal_keepout=0.305, num_buttons=4, button_keepout=0.2,
                  hazard_size=0.2, hazard_keepout=0.18, gremlin_travel=0.35, gremlin_keepout=0.4)
    if level == 1:
        return Config(extents=(-1.5, -1.5, 1.5, 1.5), num_hazards=4, num_gremlins=4, **common)
    if level == 2:
        return Config(extents=(-1.8, -1.8, 1.8, 1.8), num_hazards=8, num_gremlins=6, **common)
    raise ValueError(f"Button level {level} is not available; levels 1 and 2 are ported")


def cvpo_button_config(robot: str = "point") -> Config:
    """The CVPO paper's "Button": fixed layout, extents +-2, 5 hazards (0.17), 4 gremlins (travel 0.3)."""
    return Config(
        **robot_preset(robot, cvpo=True), episode_length=400, cost_limit=10.0,
        randomize_layout=False, extents=(-2.0, -2.0, 2.0, 2.0), goal_size=0.2, goal_placed=False,
        num_buttons=4, button_keepout=0.2, button_locations=CVPO_BUTTON_BUTTONS,
        num_hazards=5, hazard_size=0.17, hazard_keepout=0.0, hazard_locations=CVPO_BUTTON_HAZARDS,
        num_gremlins=4, gremlin_travel=0.3, gremlin_keepout=0.35, gremlin_locations=CVPO_BUTTON_GREMLINS)


def cvpo_goal_config(robot: str = "point") -> Config:
    """The CVPO paper's "Goal": its Button2 without gremlins; the goal is pressing the goal button."""
    return Config(
        **robot_preset(robot, cvpo=True), episode_length=400, cost_limit=10.0,
        randomize_layout=False, extents=(-1.8, -1.8, 1.8, 1.8), goal_size=0.2, goal_placed=False,
        num_buttons=4, button_keepout=0.2, button_locations=CVPO_GOAL_BUTTONS,
        num_hazards=11, hazard_size=0.22, hazard_keepout=0.0, hazard_locations=CVPO_GOAL_HAZARDS)


class ButtonEnv(SafetyEnv):
    reward_terms = ("distance", "goal")
    cost_terms = ("hazards", "buttons", "gremlins")

    def __init__(self, config: Config, name: str = ""):
        super().__init__(config, name)
        self._button_geoms = self.geom_ids("button", config.num_buttons)
        self._gremlin_geoms = self.geom_ids("gremlin", config.num_gremlins)

    def _scene_spec(self) -> mjcf.SceneSpec:
        c = self.config
        return dataclasses.replace(
            super()._scene_spec(), goal_size=c.goal_size, num_hazards=c.num_hazards,
            hazard_size=c.hazard_size, num_buttons=c.num_buttons, button_size=c.button_size,
            num_gremlins=c.num_gremlins, gremlin_size=c.gremlin_size)

    def _layout_items(self):
        c = self.config
        items = [layouts.Item("robot", 1, c.robot_keepout),
                 layouts.Item("buttons", c.num_buttons, c.button_keepout, c.button_locations)]
        if c.goal_placed:
            # Safety-Gymnasium places the goal marker like any object (then moves it onto the goal button), so
            # it still keeps later objects away from where it was first drawn.
            items.append(layouts.Item("goal", 1, c.goal_keepout))
        items += [layouts.Item("hazards", c.num_hazards, c.hazard_keepout, c.hazard_locations),
                  layouts.Item("gremlins", c.num_gremlins, c.gremlin_keepout, c.gremlin_locations)]
        return tuple(items)

    def lidar_names(self):
        return ("buttons", "goal", "hazards") + (("gremlins",) if self.config.num_gremlins else ())

    def _lidar_points(self, d):
        hidden = d.userdata[_UD_TIMER] > 0
        visible = jnp.where(hidden, 0.0, 1.0) * jnp.ones(self.config.num_buttons)
        return [(self.objects_xy(d, name), visible if name == "buttons" else None)
                for name in self.lidar_names()]

    def _set_goal_button(self, d, goal_button: jax.Array, timer: jax.Array):
        goal_xy = self.objects_xy(d, "buttons")[goal_button]
        ud = d.userdata.at[_UD_GOAL_BUTTON].set(goal_button.astype(jnp.float32))
        ud = ud.at[_UD_TIMER].set(timer)
        ud = ud.at[_UD_LAST_DIST].set(jnp.linalg.norm(goal_xy - self.robot_xy(d)))
        return d.replace(mocap_pos=d.mocap_pos.at[self.slices["goal"].start, :2].set(goal_xy), userdata=ud)

    def _start_task(self, d, layout, rng):
        # Timer starts at 0 (buttons visible at once), as Safety-Gym and the CVPO code do.
        return self._set_goal_button(d, jax.random.randint(rng, (), 0, self.config.num_buttons), 0.0)

    def _task_step(self, d, rng):
        c = self.config
        goal_button = d.userdata[_UD_GOAL_BUTTON].astype(jnp.int32)
        timer = d.userdata[_UD_TIMER]
        goal_xy = self.objects_xy(d, "buttons")[goal_button]
        dist = jnp.linalg.norm(goal_xy - self.robot_xy(d))
        touched = self.touching(d, self._button_geoms)  # [num_buttons]
        is_goal = jnp.arange(c.num_buttons) == goal_button
        pressed = jnp.sum(touched * is_goal)  # 0/1
        rewards = {"distance": (d.userdata[_UD_LAST_DIST] - dist) * c.reward_distance,
                   "goal": pressed * c.reward_goal}
        wrong = jnp.max(touched * (1.0 - is_goal))
        costs = {"hazards": self.hazard_cost(d),
                 "buttons": jnp.where(timer == 0, wrong, 0.0),
                 "gremlins": jnp.max(self.touching(d, self._gremlin_geoms), initial=0.0)}
        timer = jnp.maximum(timer - 1.0, 0.0)
        new_goal = jax.random.randint(rng, (), 0, c.num_buttons)
        d = self._set_goal_button(
            d, jnp.where(pressed > 0, new_goal, goal_button),
            jnp.where(pressed > 0, jnp.float32(c.button_delay), timer))
        return d, rewards, costs, pressed
