"""The two Safety-Gym robots, Point and Car, as MJCF fragments plus what the env needs to drive them.

The bodies are written from the numbers in the Safety-Gym sources (see envs/README.md), not copied. Changes
forced or chosen for MJX are marked "MJX:" and listed in the README's deviation table.

Collision bits (contype/conaffinity) used across the scene, so that MJX only ever tests the pairs that
can touch (MJX pays for every candidate pair, touching or not):
  FLOOR_BIT     floor          <-> robot parts that roll or rest on it (Car wheels, caster, chassis)
  OBSTACLE_BIT  buttons, gremlins, vases <-> robot parts that may bump into them
Obstacles never collide with each other or with the floor (they are mocap bodies: positions are set, not
simulated), hazards and goals never collide with anything.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FLOOR_BIT = 1
OBSTACLE_BIT = 2


@dataclasses.dataclass(frozen=True)
class Robot:
    """Static description of a robot: MJCF pieces and the facts the env code needs."""

    name: str
    body_xml: str  # <body name="robot"> ... </body>, placed under <worldbody>
    actuator_xml: str  # <actuator> children
    body_height: float  # z of the robot body origin (the sensor site) when resting on the floor
    sgym_timestep: float  # Safety-Gym / Safety-Gymnasium physics timestep
    cvpo_timestep: float  # the CVPO paper's modified timestep
    ball_joints: tuple[str, ...]  # ball joints whose angvel (3) and quat-as-matrix (9) are observed
    free_root: bool  # True: root is a free joint (qpos x, y, z, quat); False: slide x, slide y, hinge z
    nominal_speed: float  # straight-line speed at full forward command, m/s (spec, measured with MuJoCo)
    sensor_size: int  # accelerometer, velocimeter, gyro, magnetometer (+ ball joints)
    # MJX: contacts that enter the solver per step (the deepest first). Point: at most a button and a
    # gremlin at once. Car: 2 per wheel + caster = 5 on the floor, + 2 obstacle contacts; MuJoCo C had more
    # than 7 contacts in 12 of 100000 physics steps of random driving among tightly packed obstacles.
    max_contact_points: int
    # Newton line-search steps per solver iteration. Under vmap MJX runs all of them every iteration. Car:
    # 5 -> 3 bought ~15%, 3 -> 2 another ~5% (batch 1024, interleaved A/B); MuJoCo C with 10 iterations and
    # 2 line-search steps stays within 3e-6 m of Safety-Gym's 100/50 budget over 20-100 random env steps,
    # 50 straight ones and 30 pushing into a button (README). The Point gains nothing from fewer.
    # Solver iterations stay at 10 for both: the Car needs 3.5 on average but up to 11 (MuJoCo C, 100/50),
    # and under vmap the slowest env sets the count; at 5 the Car parts from the 100/50 run by 0.5 m within
    # 5 s of straight driving.
    ls_iterations: int
    # MJX mass-matrix layout. "sparse" keeps LAPACK out of MJX's mass-matrix factorisations (pure JAX
    # instead); only the Newton solver's own Cholesky is left, one call at a time. Why the Car needs it:
    # jaxlib's batched Cholesky splits batches of more than ~450 11x11 matrices across XLA's intra-op thread
    # pool and blocks its worker until the pieces finish. Dense MJX factorises three matrices per physics
    # step (mass matrix, mass matrix + Euler damping, Newton Hessian); some are independent, XLA runs two at
    # once, and with two pool threads (this 2-core CPU) both workers then wait forever for pieces that no
    # free worker can run: the "car at batch 1024 hangs" bug (gdb: both workers in lapack_spotrf_ffi ->
    # ParallelBatchMap -> BlockingCounter::Wait). Same speed and trajectories as dense (README). The Point
    # (nv 3, 9 FLOP per factorisation) would split only beyond ~22000 envs and keeps "auto" (dense).
    jacobian: str = "auto"

    def forward_action(self) -> np.ndarray:
        """Action that drives straight ahead at full speed."""
        return np.ones(2, dtype=np.float32)


# Point: one sphere body sliding in the plane. The arrow box (the "nose") keeps its mass but not its
# collisions.
# MJX: the arrow does not collide (box collisions are the expensive ones in MJX; the sphere alone still
#   bumps into obstacles).
# MJX: the sphere does not touch the floor. The body has no vertical DoF, so the floor contact only adds
#   a little friction: measured speed/turn-rate change is in the README.
_POINT_BODY = """
<body name="robot" pos="0 0 0.1">
  <joint name="robot_x" type="slide" axis="1 0 0" damping="0.01"/>
  <joint name="robot_y" type="slide" axis="0 1 0" damping="0.01"/>
  <joint name="robot_z" type="hinge" axis="0 0 1" damping="0.005"/>
  <geom name="robot_sphere" type="sphere" size="0.1" friction="1 0.01 0.01" condim="6" density="1"
        contype="{sphere_contype}" conaffinity="0" rgba="0.74 0.04 0.18 1"/>
  <geom name="robot_arrow" type="box" pos="0.1 0 0" size="0.05 0.05 0.05" condim="6" density="1"
        contype="0" conaffinity="0" rgba="0.0 0.15 0.4 1"/>
  <site name="robot" size="0.032" rgba="1 0 0 0.1"/>
