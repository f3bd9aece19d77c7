"""`python -m cvpo_jax.bench gpu`: a cost plan of the training programs on a GPU this machine does not have.

Every figure it prints is a MODEL ESTIMATE, not a measurement. It compiles, without a device, for a named GPU
target (the description ships in `gpu_targets/`; jax's CUDA plugin must be installed: `pip install -e
".[gpu-plan]"`), and prices the optimized program with `hlo_model`:

  (a) the fused update of the algorithm for N vmapped members (`members=1,10`),
  (b) one env step (acting: step, transition, reset) of each task at E environments (`envs=4096`),
  (c) one iteration of the training loop at the GPU preset (E envs per member, U updates per iteration,
      N members), from the compiled chunk,

then estimates the wall time of the paper's run (2.4M env steps per seed) for N seeds. Trip counts of loops
XLA cannot bound are measured where a short CPU run of the same program reports them (MJX's constraint-solver
iterations), else assumed (`unknown_trips=3`) and labelled so.

Options (key=value): target=h100 members=1,10 tasks=point_goal,car_goal envs=4096 parts=update,env,loop
unknown_trips=3 launch_us=4 round_trip_us=10 total_env_steps=2400000 loop_envs=120 loop_updates=16
(the suite's gpu scale: 120 envs x 16 updates per iteration = the authors' 0.133 updates per env step)
json=PATH, and any run option for the update (e.g. cvpo.dual_solver=newton, algo=sac_lag).
"""

from __future__ import annotations

import os
import sys
import time
from importlib import resources

# Compile for the GPU target while running on the CPU: no autotuning (it needs the device), no check of the
# CUDA libraries of a device that is not there. Only effective before jax is imported (the command line);
# a process that already runs jax (the tests) is left as it is.
if "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    if "--xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()

from cvpo_jax.benchmarks import hlo_model  # noqa: E402
from cvpo_jax.config import ConfigError  # noqa: E402

TARGETS = {"h100": "h100_sxm.txtpb"}
PARTS = ("update", "env", "loop")
_DEFAULTS = {"target": "h100", "members": "1,10", "tasks": "point_goal,car_goal", "envs": "4096",
             "parts": ",".join(PARTS), "unknown_trips": "3", "launch_us": "4", "round_trip_us": "10",
             "total_env_steps": "2400000", "loop_envs": "120", "loop_updates": "16", "json": ""}
LABEL = "MODEL ESTIMATE"


class PluginMissing(Exception):
    """jax's CUDA plugin is not installed, so there is no GPU compiler."""


def target_description(name: str) -> str:
    if name not in TARGETS:
        raise ConfigError(f"target={name}: allowed: {', '.join(TARGETS)}")
    return resources.files("cvpo_jax.benchmarks").joinpath("gpu_targets", TARGETS[name]).read_text()


