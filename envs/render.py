"""Top-down pictures of a task: layout, robot path, costs. PNG out.

Python:
    from cvpo_jax.envs import render
    frames = render.rollout("point_goal", steps=200, seed=0)      # Trajectory of random actions
    render.render_rollout("point_goal", frames, "x.png")         # or pass a list of brax States

Command line (random actions):
    python -m cvpo_jax.envs.render env=point_goal out=x.png steps=200 [seed=0] [backend=2d|mujoco]

The default backend is a plain matplotlib 2-D drawing: it needs no OpenGL and runs on any CPU machine.
backend=mujoco renders the last state with MuJoCo's offscreen renderer from the top camera (set
MUJOCO_GL=egl or osmesa where available); if that fails it falls back to the 2-D drawing and says so.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class Trajectory:
    """What a picture needs, as numpy arrays. T = number of recorded states."""

    robot_xy: np.ndarray  # [T, 2]
    robot_yaw: np.ndarray  # [T]
    mocap_xy: np.ndarray  # [T, nmocap, 2] positions of goal, hazards, buttons, gremlins, vases
    cost: np.ndarray  # [T] 0/1 cost of the step that led to each state (0 for the first)
    goal_reached: np.ndarray  # [T]
    goal_button: np.ndarray  # [T] int, -1 when the task has no buttons


def _yaw(xmat: np.ndarray) -> np.ndarray:
    """Heading of the robot's forward axis: +x for the Point, -y for the Car (handled by the caller)."""
    return np.arctan2(xmat[..., 1, 0], xmat[..., 0, 0])


def trajectory_from_states(env, states: Sequence) -> Trajectory:
    """Trajectory from a list of (unbatched) brax States of `env`, or from one State whose leaves carry a
    leading time axis."""
    from .base import _UD_GOAL_BUTTON

    if not isinstance(states, (list, tuple)):
        states = [states]
    ps = [s.pipeline_state for s in states]
    m = env.mj_model
    steps = [int(np.prod(p.xpos.shape[:-2])) for p in ps]  # states held by each entry (1 if unbatched)
    xpos = np.concatenate([np.asarray(p.xpos).reshape(n, m.nbody, 3) for p, n in zip(ps, steps)])
    xmat = np.concatenate([np.asarray(p.xmat).reshape(n, m.nbody, 3, 3) for p, n in zip(ps, steps)])
    mocap = np.concatenate([np.asarray(p.mocap_pos).reshape(n, m.nmocap, 3) for p, n in zip(ps, steps)])
    ud = np.concatenate([np.asarray(p.userdata).reshape(n, m.nuserdata) for p, n in zip(ps, steps)])
    cost = np.concatenate([np.asarray(s.info["cost"]).reshape(-1) for s in states])
    reached = np.concatenate([np.asarray(s.info["goal_reached"]).reshape(-1) for s in states])
    body = env._robot_body
    yaw = _yaw(xmat[:, body])
    if env.robot.free_root:
        yaw = yaw - np.pi / 2  # the Car drives along its body -y axis
    buttons = env.config.num_buttons > 0
    return Trajectory(
        robot_xy=xpos[:, body, :2], robot_yaw=yaw, mocap_xy=mocap[:, :, :2], cost=cost,
        goal_reached=reached,
        goal_button=ud[:, _UD_GOAL_BUTTON].astype(int) if buttons else -np.ones(len(cost), int))


def rollout(env_name_or_env, steps: int = 200, seed: int = 0, policy=None) -> Trajectory:
    """Reset and run `steps` env steps (random uniform actions unless `policy(obs, key) -> action`), in one
    jitted lax.scan; returns the Trajectory including the reset state."""
    import jax
    import jax.numpy as jnp

    from . import registry

    env = registry.make(env_name_or_env) if isinstance(env_name_or_env, str) else env_name_or_env

    def act(state, key):
        if policy is None:
            return jax.random.uniform(key, (env.action_size,), minval=-1.0, maxval=1.0)
        return policy(state.obs, key)

    def run(key):
        k_reset, k_act = jax.random.split(key)
        state = env.reset(k_reset)

        def body(state, key):
            state = env.step(state, act(state, key))
            return state, state

        _, states = jax.lax.scan(body, state, jax.random.split(k_act, steps))
        first = jax.tree.map(lambda x: x[None], state)
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, states)

    states = jax.jit(run)(jax.random.PRNGKey(seed))
    return trajectory_from_states(env, states)


