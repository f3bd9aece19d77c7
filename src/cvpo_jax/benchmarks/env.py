"""Env stepping speed: the MJX port (jitted, vmapped, lax.scan over steps) vs single-threaded MuJoCo C.

    python -m cvpo_jax.bench env [envs=point_goal,car_goal] [batches=1,64,1024] [steps=100] [json=out.json]

For each env and batch size: compile time of the rollout (`steps` vmapped env steps with random actions in
one jit, lax.scan over steps), then env-steps/s of a second call (batch * steps / seconds; reset is not
timed). Reference: the same MJCF stepped by
`mujoco.mj_step` in a Python loop (10 physics steps + one mj_forward per env step, as Safety-Gym does),
single-threaded, float64, random controls; reported with the ratio MJX / MuJoCo C.
"""

from __future__ import annotations

import json
import sys
import time

_DEFAULTS = {"envs": "all", "batches": "1,64,1024", "steps": "100", "c_steps": "2000", "json": ""}


def _parse(argv: list[str]) -> dict:
    opts = dict(_DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in opts:
            raise ValueError(f"bad option {arg!r}; use key=value with keys {', '.join(opts)}")
        opts[key] = value
    out = {"json": opts["json"]}
    try:
        out["batches"] = [int(b) for b in opts["batches"].split(",") if b]
        out["steps"] = int(opts["steps"])
        out["c_steps"] = int(opts["c_steps"])
    except ValueError:
        raise ValueError("batches, steps and c_steps take integers (batches comma-separated)") from None
    if not out["batches"] or min(out["batches"]) < 1 or out["steps"] < 1 or out["c_steps"] < 1:
        raise ValueError("batches, steps and c_steps must be positive")
    from cvpo_jax import envs

    names = envs.names() if opts["envs"] == "all" else [n for n in opts["envs"].split(",") if n]
    unknown = [n for n in names if n not in envs.names()]
    if unknown or not names:
        raise ValueError(f"unknown env(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(envs.names())}")
    out["envs"] = names
    return out


def mjx_speed(env, batch: int, steps: int, seed: int = 0) -> dict:
    """Compile seconds and env-steps/s of `steps` vmapped env steps at `batch` (reset not timed)."""
    import jax

    def rollout(state, key):
        def body(state, key):
            action = jax.random.uniform(key, (batch, env.action_size), minval=-1.0, maxval=1.0)
            state = jax.vmap(env.step)(state, action)
            return state, state.reward

        state, rewards = jax.lax.scan(body, state, jax.random.split(key, steps))
        return state, rewards

    reset = jax.jit(jax.vmap(env.reset))
    state = jax.block_until_ready(reset(jax.random.split(jax.random.PRNGKey(seed), batch)))
    t0 = time.perf_counter()
    compiled = jax.jit(rollout).lower(state, jax.random.PRNGKey(seed)).compile()
    compile_s = time.perf_counter() - t0
    state, _ = jax.block_until_ready(compiled(state, jax.random.PRNGKey(seed + 1)))  # warm-up run
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state, jax.random.PRNGKey(seed + 2)))
    run_s = time.perf_counter() - t0
    return {"batch": batch, "steps": steps, "compile_s": compile_s, "run_s": run_s,
            "env_steps_per_s": batch * steps / run_s}


def mujoco_c_speed(env, env_steps: int, seed: int = 0) -> dict:
    """Env-steps/s of MuJoCo C on the env's own MJCF: frame_skip mj_step + one mj_forward per env step."""
    import mujoco
    import numpy as np

    m = env.mj_model
    d = mujoco.MjData(m)
    rng = np.random.default_rng(seed)
    # Put the objects where a reset would (robot at the origin, objects spread on a line) so that the C
    # model tests the same contact pairs; placement details do not matter for speed.
    d.mocap_pos[:, :2] = np.stack([np.linspace(-1.5, 1.5, m.nmocap), np.full(m.nmocap, 1.0)], 1)
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


def main(argv: list[str]) -> int:
    try:
        opts = _parse(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from cvpo_jax import envs

    results = []
    for name in opts["envs"]:
        env = envs.make(name)
        c = mujoco_c_speed(env, opts["c_steps"])
        print(f"{name}: MuJoCo C single thread {c['env_steps_per_s']:.0f} env-steps/s", flush=True)
        for batch in opts["batches"]:
            r = mjx_speed(env, batch, opts["steps"])
            r.update(env=name, mujoco_c_env_steps_per_s=c["env_steps_per_s"],
                     ratio_vs_mujoco_c=r["env_steps_per_s"] / c["env_steps_per_s"])
            results.append(r)
            print(f"{name}: batch {batch:5d}  compile {r['compile_s']:6.1f} s  {r['env_steps_per_s']:9.0f} "
                  f"env-steps/s  ({r['ratio_vs_mujoco_c']:.2f}x MuJoCo C)", flush=True)
    if opts["json"]:
        with open(opts["json"], "w") as f:
            json.dump({"results": results}, f, indent=1)
        print(f"wrote {opts['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
