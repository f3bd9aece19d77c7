"""Does the number of particles K decide how often CVPO's E-step is infeasible?

    python experiments/estep_particles.py run=runs/suite_cpu/car_goal-cvpo [batches=100] [particles=16,32,64]

Restores a CVPO run's last checkpoint and, for every member and every K, solves the E-step exactly as training
does (the target policy's particles, the target critics, the member's ε1 and ε) on `batches` replay batches of
the run's batch size, the same batches for every K. It prints the fraction of infeasible solves (no q within
the KL ball reaches E_q[Q_c] ≤ ε1), the batch mean of Q_c under the old policy's particles, E_q*[Q_c], λ, and
the within-state standard deviation of Q_c over the particles (how much the critic lets the action matter).
Nothing trains and nothing in the run directory is written.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np


def main(argv: list[str]) -> int:
    from cvpo_jax.cli import exit_on_bad_input, parse_options

    with exit_on_bad_input():
        options = parse_options(argv, {"run": "", "batches": "100", "particles": "16,32,64"})
    import jax
    import jax.numpy as jnp

    from cvpo_jax import saved_run
    from cvpo_jax.core.members import one_member
    from cvpo_jax.cvpo import make_cvpo, replay_estep

    with exit_on_bad_input():
        run = saved_run.load(options["run"], algo="cvpo")
    cfg, env, members = run.cfg, run.env, run.members
    batches, counts = int(options["batches"]), [int(k) for k in options["particles"].split(",")]
    print(f"{cfg.algo} on {cfg.env}, checkpoint iteration {run.iteration}, B {cfg.cvpo.batch_size}, "
          f"{batches} replay batches per member; ε1 {members.cost_thresholds}")
    print(f"{'member':>6} {'K':>4} {'infeasible':>10} {'E_pi[Q_c]':>10} {'E_q*[Q_c]':>10} {'lambda':>8} "
          f"{'std_a Q_c':>10}")
    for k in counts:
        cfg_k = dataclasses.replace(cfg, cvpo=dataclasses.replace(cfg.cvpo, num_particles=k))
        learner, phases = make_cvpo(cfg_k, env.observation_size, env.action_size)

        estep_on_replay = replay_estep(learner, phases)

        @jax.jit
        def solve(learner_state, replay_state, settings, key):
            _, _, q_c, solution = estep_on_replay(learner_state, replay_state, settings, key)
            expected = jnp.mean(jnp.sum(solution.weights * q_c, axis=-1))
            spread = jnp.mean(jnp.std(q_c, axis=-1))  # how much Q_c depends on the action within a state
            return solution.infeasible, jnp.mean(q_c), expected, solution.lam, spread

        for m in range(members.size):
            member = one_member(run.state, m)
            settings = one_member(members.settings(), m)
            rows = [jax.device_get(solve(member.learner, member.replay, settings,
                                         jax.random.fold_in(jax.random.PRNGKey(m), b)))
                    for b in range(batches)]  # the same batches for every K: the sample key does not depend on K
            infeasible, q_pi, q_star, lam, spread = (np.array(col, dtype=float) for col in zip(*rows))
            print(f"{m:>6} {k:>4} {np.mean(infeasible):>10.2f} {np.mean(q_pi):>10.3f} {np.mean(q_star):>10.3f} "
                  f"{np.mean(lam):>8.3f} {np.mean(spread):>10.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
