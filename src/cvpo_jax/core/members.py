"""The sweep members: who each vmapped member is (seed, cost limit, threshold), built once from the config.

Member order is fixed here and nowhere else: seeds vary fastest, then the swept cost limits, so member
m has seed `cfg.seed + m % num_seeds` and limit `limits[m // num_seeds]`. The run command, evaluation, the
benchmarks and both trainers read this object instead of working the order out again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from cvpo_jax.core.contracts import MemberSettings

if TYPE_CHECKING:
    from cvpo_jax.config import RunConfig

# Evaluation keys come from seed + this offset, so that evaluation never draws from the training streams.
_EVAL_SEED_OFFSET = 7919


def cost_threshold_from_episode_limit(limit: float, episode_length: int, gamma: float) -> float:
    """Per-state cost threshold ε1 from an episodic cost limit (CVPO Appendix B.1).

    ε1 = limit · (1 − γ^T) / (T · (1 − γ)): the discounted value of spreading `limit` evenly over the T steps
    of an episode.  Limit 10, T 400, γ 0.99 → 2.455; limit 20, T 300 → 6.34.
    """
    if episode_length <= 0:
        raise ValueError(f"episode_length must be positive, got {episode_length}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if gamma == 1.0:  # the limit of the formula as γ → 1: no discounting
        return float(limit) / episode_length
    return float(limit) * (1.0 - gamma**episode_length) / (episode_length * (1.0 - gamma))


def one_member(stacked: Any, member: int) -> Any:
    """Member `member`'s slice of a pytree whose leaves are stacked over the members on the leading axis
    (training state, parameters, replay, `SweepMembers.settings()`)."""
    return jax.tree.map(lambda leaf: leaf[member], stacked)


@dataclass(frozen=True)
class SweepMembers:
    seeds: tuple[int, ...]  # [N] random seed of each member
    cost_limits: tuple[float, ...]  # [N] episodic cost limit of each member
    cost_thresholds: tuple[float, ...]  # [N] ε1 of each member (its algorithm's γ, the task's T)
    kl_bound: float  # ε of CVPO's E-step, the same for every member

    @classmethod
    def from_config(cls, cfg: "RunConfig") -> "SweepMembers":
        """Needs `cfg.episode_length` and `cfg.cost_limit` resolved (`config.fill_task_presets`)."""
        from cvpo_jax import algorithms

        if cfg.episode_length is None or cfg.cost_limit is None:
            raise ValueError("SweepMembers.from_config needs the task presets filled (config.fill_task_presets)")
        gamma = float(algorithms.config_value(cfg, algorithms.get(cfg.algo).gamma_key))
        limits = [float(x) for x in (cfg.sweep.cost_limits or [cfg.cost_limit])]
        seeds = [cfg.seed + s for _ in limits for s in range(cfg.num_seeds)]
        member_limits = [limit for limit in limits for _ in range(cfg.num_seeds)]
        thresholds = [cost_threshold_from_episode_limit(x, cfg.episode_length, gamma) for x in member_limits]
        return cls(tuple(seeds), tuple(member_limits), tuple(thresholds), float(cfg.cvpo.kl_bound))

    @property
    def size(self) -> int:
        return len(self.seeds)

    def labels(self) -> list[str]:
        return [f"member {m} (seed {s}, cost limit {c:g})"
                for m, (s, c) in enumerate(zip(self.seeds, self.cost_limits))]

    def settings(self) -> MemberSettings:
        """Stacked per-member settings [N]."""
        return MemberSettings(cost_threshold=jnp.asarray(self.cost_thresholds, jnp.float32),
                              kl_bound=jnp.full((self.size,), self.kl_bound, jnp.float32),
                              cost_limit=jnp.asarray(self.cost_limits, jnp.float32))

    def keys(self) -> jax.Array:
        """[N, 2] training keys, one per member from its seed."""
        return jnp.stack([jax.random.PRNGKey(s) for s in self.seeds])

    def eval_keys(self, iteration: int) -> jax.Array:
        """[N, 2] evaluation keys that depend only on the seed and the step, so evaluation never perturbs
        training and a resumed run evaluates as the uninterrupted one."""
        return jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s + _EVAL_SEED_OFFSET), iteration)
                          for s in self.seeds])