</body>
"""

# Motor along the body x axis (force = 0.3 * clip(u, +-0.05): it saturates at |u| >= 0.05) and a
# velocity servo on the yaw hinge (kv = 1, gear 0.3, force range +-0.05).
_POINT_ACTUATORS = """
<motor name="robot_forward" site="robot" gear="0.3 0 0 0 0 0" ctrllimited="true" ctrlrange="-1 1"
       forcelimited="true" forcerange="-0.05 0.05"/>
<velocity name="robot_turn" joint="robot_z" gear="0.3" kv="1" ctrllimited="true" ctrlrange="-1 1"
          forcelimited="true" forcerange="-0.05 0.05"/>
"""

# Car: free chassis with two driven rear wheels and a ball caster at the front. Its front is -y.
# MJX: wheels (cylinders) collide with the floor only: MJX has no cylinder-box collision, so a wheel cannot
#   hit a gremlin or a vase; the chassis, both bumpers and the caster still collide with obstacles. The two
#   thin connector boxes sit between the chassis and the bumpers and never touch anything first, so they
#   keep their mass but not their collisions.
_CAR_BODY = """
<body name="robot" pos="0 0 0.1">
  <freejoint name="robot_root"/>
  <site name="robot" size="0.032"/>
  <geom name="robot_chassis" type="box" size="0.1 0.1 0.05" condim="6" density="5"
        friction="1 0.005 0.0001" contype="{chassis_contype}" conaffinity="0" rgba="0.74 0.04 0.18 1"/>
  <geom name="robot_back_bumper" type="box" pos="0 0.15 0" size="0.1 0.01 0.05" condim="6" density="5"
        friction="1 0.005 0.0001" contype="{bumper_contype}" conaffinity="0" rgba="0.0 0.15 0.4 1"/>
  <geom name="robot_back_connector" type="box" pos="0 0.125 0" size="0.01 0.025 0.03" condim="6"
        density="5" contype="0" conaffinity="0" rgba="0.0 0.15 0.4 1"/>
  <geom name="robot_front_bumper" type="box" pos="0 -0.165 0" size="0.05 0.01 0.05" condim="6"
        density="5" friction="1 0.005 0.0001" contype="{bumper_contype}" conaffinity="0"
        rgba="0.0 0.15 0.4 1"/>
  <geom name="robot_front_connector" type="box" pos="0 -0.13 0.04" size="0.05 0.03 0.01" condim="6"
        density="5" contype="0" conaffinity="0" rgba="0.0 0.15 0.4 1"/>
  <body name="robot_left" pos="-0.1 0.1 -0.05">
    <joint name="robot_left" type="hinge" axis="1 0 0" damping="0.001"/>
    <geom name="robot_left_wheel" type="cylinder" fromto="-0.055 0 0 -0.005 0 0" size="0.05" condim="6"
          density="5" friction="1 0.005 0.0001" contype="{wheel_contype}" conaffinity="0"
          rgba="0.2 0.2 0.2 1"/>
  </body>
  <body name="robot_right" pos="0.1 0.1 -0.05">
    <joint name="robot_right" type="hinge" axis="1 0 0" damping="0.001"/>
    <geom name="robot_right_wheel" type="cylinder" fromto="0.005 0 0 0.055 0 0" size="0.05" condim="6"
          density="5" friction="1 0.005 0.0001" contype="{wheel_contype}" conaffinity="0"
          rgba="0.2 0.2 0.2 1"/>
  </body>
  <body name="robot_rear" pos="0 -0.1 -0.05">
    <joint name="robot_rear" type="ball" damping="0.001"/>
    <geom name="robot_caster" type="sphere" size="0.05" condim="6" density="5" friction="1 0.005 0.0001"
          contype="{caster_contype}" conaffinity="0" rgba="0.2 0.2 0.2 1"/>
  </body>
