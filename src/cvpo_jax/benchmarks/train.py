"""`python -m cvpo_jax.bench train`: the update and the whole training loop of each algorithm, timed.

At the paper's configuration (B 300, K 32, M 6, 256×256) on `point_goal` it prints the time of one update
split into critic step, E-step and M-step, updates/s, the env-steps/s of the whole jitted loop (acting +
replay + updates at the configured ratio), and the same for several `num_seeds` (time per seed-update).
The phase timings run on replay batches of Gaussian noise (their cost does not depend on the data, except
the E-step's iteration count, which is reported); the loop timing runs the real task.

Other algorithms (`algos=cvpo,sac_lag,ppo_lag,...`, default cvpo) print the same table: the off-policy
baselines time their fused update on the same noise batch (no phases), the on-policy ones (whose update needs
a rollout) only the loop. The loop column is comparable across all of them: env-steps/s of acting and
learning at each method's own settings.

Options (key=value): algos=cvpo  seeds=1,4,16  repeats=5  chunk_env_steps=160  json=PATH, and any run option
(e.g. env=point_goal cvpo.num_particles=64).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cvpo_jax.config import ConfigError, fill_task_presets, load_config

BENCH_KEYS = {"algos", "seeds", "repeats", "json"}


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _timed_compile(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def bench_seeds(run_args: list[str], num_seeds: int, repeats: int) -> dict:
    from cvpo_jax import algorithms, envs
    from cvpo_jax.core.members import SweepMembers

    cfg = load_config(run_args + [f"num_seeds={num_seeds}", "progress=false"], envs.names())
    env = envs.make(cfg.env)
    fill_task_presets(cfg, env)  # as run does: csc converts episodic costs with cfg.episode_length
    trainer = algorithms.make_trainer(cfg, env)
    members = SweepMembers.from_config(cfg)
    settings, keys = members.settings(), members.keys()
    result: dict = {"algo": cfg.algo, "num_seeds": num_seeds}
    if algorithms.get(cfg.algo).trainer == algorithms.REPLAY:
        result.update(_time_updates(cfg, env, trainer.learner, settings, keys, repeats))
    result.update(_time_loop(cfg, trainer, settings, keys, repeats))
    return result


def _time_updates(cfg, env, learner, settings, keys, repeats: int) -> dict:
    """The replay learners' update on a noise batch; CVPO's also split into its three phases."""
    from cvpo_jax.core.replay import Transition

    n, b = keys.shape[0], learner.batch_size
    init_learner = jax.jit(jax.vmap(learner.init))
    learner_state = init_learner(keys)
    rng = np.random.default_rng(0)
    batch = Transition(
        obs=jnp.asarray(rng.normal(size=(n, b, env.observation_size)), jnp.float32),
        action=jnp.asarray(rng.uniform(-1, 1, size=(n, b, env.action_size)), jnp.float32),
        reward=jnp.asarray(rng.normal(size=(n, b)), jnp.float32),
        cost=jnp.asarray(rng.uniform(size=(n, b)) < 0.1, jnp.float32),
        next_obs=jnp.asarray(rng.normal(size=(n, b, env.observation_size)), jnp.float32),
        terminal=jnp.zeros((n, b)), truncated=jnp.zeros((n, b)), terminated=jnp.zeros((n, b)))
    update_keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(n))

    full = jax.jit(jax.vmap(learner.update))
    phases = {"update": lambda: full(learner_state, batch, settings, update_keys)}
    result: dict = {}
    if cfg.algo == "cvpo":  # timed phase by phase too
        from cvpo_jax.cvpo import make_cvpo

        cvpo_phases = make_cvpo(cfg, env.observation_size, env.action_size)[1]
        critic = jax.jit(jax.vmap(cvpo_phases.critic_step))
        estep = jax.jit(jax.vmap(cvpo_phases.estep_step))
        targets, _, _, solution = estep(learner_state, batch, settings, update_keys)
        mstep = jax.jit(jax.vmap(cvpo_phases.mstep_step))
        phases = {
            "critic": lambda: critic(learner_state, batch, update_keys),
            "estep": lambda: estep(learner_state, batch, settings, update_keys),
            "mstep": lambda: mstep(learner_state, targets),
            **phases,
        }
        result["estep_iterations"] = float(np.mean(solution.iterations))
    for name, fn in phases.items():
        result[f"{name}_compile_s"] = _timed_compile(fn)
        result[f"{name}_ms"] = 1e3 * _median_time(fn, repeats)
    result["updates_per_s"] = n / (result["update_ms"] / 1e3)
    result["ms_per_seed_update"] = result["update_ms"] / n
    return result


def _time_loop(cfg, trainer, settings, keys, repeats: int) -> dict:
    n = keys.shape[0]
    result: dict = {}
    # The whole loop: one chunk of acting + replay + updates after the warm-up, on the real task.
    state = trainer.init(keys)
    # Past the warm-up and past the burst of updates at its last iteration: the steady loop.
    first = np.int32(trainer.schedule.warmup_iterations + 1)
    start = time.perf_counter()
    state, _ = trainer.run_chunk(state, settings, first)
    jax.block_until_ready(state)
    result["loop_compile_s"] = time.perf_counter() - start
    chunk_steps = trainer.schedule.iterations_per_chunk * cfg.num_envs
    times = []
    for _ in range(max(1, repeats // 2)):
        start = time.perf_counter()
        state, metrics = trainer.run_chunk(state, settings, first)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    loop_s = float(np.median(times))
    result["loop_env_steps_per_s"] = n * chunk_steps / loop_s
    # Gradient updates as each trainer counts them (replay updates; one per rollout for on-policy methods).
    result["loop_updates_per_s"] = float(np.sum(metrics["train/updates"])) / loop_s
    result["loop_config"] = {"num_envs": cfg.num_envs, "updates_per_iteration": cfg.updates_per_iteration,
                             "chunk_env_steps": chunk_steps}
    return result


def main(argv: list[str]) -> int:
    options = dict(a.split("=", 1) for a in argv if "=" in a and a.split("=", 1)[0] in BENCH_KEYS)
    run_args = [a for a in argv if not ("=" in a and a.split("=", 1)[0] in BENCH_KEYS)]
    try:
        seeds = [int(s) for s in options.get("seeds", "1,4,16").split(",")]
        algos = [a for a in options.get("algos", "cvpo").split(",") if a]
        if any(a.startswith("algo=") for a in run_args):
            raise ConfigError("give the algorithms as algos=cvpo,sac_lag,... (algo= is not a bench option)")
        repeats = int(options.get("repeats", "5"))
        if not run_args or not any(a.startswith("env=") for a in run_args):
            run_args = ["env=point_goal"] + run_args
        if not any(a.startswith("chunk_env_steps=") for a in run_args):
            run_args.append("chunk_env_steps=160")
        from cvpo_jax import envs

        for algo in algos:  # validate before compiling anything
            load_config(run_args + [f"algo={algo}"], envs.names())
        if any(s < 1 for s in seeds) or repeats < 1:
            raise ConfigError("seeds and repeats must be positive integers, e.g. seeds=1,4,16 repeats=5")
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"Update and loop of {', '.join(algos)} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
          f"options: {' '.join(run_args)}")
    header = (f"{'algo':>8} {'seeds':>5} {'critic ms':>10} {'E-step ms':>10} {'M-step ms':>10} {'update ms':>10} "
              f"{'ms/seed-upd':>11} {'updates/s':>10} {'E-it':>5} {'loop env-st/s':>13} {'loop upd/s':>10} "
              f"{'compile s':>9}")
    print(header)
    results = []
    nan = float("nan")
    for algo in algos:
        for n in seeds:
            r = bench_seeds(run_args + [f"algo={algo}"], n, repeats)
            results.append(r)
            g = lambda k: r.get(k, nan)  # noqa: E731 - columns an algorithm does not have print as nan
            compile_s = r.get("update_compile_s", 0.0) + r["loop_compile_s"]
            print(f"{algo:>8} {n:>5} {g('critic_ms'):>10.2f} {g('estep_ms'):>10.2f} {g('mstep_ms'):>10.2f} "
                  f"{g('update_ms'):>10.2f} {g('ms_per_seed_update'):>11.2f} {g('updates_per_s'):>10.1f} "
                  f"{g('estep_iterations'):>5.1f} {r['loop_env_steps_per_s']:>13.0f} {r['loop_updates_per_s']:>10.1f} "
                  f"{compile_s:>9.1f}", flush=True)
    print("Phases are timed alone (each its own jitted call); 'update' is the fused step, so it is not their sum.")
    if "json" in options:
        with open(options["json"], "w") as f:
            json.dump({"device": str(jax.devices()[0]), "options": run_args, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
