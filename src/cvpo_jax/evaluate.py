"""`python -m cvpo_jax.evaluate run=<run dir> [episodes=N] [picture=PATH] [member=M]`.

Loads the last checkpoint of a run, reports episodic reward, cost and cost rate of the policy mean for every
sweep member, and draws a top-down picture of one episode of member M (default: <run dir>/rollout.png).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

ALLOWED = ("run", "episodes", "picture", "member")


class EvaluateError(ValueError):
    pass


def _parse(argv: Sequence[str]) -> dict[str, str]:
    from cvpo_jax.cli import parse_options

    options = {k: v for k, v in parse_options(argv, dict.fromkeys(ALLOWED, "")).items() if v}
    if "run" not in options:
        raise EvaluateError("missing run=<run dir> (a directory made by python -m cvpo_jax.run)")
    return options


def draw_policy_rollout(trainer, params, member: int, path: str, title: str, seed: int = 0) -> None:
    """One episode of the policy mean of `member`, drawn top-down to `path`."""
    from cvpo_jax import envs
    from cvpo_jax.core.members import one_member
    from cvpo_jax.envs import render

    params = one_member(params, member)

    def policy(obs, key):
        return trainer.learner.act(params, obs[None], key, deterministic=True)[0]

    env = trainer.env
    if isinstance(env, envs.SafetyEnv):
        trajectory = render.rollout(env, steps=trainer.schedule.episode_length, seed=seed, policy=policy)
        render.render_rollout(env, trajectory, path, title=title)
    else:
        _draw_plain_path(env, policy, trainer.schedule.episode_length, seed, path, title)


def _draw_plain_path(env, policy, steps: int, seed: int, path: str, title: str) -> None:
    """For the pure-JAX tasks, whose state is a plain position: the path on the plane."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def run(key):
        def body(state, key):
            state = env.step(state, policy(state.obs, key))
            return state, (state.pipeline_state, state.info["cost"])

        state = env.reset(key)
        return jax.lax.scan(body, state, jax.random.split(key, steps))[1]

    positions, costs = jax.device_get(jax.jit(run)(jax.random.PRNGKey(seed)))  # [T, 2], [T]
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    ax.plot(positions[:, 0], positions[:, 1], color="0.3", lw=1)
    ax.scatter(positions[:, 0], positions[:, 1], c=costs, cmap="coolwarm", vmin=0, vmax=1, s=12)
    ax.set_aspect("equal")
    ax.set_title(f"{title}\nred: steps with cost ({int(costs.sum())})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options = _parse(argv)
        run_dir = options["run"]
        if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
            raise EvaluateError(f"run={run_dir}: no config.yaml there; give a run directory made by cvpo_jax.run")
        episodes = int(options.get("episodes", "10"))
        member = int(options.get("member", "0"))
        if episodes < 1:
            raise EvaluateError(f"episodes={episodes}: must be >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import dataclasses

    import jax

    from cvpo_jax import saved_run
    from cvpo_jax.config import from_yaml_file

    cfg = dataclasses.replace(from_yaml_file(os.path.join(run_dir, "config.yaml")), eval_episodes=episodes)
    try:
        run = saved_run.load(run_dir, cfg)
    except ValueError as e:  # no checkpoint yet, or one another version wrote
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer, members, iteration, state = run.trainer, run.members, run.iteration, run.state
    num_members = members.size
    if not 0 <= member < num_members:
        print(f"error: member={member}: the run has members 0..{num_members - 1}", file=sys.stderr)
        return 2

    metrics = jax.device_get(trainer.evaluate(state.learner.params, members.eval_keys(iteration + 1)))
    env_steps = iteration * cfg.num_envs
    print(f"{cfg.algo} on {cfg.env}, checkpoint at {env_steps} env steps per member, {episodes} episodes each")
    print(f"{'member':>6} {'seed':>5} {'cost_limit':>10} {'episode_reward':>15} {'episode_cost':>13} {'cost_rate':>10} "
          f"{'length':>7} {'terminated':>10}")
    for m in range(num_members):
        print(f"{m:>6} {members.seeds[m]:>5} {members.cost_limits[m]:>10g} "
              f"{metrics['eval/episode_reward'][m]:>15.3f} "
              f"{metrics['eval/episode_cost'][m]:>13.3f} {metrics['eval/cost_rate'][m]:>10.4f} "
              f"{metrics['eval/episode_length'][m]:>7.1f} {metrics['eval/terminated'][m]:>10.2f}")

    picture = options.get("picture", os.path.join(run_dir, "rollout.png"))
    draw_policy_rollout(trainer, state.learner.params, member, picture,
                        title=f"{cfg.algo} on {cfg.env}, member {member}, policy mean at {env_steps} env steps")
    print(f"rollout picture: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
