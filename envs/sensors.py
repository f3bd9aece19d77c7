"""Robot sensors computed from mjx.Data, the way MuJoCo's C sensors compute them.

MJX implements all four site sensors, but enabling them makes every one of the 10 physics substeps pay for
them (the accelerometer also needs a post-constraint RNE pass). Safety-Gym reads sensors once per env step,
after a final mj_forward, so the env computes them here, once, from the fields that forward already filled:
site frame, cvel, cdof_dot, qacc, subtree_com. tests/test_envs_physics.py checks them against
mujoco.mj_forward's sensordata on the same state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import mujoco
import numpy as np


@dataclasses.dataclass(frozen=True)
class SensorIds:
    """Static indices into model/data arrays, looked up once from the MjModel."""

    site: int
    body: int
    root: int  # body_rootid of `body`: cvel/cacc are expressed at that subtree's centre of mass
    dofs: tuple[int, ...]  # dofs of the chain from the world to `body` (root bodies: their own dofs)
    ball_qpos: tuple[int, ...]  # qpos address of each observed ball joint
    ball_dof: tuple[int, ...]  # dof address of each observed ball joint
    gravity: tuple[float, float, float]
    magnetic: tuple[float, float, float]

    @classmethod
    def from_model(cls, m: mujoco.MjModel, site: str, ball_joints: tuple[str, ...]) -> "SensorIds":
        sid = m.site(site).id
        body = int(m.site_bodyid[sid])
        chain, b = [], body
        while b != 0:
            chain.append(b)
            b = int(m.body_parentid[b])
        dofs = tuple(int(i) for i in range(m.nv) if int(m.dof_bodyid[i]) in chain)
        return cls(
            site=sid,
            body=body,
            root=int(m.body_rootid[body]),
            dofs=dofs,
            ball_qpos=tuple(int(m.jnt_qposadr[m.joint(j).id]) for j in ball_joints),
            ball_dof=tuple(int(m.jnt_dofadr[m.joint(j).id]) for j in ball_joints),
            gravity=tuple(float(x) for x in m.opt.gravity),
            magnetic=tuple(float(x) for x in m.opt.magnetic),
        )


def _to_site(spatial: jax.Array, site_pos: jax.Array, com: jax.Array, rot: jax.Array):
    """MuJoCo's mju_transformSpatial for motion vectors: move [ang(3), lin(3)] from com to the site and
    rotate into the site frame. Returns (ang [3], lin [3])."""
    ang, lin = spatial[:3], spatial[3:]
    lin = lin - jnp.cross(site_pos - com, ang)
    return rot.T @ ang, rot.T @ lin


def quat_to_mat(q: jax.Array) -> jax.Array:
    """Unit quaternion (w, x, y, z) -> 3x3 rotation matrix [3, 3]."""
    q = q / jnp.linalg.norm(q)
    w, x, y, z = q
    return jnp.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def site_sensors(d, ids: SensorIds) -> dict[str, jax.Array]:
    """accelerometer, velocimeter, gyro, magnetometer [3 each] at the robot site, in the site frame.

    `d` must have gone through mjx.forward (positions, velocities and qacc of the same state).
    """
    pos = d.site_xpos[ids.site]  # [3]
    rot = d.site_xmat[ids.site].reshape(3, 3)  # [3, 3]
    com = d.subtree_com[ids.root]  # [3]
    cvel = d.cvel[ids.body]  # [6] (ang, lin) at com
    gyro, velocimeter = _to_site(cvel, pos, com, rot)

    # cacc as mj_rnePostConstraint builds it: the world "accelerates" upward at -gravity, and each dof on
    # the chain adds cdof_dot * qvel + cdof * qacc.
    dofs = np.asarray(ids.dofs)
    cacc = jnp.concatenate([jnp.zeros(3), -jnp.asarray(ids.gravity)])
    cacc = cacc + d.cdof_dot[dofs].T @ d.qvel[dofs] + d.cdof[dofs].T @ d.qacc[dofs]  # [6]
    _, acc_lin = _to_site(cacc, pos, com, rot)
    accelerometer = acc_lin + jnp.cross(gyro, velocimeter)  # Coriolis term, as mj_objectAcceleration

    magnetometer = rot.T @ jnp.asarray(ids.magnetic)
    return {
        "accelerometer": accelerometer,
        "velocimeter": velocimeter,
        "gyro": gyro,
        "magnetometer": magnetometer,
    }


def robot_observation(d, ids: SensorIds) -> jax.Array:
    """The sensor part of the observation in Safety-Gymnasium's order: accelerometer, velocimeter, gyro,
    magnetometer, then per ball joint its angular velocity [3], then per ball joint its orientation as a
    row-major 3x3 rotation matrix [9]. Shape [12 + 12 * n_ball]."""
    s = site_sensors(d, ids)
    parts = [s["accelerometer"], s["velocimeter"], s["gyro"], s["magnetometer"]]
    parts += [d.qvel[a:a + 3] for a in ids.ball_dof]
    parts += [quat_to_mat(d.qpos[a:a + 4]).reshape(9) for a in ids.ball_qpos]
    return jnp.concatenate(parts)
