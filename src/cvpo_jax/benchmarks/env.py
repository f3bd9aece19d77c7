"""Env stepping speed: the MJX port (jitted, vmapped, lax.scan over steps) vs single-threaded MuJoCo C.

    python -m cvpo_jax.bench env [envs=all|point_goal,car_goal] [batches=1,64,1024] [steps=auto]
                                 [repeats=2] [c_steps=2000] [iterations=N] [acting=false] [json=out.json]

For each env and batch size: the compile time of the rollout (`steps` vmapped env steps with random actions
in one jit, lax.scan over steps), then env-steps/s = batch * steps / seconds of the best of `repeats` timed
calls, after one untimed warm-up call. Reset (compiled and run once per batch) is outside the timed region
and its seconds are reported apart. steps=auto takes ceil(20000 / batch) clamped to [20, 200], so every
timed call makes at least 4000 env steps (batch 1: 200, batch 64: 200, batch 1024: 20).

Reference: the same MJCF, from the same reset state, stepped by `mujoco.mj_step` in a Python loop (frame_skip
physics steps + one mj_forward per env step, as Safety-Gym does), single-threaded, float64, random controls;
reported with the ratio MJX / MuJoCo C.

iterations=N replaces every task's constraint-solver iteration budget in the MJX rollout; the MuJoCo C
reference keeps the shipped budget. iterations=0 skips the contact solve altogether while collision
detection, constraint rows and everything else still run: an upper bound on what any faster solver could
reach. Such figures are labelled as a bound and never counted as meeting the speed target.

acting=true also times the trainers' acting step (`core/acting.py`: the same env steps plus the per-env
episode clocks, the restarts of ended episodes from the reset pool and its refills, at the task's episode
length) and prints it beside the bare step as a ratio: what the termination machinery costs. It takes the
velocity tasks too (`hopper_velocity`, ...; they have no MuJoCo C reference here).

envs=all (the 16 MuJoCo tasks) at the default batches takes about 40 minutes on a shared 2-core CPU (each
task compiles three rollouts, 10-40 s each; the Car tasks run at ~1000 env-steps/s). For a quick look use
e.g. `envs=point_goal,car_goal batches=1,64,1024` (~5 minutes).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

_DEFAULTS = {"envs": "all", "batches": "1,64,1024", "steps": "auto", "repeats": "2", "c_steps": "2000",
             "iterations": "", "acting": "false", "json": ""}

# Safety-Gymnasium 1.0.0's single env on this 2-core CPU (steps/s, resets untimed), measured by
# experiments/sgym_reference.py (it needs Python 3.10, so it is not run here; figures in
# experiments/results/sgym_reference_cpu.json). The batched port is asked to step at least 5x faster than
# Safety-Gymnasium on the same task. Each of our tasks is compared with the level-1 task of the same robot
# and family (the CVPO paper's fixed-layout tasks and the level-2 ones have no exact Safety-Gymnasium twin).
SGYM_SINGLE_ENV_STEPS_PER_S = {
    "SafetyPointGoal1": 919.0, "SafetyCarGoal1": 669.0, "SafetyPointButton1": 199.0,
    "SafetyCarButton1": 183.0, "SafetyPointCircle1": 2161.0, "SafetyCarCircle1": 1078.0,
}
TARGET_FACTOR = 5.0


def sgym_counterpart(name: str) -> tuple[str, float] | None:
    """The Safety-Gymnasium task our task is compared with, and its measured steps/s (None: no counterpart)."""
    robot, _, task = name.partition("_")
    family = task.rstrip("0123456789")
    key = f"Safety{robot.capitalize()}{family.capitalize()}1"
    return (key, SGYM_SINGLE_ENV_STEPS_PER_S[key]) if key in SGYM_SINGLE_ENV_STEPS_PER_S else None


def _parse(argv: list[str]) -> dict:
    from cvpo_jax.cli import parse_options

    opts = parse_options(argv, dict(_DEFAULTS))
    out = {"json": opts["json"]}
    try:
        out["batches"] = [int(b) for b in opts["batches"].split(",") if b]
        out["steps"] = None if opts["steps"] == "auto" else int(opts["steps"])
        out["repeats"] = int(opts["repeats"])
        out["c_steps"] = int(opts["c_steps"])
        out["iterations"] = int(opts["iterations"]) if opts["iterations"] else None
    except ValueError:
        raise ValueError("batches, steps (or auto), repeats, c_steps and iterations take integers (batches "
                         "comma-separated)") from None
    if (not out["batches"] or min(out["batches"]) < 1 or (out["steps"] is not None and out["steps"] < 1)
            or out["repeats"] < 1 or out["c_steps"] < 1):
        raise ValueError("batches, steps, repeats and c_steps must be positive")
    if out["iterations"] is not None and out["iterations"] < 0:
        raise ValueError("iterations must be 0 or more")
    if opts["acting"] not in ("true", "false"):
        raise ValueError(f"acting={opts['acting']}: allowed: true, false")
    out["acting"] = opts["acting"] == "true"
    from cvpo_jax import envs
    from cvpo_jax.envs import velocity

    # Plain-JAX tasks (speed_limit) have no MJCF and no MuJoCo C reference; the velocity tasks (brax's robots)
    # are timed with acting=true only.
    valid = envs.mjx_names() + (sorted(velocity.TASKS) if out["acting"] else [])
    names = valid if opts["envs"] == "all" else [n for n in opts["envs"].split(",") if n]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"unknown env(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(valid)}")
    out["envs"] = names
    return out


def auto_steps(batch: int) -> int:
    """Scan length for a batch: ~20000 env steps per timed call, 20 to 200 steps."""
    return int(min(200, max(20, math.ceil(20000 / batch))))


def mjx_speed(env, batch: int, steps: int, repeats: int = 2, seed: int = 0) -> dict:
    """Compile seconds and env-steps/s (best of `repeats` calls) of `steps` vmapped env steps at `batch`.

    Reset is compiled and run before anything is timed; the rollout is compiled ahead of time (lower +
    compile) so that compile seconds and run seconds are measured apart.
    """
    import jax

    def rollout(state, key):
        def body(state, key):
            action = jax.random.uniform(key, (batch, env.action_size), minval=-1.0, maxval=1.0)
            state = jax.vmap(env.step)(state, action)
            return state, state.reward

        state, rewards = jax.lax.scan(body, state, jax.random.split(key, steps))
        return state, rewards

    t0 = time.perf_counter()
    reset = jax.jit(jax.vmap(env.reset))
    state = jax.block_until_ready(reset(jax.random.split(jax.random.PRNGKey(seed), batch)))
    reset_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = jax.jit(rollout).lower(state, jax.random.PRNGKey(seed)).compile()
    compile_s = time.perf_counter() - t0
    state, _ = jax.block_until_ready(compiled(state, jax.random.PRNGKey(seed + 1)))  # warm-up, untimed
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        state, _ = jax.block_until_ready(compiled(state, jax.random.PRNGKey(seed + 2 + r)))
        times.append(time.perf_counter() - t0)
    run_s = min(times)
    return {"batch": batch, "steps": steps, "repeats": repeats, "reset_compile_and_run_s": reset_s,
            "compile_s": compile_s, "run_s": run_s, "run_s_all": times, "env_steps_per_s": batch * steps / run_s}


def acting_speed(env, batch: int, steps: int, repeats: int = 2, seed: int = 0) -> dict:
    """Env-steps/s of the trainers' acting step (best of `repeats` calls of `steps` steps in one jit), random
    actions, at the task's own episode length, timed as `mjx_speed` times the bare step."""
    import jax

    from cvpo_jax.core.acting import make_acting

    acting = make_acting(env, int(env.episode_length), batch)

    def rollout(envs_state, first_iteration, key):
        def body(carry, offset):
            envs_state, key = carry
            key, act_key, step_key = jax.random.split(key, 3)
            action = jax.random.uniform(act_key, (batch, env.action_size), minval=-1.0, maxval=1.0)
            out = acting.step(envs_state, action, first_iteration + offset, step_key)
            return (out.envs, key), out.finished["episodes"]

        (envs_state, _), episodes = jax.lax.scan(body, (envs_state, key), jax.numpy.arange(steps))
        return envs_state, episodes.sum()

    state = jax.block_until_ready(jax.jit(acting.reset)(jax.random.PRNGKey(seed)))
    t0 = time.perf_counter()
    compiled = jax.jit(rollout).lower(state, 0, jax.random.PRNGKey(seed)).compile()
    compile_s = time.perf_counter() - t0
    state, _ = jax.block_until_ready(compiled(state, 0, jax.random.PRNGKey(seed + 1)))  # warm-up, untimed
    times, episodes = [], 0
    for r in range(repeats):
        t0 = time.perf_counter()
        state, ended = jax.block_until_ready(compiled(state, (r + 1) * steps, jax.random.PRNGKey(seed + 2 + r)))
        times.append(time.perf_counter() - t0)
        episodes += int(ended)
    run_s = min(times)
    return {"acting_compile_s": compile_s, "acting_run_s": run_s, "acting_env_steps_per_s": batch * steps / run_s,
            "acting_episodes_ended": episodes}


