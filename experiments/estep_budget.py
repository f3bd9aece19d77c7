"""How many E-step iterations do warm-started solves need on real training data?

    python experiments/estep_budget.py run=runs/suite_cpu/point_goal-cvpo [updates=200] [budgets=4,6,8,12]

Restores a CVPO run's last checkpoint (networks and replay buffer) and continues training its first member
for `updates` updates on the CPU with the default solver (L-BFGS-B run to tolerance, warm-started from the
previous update, as training does). At every update it also solves the same E-step problem (same Q values,
same warm start) with the accelerator shapes: L-BFGS-B in lockstep with each iteration budget, and the
projected Newton solver with each budget. It prints, per solver, the fraction of solves that reached the
tolerance, the iterations used, and the disagreement with the reference: |Δ dual value| relative to the
dual's scale, the KL of q* and E_q*[Q_c] − ε1 (constraint residuals; the reference has them at ~0 where
active), and the total-variation distance between the two weight vectors (what the M-step sees).
"""

from __future__ import annotations

import os
import sys

import numpy as np


def main(argv: list[str]) -> int:
    options = {"run": "", "updates": "200", "budgets": "4,6,8,12"}
    from cvpo_jax.cli import exit_on_bad_input, parse_options

    with exit_on_bad_input():
        options = parse_options(argv, options)
    if not options["run"] or not os.path.isfile(os.path.join(options["run"], "config.yaml")):
        print("error: run= must name a CVPO run directory with a config.yaml and checkpoints", file=sys.stderr)
        return 2
    import jax
    import jax.numpy as jnp

    from cvpo_jax import estep, saved_run
    from cvpo_jax.core import replay
    from cvpo_jax.core.members import one_member
    from cvpo_jax.cvpo import make_cvpo

    run_dir = options["run"]
    with exit_on_bad_input():
        run = saved_run.load(run_dir, algo="cvpo")
    cfg, env, members, iteration = run.cfg, run.env, run.members, run.iteration
    state = one_member(run.state, 0)
    settings = jax.tree.map(lambda x: x[0], members.settings())
    learner, phases = make_cvpo(cfg, env.observation_size, env.action_size)

    budgets = [int(b) for b in options["budgets"].split(",")]
    shapes = {"lbfgsb tolerance (reference)": dict(solver="lbfgsb", loop="tolerance")}
    for b in budgets:
        shapes[f"lbfgsb lockstep {b}"] = dict(solver="lbfgsb", loop="lockstep", fixed_iter=b)
    for b in budgets:
        shapes[f"newton {b}"] = dict(solver="newton", fixed_iter=b)

    @jax.jit
    def step(learner_state, replay_state, key):
        sample_key, update_key, particle_key = jax.random.split(key, 3)
        batch = replay.sample(replay_state, sample_key, learner.batch_size)
        _, q_r, q_c, _ = phases.estep_step(learner_state, batch, settings, particle_key)
        new_state, _ = learner.update(learner_state, batch, settings, update_key)
        return new_state, q_r, q_c

    solve = {name: jax.jit(lambda q_r, q_c, init, kw=kw: estep.solve_dual(
        q_r, q_c, cost_threshold=settings.cost_threshold, kl_bound=settings.kl_bound,
        init=init, **kw)) for name, kw in shapes.items()}

    records = {name: [] for name in shapes}
    learner_state, key = state.learner, jax.random.PRNGKey(0)
    for _ in range(int(options["updates"])):
        key, k = jax.random.split(key)
        warm = (learner_state.dual_warm_start[0], learner_state.dual_warm_start[1])
        new_state, q_r, q_c = step(learner_state, state.replay, k)
        reference = solve["lbfgsb tolerance (reference)"](q_r, q_c, warm)
        scale = float(jnp.sqrt(jnp.mean(jnp.var(q_r, axis=-1))))  # the dual's units
        for name in shapes:
            s = solve[name](q_r, q_c, warm)
            records[name].append({
                "converged": float(s.converged), "iterations": float(s.iterations),
                "infeasible": float(s.infeasible),
                "dual_gap": abs(float(s.dual_value) - float(reference.dual_value)) / scale,
                "kl_minus_bound": float(s.kl) - float(settings.kl_bound),
                "cost_minus_threshold": float(s.expected_cost) - float(settings.cost_threshold),
                "tv": 0.5 * float(jnp.mean(jnp.sum(jnp.abs(s.weights - reference.weights), axis=-1))),
            })
        learner_state = new_state

    print(f"{options['updates']} warm-started E-step solves on {run_dir} (member 0, checkpoint iteration "
          f"{iteration}, B {learner.batch_size}, K {cfg.cvpo.num_particles}); ε = {float(settings.kl_bound):g}, "
          f"ε1 = {float(settings.cost_threshold):.3f}")
    print(f"{'solver':32s} {'converged':>9s} {'iter mean':>9s} {'iter max':>8s} {'infeas.':>7s} "
          f"{'|Δg|/s_r p50':>12s} {'p95':>9s} {'KL−ε p95':>9s} {'E[Qc]−ε1 p95':>13s} {'TV p50':>8s} {'TV p95':>8s}")
    for name, rows in records.items():
        col = lambda k: np.asarray([r[k] for r in rows])  # noqa: E731
        print(f"{name:32s} {col('converged').mean():9.2f} {col('iterations').mean():9.2f} "
              f"{col('iterations').max():8.0f} {col('infeasible').mean():7.2f} "
              f"{np.percentile(col('dual_gap'), 50):12.2e} {np.percentile(col('dual_gap'), 95):9.2e} "
              f"{np.percentile(col('kl_minus_bound'), 95):9.2e} {np.percentile(col('cost_minus_threshold'), 95):13.3f} "
              f"{np.percentile(col('tv'), 50):8.2e} {np.percentile(col('tv'), 95):8.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
