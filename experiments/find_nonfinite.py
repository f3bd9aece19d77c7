"""Replay a run that stopped on a non-finite update, one iteration at a time, and say where it went wrong.

    python experiments/find_nonfinite.py run=runs/<dir> [max_iterations=20000] [out=probe.npz]

`python -m cvpo_jax.run` stops at the first chunk with a non-finite loss or parameter and keeps its last good
checkpoint. This loads that checkpoint (or starts where the run started, if it stopped before its first;
nothing in the run directory is written), runs the same training loop in chunks of one iteration (one
rollout for the on-policy methods; the state carries its own keys, so the trajectory is the run's), and at the
first non-finite iteration prints, for each bad member, the update metrics of the last finite iteration and
of the bad one, and which parameter leaves went non-finite. `out=` saves both iterations' metrics.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def main(argv: list[str]) -> int:
    from cvpo_jax.cli import exit_on_bad_input, parse_options

    with exit_on_bad_input():
        options = parse_options(argv, {"run": "", "max_iterations": "20000", "out": ""})
    run_dir = options["run"]
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        print(f"error: run={run_dir}: give a run directory made by cvpo_jax.run", file=sys.stderr)
        return 2

    import jax

    from cvpo_jax import run, saved_run

    cfg = run.resolve([f"resume={run_dir}"])
    cfg.chunk_env_steps = cfg.num_envs  # one iteration per chunk
    # With no checkpoint the replay starts where the run started (its keys are the seeds').
    replay = saved_run.load(run_dir, cfg, from_start_if_no_checkpoint=True)
    trainer, members, state, iteration = replay.trainer, replay.members, replay.state, replay.iteration
    settings = members.settings()
    per_chunk = trainer.schedule.iterations_per_chunk  # 1, or one rollout for the on-policy methods
    print(f"from iteration {iteration} (env step {iteration * cfg.num_envs}; "
          f"{'a checkpoint' if iteration else 'the start'}), {per_chunk} iteration(s) per step, "
          f"members: {members.labels()}", flush=True)

    previous = None
    for _ in range(int(options["max_iterations"])):
        new_state, metrics = trainer.run_chunk(state, settings, np.int32(iteration))
        metrics = run.to_host(metrics)
        bad = np.ravel(metrics.pop("nonfinite"))
        if bad.any():
            break
        state, previous, iteration = new_state, metrics, iteration + per_chunk
        if iteration % 500 < per_chunk:
            print(f"  iteration {iteration} finite", flush=True)
    else:
        print("no non-finite iteration found")
        return 0

    print(f"first non-finite iteration: {iteration} (env steps {iteration * cfg.num_envs}-"
          f"{(iteration + per_chunk) * cfg.num_envs})")
    params = jax.device_get(new_state.learner.params)
    for member in np.flatnonzero(bad):
        print(f"\nmember {members.labels()[member]}")
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        broken = [jax.tree_util.keystr(path) for path, leaf in leaves
                  if not np.all(np.isfinite(np.asarray(leaf)[member]))]
        print(f"  non-finite parameter leaves: {len(broken)} of {len(leaves)}: {broken[:6]}")
        print(f"  {'metric':34s} {'last finite':>12s} {'bad':>12s}")
        for key in sorted(metrics):
            if key.startswith("train/"):
                continue
            before = np.ravel(previous[key])[member] if previous is not None else np.nan
            after = np.ravel(metrics[key])[member]
            flag = "" if np.isfinite(after) else "   <-- non-finite"
            print(f"  {key:34s} {before:12.5g} {after:12.5g}{flag}")
    if options["out"]:
        np.savez(options["out"], iteration=iteration, **{f"bad/{k}": v for k, v in metrics.items()},
                 **({f"last/{k}": v for k, v in previous.items()} if previous is not None else {}))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
