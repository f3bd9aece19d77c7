"""Scene MJCF generation: a floor, one robot, and every task object as a mocap body.

Every placed object (goal, hazards, buttons, gremlins, vases) is a mocap body, so that its position lives in
`mjx.Data.mocap_pos` (per env, set at reset) rather than in the model: one compiled model serves every
layout, and brax's AutoResetWrapper (which restores `pipeline_state`) restores the layout with the robot.

Only buttons, gremlins and vases collide (with the robot only). Hazards, the goal, the circle and the
walls are visual geoms that never enter MJX's collision pipeline.
"""

from __future__ import annotations

import dataclasses

import mujoco

from . import robots

# Colours from the Safety-Gym palette, so pictures look familiar.
_RGBA = {
    "goal": "0 1 0 0.25",
    "hazard": "0.3 0.3 1 0.25",
    "button": "1 0.5 0 1",
    "gremlin": "0.5 0 1 1",
    "vase": "0 1 1 1",
    "circle": "0 1 0 0.1",
    "wall": "1 0 0 0.3",
}


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """What goes in the scene. Counts and sizes only: positions are set per env through mocap_pos."""

    robot: str = "point"
    timestep: float = 0.002
    goal_size: float = 0.0  # 0: no goal geom
    num_hazards: int = 0
    hazard_size: float = 0.2
    num_buttons: int = 0
    button_size: float = 0.1
    num_gremlins: int = 0
    gremlin_size: float = 0.1
    num_vases: int = 0
    vase_size: float = 0.1
    circle_radius: float = 0.0  # 0: no circle
    wall_x: float = 0.0  # 0: no walls; otherwise visual walls at |x| = wall_x
    wall_y: float = 0.0
    # Solver settings. MJX pays for every solver iteration across the whole batch (a while-loop runs until the
    # slowest env converges), so they are kept as low as the fidelity tests allow (see README).
    solver: str = "Newton"
    iterations: int = 10
    ls_iterations: int = 5
    tolerance: float = 1e-8  # MuJoCo's default; early exit of the solver's iterations
    cone: str = "pyramidal"  # MuJoCo's default friction cone (Safety-Gym's)
    jacobian: str = "auto"  # MJX: "dense" below nv 60 on CPU/GPU; see robots.py for the Car's "sparse"
    # MJX broad phase: per collision-function group, only the N closest candidate pairs are tested.
    max_geom_pairs: int = 2
    # MJX: at most N contacts per condim group enter the solver (the N deepest); -1: all.
    max_contact_points: int = -1
    nuserdata: int = 0  # task scalars kept in mjx.Data.userdata (see base.py)
    with_sensors: bool = False  # MuJoCo C sensors (for tests); the env computes its own (envs/sensors.py)


# Mocap bodies in this order; MOCAP_GROUPS gives each group's slice of mocap_pos.
MOCAP_ORDER = ("goal", "hazards", "buttons", "gremlins", "vases")


def mocap_slices(spec: SceneSpec) -> dict[str, slice]:
    counts = {
        "goal": 1 if spec.goal_size > 0 else 0,
        "hazards": spec.num_hazards,
        "buttons": spec.num_buttons,
        "gremlins": spec.num_gremlins,
        "vases": spec.num_vases,
    }
    out, start = {}, 0
    for name in MOCAP_ORDER:
        out[name] = slice(start, start + counts[name])
        start += counts[name]
    return out


def _mocap(name: str, z: float, geom: str, index: int) -> str:
    # Mocap bodies start outside the arena, apart from each other and from the robot; reset moves them.
    return f'<body name="{name}" mocap="true" pos="{10 + index} 10 {z}">{geom}</body>'


