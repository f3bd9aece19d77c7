"""Run every algorithm on one task for a short budget, as a user would (`python -m cvpo_jax.run`), and tabulate it.

    python experiments/every_algorithm.py env=hopper_velocity [algos=cvpo,sac_lag,...] [steps=8000]
        [out=runs/every_algorithm] [table=path.md] [key=value ... passed to every run]

Each algorithm is its own `python -m cvpo_jax.run` process (one seed, 32x32 networks, a short warm-up), so
this checks the whole path a user takes: configuration, compile, acting with terminations, updates,
evaluation, checkpoint and metrics. It prints one row per algorithm: exit status, wall time (mostly
compilation), the training episodes' mean length and fraction ended by termination, and the last
evaluation. It is a smoke run, not a learning result.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time

from cvpo_jax import algorithms

_COLUMNS = ("train/episode_length", "train/terminated", "train/episodes", "eval/episode_reward",
            "eval/episode_length", "eval/terminated")


def _last_values(metrics_csv: str) -> dict:
    """The last finite value of each column of interest, from a run's metrics.csv."""
    values: dict = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for column in _COLUMNS:
                text = row.get(column, "")
                if text not in ("", None) and math.isfinite(float(text)):
                    values[column] = float(text)
    return values


def _format(value) -> str:
    return "—" if value is None else f"{value:.3g}"


def main(argv: list[str]) -> int:
    options = {"algos": ",".join(algorithms.names()), "steps": "8000", "out": "runs/every_algorithm",
               "table": ""}
    passthrough = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            print(f"error: expected key=value, got {arg!r}", file=sys.stderr)
            return 2
        if key in options or key == "env":
            options[key] = value
        else:
            passthrough.append(arg)
    if "env" not in options:
        print("error: env= is required (a task name, as for python -m cvpo_jax.run)", file=sys.stderr)
        return 2
    env, steps = options["env"], int(options["steps"])
    unknown = [a for a in options["algos"].split(",") if a not in algorithms.names()]
    if unknown:
        print(f"error: unknown algorithm(s) {unknown}; allowed: {', '.join(algorithms.names())}",
              file=sys.stderr)
        return 2

    rows = []
    for algo in options["algos"].split(","):
        run_name = f"{env}-{algo}"
        command = [sys.executable, "-m", "cvpo_jax.run", f"env={env}", f"algo={algo}", "num_seeds=1",
                   "network.hidden=[32,32]", f"total_env_steps={steps}",
                   f"warmup_env_steps={min(2000, steps // 4)}", f"eval_every_env_steps={steps}",
                   f"checkpoint_every_env_steps={steps}", "eval_episodes=2", "progress=false",
                   f"out_dir={options['out']}", f"run_name={run_name}", *passthrough]
        print("$", " ".join(command[1:]), flush=True)
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.time() - start
        metrics_csv = os.path.join(options["out"], run_name, "metrics.csv")
        values = _last_values(metrics_csv) if done.returncode == 0 and os.path.exists(metrics_csv) else {}
        if done.returncode != 0:
            print((done.stderr or done.stdout).strip().splitlines()[-1:], flush=True)
        rows.append((algo, done.returncode, wall, values))
        print(f"  rc={done.returncode} wall={wall:.0f}s {values}", flush=True)

    header = ("| algo | rc | wall s | train ep. length | train terminated | train episodes | eval reward "
              "| eval length | eval terminated |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"{env}, {steps} env steps, 1 seed, 32x32 networks, commit {commit or 'unknown'}, "
             f"extra options: {' '.join(passthrough) or 'none'} (smoke run, not a learning result)", "",
             header, "|" + "---|" * 9]
    for algo, rc, wall, values in rows:
        lines.append(f"| {algo} | {rc} | {wall:.0f} | "
                     + " | ".join(_format(values.get(c)) for c in _COLUMNS) + " |")
    table = "\n".join(lines)
    print(table)
    if options["table"]:
        with open(options["table"], "w") as f:
            f.write(table + "\n")
    return 0 if all(rc == 0 for _, rc, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
