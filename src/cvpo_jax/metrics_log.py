"""Run metrics: metrics.csv (one row per evaluation and member) and TensorBoard events (every chunk)."""

from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np

CSV_NAME = "metrics.csv"
LEADING_COLUMNS = ["env_steps", "member", "cost_limit"]


class MetricsLog:
    def __init__(self, run_dir: str, num_members: int, resume_from_env_steps: int = 0):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(run_dir, CSV_NAME)
        self.num_members = num_members
        self.columns: list[str] | None = None
        if os.path.exists(self.path):
            # Rows written after the checkpoint we resume from describe work that is being redone; the row of
            # the checkpoint's own step was written before it (run.train) and stays.
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            kept = [r for r in rows if int(float(r["env_steps"])) <= resume_from_env_steps] if resume_from_env_steps \
                else []
            if rows:
                self.columns = list(rows[0].keys())
            with open(self.path, "w", newline="") as f:
                if self.columns:
                    writer = csv.DictWriter(f, fieldnames=self.columns)
                    writer.writeheader()
                    writer.writerows(kept)
        self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, env_steps: int, evaluation: dict, training: dict, cost_limits: Sequence[float]) -> None:
        """Append one row per member with the evaluation and the training metrics since the last one."""
        values = {**evaluation, **training}
        if self.columns is None or not set(values) <= set(self.columns):
            # The first row (before any training) lacks the training columns: widen the file once.
            known = set(self.columns or []) | set(values)
            self._rewrite_with_columns(LEADING_COLUMNS + sorted(known - set(LEADING_COLUMNS)))
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for m in range(self.num_members):
                row = {"env_steps": env_steps, "member": m, "cost_limit": cost_limits[m]}
                row.update({k: float(np.ravel(v)[m]) for k, v in values.items()})
                writer.writerow([row.get(c, "") for c in self.columns])
            f.flush()
            os.fsync(f.fileno())
        for k, v in evaluation.items():
            self.tb.add_scalar(f"{k}/mean", float(np.mean(v)), env_steps)
            for m in range(self.num_members):
                self.tb.add_scalar(f"{k}/member{m}", float(np.ravel(v)[m]), env_steps)

    def _rewrite_with_columns(self, columns: list[str]) -> None:
        rows = []
        if self.columns is not None and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        self.columns = columns

    def tensorboard(self, env_steps: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.tb.add_scalar(f"{k}/mean", float(np.mean(v)), env_steps)

    def close(self) -> None:
        self.tb.close()


def read_csv(path: str) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) if r[k] != "" else np.nan for r in rows]) for k in rows[0]}
