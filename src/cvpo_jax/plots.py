"""Learning curves: evaluation reward and cost against env steps, per member and mean, cost limit drawn.

Members that share a cost limit form a group (the seeds of one setting): each member is a thin line, the
group mean a thick one, and the group's limit a dashed line of the same colour on the cost panel.
"""

from __future__ import annotations

import numpy as np

from cvpo_jax.metrics_log import read_csv


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
        ax.set_xlabel("env steps (per member)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