def gpu_device(target: str):
    """The device of a one-GPU topology of `target`, built without a GPU."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=target_description(target),
                                                topology="1x1x1")
    except Exception as e:  # the plugin registers the "cuda" platform; without it there is no such backend
        raise PluginMissing(f"no CUDA compiler ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                            f"install jax's CUDA plugin: pip install -e \".[gpu-plan]\"") from e
    return topology.devices[0]


def compile_for(device, fn, *args):
    """Compile jit(fn) for `device` from the shapes of `args` (arrays or ShapeDtypeStructs); returns the
    optimized HLO text and the compile seconds. Its while loops carry their labels (`labelled_while_loops`)
    only if `fn` is traced here, i.e. built inside that context by the caller."""
    import jax

    sharding = jax.sharding.SingleDeviceSharding(device)
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), args)
    start = time.perf_counter()
    with hlo_model.labelled_while_loops():
        compiled = jax.jit(fn).lower(*specs).compile()
    return compiled.as_text(), time.perf_counter() - start


def _update_program(run_args: list[str], members: int):
    """(fn, args, learner, cfg): the algorithm's fused update vmapped over `members` (what the replay trainer
    runs) and the shapes of its arguments."""
    import jax
    import jax.numpy as jnp

    from cvpo_jax import algorithms, envs
    from cvpo_jax.config import fill_task_presets, load_config
    from cvpo_jax.core.members import SweepMembers
    from cvpo_jax.core.replay import Transition

    cfg = load_config(run_args + [f"num_seeds={members}", "progress=false"], envs.names())
    if algorithms.get(cfg.algo).trainer != algorithms.REPLAY:
        replay_algos = [n for n in algorithms.names() if algorithms.get(n).trainer == algorithms.REPLAY]
        raise ConfigError(f"algo={cfg.algo}: the update part needs a replay learner ({', '.join(replay_algos)})")
    env = envs.make(cfg.env)
    fill_task_presets(cfg, env)
    learner = algorithms.make_trainer(cfg, env).learner
    sweep = SweepMembers.from_config(cfg)
    keys = sweep.keys()
    state = jax.eval_shape(jax.vmap(learner.init), keys)
    n, b, o, a = members, learner.batch_size, env.observation_size, env.action_size
    f32 = jnp.float32
    batch = Transition(obs=jax.ShapeDtypeStruct((n, b, o), f32), action=jax.ShapeDtypeStruct((n, b, a), f32),
                       reward=jax.ShapeDtypeStruct((n, b), f32), cost=jax.ShapeDtypeStruct((n, b), f32),
                       next_obs=jax.ShapeDtypeStruct((n, b, o), f32), terminal=jax.ShapeDtypeStruct((n, b), f32),
                       truncated=jax.ShapeDtypeStruct((n, b), f32), terminated=jax.ShapeDtypeStruct((n, b), f32))
    return jax.vmap(learner.update), (state, batch, sweep.settings(), keys), learner, cfg


def _env_program(task: str, num_envs: int):
    import jax
    import jax.numpy as jnp

    from cvpo_jax import envs
    from cvpo_jax.core.acting import make_acting

    env = envs.make(task)
    acting = make_acting(env, 400, num_envs)  # restarts from the reset pool; its refill is a conditional
    state = jax.eval_shape(acting.reset, jax.random.PRNGKey(0))
    args = (state, jax.ShapeDtypeStruct((num_envs, env.action_size), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32))
    return acting.step, args, env, acting


def _accelerator_program(run_args: list[str]) -> list[str]:
    """Run options that make a CPU run execute the program an accelerator compiles (the E-step's lockstep
    loop, which `cvpo.dual_loop=auto` picks only when compiling for an accelerator)."""
    if any(a.startswith("cvpo.dual_loop=") for a in run_args):
        return run_args
    return run_args + ["cvpo.dual_loop=lockstep"]


def measure_update_trips(run_args: list[str], members: int, updates: int = 4) -> dict[str, float]:
    """Mean trips of each data-dependent loop of the update, from `updates` consecutive updates run on the
    CPU (fresh networks, a replay batch of Gaussian noise as `bench train` uses, warm starts carried)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    trips: dict = {}
    with hlo_model.labelled_while_loops(trips):
        fn, (_, batch_shape, settings, keys), learner, _ = _update_program(_accelerator_program(run_args), members)
        state = jax.jit(jax.vmap(learner.init))(keys)
        rng = np.random.default_rng(0)
        batch = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), batch_shape)
        batch = batch.replace(action=jnp.clip(batch.action, -1.0, 1.0), cost=(batch.cost > 1.0).astype(jnp.float32),
                               terminal=jnp.zeros_like(batch.terminal), truncated=jnp.zeros_like(batch.truncated),
                               terminated=jnp.zeros_like(batch.terminated))
        update = jax.jit(fn)
        for i in range(updates):
            state, _ = update(state, batch, settings, jax.random.split(jax.random.PRNGKey(i), members))
        jax.block_until_ready(state)
    return hlo_model.mean_trips(trips)


