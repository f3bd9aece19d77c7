"""How long random-action episodes last: Gymnasium's Hopper-v4 / Ant-v4 (the robots Safety-Gymnasium's velocity
tasks use) against brax's models that our `<robot>_velocity` tasks wrap, both stepped by MuJoCo C.

    pip install --target /tmp/gymlib --no-deps gymnasium farama-notifications imageio
    PYTHONPATH=/tmp/gymlib python experiments/velocity_random_lengths.py [episodes=50]

Actions uniform in [-1, 1]; an episode ends where each library's healthy test fails (brax's: torso body z and
angle for the Hopper, torso z in [0.2, 1.0] for the Ant) or at 1000 steps. Prints median and quartiles.
gymnasium is not a dependency of this project; this is a one-off fidelity check of the robots' falls.
"""

from __future__ import annotations

import sys

import mujoco
import numpy as np


def _gymnasium_lengths(name: str, episodes: int, rng) -> list[int]:
    import gymnasium as gym

    env, lengths = gym.make(name), []
    for episode in range(episodes):
        env.reset(seed=episode)
        steps = 0
        while True:
            _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
            steps += 1
            if terminated or truncated:
                break
        lengths.append(steps)
    return lengths


def _healthy(robot: str, data) -> bool:
    if robot == "hopper":  # brax Hopper.step: torso body z > 0.7, |qpos[2]| < 0.2, |qpos[2:], qvel| < 100
        state = np.concatenate([data.qpos[2:], data.qvel])
        return bool(data.xpos[1, 2] > 0.7 and abs(data.qpos[2]) < 0.2 and np.all(np.abs(state) < 100))
    return bool(0.2 <= data.qpos[2] <= 1.0)  # brax Ant: torso z in its healthy range


def _brax_model_lengths(robot: str, episodes: int, rng) -> list[int]:
    from cvpo_jax import envs

    brax_env = envs.make(f"{robot}_velocity")._env
    model, frames = brax_env.sys.mj_model, int(brax_env._n_frames)
    noise = float(brax_env._reset_noise_scale)  # brax's reset: qpos0 + U(±noise), qvel noise of that scale
    lengths = []
    for _ in range(episodes):
        data = mujoco.MjData(model)
        data.qpos[:] = model.qpos0 + rng.uniform(-noise, noise, model.nq)
        data.qvel[:] = rng.uniform(-noise, noise, model.nv)
        mujoco.mj_forward(model, data)
        steps = 0
        while steps < 1000:
            data.ctrl[:] = rng.uniform(-1, 1, model.nu)
            for _ in range(frames):
                mujoco.mj_step(model, data)
            steps += 1
            if not _healthy(robot, data):
                break
        lengths.append(steps)
    return lengths


def _summary(lengths: list[int]) -> str:
    q1, median, q3 = np.percentile(lengths, [25, 50, 75])
    return f"median {median:.0f} (quartiles {q1:.0f}-{q3:.0f})"


def main(argv: list[str]) -> int:
    episodes = 50
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key != "episodes" or not sep or not value.isdigit() or int(value) < 1:
            print(f"error: bad argument {arg!r}; allowed: episodes=<positive integer>", file=sys.stderr)
            return 2
        episodes = int(value)
    rng = np.random.default_rng(0)
    for robot, gym_name in (("hopper", "Hopper-v4"), ("ant", "Ant-v4")):
        print(f"{robot}: Gymnasium {gym_name} {_summary(_gymnasium_lengths(gym_name, episodes, rng))}; "
              f"brax's model {_summary(_brax_model_lengths(robot, episodes, rng))} "
              f"({episodes} random-action episodes each)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
