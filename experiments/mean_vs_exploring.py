"""Why does the evaluated policy mean cost more than the exploring policy on the Car?

    python experiments/mean_vs_exploring.py run=runs/suite_cpu/car_goal-cvpo [episodes=20] [seed=1]

Plays `episodes` episodes per member of the run's last checkpoint twice on the same layouts and starts: once
with the policy mean (what the evaluations report) and once with the exploring policy (what training runs
and the E-step constrains). Prints per member and mode the episode reward, the episode cost, how far the
robot moves per env step (the path length of its body's xy), the mean |action|, and the share of steps with
an action component at the edge of the box [-1, 1] (for the mean: a policy mean outside the box). The
hypothesis it tests: on a differential-drive Car, independent noise on the two wheels averages out to a
slower walk, so the exploring policy covers less ground and meets fewer hazards than its own mean.
Measurement only: it prints figures and writes nothing.
"""

from __future__ import annotations

import sys
from functools import partial

import numpy as np


def main(argv: list[str]) -> int:
    from cvpo_jax.cli import exit_on_bad_input, parse_options

    with exit_on_bad_input():
        options = parse_options(argv, {"run": "", "episodes": "20", "seed": "1"})
        episodes, seed = int(options["episodes"]), int(options["seed"])
        if episodes < 1:
            raise ValueError(f"episodes={episodes}: needs at least 1")
    import jax
    import jax.numpy as jnp
    from brax.envs.wrappers.training import EpisodeWrapper, VmapWrapper

    from cvpo_jax import saved_run

    with exit_on_bad_input():
        run = saved_run.load(options["run"])
    cfg, env, trainer = run.cfg, run.env, run.trainer
    if not hasattr(env, "robot_xy"):
        print(f"error: run={options['run']}: its env ({cfg.env}) has no robot position to measure", file=sys.stderr)
        return 2
    members = run.members.size
    episode_env = EpisodeWrapper(VmapWrapper(env), cfg.episode_length, 1)

    @partial(jax.jit, static_argnums=2)
    def play(params, key, deterministic):
        reset_key, act_key = jax.random.split(key)
        # The same reset keys for both modes: the same layouts and starting poses.
        state = episode_env.reset(jax.random.split(reset_key, episodes))

        robot_xy = jax.vmap(env.robot_xy)

        def step(carry, k):
            state, xy, alive = carry  # xy: [episodes, 2], the robot's position in `state`, carried to read it once
            action = trainer.learner.act(params, state.obs, k, deterministic=deterministic)
            new = episode_env.step(state, action)
            new_xy = robot_xy(new.pipeline_state)
            moved = jnp.linalg.norm(new_xy - xy, axis=-1)
            size = jnp.abs(action).mean(-1)  # mean |a| over the action's components, [episodes]
            saturated = (jnp.abs(action) >= 0.999).any(-1)  # a component at the box's edge
            out = (new.reward * alive, new.info["cost"] * alive, moved * alive, size * alive, saturated * alive, alive)
            return (new, new_xy, alive * (1.0 - new.done)), out

        start = (state, robot_xy(state.pipeline_state), jnp.ones(episodes))
        _, (reward, cost, moved, size, saturated, alive) = jax.lax.scan(step, start,
                                                                        jax.random.split(act_key, cfg.episode_length))
        steps = jnp.maximum(alive.sum(0), 1.0)
        return reward.sum(0), cost.sum(0), moved.sum(0) / steps, size.sum(0) / steps, saturated.sum(0) / steps

    print(f"{cfg.algo} on {cfg.env}, checkpoint iteration {run.iteration}, {episodes} episodes per member and mode "
          f"on the same layouts; cost limit {cfg.cost_limit}")
    print(f"{'member':>6} {'policy':>9} {'reward':>14} {'cost':>14} {'metres per step':>18} {'mean |a|':>8} "
          f"{'saturated':>9}")
    key = jax.random.PRNGKey(seed)
    for m in range(members):
        params = run.member_params(m)
        for name, deterministic in (("mean", True), ("exploring", False)):
            reward, cost, moved, size, saturated = (np.asarray(x, np.float64)
                                                    for x in jax.device_get(play(params, key, deterministic)))
            se = lambda x: x.std() / np.sqrt(len(x))  # noqa: E731
            print(f"{m:>6} {name:>9} {reward.mean():>7.1f} ± {se(reward):>4.1f} {cost.mean():>7.1f} ± {se(cost):>4.1f} "
                  f"{moved.mean():>9.4f} ± {se(moved):.4f} {size.mean():>8.3f} {saturated.mean():>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
