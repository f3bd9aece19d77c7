"""The shared env machinery: config, MJX model, physics stepping, observations, brax State plumbing.

Every task (goal.py, button.py, circle.py, traps.py) subclasses `SafetyEnv` and fills in four hooks: what to
place, how to start the task, what a step earns/costs, and which objects the lidars see (plus, optionally,
`_terminated`: whether the task ends the episode).

Task state that must survive brax's AutoResetWrapper (which restores only `pipeline_state` and `obs`) lives
inside the mjx.Data: object positions in `mocap_pos`, scalars (last goal distance, button timer, goal
button, trap health, gremlin centres) in `userdata`. `state.info` only carries the rng and this step's
cost/goal flags.

`state.done` is 1.0 on a step where the task itself ends the episode (`_terminated`; only the traps tasks
do, on the robot's death), else 0.0. Time limits are not the env's business (EpisodeWrapper / the trainer).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from brax.envs.base import Env, State
from mujoco import mjx

from . import layouts, lidar, mjcf, robots, sensors

# userdata slots (see module docstring); gremlin centres follow from slot _UD_GREMLINS as x0, y0, x1, ...
_UD_LAST_DIST = 0
_UD_TIMER = 1
_UD_GOAL_BUTTON = 2
_UD_HEALTH = 3  # traps.py: health counter
_UD_GREMLINS = 4


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a task. Presets live beside each task (`default_config`); `make(name, **kw)`
    replaces fields by name. Distances in metres, angles in radians, (xmin, ymin, xmax, ymax) extents."""

    robot: str = "point"  # "point" | "car"
    timestep: float = 0.002  # physics timestep (SGym: Point 0.002, Car 0.004; CVPO: 0.006, 0.01)
    frame_skip: int = 10  # physics steps per env step
    episode_length: int = 1000  # read by the trainer, which enforces it (core/acting.py)
    cost_limit: float = 25.0  # read by the trainer's presets

    # Layout. randomize_layout=False: drawn once from layout_seed at construction and reused every reset.
    randomize_layout: bool = True
    layout_seed: int = 0
    extents: tuple[float, float, float, float] = (-1.5, -1.5, 1.5, 1.5)
    robot_keepout: float = 0.4
    robot_extents: tuple[float, float, float, float] | None = None  # None: `extents`
    placement_tries: int = 100  # draws per object, as Safety-Gym
    layout_tries: int = 10000  # whole layouts redrawn until one is complete, at most this many (Safety-Gym)

    goal_size: float = 0.3
    goal_keepout: float = 0.305
    goal_placed: bool = True  # goal takes part in layout sampling (SGym Goal and Button levels)
    num_hazards: int = 0
    hazard_size: float = 0.2
    hazard_keepout: float = 0.18
    hazard_locations: tuple[tuple[float, float], ...] = ()
    num_vases: int = 0
    vase_size: float = 0.1
    vase_keepout: float = 0.15
    num_buttons: int = 0
    button_size: float = 0.1
    button_keepout: float = 0.2
    button_locations: tuple[tuple[float, float], ...] = ()
    button_delay: int = 10  # env steps after a press during which buttons are hidden and harmless
    num_gremlins: int = 0
    gremlin_size: float = 0.1
    gremlin_keepout: float = 0.4
    gremlin_travel: float = 0.35
    gremlin_locations: tuple[tuple[float, float], ...] = ()
    trap_health: int = 25  # traps.py: steps inside traps until the robot dies (traps are the hazard geoms)

    circle_radius: float = 1.5
    circle_reward_scale: float = 0.1
    wall_x: float = 0.0  # cost when |x| > wall_x (0: no wall)
    wall_y: float = 0.0

    lidar_bins: int = 16
    lidar_max_dist: float = 3.0
    reward_distance: float = 1.0
    reward_goal: float = 1.0
    reward_clip: float = 10.0
    goal_resample_tries: int = 64

    # MJX solver / collision settings (see README for what each buys).
    solver: str = "Newton"
    iterations: int = 10
    ls_iterations: int = 5
    tolerance: float = 1e-8
    cone: str = "pyramidal"
    jacobian: str = "auto"
    max_geom_pairs: int = 2
    max_contact_points: int = -1


def robot_preset(robot: str, cvpo: bool) -> dict[str, Any]:
    """Robot-dependent Config fields: the timestep (Safety-Gymnasium's or the CVPO paper's) and the MJX
    solver budget (see robots.py)."""
    r = robots.get(robot)
    return dict(robot=robot, timestep=r.cvpo_timestep if cvpo else r.sgym_timestep,
                max_contact_points=r.max_contact_points, ls_iterations=r.ls_iterations,
                jacobian=r.jacobian)