def measure_env_trips(task: str, num_envs: int, steps: int = 4) -> dict[str, float]:
    """Mean trips of each data-dependent loop of the env step (MJX's constraint solver), from `steps` steps of
    `num_envs` envs on the CPU with random actions after a reset (in lockstep: the slowest env's count)."""
    import jax
    import jax.numpy as jnp

    trips: dict = {}
    with hlo_model.labelled_while_loops(trips):
        _, _, env, acting = _env_program(task, num_envs)
        state = jax.jit(acting.reset)(jax.random.PRNGKey(0))
        step = jax.jit(acting.step)
        key = jax.random.PRNGKey(1)
        for i in range(steps + 1):
            if i == 1:
                trips.clear()  # the first step follows the reset
            key, act_key, reset_key = jax.random.split(key, 3)
            action = jax.random.uniform(act_key, (num_envs, env.action_size), minval=-1.0, maxval=1.0)
            state = step(state, action, jnp.int32(i), reset_key).envs
        jax.block_until_ready(state)
    return hlo_model.mean_trips(trips)


def _loop_program(run_args: list[str], members: int, loop_envs: int, loop_updates: int):
    """The compiled chunk of the replay trainer (iterations_per_chunk iterations of env step + U updates)."""
    import jax

    from cvpo_jax import algorithms, envs
    from cvpo_jax.config import fill_task_presets, load_config
    from cvpo_jax.core.members import SweepMembers

    chunk_iterations = 4
    # The steady loop: without the random warm-up there is no warm-up burst (a `lax.cond` whose costly branch,
    # warm-up/2 updates, runs once per run; the model would price it at every iteration). Its cost is added
    # to the run's estimate apart.
    cfg = load_config(run_args + [f"num_seeds={members}", f"num_envs={loop_envs}",
                                  f"updates_per_iteration={loop_updates}", "warmup_env_steps=0",
                                  f"chunk_env_steps={chunk_iterations * loop_envs}", "progress=false"], envs.names())
    env = envs.make(cfg.env)
    fill_task_presets(cfg, env)
    trainer = algorithms.make_trainer(cfg, env)
    sweep = SweepMembers.from_config(cfg)
    state = jax.eval_shape(trainer.init, sweep.keys())
    first = jax.ShapeDtypeStruct((), jax.numpy.int32)
    # run_chunk is jit(vmap(chunk)); lowering the jitted function with the GPU device's shapes compiles it.
    return trainer.run_chunk, (state, sweep.settings(), first), cfg, chunk_iterations


def _refill_odds(refill_period: int) -> dict[str, float]:
    """The acting step's conditional (the reset pool's refill) runs its costly branch once per refill period;
    priced as taken every step, it would charge a full vmapped reset to each env step."""
    return {"acting.py:make_acting.<locals>.step": 1.0 / refill_period}


def _fmt_row(values: list, widths: list[int]) -> str:
    return " ".join(f"{v:>{w}}" for v, w in zip(values, widths))


