"""The algorithm table: the one list of what `algo=` may name, each with its trainer and learner factory.

Configuration validation, the run command's help, the benchmarks and `make_trainer` all read `ALGORITHMS`;
adding a method is one module with a learner factory and one row here. Factories are named as
"module:function" and imported only when used, so that parsing a command line imports no learner.

A learner factory is `factory(cfg: RunConfig, observation_size, action_size) -> learner`, where the learner
is a `core.contracts.OffPolicyLearner` for the replay trainer or an `OnPolicyLearner` for the rollout
trainer; `cfg.episode_length` and `cfg.cost_limit` are resolved (`config.fill_task_presets`) by then.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from brax.envs.base import Env

    from cvpo_jax.config import RunConfig
    from cvpo_jax.core.contracts import Trainer

REPLAY, ROLLOUT = "replay", "rollout"


@dataclass(frozen=True)
class Algorithm:
    name: str
    trainer: str  # REPLAY (off-policy, core/replay_trainer.py) or ROLLOUT (on-policy, core/rollout_trainer.py)
    learner_factory: str  # "module:function"
    summary: str  # one line for the help text
    gamma_key: str  # the config key of its discount (the per-state cost threshold ε1 is computed with it)
    replay_batch_key: Optional[str] = None  # config key of its replay minibatch (replay_capacity must hold it)
    presets: Mapping[str, Any] = field(default_factory=dict)  # config defaults of this method (user wins)

    def make_learner(self, cfg: "RunConfig", observation_size: int, action_size: int):
        module, function = self.learner_factory.split(":")
        return getattr(importlib.import_module(module), function)(cfg, observation_size, action_size)


# The CVPO authors' protocol for their four off-policy methods (cvpo-safe-rl safe_rl/runner.py,
# script/config/config_cvpo.yaml, config_baseline.yaml): 20 episodes collected, then episode_rerun_num 40 × steps
# / batch 300 updates, i.e. 0.133 updates per env step: here 2 updates per step of 15 envs. Replay 80k for
# CVPO, 20k for the baselines; DDPG-Lag's actor lr 3e-4.
_AUTHORS_RATIO = {"num_envs": 15, "updates_per_iteration": 2}
_BASELINE_REPLAY = {**_AUTHORS_RATIO, "replay_capacity": 20_000}
# The on-policy methods act with a diagonal Gaussian, as TRPO, CPO and PPO are usually run (the CVPO authors
# released no on-policy code). The full Cholesky head of CVPO's code is fragile in their float32 likelihood
# ratios: on ant_velocity (observations up to 18, 8 actions) the initial Cholesky diagonal spans 0.007-11
# across states, the log-density of the policy's own samples reaches −3.8e6 and KL(π_old ‖ π_old) reads 13.7,
# so TRPO, TRPO-Lag, CPO and CSC rejected every step and stopped on NaN metrics at the first update.
_ON_POLICY = {"network.covariance": "diag"}

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("cvpo", REPLAY, "cvpo_jax.cvpo:make_cvpo_learner",
              "Constrained Variational Policy Optimization (the default)", "cvpo.gamma", "cvpo.batch_size",
              presets=_AUTHORS_RATIO),
    Algorithm("sac_lag", REPLAY, "cvpo_jax.baselines.off_policy:make_sac_lag_learner",
              "SAC with a PID Lagrange multiplier", "offpolicy.gamma", "offpolicy.batch_size",
              presets=_BASELINE_REPLAY),
    Algorithm("td3_lag", REPLAY, "cvpo_jax.baselines.off_policy:make_td3_lag_learner",
              "TD3 with a PID Lagrange multiplier", "offpolicy.gamma", "offpolicy.batch_size",
              presets=_BASELINE_REPLAY),
    Algorithm("ddpg_lag", REPLAY, "cvpo_jax.baselines.off_policy:make_ddpg_lag_learner",
              "DDPG with a PID Lagrange multiplier", "offpolicy.gamma", "offpolicy.batch_size",
              presets={**_BASELINE_REPLAY, "offpolicy.actor_lr": 3e-4}),
    Algorithm("ppo_lag", ROLLOUT, "cvpo_jax.baselines.on_policy:make_ppo_lag_learner",
              "PPO with a PID Lagrange multiplier", "onpolicy.gamma",
              presets=_ON_POLICY),
    Algorithm("trpo_lag", ROLLOUT, "cvpo_jax.baselines.on_policy:make_trpo_lag_learner",
              "TRPO with a PID Lagrange multiplier", "onpolicy.gamma",
              presets=_ON_POLICY),
    Algorithm("cpo", ROLLOUT, "cvpo_jax.baselines.on_policy:make_cpo_learner",
              "Constrained Policy Optimization", "onpolicy.gamma",
              presets=_ON_POLICY),
    Algorithm("trpo", ROLLOUT, "cvpo_jax.baselines.on_policy:make_trpo_learner",
              "unconstrained TRPO (the cost is only logged)", "onpolicy.gamma",
              presets=_ON_POLICY),
    Algorithm("csc", ROLLOUT, "cvpo_jax.baselines.csc:make_csc_learner",
              "Conservative Safety Critics", "onpolicy.gamma", "csc.batch_size",
              presets=_ON_POLICY),
)}


def names() -> tuple[str, ...]:
    return tuple(ALGORITHMS)


def get(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def config_value(cfg: "RunConfig", key: str):
    """The value of a dotted config key, e.g. config_value(cfg, "cvpo.gamma")."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def make_trainer(cfg: "RunConfig", env: "Env") -> "Trainer":
    """The trainer of `cfg.algo` on `env`, driving a fresh learner of that algorithm."""
    algorithm = get(cfg.algo)
    learner = algorithm.make_learner(cfg, env.observation_size, env.action_size)
    if algorithm.trainer == REPLAY:
        from cvpo_jax.core.replay_trainer import make_replay_trainer

        return make_replay_trainer(cfg, env, learner)
    from cvpo_jax.core.rollout_trainer import make_rollout_trainer

    return make_rollout_trainer(cfg, env, learner)
