"""Which trainer and learner `algo=` selects.

Off-policy methods (CVPO and the Lagrangian SAC/TD3/DDPG) share the replay trainer of `trainer.py`; the
on-policy methods (PPO-Lag, TRPO-Lag, CPO, TRPO) and CSC share the rollout trainer of
`baselines/rollout_trainer.py`. Both return the same `Trainer`, so the run command, checkpoints, metrics,
evaluation and benchmarks do not care which method runs.
"""

from __future__ import annotations

from brax.envs.base import Env

from cvpo_jax.config import OFF_POLICY_ALGORITHMS, ON_POLICY_ALGORITHMS, RunConfig
from cvpo_jax.trainer import Trainer


def make_trainer(cfg: RunConfig, env: Env, episode_length: int) -> Trainer:
    if cfg.algo == "cvpo":
        from cvpo_jax.trainer import make_trainer as make_replay_trainer

        return make_replay_trainer(cfg, env, episode_length)
    if cfg.algo in OFF_POLICY_ALGORITHMS:
        from cvpo_jax.baselines.off_policy import make_off_policy_learner
        from cvpo_jax.trainer import make_trainer as make_replay_trainer

        learner = make_off_policy_learner(cfg, env.observation_size, env.action_size)
        return make_replay_trainer(cfg, env, episode_length, learner=learner)
    if cfg.algo in ON_POLICY_ALGORITHMS:
        from cvpo_jax.baselines.rollout_trainer import make_rollout_trainer

        return make_rollout_trainer(cfg, env, episode_length)
    raise ValueError(f"unknown algorithm {cfg.algo!r}")
