"""Safety-Gymnasium's velocity tasks (`hopper_velocity`, `ant_velocity`, ...) on brax's MJX locomotion robots.

A thin wrapper around `brax.envs.get_environment(robot, backend="mjx")`: brax's robot, reward, observation and
healthy-state termination unchanged, plus Safety-Gymnasium's per-step cost, 1.0 when the robot moves faster
than its v1 threshold. The wrapped env is raw (no EpisodeWrapper / AutoResetWrapper): `state.done` is 1.0 only
when the robot itself becomes unhealthy; the 1000-step time limit (`episode_length`) is the trainer's job.
See envs/README.md ("Velocity tasks") for how brax's robots differ from Gymnasium's.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from brax.base import Motion, Transform
from brax.envs.base import Env, State
from brax.mjx import base as brax_mjx_base
from brax.mjx import pipeline as brax_mjx_pipeline
from mujoco import mjx

# v1 speed thresholds (m/s), from safety_gymnasium 1.0.0 tasks/safe_velocity/safety_<robot>_velocity_v1.py
# (`self._velocity_threshold`); the cost is `velocity > threshold` there and here. Swimmer has no MJX version in
# brax (its constructor accepts only backend="generalized"), so it is listed but not registered.
VELOCITY_THRESHOLDS: dict[str, float] = {
    "hopper": 0.7402,
    "walker2d": 2.3415,
    "halfcheetah": 3.2096,
    "swimmer": 0.2282,
    "ant": 2.6222,
    "humanoid": 1.4149,
}


@dataclasses.dataclass(frozen=True)
class Robot:
    """How a robot's task is measured. `speed`: "x" = signed (qpos[0]' - qpos[0]) / dt (Hopper, Walker2d,
    HalfCheetah); "torso_xy" = |xy displacement of the torso body frame| / dt (Ant: Safety-Gymnasium's
    `get_body_com('torso')`, which is the body's xpos); "com_xy" = |xy displacement of the mass-weighted centre
    of all bodies| / dt (Humanoid: Gymnasium's `mass_center`)."""

    speed: str
    observation_size: int  # brax's observation length (checked against a traced reset in the tests)
    terminates: bool  # brax sets done when unhealthy (HalfCheetah never terminates)
    brax_rescales_actions: bool = False  # brax's Humanoid maps [-1, 1] to its ctrl range itself


ROBOTS: dict[str, Robot] = {
    "hopper": Robot(speed="x", observation_size=11, terminates=True),
    "walker2d": Robot(speed="x", observation_size=17, terminates=True),
    "halfcheetah": Robot(speed="x", observation_size=17, terminates=False),
    "ant": Robot(speed="torso_xy", observation_size=27, terminates=True),
    "humanoid": Robot(speed="com_xy", observation_size=244, terminates=True, brax_rescales_actions=True),
}

TASKS: dict[str, str] = {f"{robot}_velocity": robot for robot in ROBOTS}  # task name -> robot


def velocity_cost(velocity: jax.Array, threshold: float) -> jax.Array:
    """Safety-Gymnasium's cost: 1.0 where `velocity > threshold`, else 0.0 (float32)."""
    return (velocity > threshold).astype(jnp.float32)


class VelocityEnv(Env):
    """A brax MJX locomotion robot with Safety-Gymnasium's velocity cost (brax Env API)."""

    episode_length = 1000  # Safety-Gymnasium's time limit; enforced by the trainer, not here
    cost_limit = 25.0  # OmniSafe / FSRL's episodic cost limit on these tasks

    def __init__(self, robot: str, name: str = ""):
        if robot not in ROBOTS:
            raise ValueError(f"unknown velocity robot {robot!r}; valid: {', '.join(sorted(ROBOTS))}")
        from brax import envs as brax_envs

        self.robot = robot
        self.name = name or f"{robot}_velocity"
        self.spec = ROBOTS[robot]
        self.terminates = self.spec.terminates  # HalfCheetah never does (the trainers read this)
        self.velocity_threshold = VELOCITY_THRESHOLDS[robot]
        with warnings.catch_warnings():
            # brax warns on every model load that its envs are unmaintained (README: why we use them anyway).
            warnings.filterwarnings("ignore", message="Brax System, piplines and environments")
            self._env = brax_envs.get_environment(robot, backend="mjx")
        sys = self._env.sys
        ctrl_range = np.asarray(sys.actuator_ctrlrange, dtype=np.float32)  # [nu, 2]
        self._ctrl_low, self._ctrl_high = ctrl_range[:, 0], ctrl_range[:, 1]
        self._action_size = int(self._env.action_size)
        self._dt = float(self._env.dt)
        self._torso = int(sys.mj_model.body("torso").id)  # MuJoCo body id (0 is the world)
        self._body_mass = np.asarray(sys.body_mass, dtype=np.float32)  # [nbody], world body has mass 0
        # brax's reset starts the robot with a full mjx.forward; positions and velocities are all a reset needs
        # (every step begins with its own forward pass), and the lighter start compiles in ~40% less time.
        self._env.pipeline_init = self._init_at_rest

    # ----- brax Env API --------------------------------------------------------------------------------
    @property
    def observation_size(self) -> int:
        return self.spec.observation_size

    @property
    def action_size(self) -> int:
        return self._action_size

    @property
    def backend(self) -> str:
        return "mjx"

    @property
    def dt(self) -> float:
        """Seconds per env step (brax's timestep x frames)."""
        return self._dt

    @property
    def brax_env(self) -> Env:
        """The wrapped brax env."""
        return self._env

    def reset(self, rng: jax.Array) -> State:
        state = self._env.reset(rng)
        zero = jnp.zeros((), jnp.float32)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in state.metrics.items()}
        metrics.update(cost=zero, goal_reached=zero, velocity=zero, nan_action=zero)
        info = {**state.info, "cost": zero, "goal_reached": zero}
        return state.replace(reward=zero, done=zero, metrics=metrics, info=info)

    def step(self, state: State, action: jax.Array) -> State:
        action = jnp.asarray(action, dtype=jnp.float32)  # [A] in [-1, 1]
        # NaN actions: the component is replaced by 0 (no torque), flagged in metrics["nan_action"], as the
        # Safety-Gym tasks do (envs/base.py).
        nan = jnp.isnan(action)
        action = jnp.clip(jnp.where(nan, 0.0, action), -1.0, 1.0)
        if self.spec.brax_rescales_actions:
            ctrl = action
        else:
            ctrl = self._ctrl_low + (action + 1.0) * 0.5 * (self._ctrl_high - self._ctrl_low)
        before = state.pipeline_state
        # brax updates state.metrics in place: hand it a copy so the caller's state is never changed.
        inner = self._env.step(state.replace(metrics=dict(state.metrics)), ctrl)
        after = inner.pipeline_state
        velocity = self.measured_velocity(before, after)
        cost = velocity_cost(velocity, self.velocity_threshold)
        if self.spec.terminates:
            # brax's healthy checks, plus Gymnasium Ant/Humanoid's "state is finite" (brax's miss a NaN state).
            finite = jnp.all(jnp.isfinite(after.qpos)) & jnp.all(jnp.isfinite(after.qvel))
            done = jnp.where(finite, inner.done, 1.0).astype(jnp.float32)
        else:
            done = jnp.zeros((), jnp.float32)  # brax leaves the incoming done in place; these never terminate
        zero = jnp.zeros((), jnp.float32)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in inner.metrics.items()}
        metrics.update(cost=cost, goal_reached=zero, velocity=velocity,
                       nan_action=jnp.any(nan).astype(jnp.float32))
        info = {**inner.info, "cost": cost, "goal_reached": zero}
        return inner.replace(reward=jnp.asarray(inner.reward, jnp.float32), done=done, metrics=metrics,
                             info=info)

    def _init_at_rest(self, q: jax.Array, qd: jax.Array, act=None, ctrl=None) -> brax_mjx_base.State:
        """brax's MJX pipeline state for (q, qd), as brax's `pipeline_init` builds it, but from kinematics and
        COM positions/velocities instead of a full forward pass: the same positions, velocities and observation;
        accelerations, forces and contacts stay zero until the first step computes them."""
        sys = self._env.sys
        d = mjx.make_data(sys).replace(qpos=q, qvel=qd)
        if act is not None:
            d = d.replace(act=act)
        if ctrl is not None:
            d = d.replace(ctrl=ctrl)
        d = mjx.com_vel(sys, mjx.com_pos(sys, mjx.kinematics(sys, d)))
        x = Transform(pos=d.xpos[1:], rot=d.xquat[1:])  # brax's links exclude the world body
        cvel = Motion(vel=d.cvel[1:, 3:], ang=d.cvel[1:, :3])
        xd = Transform.create(pos=d.xpos[1:] - d.subtree_com[sys.body_rootid[1:]]).vmap().do(cvel)
        fields = {f.name: getattr(d, f.name) for f in dataclasses.fields(d)}
        # brax's own Contact layout (a private helper of the pinned brax 0.14.2), so reset and step states match.
        contact = brax_mjx_pipeline._reformat_contact(sys, d._impl.contact)
        return brax_mjx_base.State(q=d.qpos, qd=d.qvel, x=x, xd=xd, contact=contact, **fields)

    # ----- the cost's velocity --------------------------------------------------------------------------
    def _position(self, data) -> jax.Array:
        """The measured position: qpos[0] [], or an xy point [2] (see Robot.speed)."""
        if self.spec.speed == "x":
            return data.qpos[0]
        if self.spec.speed == "torso_xy":
            return data.xpos[self._torso, :2]
        mass = jnp.asarray(self._body_mass)
        return jnp.sum(mass[:, None] * data.xipos, axis=0)[:2] / jnp.sum(mass)

    def measured_velocity(self, before, after) -> jax.Array:
        """Safety-Gymnasium's measured velocity between two pipeline states one env step apart (float32 [])."""
        delta = (self._position(after) - self._position(before)) / self._dt
        if self.spec.speed == "x":
            return delta.astype(jnp.float32)
        return jnp.sqrt(jnp.sum(jnp.square(delta))).astype(jnp.float32)