def mujoco_c_speed(env, env_steps: int, seed: int = 0) -> dict:
    """Env-steps/s of MuJoCo C on the env's own MJCF, from the env's own reset state (same objects, same
    contact candidates): frame_skip mj_step + one mj_forward per env step, random controls."""
    import jax
    import mujoco
    import numpy as np

    m = env.mj_model
    d = mujoco.MjData(m)
    ps = jax.device_get(jax.jit(env.reset)(jax.random.PRNGKey(seed)).pipeline_state)
    d.qpos[:], d.mocap_pos[:], d.mocap_quat[:] = ps.qpos, ps.mocap_pos, ps.mocap_quat
    rng = np.random.default_rng(seed)
    ctrl = rng.uniform(-1, 1, (env_steps, m.nu))
    mujoco.mj_forward(m, d)
    t0 = time.perf_counter()
    for t in range(env_steps):
        d.ctrl[:] = ctrl[t]
        for _ in range(env.config.frame_skip):
            mujoco.mj_step(m, d)
        mujoco.mj_forward(m, d)
    run_s = time.perf_counter() - t0
    return {"env_steps": env_steps, "run_s": run_s, "env_steps_per_s": env_steps / run_s}


def _machine() -> dict:
    import jax
    import mujoco

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "jax": jax.__version__, "mujoco": mujoco.__version__, "backend": jax.default_backend()}


