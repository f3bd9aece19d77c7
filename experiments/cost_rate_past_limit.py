"""Does the cost rate change past the episode's time limit?

    python experiments/cost_rate_past_limit.py run=runs/suite_cpu/car_circle-cvpo [member=0] [episodes=16]

The critics bootstrap through the time limit, and `python -m cvpo_jax.diagnostics` runs its Monte-Carlo sums
H steps past it (γ^H ≤ 0.01). Training data never holds a state after the limit, so if the exploring policy
drifts somewhere else past it (a car circling outwards into the walls), the Monte-Carlo cost of late states
counts steps the critic was never trained on. This plays `episodes` exploring episodes of one member for
T + H steps and prints the mean cost per step in windows of T/2 steps. Measurement only: it prints figures.
"""

from __future__ import annotations

import math
import sys

import numpy as np


def main(argv: list[str]) -> int:
    from cvpo_jax.cli import exit_on_bad_input, parse_options

    with exit_on_bad_input():
        options = parse_options(argv, {"run": "", "member": "0", "episodes": "16"})
        member, episodes = int(options["member"]), int(options["episodes"])
        if episodes < 1:
            raise ValueError(f"episodes={episodes}: needs at least 1")
    import jax
    from brax.envs.wrappers.training import EpisodeWrapper, VmapWrapper

    from cvpo_jax import algorithms, saved_run

    with exit_on_bad_input():
        run = saved_run.load(options["run"])
        params = run.member_params(member)
    cfg, env, trainer = run.cfg, run.env, run.trainer
    gamma = float(algorithms.config_value(cfg, algorithms.get(cfg.algo).gamma_key))
    limit = cfg.episode_length
    total = limit + math.ceil(math.log(0.01) / math.log(gamma))
    long_env = EpisodeWrapper(VmapWrapper(env), total + 1, 1)

    @jax.jit
    def play(key):
        reset_key, act_key = jax.random.split(key)
        state = long_env.reset(jax.random.split(reset_key, episodes))

        def step(carry, k):
            state, alive = carry
            new = long_env.step(state, trainer.learner.act(params, state.obs, k))
            return (new, alive * (1.0 - new.done)), (new.info["cost"] * alive, alive)

        _, (cost, alive) = jax.lax.scan(step, (state, jax.numpy.ones(episodes)), jax.random.split(act_key, total))
        return cost, alive  # [total, episodes]

    cost, alive = (np.asarray(x, np.float64) for x in jax.device_get(play(jax.random.PRNGKey(member))))
    print(f"{cfg.algo} on {cfg.env}, member {member}, checkpoint iteration {run.iteration}: {episodes} exploring "
          f"episodes of {total} steps (time limit {limit}); cost per step by window")
    window = max(limit // 2, 1)
    for start in range(0, total, window):
        end = min(start + window, total)
        steps = alive[start:end].sum()
        rate = cost[start:end].sum() / max(steps, 1.0)
        side = "before" if end <= limit else "past"
        print(f"  steps {start:>4}-{end - 1:<4} ({side} the limit): {rate:.3f} "
              f"(episodes alive {steps / (end - start):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
