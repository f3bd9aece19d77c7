"""Env-steps/s of the trainers' acting step, for comparing two checkouts of cvpo_jax on one machine.

    PYTHONPATH=<checkout>/src python experiments/acting_before_after.py tasks=point_goal batch=15 [refill_period=auto|N]

Times `steps` acting steps of `batch` envs in one jit (random actions, best of `repeats` calls after a warm-up),
through whichever acting API the checkout has: before issue 14, `make_acting(...).step(env_state, action,
iteration, reset_key)` with every env in lock-step and one reset under `lax.cond` at the time limit; after it,
per-env clocks and restarts from a reset pool (`.envs`). Run it alternately on the two checkouts: the machine
is shared, so only figures taken close together compare.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp


def main(argv):
    opts = {"tasks": "point_goal", "batch": "15", "steps": "400", "repeats": "3", "refill_period": "auto"}
    from cvpo_jax.cli import parse_options

    try:
        opts = parse_options(argv, opts)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    from cvpo_jax import envs
    from cvpo_jax.core import acting as acting_module

    batch, steps, repeats = int(opts["batch"]), int(opts["steps"]), int(opts["repeats"])
    new_api = hasattr(acting_module, "EnvsState")
    for task in opts["tasks"].split(","):
        env = envs.make(task)
        auto = opts["refill_period"] == "auto"
        refill = {"refill_period": None if auto else int(opts["refill_period"])} if new_api else {}
        acting = acting_module.make_acting(env, int(env.episode_length), batch, **refill)

        def rollout(state, first, key):
            def body(carry, offset):
                state, key = carry
                key, act_key, step_key = jax.random.split(key, 3)
                action = jax.random.uniform(act_key, (batch, env.action_size), minval=-1.0, maxval=1.0)
                out = acting.step(state, action, first + offset, step_key)
                return (out.envs if new_api else out.env_state, key), out.finished["episodes"]

            (state, _), episodes = jax.lax.scan(body, (state, key), jnp.arange(steps))
            return state, episodes.sum()

        state = jax.jit(acting.reset)(jax.random.PRNGKey(0))
        compiled = jax.jit(rollout).lower(state, 0, jax.random.PRNGKey(0)).compile()
        state, _ = jax.block_until_ready(compiled(state, 0, jax.random.PRNGKey(1)))
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            state, _ = jax.block_until_ready(compiled(state, (r + 1) * steps, jax.random.PRNGKey(2 + r)))
            times.append(time.perf_counter() - t0)
        label = f"after (refill every {opts['refill_period']})" if new_api else "before"
        print(f"{label} {task} batch {batch}: "
              f"{batch * steps / min(times):.0f} env-steps/s (best of {repeats} x {steps} steps)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
