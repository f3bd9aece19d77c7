"""`python -m cvpo_jax.evaluate run=<run dir> [episodes=N] [picture=PATH] [member=M]`.

Loads the last checkpoint of a run, reports episodic reward, cost and cost rate of the policy mean for every
sweep member, and draws a top-down picture of one episode of member M (default: <run dir>/rollout.png).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import numpy as np

ALLOWED = ("run", "episodes", "picture", "member")


class EvaluateError(ValueError):
    pass


def _parse(argv: Sequence[str]) -> dict[str, str]:
    options = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ALLOWED:
            raise EvaluateError(f"bad argument {arg!r}; allowed: {', '.join(k + '=...' for k in ALLOWED)}")
        options[key] = value
    if "run" not in options:
        raise EvaluateError("missing run=<run dir> (a directory made by python -m cvpo_jax.run)")
    return options


def rollout_positions(trainer, params, key, member: int):
    """Robot xy path [T, 2] of one episode of the policy mean of `member` (and the states for drawing)."""
    import jax

    env = trainer.env
    params = jax.tree.map(lambda x: x[member], params)
    act = trainer.learner.act

    @jax.jit
    def episode(key):
        state = env.reset(key)

        def step(state, _):
            action = act(params, state.obs[None], key, deterministic=True)[0]
            state = env.step(state, action)
            return state, state.pipeline_state

        _, pipeline_states = jax.lax.scan(step, state, None, length=trainer.schedule.episode_length)
        return state.pipeline_state, pipeline_states

    return episode(key)


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

    from cvpo_jax import checkpoint, envs
    from cvpo_jax.config import from_yaml_file
    from cvpo_jax.trainer import eval_keys, make_trainer, member_keys

    cfg = dataclasses.replace(from_yaml_file(os.path.join(run_dir, "config.yaml")), eval_episodes=episodes)
    iteration = checkpoint.latest_iteration(run_dir)
    if iteration is None:
        print(f"error: run={run_dir}: no checkpoint yet", file=sys.stderr)
        return 2
    env = envs.make(cfg.env)
    trainer = make_trainer(cfg, env, cfg.episode_length)
    like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(trainer.init, member_keys(cfg)))
    state = checkpoint.restore(run_dir, iteration, like)
    num_members = jax.tree.leaves(state.learner.params)[0].shape[0]
    if not 0 <= member < num_members:
        print(f"error: member={member}: the run has members 0..{num_members - 1}", file=sys.stderr)
        return 2

    metrics = jax.device_get(trainer.evaluate(state.learner.params, eval_keys(cfg, iteration + 1)))
    env_steps = iteration * cfg.num_envs
    print(f"{cfg.algo} on {cfg.env}, checkpoint at {env_steps} env steps per member, {episodes} episodes each")
    print(f"{'member':>6} {'cost_limit':>10} {'episode_reward':>15} {'episode_cost':>13} {'cost_rate':>10}")
    limits = list(cfg.sweep.cost_limits or [cfg.cost_limit])
    for m in range(num_members):
        print(f"{m:>6} {limits[m // cfg.num_seeds]:>10g} {metrics['eval/episode_reward'][m]:>15.3f} "
              f"{metrics['eval/episode_cost'][m]:>13.3f} {metrics['eval/cost_rate'][m]:>10.4f}")

    picture = options.get("picture", os.path.join(run_dir, "rollout.png"))
    first, states = rollout_positions(trainer, state.learner.params, jax.random.PRNGKey(member), member)
    envs.render.draw_rollout(env, first, states, picture,
                             title=f"{cfg.env}, member {member}, policy mean at {env_steps} env steps")
    print(f"rollout picture: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