def scene_xml(spec: SceneSpec) -> str:
    """The full MJCF of a scene as a string."""
    robot = robots.get(spec.robot)
    obst = robots.OBSTACLE_BIT
    bodies = []
    add = lambda name, z, geom: bodies.append(_mocap(name, z, geom, len(bodies)))
    if spec.goal_size > 0:
        add(
            "goal", spec.goal_size / 2,
            f'<geom name="goal" type="cylinder" size="{spec.goal_size} {spec.goal_size / 2}" '
            f'contype="0" conaffinity="0" rgba="{_RGBA["goal"]}"/>')
    for i in range(spec.num_hazards):
        add(
            f"hazard{i}", 0.01,
            f'<geom name="hazard{i}" type="cylinder" size="{spec.hazard_size} 0.01" '
            f'contype="0" conaffinity="0" rgba="{_RGBA["hazard"]}"/>')
    for i in range(spec.num_buttons):
        add(
            f"button{i}", spec.button_size,
            f'<geom name="button{i}" type="sphere" size="{spec.button_size}" condim="6" '
            f'contype="0" conaffinity="{obst}" rgba="{_RGBA["button"]}"/>')
    for i in range(spec.num_gremlins):
        s = spec.gremlin_size
        add(
            f"gremlin{i}", s,
            f'<geom name="gremlin{i}" type="box" size="{s} {s} {s}" condim="6" '
            f'contype="0" conaffinity="{obst}" rgba="{_RGBA["gremlin"]}"/>')
    for i in range(spec.num_vases):
        s = spec.vase_size
        add(
            f"vase{i}", s,
            f'<geom name="vase{i}" type="box" size="{s} {s} {s}" condim="6" '
            f'contype="0" conaffinity="{obst}" rgba="{_RGBA["vase"]}"/>')
    if spec.circle_radius > 0:
        bodies.append(
            f'<geom name="circle" type="cylinder" size="{spec.circle_radius} 0.001" pos="0 0 0.001" '
            f'contype="0" conaffinity="0" rgba="{_RGBA["circle"]}"/>')
    for axis, w in (("x", spec.wall_x), ("y", spec.wall_y)):
        if w > 0:
            for sign in (-1, 1):
                pos = f"{sign * w} 0 0.25" if axis == "x" else f"0 {sign * w} 0.25"
                size = "0.01 3.5 0.25" if axis == "x" else "3.5 0.01 0.25"
                bodies.append(f'<geom name="wall_{axis}{"p" if sign > 0 else "m"}" type="box" pos="{pos}" '
                              f'size="{size}" contype="0" conaffinity="0" rgba="{_RGBA["wall"]}"/>')

    sensors = ""
    if spec.with_sensors:
        sensors = ('<sensor><accelerometer site="robot" name="accelerometer"/>'
                   '<velocimeter site="robot" name="velocimeter"/><gyro site="robot" name="gyro"/>'
                   '<magnetometer site="robot" name="magnetometer"/>')
        for j in robot.ball_joints:
            sensors += (f'<ballangvel joint="{j}" name="ballangvel_{j}"/>'
                        f'<ballquat joint="{j}" name="ballquat_{j}"/>')
        sensors += "</sensor>"

    numerics = ""
    if spec.max_geom_pairs > 0:
        numerics += f'<numeric name="max_geom_pairs" data="{spec.max_geom_pairs}"/>'
    if spec.max_contact_points > 0:
        numerics += f'<numeric name="max_contact_points" data="{spec.max_contact_points}"/>'
    custom = f"<custom>{numerics}</custom>" if numerics else ""

    return f"""<mujoco model="{spec.robot}_scene">
    <compiler angle="radian"/>
    <option timestep="{spec.timestep}" integrator="Euler" solver="{spec.solver}"
            iterations="{spec.iterations}" ls_iterations="{spec.ls_iterations}"
            tolerance="{spec.tolerance}" cone="{spec.cone}" jacobian="{spec.jacobian}"/>
    <size nuserdata="{spec.nuserdata}"/>
    {custom}
    <visual><global offwidth="640" offheight="640"/></visual>
    <asset>
      <texture name="grid" type="2d" builtin="checker" rgb1="0.9 0.9 0.9" rgb2="0.8 0.8 0.8" width="300"
               height="300"/>
      <material name="grid" texture="grid" texrepeat="7 7"/>
    </asset>
    <worldbody>
      <light pos="0 0 4" dir="0 0 -1" directional="true"/>
      <camera name="top" pos="0 0 6" xyaxes="1 0 0 0 1 0"/>
      <geom name="floor" type="plane" size="3.5 3.5 0.1" condim="6" material="grid"
            contype="0" conaffinity="{robots.FLOOR_BIT}"/>
      {robot.body_xml}
      {"".join(bodies)}
    </worldbody>
    <actuator>{robot.actuator_xml}</actuator>
    {sensors}
  </mujoco>
  """


def compile_model(spec: SceneSpec) -> mujoco.MjModel:
    return mujoco.MjModel.from_xml_string(scene_xml(spec))