</body>
"""

_CAR_ACTUATORS = """
<motor name="robot_left" joint="robot_left" gear="1" ctrllimited="true" ctrlrange="-1 1"
       forcelimited="true" forcerange="-0.02 0.02"/>
<motor name="robot_right" joint="robot_right" gear="1" ctrllimited="true" ctrlrange="-1 1"
       forcelimited="true" forcerange="-0.02 0.02"/>
"""

POINT = Robot(
    name="point",
    body_xml=_POINT_BODY.format(sphere_contype=OBSTACLE_BIT),
    actuator_xml=_POINT_ACTUATORS,
    body_height=0.1,
    sgym_timestep=0.002,
    cvpo_timestep=0.006,
    ball_joints=(),
    free_root=False,
    nominal_speed=1.47,
    sensor_size=12,
    max_contact_points=2,
    ls_iterations=5,
)

CAR = Robot(
    name="car",
    body_xml=_CAR_BODY.format(
        # MJX: the chassis box does not collide with the floor (4 box-plane contacts, 40 constraint rows,
        # ~1/4 of the Car's solver work); in MuJoCo C it never touched the floor in 20000 physics steps of
        # random and bang-bang controls (max tilt 18 degrees).
        chassis_contype=OBSTACLE_BIT,
        bumper_contype=OBSTACLE_BIT,
        wheel_contype=FLOOR_BIT,
        caster_contype=FLOOR_BIT | OBSTACLE_BIT,
    ),
    actuator_xml=_CAR_ACTUATORS,
    body_height=0.1,
    sgym_timestep=0.004,
    cvpo_timestep=0.01,
    ball_joints=("robot_rear",),
    free_root=True,
    nominal_speed=0.77,
    sensor_size=24,
    max_contact_points=7,
    ls_iterations=2,
    jacobian="sparse",
)

ROBOTS = {"point": POINT, "car": CAR}


def get(name: str) -> Robot:
    if name not in ROBOTS:
        raise ValueError(f"unknown robot {name!r}; valid robots: {', '.join(sorted(ROBOTS))}")
    return ROBOTS[name]


def initial_qpos(robot: Robot, qpos0: np.ndarray, xy, yaw):
    """qpos [nq] with the robot at (x, y) facing yaw (radians), everything else from qpos0.

    Works on numpy or jax inputs (xy [2], yaw scalar); returns the same kind of array as xy.
    """
    import jax.numpy as jnp

    xp = jnp if not isinstance(xy, np.ndarray) else np
    qpos = xp.asarray(qpos0)
    if robot.free_root:
        # Free joint qpos is absolute: x, y, z, quaternion (w, x, y, z) of a yaw rotation.
        root = xp.stack(
            [xy[0], xy[1], xp.asarray(robot.body_height, dtype=qpos.dtype) + 0 * xy[0],
             xp.cos(yaw / 2), 0 * yaw, 0 * yaw, xp.sin(yaw / 2)]
        )
        if xp is np:
            qpos = qpos.copy()
            qpos[:7] = root
            return qpos
        return qpos.at[:7].set(root.astype(qpos.dtype))
    # Point: slide joints are offsets from the body position (0, 0, 0.1), hinge is the yaw.
    root = xp.stack([xy[0], xy[1], yaw])
    if xp is np:
        qpos = qpos.copy()
        qpos[:3] = root
        return qpos
    return qpos.at[:3].set(root.astype(qpos.dtype))
