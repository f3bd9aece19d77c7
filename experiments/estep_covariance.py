"""Why does CVPO's policy standard deviation stay near its initial 0.6-0.7 on the Car?

    python experiments/estep_covariance.py run=runs/suite_cpu/car_goal-cvpo [batches=50]

The M-step fits the covariance head around the *old* mean to the E-step's weighted particles (mstep.py), so
the covariance it moves towards is q*'s second moment about μ_old (`diagnostics.weighted_spread`). A score
linear in the action tilts q* sideways, which keeps its variance and adds the squared shift: for a continuous
q* the target is then at least as wide as the old policy. Only a score curved around μ_old narrows it.

This restores a CVPO run's last checkpoint and, per member, solves the E-step as training does on `batches`
replay batches. Per action dimension (a/b) it prints the old policy's σ and |μ|, the share of particles outside
the box [-1, 1] (they execute as its edge, so the critics give them one value), and the target's second moment
over σ_old² (> 1: the M-step pulls σ up). Averaged over dimensions: the same with uniform weights (sampling
noise alone), the squared mean shift and q*'s own variance (in units of σ_old²), the share of log q* per state
that a linear function of the action explains (R²), and the second moment with the weights of that linear
part alone on the same particles. Measurement only: nothing trains and nothing is written.
"""

from __future__ import annotations

import sys

import numpy as np


def main(argv: list[str]) -> int:
    from cvpo_jax.cli import exit_on_bad_input, parse_options

    with exit_on_bad_input():
        options = parse_options(argv, {"run": "", "batches": "50"})
        batches = int(options["batches"])
        if batches < 1:
            raise ValueError(f"batches={batches}: needs at least 1")
    import jax
    import jax.numpy as jnp

    from cvpo_jax import saved_run
    from cvpo_jax.core.members import one_member
    from cvpo_jax.cvpo import make_cvpo, replay_estep
    from cvpo_jax.diagnostics import weighted_spread

    with exit_on_bad_input():
        run = saved_run.load(options["run"], algo="cvpo")
    cfg, env, members = run.cfg, run.env, run.members
    learner, phases = make_cvpo(cfg, env.observation_size, env.action_size)

    estep_on_replay = replay_estep(learner, phases)

    @jax.jit
    def solve(learner_state, replay_state, settings, key):
        targets, _, _, solution = estep_on_replay(learner_state, replay_state, settings, key)
        old_std = jnp.sqrt(jnp.sum(targets.old.scale_tril ** 2, axis=-1))  # [B, A] per-dimension σ (rows of L)
        return targets.particles, targets.weights, targets.old.mean, old_std, solution.infeasible

    print(f"{cfg.algo} on {cfg.env}, checkpoint iteration {run.iteration}, K {cfg.cvpo.num_particles}, "
          f"B {cfg.cvpo.batch_size}, {batches} replay batches per member; a/b: per action dimension")
    print(f"{'member':>6} {'sigma_old':>11} {'|mu_old|':>11} {'outside box':>11} {'m2/s2 (q*)':>11} "
          f"{'m2/s2 (unif)':>12} {'shift^2':>7} {'var_q*':>6} {'R2 linear':>9} {'m2/s2 lin':>9} {'infeasible':>10}")
    for m in range(members.size):
        member, settings = one_member(run.state, m), one_member(members.settings(), m)
        stats = {k: [] for k in ("sigma", "mean_abs", "outside", "target_dim", "r2", "linear", "infeasible")}
        spreads = []
        for b in range(batches):
            particles, weights, old_mean, old_std, infeasible = (np.asarray(x, np.float64) for x in jax.device_get(
                solve(member.learner, member.replay, settings, jax.random.fold_in(jax.random.PRNGKey(m), b))))
            spreads.append(weighted_spread(particles, weights, old_mean, old_std))
            stats["target_dim"].append([weighted_spread(particles[..., d:d + 1], weights, old_mean[:, d:d + 1],
                                                        old_std[:, d:d + 1])["target_to_old"]
                                        for d in range(particles.shape[-1])])
            stats["sigma"].append(np.mean(old_std, axis=0))  # [A]
            stats["mean_abs"].append(np.mean(np.abs(old_mean), axis=0))  # [A]
            # Particles past the box execute as its edge: the critics give them one value (cvpo.estep_step).
            stats["outside"].append(np.mean(np.abs(particles) > 1.0, axis=(0, 1)))  # [A]
            stats["infeasible"].append(float(infeasible))
            # log q* per state regressed on the particles in units of σ_old (with an intercept): how linear the
            # E-step's score is in the action; then the same particles weighted by that linear part alone.
            z = (particles - old_mean[:, None]) / old_std[:, None]  # [B, K, A]
            design = np.concatenate([np.ones(z.shape[:2] + (1,)), z], axis=-1)  # [B, K, 1 + A]
            log_w = np.log(np.maximum(weights, 1e-300))  # [B, K]
            linear_weights = np.empty_like(weights)
            for i, (x, y) in enumerate(zip(design, log_w)):
                coef, *_ = np.linalg.lstsq(x, y, rcond=None)
                fitted = x @ coef
                total = np.sum((y - y.mean()) ** 2)
                stats["r2"].append(1.0 - np.sum((y - fitted) ** 2) / total if total > 0 else np.nan)
                linear_weights[i] = np.exp(fitted - fitted.max()) / np.sum(np.exp(fitted - fitted.max()))
            stats["linear"].append(weighted_spread(particles, linear_weights, old_mean, old_std)["target_to_old"])
        spread = {k: np.mean([r[k] for r in spreads]) for k in spreads[0]}
        per_dim = {k: "/".join(f"{x:.2f}" for x in np.mean(stats[k], axis=0))
                   for k in ("sigma", "mean_abs", "outside", "target_dim")}
        print(f"{m:>6} {per_dim['sigma']:>11} {per_dim['mean_abs']:>11} {per_dim['outside']:>11} "
              f"{per_dim['target_dim']:>11} {spread['uniform_to_old']:>12.3f} {spread['shift_sq']:>7.3f} "
              f"{spread['tilted_variance']:>6.3f} {np.nanmean(stats['r2']):>9.2f} {np.mean(stats['linear']):>9.3f} "
              f"{np.mean(stats['infeasible']):>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
