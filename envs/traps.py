"""The Conservative Safety Critics paper's navigation tasks: reach a goal while avoiding traps (Point, Car).

csc-paper.txt, Section 5.1 and Appendix A.5: a health counter starts at 25 each episode and drops by 1 for
every env step the robot spends inside a trap; the robot is alive while it is positive. On the step it
reaches 0 the robot dies: the only cost signal (cost 1 on that step, 0 on every other step, including steps
inside a trap while still alive) and the end of the episode (`state.done` = 1 on that step).

The paper gives no layout numbers; ours (fixed, the same every episode, README "Traps tasks"):
  extents +-2, no walls; robot starts at (0, -1.5), the first goal (size 0.3) at (0, 1.5);
  14 traps of size 0.25 (Safety-Gym's hazard geoms, same inside-test: xy distance < size) in two staggered
  barriers of 7 overlapping traps, 0.35 apart: y = -0.6, x in [-1.3, 0.8] and y = +0.6, x in [-0.8, 1.3].
  The straight path from start to first goal crosses ~0.92 m of trap (two barriers), about 31 Point / 30 Car
  steps at full speed: fatal. Around the barrier ends is ~4.6 m.
Reward: Safety-Gym's goal reward (goal.py): distance progress + 1 on reaching (within 0.3), the goal then
redrawn uniformly clear of the robot and the traps; the episode continues.
Observation: sensors, goal lidar, traps lidar (16 bins each), then health / 25 (Point 45, Car 57).
Timesteps: Safety-Gym's (Point 0.002, Car 0.004; x10 per env step), as the paper adapts Ray et al. (2019).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import layouts
from .base import _UD_HEALTH, Config, robot_preset
from .goal import GoalEnv

TRAPS_ROBOT = (0.0, -1.5)
TRAPS_GOAL = (0.0, 1.5)
TRAPS_LOCATIONS = tuple((round(-1.3 + 0.35 * i, 2), -0.6) for i in range(7)) + tuple(
    (round(-0.8 + 0.35 * i, 2), 0.6) for i in range(7))


def default_config(robot: str = "point") -> Config:
    """The CSC navigation task: 500 steps, failure-probability limit chi = 0.05 (A.8, Fig. 6)."""
    return Config(
        **robot_preset(robot, cvpo=False), episode_length=500, cost_limit=0.05,
        randomize_layout=False, extents=(-2.0, -2.0, 2.0, 2.0), goal_size=0.3, goal_keepout=0.305,
        num_hazards=len(TRAPS_LOCATIONS), hazard_size=0.25, hazard_keepout=0.17,
        hazard_locations=TRAPS_LOCATIONS, num_vases=0, trap_health=25)


class TrapsEnv(GoalEnv):
    """GoalEnv with traps (its hazards) that drain a health counter, a failure cost, and termination."""

    reward_terms = ("distance", "goal")
    cost_terms = ("failure",)
    terminates = True
    cost_is_failure = True  # CSC's setting: its csc.cost_units resolves to episodic (Q_C, χ are probabilities)

    def __init__(self, config: Config, name: str = ""):
        super().__init__(config, name)
        self._obs_size += 1  # health / trap_health

    def _layout_items(self):
        c = self.config
        return (
            layouts.Item("robot", 1, c.robot_keepout, (TRAPS_ROBOT,)),
            layouts.Item("goal", 1, c.goal_keepout, (TRAPS_GOAL,)),
            layouts.Item("hazards", c.num_hazards, c.hazard_keepout, c.hazard_locations),
        )

    def lidar_names(self):
        return ("goal", "traps")

    def _lidar_points(self, d):
        return [(self.objects_xy(d, "goal"), None), (self.objects_xy(d, "hazards"), None)]

    def health(self, d) -> jax.Array:
        return d.userdata[_UD_HEALTH]

    def _start_task(self, d, layout, rng):
        d = super()._start_task(d, layout, rng)
        return d.replace(userdata=d.userdata.at[_UD_HEALTH].set(float(self.config.trap_health)))

    def _task_step(self, d, rng):
        d, rewards, costs, reached = super()._task_step(d, rng)
        health = self.health(d)
        # costs["hazards"]: 1 if the robot's xy is inside any trap after this step's physics.
        new_health = jnp.maximum(health - costs["hazards"], 0.0)
        died = ((health > 0) & (new_health <= 0)).astype(jnp.float32)  # once: a dead robot stays at 0
        d = d.replace(userdata=d.userdata.at[_UD_HEALTH].set(new_health))
        return d, rewards, {"failure": died}, reached

    def _terminated(self, d):
        return (self.health(d) <= 0).astype(jnp.float32)

    def _observe(self, d):
        return jnp.concatenate([super()._observe(d), (self.health(d) / self.config.trap_health)[None]])