def plan(options: dict, run_args: list[str], out=print) -> dict:
    from cvpo_jax import envs
    from cvpo_jax.config import load_config, warmup_updates
    from cvpo_jax.core.acting import refill_period_for

    pricing = hlo_model.Pricing(launch_us=float(options["launch_us"]), round_trip_us=float(options["round_trip_us"]))
    unknown = float(options["unknown_trips"])
    device = gpu_device(options["target"])
    parts = options["parts"].split(",")
    members_list = [int(m) for m in options["members"].split(",")]
    result: dict = {"label": LABEL, "target": str(device.device_kind), "pricing": pricing.__dict__,
                    "unknown_trips": unknown}
    out(f"{LABEL}S for {device.device_kind}, from a deviceless compile on this CPU; nothing here ran on a GPU.")
    out(f"Pricing: {pricing.launch_us:g} us per kernel launch, {pricing.round_trip_us:g} us per host round trip "
        f"(each condition read of a data-dependent while loop, each conditional), FP32 peak "
        f"{pricing.peak_flops / 1e12:g} TFLOP/s, {pricing.bandwidth / 1e12:g} TB/s; estimate = launch-bound + "
        f"max(FLOP-bound, byte-bound). Loops XLA cannot bound: {unknown:g} trips unless measured.")
    widths = [8, 9, 7, 5, 8, 8, 9, 9, 9, 7]
    header = ["members", "launches", "r-trips", "conds", "GFLOP", "MB", "launch ms", "FLOP ms", "est. ms", "x 1 mem"]

    update_estimates: dict[int, float] = {}
    update_trips: dict[int, dict] = {}
    if "update" in parts:
        out(f"\n(a) fused update, options: {' '.join(run_args) or '(defaults)'}")
        out(_fmt_row(header, widths))
        result["update"] = []
        for n in members_list:
            trips = measure_update_trips(run_args, n)
            update_trips[n] = trips
            fn, args, _, cfg = _update_program(run_args, n)
            text, seconds = compile_for(device, fn, *args)
            counts = hlo_model.count_launches(hlo_model.HloModule.parse(text), trips, unknown_trips=unknown)
            s = hlo_model.summary(counts, pricing)
            update_estimates[n] = s["estimate_ms"]
            ratio = s["estimate_ms"] / update_estimates[members_list[0]]
            out(_fmt_row([n, s["launches"], s["round_trips"], s["conditionals"], f"{s['flops'] / 1e9:.2f}",
                          f"{s['bytes'] / 1e6:.0f}", f"{s['launch_bound_ms']:.2f}", f"{s['flop_bound_ms']:.3f}",
                          f"{s['estimate_ms']:.2f}", f"{ratio:.2f}"], widths))
            result["update"].append({"members": n, "compile_s": seconds, "measured_trips": trips, **s})
        out("  its loops (largest N): source | trips per execution (known: from XLA; measured: mean of 4 updates "
            "run on this CPU, lockstep) | launches per trip | executions per update")
        for loop in counts.loops:
            kind = "known" if loop.known else ("assumed" if loop.assumed else "measured")
            out(f"    {loop.source[:70]:70s} {loop.trips:5.1f} {kind:8s} {loop.launches_per_trip:5d} "
                f"{loop.executions:6.1f}")

    env_estimates: dict[str, float] = {}
    env_trips: dict[str, dict] = {}
    if "env" in parts:
        e = int(options["envs"])
        out(f"\n(b) one env step (step + transition + reset) at {e} envs")
        out(_fmt_row(["task", "solver it", "launches", "r-trips", "GFLOP", "MB", "est. ms", "env-steps/s"],
                     [11, 9, 9, 7, 8, 8, 8, 12]))
        result["env"] = []
        for task in options["tasks"].split(","):
            trips = measure_env_trips(task, min(e, 256))
            env_trips[task] = trips
            solver = sum(v for k, v in trips.items() if "solver" in k)
            fn, args, _, acting = _env_program(task, e)
            text, seconds = compile_for(device, fn, *args)
            counts = hlo_model.count_launches(hlo_model.HloModule.parse(text), trips, unknown_trips=unknown,
                                              costly_branch_odds=_refill_odds(acting.refill_period))
            s = hlo_model.summary(counts, pricing)
            env_estimates[task] = s["estimate_ms"]
            out(_fmt_row([task, f"{solver:.2f}", s["launches"], s["round_trips"], f"{s['flops'] / 1e9:.2f}",
                          f"{s['bytes'] / 1e6:.0f}", f"{s['estimate_ms']:.2f}",
                          f"{e / (s['estimate_ms'] / 1e3):.0f}"], [11, 9, 9, 7, 8, 8, 8, 12]))
            result["env"].append({"task": task, "envs": e, "measured_trips": trips, "compile_s": seconds, **s})
        out(f"  'solver it': trips of MJX's constraint-solver loop per physics step, measured on this CPU "
            f"({min(e, 256)} envs in lockstep, 4 steps of random actions after a reset).")

    if "loop" in parts:
        total = float(options["total_env_steps"])
        e, u = int(options["loop_envs"]), int(options["loop_updates"])
        out(f"\n(c) the training loop at {e} envs per member and {u} updates per iteration "
            f"({u / e:.3f} updates per env step), {total:.3g} env steps per seed")
        out(_fmt_row(["members", "launches/it", "r-trips/it", "est. ms/it", "iterations", "est. minutes"],
                     [8, 12, 11, 11, 11, 13]))
        result["loop"] = []
        for n in members_list:
            fn, args, cfg, chunk_iterations = _loop_program(run_args, n, e, u)
            trips = {**(update_trips.get(n) or measure_update_trips(run_args, n)),
                     **(env_trips.get(cfg.env) or measure_env_trips(cfg.env, min(e * n, 256)))}
            text, seconds = compile_for(device, fn, *args)
            refill_period = refill_period_for(envs.make(cfg.env), int(cfg.episode_length), cfg.reset_refill_period)
            counts = hlo_model.count_launches(hlo_model.HloModule.parse(text), trips, unknown_trips=unknown,
                                              costly_branch_odds=_refill_odds(refill_period))
            per_iteration = hlo_model.LaunchCount()
            per_iteration.add(counts, 1.0 / chunk_iterations)
            s = hlo_model.summary(per_iteration, pricing)
            iterations = total / e
            burst = warmup_updates(load_config(run_args, envs.names()))
            burst_s = burst * update_estimates.get(n, s["estimate_ms"] / u) / 1e3
            minutes = (iterations * s["estimate_ms"] / 1e3 + burst_s) / 60
            out(_fmt_row([n, s["launches"], s["round_trips"], f"{s['estimate_ms']:.2f}", f"{iterations:.0f}",
                          f"{minutes:.1f}"], [8, 12, 11, 11, 11, 13]))
            result["loop"].append({"members": n, "envs_per_member": e, "updates_per_iteration": u,
                                   "iterations": iterations, "warmup_burst_updates": burst,
                                   "estimated_minutes": minutes, "compile_s": seconds,
                                   **{k: v for k, v in s.items() if k != "loops"}})
        out(f"  env: {cfg.env}; the steady loop (one chunk of {chunk_iterations} iterations compiled), plus the "
            f"warm-up burst of updates priced at the update's estimate; evaluation episodes and checkpoints are "
            f"not included. Per iteration: one env step of every member's envs, then the updates.")
    return result