def _draw(ax, env, traj: Trajectory, title: str = ""):
    import matplotlib.patches as mpatches

    c = env.config
    sl = env.slices
    last = traj.mocap_xy[-1]
    lim = max(abs(v) for v in c.extents) + 0.3
    if c.wall_x > 0 or c.circle_radius > 0 and env.lidar_names() == ("circle",):
        lim = max(lim, c.circle_radius + 0.5)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_facecolor("#f4f4f4")
    x0, y0, x1, y1 = c.extents
    if env.lidar_names() != ("circle",):
        ax.add_patch(mpatches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls=":", ec="0.6"))
    for i in range(sl["hazards"].start, sl["hazards"].stop):
        ax.add_patch(mpatches.Circle(last[i], c.hazard_size, color="#4a6cff", alpha=0.35, lw=0))
    if sl["goal"].stop > sl["goal"].start and c.num_buttons == 0:
        ax.add_patch(mpatches.Circle(last[sl["goal"].start], c.goal_size, color="#2ecc40", alpha=0.45, lw=0))
    for k, i in enumerate(range(sl["buttons"].start, sl["buttons"].stop)):
        is_goal = traj.goal_button[-1] == k
        ax.add_patch(mpatches.Circle(last[i], c.button_size, color="#ff8c00", ec="#2ecc40" if is_goal else "k",
                                     lw=3 if is_goal else 0.5))
    for i in range(sl["gremlins"].start, sl["gremlins"].stop):
        centre = traj.mocap_xy[:, i].mean(axis=0) if len(traj.mocap_xy) > 20 else last[i]
        ax.add_patch(mpatches.Circle(centre, c.gremlin_travel, fill=False, ls="--", ec="#8e44ad", lw=0.8))
        s = c.gremlin_size
        ax.add_patch(mpatches.Rectangle(last[i] - s, 2 * s, 2 * s, color="#8e44ad", alpha=0.9))
    for i in range(sl["vases"].start, sl["vases"].stop):
        s = c.vase_size
        ax.add_patch(mpatches.Rectangle(last[i] - s, 2 * s, 2 * s, color="#00bcd4", alpha=0.9))
    if env.lidar_names() == ("circle",):
        ax.add_patch(mpatches.Circle((0, 0), c.circle_radius, fill=False, ec="#2ecc40", lw=2))
        for w, vertical in ((c.wall_x, True), (c.wall_y, False)):
            if w > 0:
                for sgn in (-1, 1):
                    if vertical:
                        ax.axvline(sgn * w, color="r", lw=2, alpha=0.6)
                    else:
                        ax.axhline(sgn * w, color="r", lw=2, alpha=0.6)
    xy = traj.robot_xy
    ax.plot(xy[:, 0], xy[:, 1], "-", color="0.25", lw=1)
    hit = traj.cost > 0
    if hit.any():
        ax.plot(xy[hit, 0], xy[hit, 1], "o", color="r", ms=3, label="cost")
    if traj.goal_reached.any():
        g = traj.goal_reached > 0
        ax.plot(xy[g, 0], xy[g, 1], "*", color="#2ecc40", ms=12, mec="k", label="goal reached")
    ax.plot(*xy[0], "s", color="0.3", ms=6, label="start")
    r = 0.1
    ax.add_patch(mpatches.Circle(xy[-1], r, color="#bd0b2f"))
    ax.arrow(xy[-1, 0], xy[-1, 1], 0.25 * np.cos(traj.robot_yaw[-1]), 0.25 * np.sin(traj.robot_yaw[-1]),
             width=0.02, color="k")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.7)
    steps = len(xy) - 1
    ax.set_title(title or f"{env.name}: {steps} steps, cost {int(traj.cost.sum())}, "
                 f"goals {int(traj.goal_reached.sum())}", fontsize=9)


def render_rollout(env_name_or_env, states_or_traj, path: str, title: str = "") -> str:
    """Draw a rollout (Trajectory, or list of States of the env) top-down to a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import registry

    env = registry.make(env_name_or_env) if isinstance(env_name_or_env, str) else env_name_or_env
    traj = states_or_traj if isinstance(states_or_traj, Trajectory) else trajectory_from_states(
        env, states_or_traj)
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    _draw(ax, env, traj, title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def render_mujoco(env, state, path: str, size: int = 480) -> str:
    """The state seen from the scene's top camera with MuJoCo's renderer (needs a working OpenGL)."""
    import mujoco
    from PIL import Image

    m = env.mj_model
    d = mujoco.MjData(m)
    ps = state.pipeline_state
    d.qpos[:], d.mocap_pos[:], d.mocap_quat[:] = np.asarray(ps.qpos), np.asarray(ps.mocap_pos), np.asarray(
        ps.mocap_quat)
    mujoco.mj_forward(m, d)
    with mujoco.Renderer(m, size, size) as renderer:
        renderer.update_scene(d, camera="top")
        Image.fromarray(renderer.render()).save(path)
    return path


def main(argv: list[str]) -> int:
    from . import registry

    opts = {"env": "point_goal", "out": "rollout.png", "steps": "200", "seed": "0", "backend": "2d"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in opts:
            print(f"error: bad option {arg!r}; use key=value with keys {', '.join(opts)}", file=sys.stderr)
            return 2
        opts[key] = value
    try:
        steps, seed = int(opts["steps"]), int(opts["seed"])
        env = registry.make(opts["env"])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if opts["backend"] not in ("2d", "mujoco"):
        print("error: backend must be 2d or mujoco", file=sys.stderr)
        return 2
    traj = rollout(env, steps=steps, seed=seed)
    if opts["backend"] == "mujoco":
        try:
            import jax

            state = jax.jit(env.reset)(jax.random.PRNGKey(seed))
            render_mujoco(env, state, opts["out"])
            print(f"wrote {opts['out']} (MuJoCo renderer, reset state)")
            return 0
        except Exception as err:  # no OpenGL context on this machine: fall back to the 2-D drawing
            print(f"MuJoCo renderer unavailable ({type(err).__name__}: {err}); drawing in 2-D instead",
                  file=sys.stderr)
    render_rollout(env, traj, opts["out"])
    print(f"wrote {opts['out']}: {steps} steps, cost {int(traj.cost.sum())}, "
          f"goals {int(traj.goal_reached.sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
