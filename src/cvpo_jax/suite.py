"""`python -m cvpo_jax.suite [tasks=...] [algos=...] [scale=cpu|paper|gpu] [out=runs/suite] [key=value ...]`:
the CVPO paper's experiment grid, resumable, and its figures and table.

One run per (task, algorithm), its seeds a vmapped axis in one program (`<out>/<task>-<algo>/`, an ordinary
run directory, whose command.txt gets the suite command, the commit and the wall time of every invocation that
trained it). Given the same command again, a suite interrupted anywhere (process killed, machine stopped)
skips the finished runs (`done.txt`), continues an unfinished one from its last checkpoint and starts the rest.
Other `key=value` options go to every run (as `python -m cvpo_jax.run`), after the scale's settings.

Then it writes, under `<out>/report/`:
- `curves_<task>.png`: evaluation reward and cost (limit drawn), training episode cost and the cumulative
  training cost against env steps, per algorithm, mean ± std over seeds (the paper's Figs. 2-3; on the traps
  tasks, CSC's Fig. 3: cost = failures);
- `reward_vs_cumulative_cost.png`: evaluation reward against cumulative training cost, log x (Fig. 4);
- `convergence_cost_boxplot.png`: the evaluation cost of the last 20% of training, all seeds, per algorithm
  and task, the limit drawn (Fig. 5);
- `summary.md` and `summary.csv`: final reward, convergence cost (median, third quartile), the same of the
  training episodes (the exploring policy) and as the authors' plot script pools it, cumulative cost.
`report_only=true` only rewrites the report. The report covers every run under `<out>`, the given tasks and
algorithms first.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from cvpo_jax.config import ConfigError

PAPER_TASKS = ("point_goal", "car_goal", "point_button", "car_button", "car_circle")
PAPER_ALGOS = ("cvpo", "sac_lag", "td3_lag", "ddpg_lag")
CONVERGENCE_FRACTION = 0.2  # the paper's Fig. 5: the last 20% of training

# Settings each scale adds before the user's options. The paper scale is the defaults (Table 1 and the
# authors' code) at the paper's budget. The CPU scale keeps every protocol setting and shrinks what sets the
# cost of an update (network width, batch, particles), so a 2-core CPU trains 3 seeds × 1M env steps of one
# task in about an hour; evaluations are sparser because 20 evaluation episodes cost 8000 env steps each.
SCALES: dict[str, dict[str, object]] = {
    "cpu": {"network.hidden": "[64,64]", "cvpo.batch_size": 128, "offpolicy.batch_size": 128,
            "cvpo.num_particles": 16, "num_seeds": 3, "total_env_steps": 1_000_000,
            "eval_every_env_steps": 50_000, "checkpoint_every_env_steps": 50_000},
    "paper": {"num_seeds": 10, "total_env_steps": 2_400_000, "eval_every_env_steps": 20_000,
              "checkpoint_every_env_steps": 100_000},
}
# The paper scale shaped for one GPU: the replay methods step 8x more envs per member and make 8x more updates
# per iteration, which keeps their updates per env step (the authors' 0.133 = 15 envs x 2 updates becomes
# 120 x 16; Car-Circle's 32 x 3 becomes 256 x 24) while a GPU step of 1200 envs (10 members) costs about what
# one of 150 does (it is launch-bound; `python -m cvpo_jax.bench gpu`). On-policy methods keep their loop.
SCALES["gpu"] = dict(SCALES["paper"])
GPU_LOOP_FACTOR = 8
SUITE_KEYS = ("tasks", "algos", "scale", "out", "report_only")
DONE = "done.txt"


@dataclasses.dataclass
class SuiteOptions:
    tasks: list[str]
    algos: list[str]
    scale: str
    out: str
    report_only: bool
    run_args: list[str]  # key=value options for every run
    argv: list[str]  # the command line as given (recorded in each run's command.txt)


def parse(argv: Sequence[str]) -> SuiteOptions:
    """Raises ConfigError with a one-line message on bad input."""
    from cvpo_jax import algorithms, envs

    options = {"tasks": ",".join(PAPER_TASKS), "algos": ",".join(PAPER_ALGOS), "scale": "cpu",
               "out": os.path.join("runs", "suite"), "report_only": "false"}
    run_args = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"argument {arg!r} is not of the form key=value (e.g. tasks=point_goal)")
        if key in SUITE_KEYS:
            options[key] = value
        elif key in ("env", "algo", "out_dir", "run_name", "resume"):
            raise ConfigError(f"{key}= is set by the suite; use tasks=, algos= and out= instead")
        else:
            run_args.append(arg)
    tasks = [t for t in options["tasks"].split(",") if t]
    algos = [a for a in options["algos"].split(",") if a]
    for task in tasks:
        if task not in envs.names():
            raise ConfigError(f"tasks: unknown task {task!r}; allowed: {', '.join(envs.names())}")
    for algo in algos:
        if algo not in algorithms.ALGORITHMS:
            raise ConfigError(f"algos: unknown algorithm {algo!r}; allowed: {', '.join(algorithms.names())}")
    if not tasks or not algos:
        raise ConfigError("tasks= and algos= need at least one name each")
    if options["scale"] not in SCALES:
        raise ConfigError(f"scale={options['scale']}: allowed: {', '.join(SCALES)}")
    if options["report_only"] not in ("true", "false"):
        raise ConfigError(f"report_only={options['report_only']}: allowed: true, false")
    return SuiteOptions(tasks, algos, options["scale"], options["out"], options["report_only"] == "true", run_args,
                        list(argv))


def run_config(options: SuiteOptions, task: str, algo: str):
    """The resolved RunConfig of one run of the suite (the scale, then the user's options)."""
    from cvpo_jax import algorithms, envs
    from cvpo_jax.config import fill_task_presets, load_config

    scale = [f"{k}={v}" for k, v in SCALES[options.scale].items()]
    args = scale + options.run_args + [f"env={task}", f"algo={algo}", f"out_dir={options.out}",
                                       f"run_name={task}-{algo}", "progress=false"]
    cfg = load_config(args, envs.names())
    user_keys = {a.partition("=")[0] for a in options.run_args}
    if (options.scale == "gpu" and algorithms.get(algo).trainer == algorithms.REPLAY
            and not user_keys & {"num_envs", "updates_per_iteration"}):
        # Scale the method's and task's own loop (e.g. Car-Circle's 32 envs x 3 updates) by GPU_LOOP_FACTOR.
        loop = [f"num_envs={cfg.num_envs * GPU_LOOP_FACTOR}",
                f"updates_per_iteration={cfg.updates_per_iteration * GPU_LOOP_FACTOR}"]
        cfg = load_config(scale + loop + args[len(scale):], envs.names())
    return fill_task_presets(cfg, envs.make(task))


# Keys a later invocation may change without starting the run again.
_RESUMABLE_CHANGES = ("total_env_steps", "progress", "resume", "print_config")


def _check_same_run(cfg, run_dir: str) -> None:
    from cvpo_jax.config import from_yaml_file

    saved = from_yaml_file(os.path.join(run_dir, "config.yaml"))
    changed = [f.name for f in dataclasses.fields(cfg) if f.name not in _RESUMABLE_CHANGES
               and getattr(cfg, f.name) != getattr(saved, f.name)]
    if changed:
        raise ConfigError(f"{run_dir} was started with other settings ({', '.join(changed)}); "
                          f"give the same options to continue it, or another out=")


def _finished_env_steps(run_dir: str) -> Optional[int]:
    path = os.path.join(run_dir, DONE)
    return int(open(path).read().split()[0]) if os.path.isfile(path) else None


def run_suite(options: SuiteOptions) -> list[str]:
    """Train what is not finished; return one line per run that stopped on a non-finite value."""
    from cvpo_jax import checkpoint, run

    failures = []
    for task in options.tasks:
        for algo in options.algos:
            cfg = run_config(options, task, algo)
            run_dir = os.path.join(options.out, f"{task}-{algo}")
            if os.path.isfile(os.path.join(run_dir, "config.yaml")):
                _check_same_run(cfg, run_dir)
                finished = _finished_env_steps(run_dir)
                if finished is not None and finished >= cfg.total_env_steps:
                    print(f"{task}-{algo}: finished ({finished} env steps), skipped", flush=True)
                    continue
                print(f"{task}-{algo}: " + ("continuing from its last checkpoint"
                                             if checkpoint.latest_iteration(run_dir) is not None
                                             else "no checkpoint yet, starting again"), flush=True)
            else:
                print(f"{task}-{algo}: starting", flush=True)
            start = time.time()
            _record_start(run_dir, options, _code_commit())  # the code this invocation trains with
            try:
                run.train(cfg, run_dir)
            except run.RunError as e:
                failures.append(f"{task}-{algo}: {e}")
                continue
            finally:
                _record_end(run_dir, time.time() - start)
            with open(os.path.join(run_dir, DONE), "w") as f:
                f.write(f"{cfg.total_env_steps} env steps per seed\n")
    return failures


def _code_commit() -> str:
    """The commit of the code being run, and whether tracked files differ from it."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + (" with uncommitted changes" if dirty else "")) if commit else "unknown"


STARTED = "# started "  # the line each invocation writes first; an invocation killed leaves it last


def _record_start(run_dir: str, options: SuiteOptions, commit: str) -> None:
    """Append to the run's command.txt the suite command, the code's commit and where this invocation starts.

    It is written before training, so an invocation that is killed (a session's end, SIGKILL) still shows;
    the next one notes when the killed one last saved a checkpoint, the end of its recorded work."""
    import shlex

    from cvpo_jax import checkpoint

    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "command.txt")
    lines = open(path).read().splitlines() if os.path.isfile(path) else []
    iteration = checkpoint.latest_iteration(run_dir)
    with open(path, "a") as f:
        if lines and lines[-1].startswith(STARTED):
            saved = os.path.join(run_dir, "checkpoints", str(iteration)) if iteration is not None else None
            when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(saved)))
                    if saved and os.path.exists(saved) else "never")
            f.write(f"# that invocation was stopped before its end; its last checkpoint was saved: {when}\n")
        f.write(f"python -m cvpo_jax.suite {shlex.join(options.argv)}\n"
                f"{STARTED}{time.strftime('%Y-%m-%d %H:%M:%S')}, commit {commit}, from the checkpoint of "
                f"iteration {iteration or 0}\n")


def _record_end(run_dir: str, seconds: float) -> None:
    """Append this invocation's wall time to the run's command.txt."""
    if os.path.isdir(run_dir):
        with open(os.path.join(run_dir, "command.txt"), "a") as f:
            ended = time.strftime("%Y-%m-%d %H:%M:%S")
            f.write(f"# this invocation trained for {seconds:.0f} s wall (ended {ended})\n")


# ----------------------------------------------------------------------------------------------------------
# The report (pure functions of metrics.csv data, tested on their own).


def convergence_costs(data: dict[str, np.ndarray], fraction: float = CONVERGENCE_FRACTION) -> np.ndarray:
    """Evaluation episode costs of every member at the evaluations in the last `fraction` of training."""
    steps = data["env_steps"]
    last = steps >= (1.0 - fraction) * np.max(steps)
    return data["eval/episode_cost"][last & (steps > 0)]


def training_convergence_costs(data: dict[str, np.ndarray], fraction: float = CONVERGENCE_FRACTION) -> np.ndarray:
    """Training episode costs (the exploring policy, the one the constraint is checked on) of every member in
    the evaluation periods of the last `fraction` of training; periods in which no episode ended left out."""
    steps, values = training_series(data, "train/episode_cost")
    values = values[:, steps >= (1.0 - fraction) * np.max(steps)]
    return values[np.isfinite(values)]


# The authors' box plot (cvpo-safe-rl `script/plot.py`, `plot_cost`) is not the paper's text: it smooths each
# seed's test cost over a moving window of 2 evaluations and keeps the evaluations after 1.6M of 2.4M env
# steps (the last third, where the paper says the last 20%).
ORIGINAL_PLOT_WINDOW = 2
ORIGINAL_PLOT_AFTER = 1.6 / 2.4


def original_plot_convergence_costs(data: dict[str, np.ndarray]) -> np.ndarray:
    """Evaluation costs as the authors' plot script pools them: per member the mean of each evaluation and the
    one before it (the first alone), at the evaluations past `ORIGINAL_PLOT_AFTER` of training."""
    steps, costs = member_series(data, "eval/episode_cost")
    pairs = np.concatenate([costs[:, :1], costs[:, :-1]], axis=1)  # [M, T]: the previous evaluation
    smoothed = (costs + pairs) / ORIGINAL_PLOT_WINDOW
    return smoothed[:, steps > ORIGINAL_PLOT_AFTER * np.max(steps)].ravel()


def member_series(data: dict[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Env steps [T] and `key` per member [M, T] (members cut to the shortest, as a run writes them)."""
    members = np.unique(data["member"]).astype(int)
    series = [data[key][data["member"] == m] for m in members]
    length = min(len(s) for s in series)
    return data["env_steps"][data["member"] == members[0]][:length], np.stack([s[:length] for s in series])


def training_series(data: dict[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
    """`member_series` of a training-episode metric: without the first row (before any training) and nan
    where no training episode ended in the period (metrics.csv files written before bb847b3 hold 0 there)."""
    steps, values = member_series(data, key)
    _, episodes = member_series(data, "train/episodes")
    values = np.where(episodes > 0, values, np.nan)
    return steps[1:], values[:, 1:]


def cumulative_costs(data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Env steps [T] and the training cost paid so far per member [M, T]."""
    from cvpo_jax.plots import cumulative_training_cost

    members = np.unique(data["member"]).astype(int)
    curves = [cumulative_training_cost(data, m) for m in members]
    length = min(len(c[0]) for c in curves)
    return curves[0][0][:length], np.stack([c[1][:length] for c in curves])


def summary_row(data: dict[str, np.ndarray]) -> dict[str, float]:
    steps, reward = member_series(data, "eval/episode_reward")
    conv, train_conv = convergence_costs(data), training_convergence_costs(data)
    original = original_plot_convergence_costs(data)
    _, cumulative = cumulative_costs(data)
    return {
        "env_steps": float(steps[-1]),
        "seeds": float(reward.shape[0]),
        "cost_limit": float(data["cost_limit"][0]),
        "final_reward_mean": float(np.mean(reward[:, -1])),
        "final_reward_std": float(np.std(reward[:, -1])),
        "convergence_cost_median": float(np.median(conv)),
        "convergence_cost_q3": float(np.percentile(conv, 75)),
        "training_convergence_cost_median": float(np.median(train_conv)) if train_conv.size else float("nan"),
        "training_convergence_cost_q3": float(np.percentile(train_conv, 75)) if train_conv.size else float("nan"),
        "original_plot_convergence_cost_median": float(np.median(original)),
        "original_plot_convergence_cost_q3": float(np.percentile(original, 75)),
        "cumulative_cost_mean": float(np.mean(cumulative[:, -1])),
    }


def report_scope(out: str, tasks: Sequence[str], algos: Sequence[str]) -> tuple[list[str], list[str]]:
    """The tasks and algorithms a report of `out` covers: the given ones, then those of every other
    `<task>-<algo>` run already there (a suite run one task at a time keeps one report of all of them)."""
    from cvpo_jax import algorithms, envs

    tasks, algos = list(tasks), list(algos)
    found = set()
    if os.path.isdir(out):
        for name in os.listdir(out):
            task, sep, algo = name.partition("-")
            if sep and task in envs.names() and algo in algorithms.ALGORITHMS:
                found.add((task, algo))
    task_order = list(PAPER_TASKS) + [t for t in envs.names() if t not in PAPER_TASKS]
    tasks += [t for t in task_order if t not in tasks and any(t == task for task, _ in found)]
    algos += [a for a in algorithms.ALGORITHMS if a not in algos and any(a == algo for _, algo in found)]
    return tasks, algos


def _load_runs(out: str, tasks: Sequence[str], algos: Sequence[str]) -> dict[tuple[str, str], dict]:
    from cvpo_jax.metrics_log import read_csv

    runs = {}
    for task in tasks:
        for algo in algos:
            path = os.path.join(out, f"{task}-{algo}", "metrics.csv")
            if os.path.isfile(path):
                data = read_csv(path)
                if data and np.max(data["env_steps"]) > 0:
                    runs[(task, algo)] = data
    return runs


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: str, tasks: Sequence[str], algos: Sequence[str]) -> list[str]:
    """Write the figures and tables of the runs there are; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cvpo_jax.plots import label_env_steps_axis

    runs = _load_runs(out, tasks, algos)
    report = os.path.join(out, "report")
    os.makedirs(report, exist_ok=True)
    written = []
    tasks = [t for t in tasks if any((t, a) in runs for a in algos)]
    colours = {algo: f"C{i}" for i, algo in enumerate(algos)}

    for task in tasks:  # Figs. 2-3
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
        for algo in algos:
            if (task, algo) not in runs:
                continue
            data = runs[(task, algo)]
            # The cost paid in training so far (CSC's Figs. 3 and 6: cumulative failures on the traps tasks).
            steps, paid = cumulative_costs(data)
            mean, std = np.mean(paid, 0), np.std(paid, 0)
            axes[3].plot(steps, mean, color=colours[algo], lw=2)
            axes[3].fill_between(steps, mean - std, mean + std, color=colours[algo], alpha=0.15)
            for ax, key in zip(axes, ("eval/episode_reward", "eval/episode_cost", "train/episode_cost")):
                steps, values = (training_series if key.startswith("train/") else member_series)(data, key)
                mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
                ax.plot(steps, mean, color=colours[algo], lw=2, label=f"{algo} ({values.shape[0]} seeds)")
                ax.fill_between(steps, mean - std, mean + std, color=colours[algo], alpha=0.15)
            limit = float(data["cost_limit"][0])
        for ax in axes[1:3]:
            ax.axhline(limit, color="k", ls="--", lw=1, label=f"cost limit {limit:g}")
        for ax, name in zip(axes, ("evaluation episode reward", "evaluation episode cost", "training episode cost",
                                   "cumulative training cost")):
            label_env_steps_axis(ax, "env steps (per seed)")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.suptitle(f"{task}: mean ± std over seeds")
        written.append(_save(fig, os.path.join(report, f"curves_{task}.png")))

    if tasks:  # Fig. 4
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for algo in algos:
                if (task, algo) in runs:
                    _, reward = member_series(runs[(task, algo)], "eval/episode_reward")
                    _, cumulative = cumulative_costs(runs[(task, algo)])
                    length = min(reward.shape[1], cumulative.shape[1])
                    # From the first evaluation after training started: before it nothing is paid (log x).
                    ax.plot(np.mean(cumulative[:, 1:length], 0), np.mean(reward[:, 1:length], 0),
                            color=colours[algo], lw=2, label=algo)
            ax.set_xscale("log")
            ax.set_xlabel("cumulative training cost (mean over seeds)")
            ax.set_ylabel("evaluation episode reward")
            ax.set_title(task)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(fig, os.path.join(report, "reward_vs_cumulative_cost.png")))

        # Fig. 5
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            present = [a for a in algos if (task, a) in runs]
            ax.boxplot([convergence_costs(runs[(task, a)]) for a in present], tick_labels=present)
            limit = float(runs[(task, present[0])]["cost_limit"][0])
            ax.axhline(limit, color="k", ls="--", lw=1, label=f"cost limit {limit:g}")
            ax.set_title(task)
            ax.set_ylabel("evaluation cost, last 20% of training")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
        written.append(_save(fig, os.path.join(report, "convergence_cost_boxplot.png")))

    rows = [{"task": t, "algo": a, **summary_row(runs[(t, a)])} for t in tasks for a in algos if (t, a) in runs]
    if rows:
        path = os.path.join(report, "summary.csv")
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        written.append(path)
        path = os.path.join(report, "summary.md")
        with open(path, "w") as f:
            f.write("Convergence cost: evaluation (policy mean) cost in the last 20% of training, all seeds "
                    "(the paper's Fig. 5); training: the training episodes' cost (exploring policy) there; "
                    "original's plot: the authors' `plot_cost` (2-evaluation moving mean, last third).\n\n")
            f.write("| task | algo | seeds | env steps | final reward (mean ± std) | convergence cost median / Q3 | "
                    "training median / Q3 | original's plot median / Q3 | cost limit | cumulative training cost |\n"
                    + "|---" * 10 + "|\n")
            for r in rows:
                f.write(f"| {r['task']} | {r['algo']} | {r['seeds']:.0f} | {r['env_steps']:.0f} | "
                        f"{r['final_reward_mean']:.1f} ± {r['final_reward_std']:.1f} | "
                        f"{r['convergence_cost_median']:.1f} / {r['convergence_cost_q3']:.1f} | "
                        f"{r['training_convergence_cost_median']:.1f} / {r['training_convergence_cost_q3']:.1f} | "
                        f"{r['original_plot_convergence_cost_median']:.1f} / "
                        f"{r['original_plot_convergence_cost_q3']:.1f} | {r['cost_limit']:g} | "
                        f"{r['cumulative_cost_mean']:.0f} |\n")
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    try:
        options = parse(argv)
        for task in options.tasks:  # every run's options, before anything trains
            for algo in options.algos:
                run_config(options, task, algo)
        failures = [] if options.report_only else run_suite(options)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the same command continues the suite", file=sys.stderr)
        return 130
    for path in write_report(options.out, *report_scope(options.out, options.tasks, options.algos)):
        print(path)
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