def main(argv: list[str]) -> int:
    options = dict(_DEFAULTS)
    run_args = []
    try:
        for arg in argv:
            key, sep, value = arg.partition("=")
            if not sep:
                raise ConfigError(f"argument {arg!r} is not of the form key=value (e.g. members=1,10)")
            if key in options:
                options[key] = value
            else:
                run_args.append(arg)
        for part in options["parts"].split(","):
            if part not in PARTS:
                raise ConfigError(f"parts: unknown part {part!r}; allowed: {', '.join(PARTS)}")
        for key in ("members", "envs", "loop_envs", "loop_updates"):
            values = [int(v) for v in options[key].split(",")]
            if any(v < 1 for v in values):
                raise ConfigError(f"{key}={options[key]}: must be positive integers")
        for key in ("unknown_trips", "launch_us", "round_trip_us", "total_env_steps"):
            if float(options[key]) < 0:
                raise ConfigError(f"{key}={options[key]}: must be >= 0")
        target_description(options["target"])
        if not any(a.startswith("env=") for a in run_args):
            run_args = ["env=point_goal"] + run_args
        from cvpo_jax import envs
        from cvpo_jax.config import load_config

        load_config(run_args, envs.names())  # validate the run options before compiling anything
        for task in options["tasks"].split(","):
            if task not in envs.names():
                raise ConfigError(f"tasks: unknown task {task!r}; allowed: {', '.join(envs.names())}")
        result = plan(options, run_args)
    except (ValueError, ConfigError, PluginMissing) as e:  # bad option or no CUDA compiler: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    if options["json"]:
        with open(options["json"], "w") as f:
            f.write(hlo_model.dumps({"options": options, "run_args": run_args, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
