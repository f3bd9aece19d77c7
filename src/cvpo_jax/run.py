"""`python -m cvpo_jax.run env=point_goal [key=value ...]`: train and write a run directory.

The run directory holds config.yaml (the resolved configuration), metrics.csv (one row per evaluation and
member), TensorBoard events (tb/), orbax checkpoints (checkpoints/) and, at the end, curves.png.
`resume=<run dir>` continues from the last checkpoint; `print_config=true` prints the resolved
configuration and exits. Bad options exit with code 2 and one line on stderr.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from cvpo_jax.config import ConfigError, RunConfig, fill_task_presets, from_yaml_file, load_config, to_yaml

USAGE = """usage: python -m cvpo_jax.run [key=value ...]
  env=point_goal            task (python -c 'import cvpo_jax.envs as e; print(e.names())')
  algo=cvpo                 the algorithm (listed below)
  num_seeds=4               seeds trained side by side in one program
  cvpo.kl_bound=0.05        nested keys reach the algorithm settings
  sweep.cost_limits=[5,10]  cost limits trained side by side (crossed with the seeds)
  resume=runs/<dir>         continue a run from its last checkpoint
  print_config=true         print the resolved configuration and exit
All keys and their defaults: python -m cvpo_jax.run print_config=true"""


def usage() -> str:
    from cvpo_jax import algorithms

    rows = [f"  {a.name:<10} {a.trainer:<8} {a.summary}" for a in algorithms.ALGORITHMS.values()]
    return USAGE + "\nAlgorithms (algo=, then its trainer):\n" + "\n".join(rows)


class RunError(RuntimeError):
    """A run cannot go on; the message is one line for the user (exit code 1)."""


def _env_names() -> list[str]:
    from cvpo_jax import envs

    return list(envs.names())


def resolve(argv: Sequence[str]) -> RunConfig:
    """Parse, resume-merge, fill the task presets (episode length, cost limit) and validate."""
    names = _env_names()
    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    base = None
    if resume:
        saved = os.path.join(resume, "config.yaml")
        if not os.path.isfile(saved):
            raise ConfigError(f"resume={resume}: no config.yaml there; give a run directory made by cvpo_jax.run")
        base = from_yaml_file(saved)
    cfg = load_config(argv, names, base=base)
    if cfg.episode_length is None or cfg.cost_limit is None or cfg.csc.cost_units is None:
        from cvpo_jax import envs

        fill_task_presets(cfg, envs.make(cfg.env))
    return cfg


def _run_dir(cfg: RunConfig) -> str:
    if cfg.resume:
        return cfg.resume
    name = cfg.run_name or f"{cfg.env}-{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = os.path.join(cfg.out_dir, name)
    if os.path.exists(os.path.join(path, "config.yaml")):
        raise ConfigError(f"run_name={name}: {path} already holds a run; resume=<dir> continues it")
    return path


def train(cfg: RunConfig, run_dir: Optional[str] = None) -> str:
    """Train as configured and return the run directory. Raises RunError on a non-finite update."""
    import jax

    from cvpo_jax import checkpoint, envs, plots
    from cvpo_jax.algorithms import make_trainer
    from cvpo_jax.core.members import SweepMembers
    from cvpo_jax.metrics_log import MetricsLog

    run_dir = run_dir or _run_dir(cfg)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))

    env = envs.make(cfg.env)
    trainer = make_trainer(cfg, env)
    schedule = trainer.schedule
    members = SweepMembers.from_config(cfg)
    num_members, limits = members.size, list(members.cost_limits)

    state = trainer.init(members.keys())
    state, settings = _shard(cfg, state, members.settings(), num_members)

    iteration = 0
    latest = checkpoint.latest_iteration(run_dir)
    if latest is not None:
        try:
            state = checkpoint.restore(run_dir, latest, state)
        except checkpoint.CheckpointMismatch as e:
            raise ConfigError(str(e)) from None
        iteration = latest
    log = MetricsLog(run_dir, num_members, resume_from_env_steps=iteration * cfg.num_envs)

    steps_per_iteration = cfg.num_envs
    eval_every = max(1, cfg.eval_every_env_steps // steps_per_iteration)
    ckpt_every = max(1, cfg.checkpoint_every_env_steps // steps_per_iteration)
    next_eval = (iteration // eval_every + 1) * eval_every
    next_ckpt = (iteration // ckpt_every + 1) * ckpt_every

    progress = _progress_bar(cfg, num_members, schedule.total_iterations * steps_per_iteration,
                             iteration * steps_per_iteration)
    last_summary: dict[str, float] = {}
    period: dict[str, list] = {}

    def log_evaluation(iteration: int) -> None:
        """Evaluate and write one row per member with the training metrics of the period since the last one."""
        evaluation = to_host(trainer.evaluate(state.learner.params, members.eval_keys(iteration)))
        log.write(iteration * steps_per_iteration, evaluation, _mean_period(period), limits)
        last_summary.update(reward=float(np.mean(evaluation["eval/episode_reward"])),
                            cost=float(np.mean(evaluation["eval/episode_cost"])))
        period.clear()

    start_time, start_iteration = time.time(), iteration
    try:
        if iteration == 0:
            log_evaluation(0)  # the untrained policy
        while iteration < schedule.total_iterations:
            state, metrics = trainer.run_chunk(state, settings, np.int32(iteration))
            metrics = to_host(metrics)
            nonfinite = np.ravel(metrics.pop("nonfinite"))  # [N], one flag per member
            if nonfinite.any():
                bad = "; ".join(label for label, flag in zip(members.labels(), nonfinite) if flag)
                kept = (f"the last good checkpoint in {run_dir}/checkpoints stays"
                        if checkpoint.latest_iteration(run_dir) is not None else "no checkpoint had been saved yet")
                raise RunError(
                    f"non-finite loss or parameter in the chunk ending at env step "
                    f"{(iteration + schedule.iterations_per_chunk) * steps_per_iteration} ({bad}); "
                    f"stopped without saving it; {kept} (experiments/find_nonfinite.py run={run_dir} finds the "
                    f"update)")
            iteration += schedule.iterations_per_chunk
            for k, v in metrics.items():
                period.setdefault(k, []).append(v)
            log.tensorboard(iteration * steps_per_iteration, metrics)
            done = iteration >= schedule.total_iterations
            # The row of an evaluation is written before the checkpoint of the same step, so a run resumed
            # from a checkpoint has every row up to it (and MetricsLog drops only the rows after it).
            if iteration >= next_eval or done:
                log_evaluation(iteration)
                next_eval = (iteration // eval_every + 1) * eval_every
            if iteration >= next_ckpt or done:
                checkpoint.save(run_dir, iteration, state, keep=cfg.checkpoints_kept)
                next_ckpt = (iteration // ckpt_every + 1) * ckpt_every
            elapsed = time.time() - start_time
            rate = (iteration - start_iteration) * steps_per_iteration * num_members / max(elapsed, 1e-9)
            progress.update(schedule.iterations_per_chunk * steps_per_iteration)
            progress.set_postfix(env_steps_per_s=f"{rate:.0f}", **{k: f"{v:.2f}" for k, v in last_summary.items()})
    finally:
        progress.close()
        log.close()
    plots.plot_curves(os.path.join(run_dir, "metrics.csv"), os.path.join(run_dir, "curves.png"),
                      title=f"{cfg.algo} on {cfg.env}")
    jax.block_until_ready(state)
    return run_dir


def _mean_period(period: dict[str, list]) -> dict[str, np.ndarray]:
    """Training metrics since the last evaluation, per member: episode sums over counts; the update metrics
    averaged over the chunks weighted by their updates (a chunk of the random warm-up has none, and its zeros
    would otherwise pull the period's means down)."""
    if not period:
        return {}
    summed = {k: np.sum(np.stack(v), axis=0) for k, v in period.items() if k.startswith("train/")}
    weights = np.stack(period["train/updates"]).astype(np.float64)  # [chunks, N]
    total = np.sum(weights, axis=0)
    out = {k: np.where(total > 0, np.sum(np.stack(v) * weights, 0) / np.maximum(total, 1), np.mean(np.stack(v), 0))
           for k, v in period.items() if not k.startswith("train/")}
    # A period in which no training episode ended (the short last one before the final evaluation) has no
    # episode means: nan, not 0, which would read as an episode that cost nothing.
    finished = np.asarray(summed["train/episodes"])
    per_episode = lambda total: np.where(finished > 0, total / np.maximum(finished, 1), np.nan)  # noqa: E731
    out["train/episode_reward"] = per_episode(summed["train/episode_reward"])
    out["train/episode_cost"] = per_episode(summed["train/episode_cost"])
    out["train/episodes"] = summed["train/episodes"]
    out["train/episode_length"] = per_episode(summed["train/episode_length"])
    # The fraction of the period's episodes that the task ended (a death, a fall) before the time limit.
    out["train/terminated"] = per_episode(summed["train/terminations"])
    out["train/reused_resets"] = summed["train/reused_resets"]
    out["train/updates"] = summed["train/updates"]
    return out


def _shard(cfg: RunConfig, state, settings, num_members: int):
    """Place the member axis across `devices` accelerators; XLA partitions the vmapped chunk to match."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if cfg.devices == 1:
        return state, settings
    available = jax.devices()
    if cfg.devices > len(available):
        raise ConfigError(f"devices={cfg.devices}: only {len(available)} device(s) visible to JAX")
    if num_members % cfg.devices:
        raise ConfigError(f"devices={cfg.devices}: the {num_members} sweep members must divide evenly")
    mesh = Mesh(np.array(available[: cfg.devices]), ("members",))
    sharding = NamedSharding(mesh, PartitionSpec("members"))
    return jax.device_put(state, sharding), jax.device_put(settings, sharding)


def _progress_bar(cfg: RunConfig, num_members: int, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not cfg.progress, dynamic_ncols=True,
                desc=f"{cfg.env} x{num_members}", file=sys.stderr)


def to_host(metrics: dict) -> dict[str, np.ndarray]:
    import jax

    return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    try:
        cfg = resolve(argv)
        if cfg.print_config:
            print(to_yaml(dataclasses.replace(cfg, print_config=False)), end="")
            return 0
        run_dir = _run_dir(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg, run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; resume with: python -m cvpo_jax.run resume={run_dir}", file=sys.stderr)
        return 130
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
