"""A saved run rebuilt from its directory: its config, environment, trainer, sweep members and training state.

The tools that read a finished or stopped run (`evaluate`, `diagnostics`, experiments/find_nonfinite.py,
critic_check.py, estep_budget.py) all need the same thing: the trainer the run's config.yaml builds and the
state of its last checkpoint restored into it. `run.train` does its own restore, onto the sharded state it
trains.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from cvpo_jax.config import RunConfig


@dataclasses.dataclass
class SavedRun:
    cfg: RunConfig
    env: Any  # the task's environment (envs.make(cfg.env))
    trainer: Any  # algorithms.make_trainer(cfg, env)
    members: Any  # core.members.SweepMembers of the run's sweep
    iteration: int  # iterations done per member at the restored checkpoint; 0: the run's start
    state: Any  # the training state, members stacked on the leading axis

    def member_params(self, member: int) -> Any:
        """The learner parameters of sweep member `member` (unstacked); ValueError (one line) when the run has
        no such member."""
        from cvpo_jax.core.members import one_member

        if not 0 <= member < self.members.size:
            raise ValueError(f"member={member}: the run has members 0..{self.members.size - 1}")
        return one_member(self.state.learner.params, member)


def load(run_dir: str, cfg: Optional[RunConfig] = None, from_start_if_no_checkpoint: bool = False,
         algo: Optional[str] = None) -> SavedRun:
    """Rebuild the run in `run_dir` and restore its newest checkpoint.

    cfg: the configuration to build with (default: the run's own config.yaml; give a changed copy to replay the
      run differently, e.g. in smaller chunks). It must build the same training state.
    from_start_if_no_checkpoint: with no checkpoint yet, return the state the run started from (trainer.init
      on the members' keys, iteration 0) instead of raising.
    algo: the method the caller needs (e.g. "cvpo" for a tool that solves CVPO's E-step); another is a ValueError.

    Raises ValueError (one line) when run_dir holds no config.yaml, a run of another method than `algo` or,
    unless allowed, no checkpoint, and
    checkpoint.CheckpointMismatch (a ValueError) when the checkpoint does not fit this version's state.
    """
    import jax
    import numpy as np

    from cvpo_jax import algorithms, checkpoint, envs
    from cvpo_jax.config import from_yaml_file
    from cvpo_jax.core.members import SweepMembers

    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ValueError(f"run={run_dir}: no config.yaml there; give a run directory made by cvpo_jax.run")
    cfg = cfg if cfg is not None else from_yaml_file(config_path)
    if algo is not None and cfg.algo != algo:
        raise ValueError(f"run={run_dir}: needs a {algo} run; its config says algo={cfg.algo}")
    env = envs.make(cfg.env)
    trainer = algorithms.make_trainer(cfg, env)
    members = SweepMembers.from_config(cfg)
    iteration = checkpoint.latest_iteration(run_dir)
    if iteration is None:
        if not from_start_if_no_checkpoint:
            raise ValueError(f"run={run_dir}: no checkpoint yet")
        return SavedRun(cfg, env, trainer, members, 0, trainer.init(members.keys()))
    # A zero-filled template of the state's structure is enough to restore into; it costs no compile.
    like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(trainer.init, members.keys()))
    return SavedRun(cfg, env, trainer, members, iteration, checkpoint.restore(run_dir, iteration, like))
