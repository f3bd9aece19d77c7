"""Steps/s of Safety-Gymnasium 1.0.0's single (unbatched) environment on the tasks cvpo-jax ports.

This is the reference for the env speed target ("the batched MJX port steps at least 5x faster than
Safety-Gymnasium's single environment on the same task"); compare with `python -m cvpo_jax.bench env`.
Safety-Gymnasium 1.0.0 needs Python <= 3.10, so it runs in its own venv, outside the repository:

    python3.10 -m venv /work/sgym-venv      # any Python 3.10, e.g. pyenv's 3.10.13
    /work/sgym-venv/bin/pip install safety-gymnasium==1.0.0
    # (this resolves mujoco==2.3.3, gymnasium==0.28.1, numpy==1.23.5; nothing else had to be pinned)
    /work/sgym-venv/bin/python experiments/sgym_reference.py [steps=3000] [repeats=3] [tasks=A,B] [json=PATH]

Per task: make the env (with the wrappers `safety_gymnasium.make` adds, as a user gets it), reset once with
seed 0, take a few untimed warm-up steps, then time `steps` calls of env.step with uniform random actions
in the action space (drawn beforehand, so sampling is not timed); steps/s is the best of `repeats` runs.
"""

import json
import sys
import time

import numpy as np
import safety_gymnasium

TASKS = ["SafetyPointGoal1-v0", "SafetyCarGoal1-v0", "SafetyPointButton1-v0", "SafetyCarButton1-v0",
         "SafetyPointCircle1-v0", "SafetyCarCircle1-v0"]


def time_steps(env, actions):
    """Seconds spent in env.step over all `actions`, and how many resets were needed.

    Safety-Gymnasium refuses to step a finished episode ("Environment must be reset before stepping"),
    so when an episode ends (terminated or truncated: the 1000-step limit of Goal/Button, 500 of Circle)
    the clock is stopped, the env is reset, and the clock restarts: reset time is excluded.
    """
    total, resets = 0.0, 0
    t0 = time.perf_counter()
    for a in actions:
        _, _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            total += time.perf_counter() - t0
            env.reset()
            resets += 1
            t0 = time.perf_counter()
    return total + time.perf_counter() - t0, resets


def bench(task, steps, repeats, seed=0):
    env = safety_gymnasium.make(task)
    env.reset(seed=seed)
    space = env.action_space
    rng = np.random.default_rng(seed)
    for a in rng.uniform(space.low, space.high, (10,) + space.shape):  # warm-up, untimed
        env.step(a)
    runs = []
    for _ in range(repeats):  # one continuing episode stream across repeats, no reset in between
        actions = rng.uniform(space.low, space.high, (steps,) + space.shape).astype(space.dtype)
        seconds, resets = time_steps(env, actions)
        runs.append({"seconds": seconds, "resets": resets, "steps_per_s": steps / seconds})
    env.close()
    return {"task": task, "steps": steps, "repeats": repeats,
            "steps_per_s": max(r["steps_per_s"] for r in runs), "runs": runs}


def main(argv):
    opts = {"steps": "3000", "repeats": "3", "tasks": ",".join(TASKS), "json": ""}
    from cvpo_jax.cli import parse_options

    try:
        opts = parse_options(argv, opts)
    except ValueError as e:
        sys.exit(f"error: {e}")
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    results = []
    for task in opts["tasks"].split(","):
        r = bench(task, int(opts["steps"]), int(opts["repeats"]))
        results.append(r)
        print(f"{task:24s} {r['steps_per_s']:8.0f} steps/s  (best of {r['repeats']} x {r['steps']} steps)",
              flush=True)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    print(f"load average before {' '.join(load_before)}, after {' '.join(load_after)}")
    if opts["json"]:
        # mujoco and gymnasium are already imported by safety_gymnasium; read their versions from there.
        versions = {"python": sys.version.split()[0], "safety_gymnasium": safety_gymnasium.__version__,
                    "mujoco": sys.modules["mujoco"].__version__,
                    "gymnasium": sys.modules["gymnasium"].__version__, "numpy": np.__version__}
        with open(opts["json"], "w") as f:
            json.dump({"versions": versions, "load_average_before": load_before,
                       "load_average_after": load_after, "results": results}, f, indent=1)
        print(f"wrote {opts['json']}")


if __name__ == "__main__":
    main(sys.argv[1:])