def main(argv: list[str]) -> int:
    try:
        opts = _parse(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from cvpo_jax import envs

    results = []
    t_start = time.perf_counter()
    bound = opts["iterations"] is not None  # a solver-budget experiment, not the shipped configuration
    overrides = {"iterations": opts["iterations"]} if bound else {}
    if bound:
        print(f"solver iterations overridden to {opts['iterations']} for every task: figures are not the "
              "shipped configuration and are not checked against the 5x target", flush=True)
    for name in opts["envs"]:
        env = envs.make(name, **overrides)
        c = None
        if isinstance(env, envs.SafetyEnv):
            # The reference always steps the shipped MJCF: with no solver iterations MuJoCo C lets the robot
            # fall through the floor (and MJX's cost does not depend on what the contacts do).
            c = mujoco_c_speed(envs.make(name) if bound else env, opts["c_steps"])
            sgym = sgym_counterpart(name)
            print(f"{name}: MuJoCo C single thread {c['env_steps_per_s']:.0f} env-steps/s"
                  + (f"; reference {sgym[0]} (Safety-Gymnasium, one env) {sgym[1]:.0f} steps/s" if sgym else ""),
                  flush=True)
        for batch in opts["batches"]:
            steps = opts["steps"] or auto_steps(batch)
            r = mjx_speed(env, batch, steps, opts["repeats"])
            r["env"] = name
            line = f"{name}: batch {batch:5d}  compile {r['compile_s']:6.1f} s  {r['env_steps_per_s']:9.0f} env-steps/s"
            if c is not None:
                r.update(mujoco_c_env_steps_per_s=c["env_steps_per_s"],
                         ratio_vs_mujoco_c=r["env_steps_per_s"] / c["env_steps_per_s"],
                         sgym_task=sgym[0] if sgym else None,
                         sgym_steps_per_s=sgym[1] if sgym else None,
                         ratio_vs_sgym=r["env_steps_per_s"] / sgym[1] if sgym else None,
                         iterations=env.config.iterations, iterations_overridden=bound,
                         meets_5x_sgym=(bool(r["env_steps_per_s"] >= TARGET_FACTOR * sgym[1])
                                        if sgym and not bound else None))
                verdict = (f"bound at {opts['iterations']} solver iterations" if bound
                           else f"{'meets' if r['meets_5x_sgym'] else 'misses'} 5x")
                versus_sgym = f", {r['ratio_vs_sgym']:.1f}x {sgym[0]}: {verdict}" if sgym else ""
                line += f"  ({r['ratio_vs_mujoco_c']:.2f}x MuJoCo C{versus_sgym})"
            if opts["acting"]:
                r.update(acting_speed(env, batch, steps, opts["repeats"]))
                r["acting_ratio_vs_step"] = r["acting_env_steps_per_s"] / r["env_steps_per_s"]
                line += (f"; acting step {r['acting_env_steps_per_s']:9.0f} env-steps/s "
                         f"({r['acting_ratio_vs_step']:.2f}x the bare step, {r['acting_episodes_ended']} episodes "
                         f"ended in the timed calls)")
            results.append(r)
            print(line, flush=True)
    total_s = time.perf_counter() - t_start
    print(f"total {total_s / 60:.1f} min")
    if opts["json"]:
        with open(opts["json"], "w") as f:
            json.dump({"machine": _machine(), "options": {k: v for k, v in opts.items() if k != "json"},
                       "sgym_single_env_steps_per_s": SGYM_SINGLE_ENV_STEPS_PER_S, "target_factor": TARGET_FACTOR,
                       "total_s": total_s, "results": results}, f, indent=1)
        print(f"wrote {opts['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
