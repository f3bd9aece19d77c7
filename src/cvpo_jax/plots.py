"""Learning curves: evaluation reward and cost against env steps, per member and mean, cost limit drawn.

Members that share a cost limit form a group (the seeds of one setting): each member is a thin line, the
group mean a thick one, and the group's limit a dashed line of the same colour on the cost panel.
"""

from __future__ import annotations

import numpy as np

from cvpo_jax.metrics_log import read_csv


def format_env_steps(value: float, _position=None) -> str:
    """Tick label for an env-step axis: 400000 -> "400k", 1200000 -> "1.2M" (plain numbers overlap)."""
    if abs(value) >= 1e6:
        return f"{value / 1e6:g}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


def label_env_steps_axis(ax, label: str) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xlabel(label)
    ax.xaxis.set_major_formatter(FuncFormatter(format_env_steps))


def plot_curves(csv_path: str, png_path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_csv(csv_path)
    if not data:
        return
    fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    limits = np.unique(data["cost_limit"])
    plotted_costs = []
    for colour_index, limit in enumerate(limits):
        colour = f"C{colour_index}"
        group = data["cost_limit"] == limit
        members = np.unique(data["member"][group]).astype(int)
        suffix = f" (limit {limit:g})" if len(limits) > 1 else ""
        for key, ax in (("eval/episode_reward", ax_r), ("eval/episode_cost", ax_c)):
            curves = []
            for m in members:
                rows = data["member"] == m
                steps = data["env_steps"][rows]
                if len(members) > 1:
                    ax.plot(steps, data[key][rows], lw=0.8, alpha=0.4, color=colour)
                curves.append((steps, data[key][rows]))
            length = min(len(c[1]) for c in curves)
            mean = np.mean(np.stack([c[1][:length] for c in curves]), axis=0)
            label = (f"mean of {len(members)} seeds" if len(members) > 1 else f"member {members[0]}") + suffix
            ax.plot(curves[0][0][:length], mean, lw=2.2, color=colour, label=label)
            if key == "eval/episode_cost":
                plotted_costs.append(np.nanmax(data[key][group]))
        ax_c.axhline(limit, color=colour, ls="--", lw=1.2, label=f"cost limit {limit:g}")
    # Keep the cost curves readable when one member has a very loose limit (an unconstrained baseline).
    top = max(max(plotted_costs), float(np.min(limits))) * 1.25 + 1e-6
    ax_c.set_ylim(bottom=-0.03 * top, top=top)
    for ax, label in ((ax_r, "evaluation episode reward"), (ax_c, "evaluation episode cost")):
        label_env_steps_axis(ax, "env steps (per member)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def cumulative_training_cost(data: dict[str, np.ndarray], member: int) -> tuple[np.ndarray, np.ndarray]:
    """Env steps and the total cost paid in training episodes up to them, for one member.

    Each metrics row holds the mean cost of the training episodes finished since the previous row and how
    many finished, so their product summed over rows is the cost paid so far (the paper's "cumulative cost").
    """
    rows = data["member"] == member
    steps = data["env_steps"][rows]
    paid = np.nan_to_num(data["train/episode_cost"][rows]) * np.nan_to_num(data["train/episodes"][rows])
    return steps, np.cumsum(paid)


def plot_comparison(runs: dict[str, str], png_path: str, max_env_steps: float | None = None,
                    title: str = "") -> None:
    """Methods side by side as the CVPO paper's Figs. 2-4: evaluation reward, evaluation cost and cumulative
    training cost against env steps. `runs` maps a label to a run's metrics.csv; each method is the mean over
    its members (seeds) with a band from the lowest to the highest member. Curves stop at `max_env_steps`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    limits = set()
    for index, (label, csv_path) in enumerate(runs.items()):
        data = read_csv(csv_path)
        members = np.unique(data["member"]).astype(int)
        limits.update(np.unique(data["cost_limit"]).tolist())
        colour = f"C{index}"
        series = {
            "reward": [(data["env_steps"][data["member"] == m], data["eval/episode_reward"][data["member"] == m])
                       for m in members],
            "cost": [(data["env_steps"][data["member"] == m], data["eval/episode_cost"][data["member"] == m])
                     for m in members],
            "cumulative": [cumulative_training_cost(data, m) for m in members],
        }
        for ax, key in zip(axes, ("reward", "cost", "cumulative")):
            length = min(len(s[0]) for s in series[key])
            steps = series[key][0][0][:length]
            values = np.stack([s[1][:length] for s in series[key]])  # [members, T]
            keep = steps <= (max_env_steps if max_env_steps is not None else np.inf)
            steps, values = steps[keep], values[:, keep]
            ax.plot(steps, np.mean(values, 0), color=colour, lw=2, label=f"{label} ({len(members)} seeds)")
            if len(members) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.15)
    for limit in sorted(limits):
        axes[1].axhline(limit, color="k", ls="--", lw=1, label=f"cost limit {limit:g}")
    names = ("evaluation episode reward", "evaluation episode cost", "cumulative training cost")
    for ax, name in zip(axes, names):
        label_env_steps_axis(ax, "env steps (per seed)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    """`python -m cvpo_jax.plots compare out=fig.png max_env_steps=400000 cvpo=runs/a sac_lag=runs/b ...`

    Every `label=<run dir or metrics.csv>` pair adds one method; `out` and `max_env_steps` are options.
    """
    import os
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "compare":
        print("usage: python -m cvpo_jax.plots compare out=fig.png [max_env_steps=N] [title=T] "
              "label=<run dir> [label=<run dir> ...]", file=sys.stderr)
        return 2
    options, runs = {"out": "comparison.png", "max_env_steps": None, "title": ""}, {}
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep:
            print(f"error: {arg!r} is not key=value", file=sys.stderr)
            return 2
        if key in options:
            options[key] = value
            continue
        path = os.path.join(value, "metrics.csv") if os.path.isdir(value) else value
        if not os.path.isfile(path):
            print(f"error: {key}={value}: no metrics.csv there", file=sys.stderr)
            return 2
        runs[key] = path
    if not runs:
        print("error: give at least one label=<run dir>", file=sys.stderr)
        return 2
    try:
        max_steps = float(options["max_env_steps"]) if options["max_env_steps"] else None
    except ValueError:
        print(f"error: max_env_steps={options['max_env_steps']}: expected a number", file=sys.stderr)
        return 2
    plot_comparison(runs, options["out"], max_env_steps=max_steps, title=options["title"])
    print(options["out"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
