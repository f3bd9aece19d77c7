"""Circle tasks: run counter-clockwise around a circle of radius 1.5 without crossing the walls.

Follows Safety-Gymnasium's Circle (the robot starts uniform in [-0.8, 0.8]^2 with a random heading; reward
0.1 * ((-u y + v x) / r) / (1 + |r - 1.5|) with body position (x, y), world velocity (u, v), r = |(x, y)|;
level 1 costs |x| > 1.125, level 2 also |y| > 1.125; a lidar (max distance 6) sees the circle's centre).
The CVPO paper's Car-Circle is Bullet-Safety-Gym's (clockwise, radius 7, walls at |x| = 6); we keep
Safety-Gymnasium's scale so Point and Car share the same arena as the other tasks, and take the CVPO
episode length (300) and cost limit (20) for the `*_circle` variants. See README.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from . import layouts, mjcf, robots
from .base import Config, SafetyEnv, robot_preset


def default_config(robot: str = "point", level: int = 1) -> Config:
    """Safety-Gymnasium CircleLevel1/2: 500 steps, cost limit 25, SGym timestep."""
    if level not in (1, 2):
        raise ValueError(f"Circle level {level} is not available; levels 1 and 2 are ported")
    return Config(
        **robot_preset(robot, cvpo=False), episode_length=500, cost_limit=25.0, robot_keepout=0.0,
        robot_extents=(-0.8, -0.8, 0.8, 0.8), lidar_max_dist=6.0, circle_radius=1.5, wall_x=1.125,
        wall_y=1.125 if level == 2 else 0.0, goal_size=0.0)


def cvpo_circle_config(robot: str = "point") -> Config:
    """CVPO's Circle budget (300 steps, cost limit 20, CVPO timestep) on Safety-Gymnasium's level-1 arena."""
    return dataclasses.replace(default_config(robot, 1), timestep=robots.get(robot).cvpo_timestep,
                               episode_length=300,
                               cost_limit=20.0)


class CircleEnv(SafetyEnv):
    reward_terms = ("circle",)
    cost_terms = ("walls",)

    def _scene_spec(self) -> mjcf.SceneSpec:
        c = self.config
        return dataclasses.replace(super()._scene_spec(), goal_size=0.0, circle_radius=c.circle_radius,
                                   wall_x=c.wall_x, wall_y=c.wall_y)

    def _layout_items(self):
        return (layouts.Item("robot", 1, self.config.robot_keepout),)

    def lidar_names(self):
        return ("circle",)

    def _lidar_points(self, d):
        return [(jnp.zeros((1, 2)), None)]

    def body_velocity(self, d):
        """World-frame linear velocity of the robot body origin [3] (Safety-Gym's agent.vel)."""
        b = self._robot_body
        com = d.subtree_com[self.mj_model.body_rootid[b]]
        ang, lin = d.cvel[b, :3], d.cvel[b, 3:]
        return lin - jnp.cross(d.xpos[b] - com, ang)

    def _task_step(self, d, rng):
        c = self.config
        x, y = self.robot_xy(d)
        u, v = self.body_velocity(d)[:2]
        radius = jnp.sqrt(x ** 2 + y ** 2)
        reward = ((-u * y + v * x) / radius) / (1 + jnp.abs(radius - c.circle_radius)) * c.circle_reward_scale
        out = jnp.zeros(())
        if c.wall_x > 0:
            out = jnp.maximum(out, (jnp.abs(x) > c.wall_x).astype(jnp.float32))
        if c.wall_y > 0:
            out = jnp.maximum(out, (jnp.abs(y) > c.wall_y).astype(jnp.float32))
        return d, {"circle": reward}, {"walls": out}, jnp.zeros(())
