"""Learning curves: evaluation reward and cost against env steps, per member and mean, cost limit drawn."""

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
    members = np.unique(data["member"]).astype(int)
    fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, label in (("eval/episode_reward", ax_r, "episode reward"),
                           ("eval/episode_cost", ax_c, "episode cost")):
        curves = []
        for m in members:
            rows = data["member"] == m
            steps = data["env_steps"][rows]
            ax.plot(steps, data[key][rows], lw=0.8, alpha=0.45, label=f"member {m}" if len(members) > 1 else None)
            curves.append(data[key][rows])
        length = min(len(c) for c in curves)
        mean = np.mean(np.stack([c[:length] for c in curves]), axis=0)
        ax.plot(data["env_steps"][data["member"] == members[0]][:length], mean, lw=2.2, color="k", label="mean")
        ax.set_xlabel("env steps (per member)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for limit in np.unique(data["cost_limit"]):
        ax_c.axhline(limit, color="tab:red", ls="--", lw=1.2, label=f"cost limit {limit:g}")
    ax_r.legend(fontsize=7)
    ax_c.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