def check_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """`config` with `overrides` applied; unknown keys raise a ValueError naming the allowed ones."""
    allowed = [f.name for f in dataclasses.fields(Config)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown override(s) {', '.join(unknown)}; allowed keys: {', '.join(allowed)}")
    return dataclasses.replace(config, **overrides)


class SafetyEnv(Env):
    """A Safety-Gym task on MJX, with brax's Env API (pipeline_state is an mjx.Data)."""

    # Names of reward terms (metrics "reward/<name>") and cost terms ("cost/<name>") a task reports.
    reward_terms: tuple[str, ...] = ()
    terminates = False  # whether `_terminated` can ever be 1 (the trainers refill their reset pool less often if not)
    cost_terms: tuple[str, ...] = ()
    cost_is_failure = False  # the episode's cost is one 0/1 failure event (CSC reads χ as a probability if so)

    def __init__(self, config: Config, name: str = ""):
        self.config = config
        self.name = name
        self.robot = robots.get(config.robot)
        self.episode_length = int(config.episode_length)
        self.cost_limit = float(config.cost_limit)
        self.scene = self._scene_spec()
        self.mj_model = mjcf.compile_model(self.scene)
        self.mjx_model = mjx.put_model(self.mj_model)
        self._data0 = mjx.make_data(self.mjx_model)  # template every reset starts from
        self._qpos0 = np.array(self.mj_model.qpos0, dtype=np.float32)  # [nq]
        # Mocap bodies keep the height the MJCF gives them (resting on the floor); reset sets x, y.
        self._mocap_z = np.array(mujoco.MjData(self.mj_model).mocap_pos[:, 2], dtype=np.float32)  # [nmocap]
        self.slices = mjcf.mocap_slices(self.scene)
        self._sensor_ids = sensors.SensorIds.from_model(self.mj_model, "robot", self.robot.ball_joints)
        self._robot_body = self.mj_model.body("robot").id
        m = self.mj_model
        robot_bodies = {b for b in range(m.nbody) if m.body_rootid[b] == self._robot_body}
        self._robot_geoms = np.array(
            [g for g in range(m.ngeom) if m.geom_bodyid[g] in robot_bodies and m.geom_contype[g]], np.int32)
        self._obs_size = self.robot.sensor_size + config.lidar_bins * len(self.lidar_names())
        self._fixed = None
        if not config.randomize_layout:
            # Drawn once, like the CVPO setup (Safety-Gym with a constant layout seed), then reused.
            self._fixed = jax.device_get(self._sample_layout(jax.random.PRNGKey(config.layout_seed)))

    def geom_ids(self, prefix: str, count: int) -> np.ndarray:
        """Ids [count] of the geoms named prefix0, prefix1, ..."""
        return np.array([self.mj_model.geom(f"{prefix}{i}").id for i in range(count)], np.int32)

    # ----- hooks for tasks -----------------------------------------------------------------------------
    def _scene_spec(self) -> mjcf.SceneSpec:
        c = self.config
        return mjcf.SceneSpec(
            robot=c.robot, timestep=c.timestep, iterations=c.iterations, ls_iterations=c.ls_iterations,
            solver=c.solver, tolerance=c.tolerance, cone=c.cone, jacobian=c.jacobian,
            max_geom_pairs=c.max_geom_pairs, max_contact_points=c.max_contact_points,
            nuserdata=_UD_GREMLINS + 2 * c.num_gremlins)

    def _layout_items(self) -> tuple[layouts.Item, ...]:
        """Objects to place, in Safety-Gymnasium's order (robot first)."""
        raise NotImplementedError

    def _start_task(self, data: mjx.Data, layout: dict, rng: jax.Array) -> mjx.Data:
        """Set task state (userdata, goal) on a freshly placed, forwarded scene."""
        return data

    def _task_step(self, data: mjx.Data, rng: jax.Array):
        """After physics: returns (data, reward_terms {name: r}, cost_terms {name: 0/1}, goal_reached)."""
        raise NotImplementedError

    def _terminated(self, data: mjx.Data) -> jax.Array:
        """After _task_step: 1.0 if the task ends the episode on this step (state.done), else 0.0."""
        return jnp.zeros(())

    def lidar_names(self) -> tuple[str, ...]:
        """Names of the observed lidars, in observation order."""
        raise NotImplementedError

    def _lidar_points(self, data: mjx.Data) -> list[tuple[jax.Array, jax.Array | None]]:
        """Per lidar (same order as lidar_names): world points [N, 2] and visibility [N] or None."""
        raise NotImplementedError

    # ----- brax Env API --------------------------------------------------------------------------------
    @property
    def observation_size(self) -> int:
        return self._obs_size

    @property
    def action_size(self) -> int:
        return int(self.mj_model.nu)

    @property
    def backend(self) -> str:
        return "mjx"

    def reset(self, rng: jax.Array) -> State:
        rng, k_layout, k_task = jax.random.split(rng, 3)
        layout = self._fixed if self._fixed is not None else self._sample_layout(k_layout)
        layout = jax.tree.map(jnp.asarray, layout)
        data = self._at_rest(self._place(layout))
        data = self._start_task(data, layout, k_task)
        obs = self._observe(data)
        zero = jnp.zeros(())
        metrics = self._metrics({k: zero for k in self.reward_terms}, {k: zero for k in self.cost_terms},
                                zero, zero, zero)
        info = {"rng": rng, "cost": zero, "goal_reached": zero}
        return State(pipeline_state=data, obs=obs, reward=zero, done=zero, metrics=metrics, info=info)

    def step(self, state: State, action: jax.Array) -> State:
        action = jnp.asarray(action, dtype=jnp.float32)
        # NaN actions: the component is replaced by 0 (no push), flagged in metrics["nan_action"]. A NaN in
        # ctrl would otherwise poison qpos for the rest of the episode.
        nan = jnp.isnan(action)
        ctrl = jnp.clip(jnp.where(nan, 0.0, action), -1.0, 1.0)
        data = state.pipeline_state.replace(ctrl=ctrl)
        data = self._physics(data)
        rng, key = jax.random.split(state.info["rng"])
        data, reward_terms, cost_terms, goal_reached = self._task_step(data, key)
        reward = sum(reward_terms.values(), jnp.zeros(()))
        reward = jnp.clip(reward, -self.config.reward_clip, self.config.reward_clip)
        # Indicator cost, as Safety-Gym's constrain_indicator: 1 if any constraint is violated this step.
        cost = jnp.zeros(())
        for v in cost_terms.values():
            cost = jnp.maximum(cost, v)
        obs = self._observe(data)
        metrics = self._metrics(reward_terms, cost_terms, cost, goal_reached, jnp.any(nan).astype(jnp.float32))
        info = {**state.info, "rng": rng, "cost": cost, "goal_reached": goal_reached}
        return state.replace(pipeline_state=data, obs=obs, reward=reward, done=self._terminated(data),
                             metrics=metrics, info=info)

    # ----- pieces ---------------------------------------------------------------------------------------
    def _metrics(self, reward_terms, cost_terms, cost, goal_reached, nan_action) -> dict[str, jax.Array]:
        metrics = {f"reward/{k}": v for k, v in reward_terms.items()}
        metrics.update({f"cost/{k}": v for k, v in cost_terms.items()})
        metrics.update(cost=cost, goal_reached=goal_reached, nan_action=nan_action)
        return metrics

    def _sample_layout(self, rng: jax.Array) -> dict:
        """{name: xy [count, 2]} for every placed kind, plus 'robot_yaw' [], 'yaw' [nmocap] and 'ok'."""
        c = self.config
        k_place, k_yaw, k_rot = jax.random.split(rng, 3)
        if c.robot_extents is not None:
            # The robot alone in its own area (Circle: nothing else is placed).
            placed, ok = layouts.sample_layout(k_place, self._layout_items()[:1], c.robot_extents,
                                               c.placement_tries, c.layout_tries)
        else:
            placed, ok = layouts.sample_layout(k_place, self._layout_items(), c.extents, c.placement_tries,
                                               c.layout_tries)
        placed["robot_yaw"] = layouts.random_yaw(k_yaw)
        placed["yaw"] = layouts.random_yaw(k_rot, (self.mj_model.nmocap,))
        placed["ok"] = ok
        return placed

    def _place(self, layout: dict) -> mjx.Data:
        """Scene at rest with the robot and objects where the layout says."""
        nmocap = self.mj_model.nmocap
        mocap_xy = jnp.zeros((nmocap, 2))
        for name, sl in self.slices.items():
            if sl.stop > sl.start and name in layout:
                mocap_xy = mocap_xy.at[sl].set(layout[name])
        mocap_pos = jnp.concatenate([mocap_xy, jnp.asarray(self._mocap_z)[:, None]], axis=1)  # [nmocap, 3]
        mocap_quat = layouts.yaw_quat(layout["yaw"])  # [nmocap, 4]
        qpos = robots.initial_qpos(self.robot, jnp.asarray(self._qpos0), layout["robot"][0],
                                   layout["robot_yaw"])
        userdata = jnp.zeros(self.mj_model.nuserdata)
        if self.config.num_gremlins:
            userdata = userdata.at[_UD_GREMLINS:].set(layout["gremlins"].reshape(-1))
        return self._data0.replace(qpos=qpos, qvel=jnp.zeros_like(self._data0.qvel), mocap_pos=mocap_pos,
                                   mocap_quat=mocap_quat, userdata=userdata,
                                   ctrl=jnp.zeros_like(self._data0.ctrl))

    def _at_rest(self, d: mjx.Data) -> mjx.Data:
        """Positions and (zero) velocities of a scene at rest, without the full forward pass.

        The first step runs mjx.forward anyway; skipping it here keeps reset's compile to a few seconds. The
        one visible difference: the reset observation's accelerometer reads gravity alone (qacc = 0). That is
        exact for the Point; a resting Car in MuJoCo reads ~1 m/s^2 less while its contacts settle.
        """
        d = mjx.kinematics(self.mjx_model, d)
        d = mjx.com_pos(self.mjx_model, d)
        return mjx.com_vel(self.mjx_model, d)

    def _move_mocaps(self, d: mjx.Data) -> mjx.Data:
        """Gremlins circle their layout position, all in phase: centre + travel * (sin t, cos t)."""
        n = self.config.num_gremlins
        if not n:
            return d
        centres = d.userdata[_UD_GREMLINS:_UD_GREMLINS + 2 * n].reshape(n, 2)
        offset = self.config.gremlin_travel * jnp.stack([jnp.sin(d.time), jnp.cos(d.time)])
        sl = self.slices["gremlins"]
        return d.replace(mocap_pos=d.mocap_pos.at[sl, :2].set(centres + offset))

    def _physics(self, d: mjx.Data) -> mjx.Data:
        """frame_skip physics steps (mocaps moved before each, as Safety-Gym), then a forward pass so that
        positions, contacts and sensors describe the new state (Safety-Gym calls mj_forward here too)."""

        def substep(d, _):
            return mjx.step(self.mjx_model, self._move_mocaps(d)), None

        d, _ = jax.lax.scan(substep, d, None, length=self.config.frame_skip)
        return mjx.forward(self.mjx_model, d)

    def robot_xy(self, d: mjx.Data) -> jax.Array:
        return d.xpos[self._robot_body, :2]

    def _observe(self, d: mjx.Data) -> jax.Array:
        pos, mat = d.xpos[self._robot_body], d.xmat[self._robot_body]
        parts = [sensors.robot_observation(d, self._sensor_ids)]
        for points, visible in self._lidar_points(d):
            parts.append(lidar.pseudo_lidar(pos, mat, points, self.config.lidar_max_dist,
                                            self.config.lidar_bins, visible))
        return jnp.concatenate(parts)

    def touching(self, d: mjx.Data, geoms: np.ndarray) -> jax.Array:
        """[len(geoms)] 0/1: is any robot geom in contact (penetrating) with each of `geoms`?"""
        contact = d._impl.contact
        if contact.dist.shape[0] == 0 or len(geoms) == 0:
            return jnp.zeros(len(geoms))
        g = contact.geom  # [ncon, 2]
        active = contact.dist < 0  # [ncon]
        robot = jnp.isin(g, jnp.asarray(self._robot_geoms))  # [ncon, 2]
        target = g[:, :, None] == jnp.asarray(geoms)[None, None, :]  # [ncon, 2, n]
        hit = (target[:, 0] & robot[:, 1, None]) | (target[:, 1] & robot[:, 0, None])  # [ncon, n]
        return jnp.any(hit & active[:, None], axis=0).astype(jnp.float32)

    def hazard_cost(self, d: mjx.Data) -> jax.Array:
        """1 if the robot's xy is strictly inside any hazard (Safety-Gym sums size - dist over hazards with
        dist <= size, then takes sum > 0)."""
        sl = self.slices["hazards"]
        if sl.stop == sl.start:
            return jnp.zeros(())
        dist = jnp.linalg.norm(d.mocap_pos[sl, :2] - self.robot_xy(d), axis=1)
        return jnp.any(dist < self.config.hazard_size).astype(jnp.float32)

    def objects_xy(self, d: mjx.Data, name: str) -> jax.Array:
        return d.mocap_pos[self.slices[name], :2]
