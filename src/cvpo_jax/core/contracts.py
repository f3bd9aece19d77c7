"""What every algorithm shares: the per-member settings, the two learner interfaces and the trainer.

An algorithm is a learner factory (`cvpo_jax.algorithms` lists them all) that returns one of the two
learner interfaces below; a trainer (`replay_trainer.py` for off-policy learners, `rollout_trainer.py` for
on-policy ones) drives it and returns a `Trainer`, the one object the run command, evaluation, checkpoints
and benchmarks talk to. Learners import this module, never each other nor a trainer.

Everything is written for one sweep member; trainers vmap it once over the member axis ([N] below).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import jax
from flax import struct

if TYPE_CHECKING:  # brax pulls in MuJoCo; the contracts stay importable without it (bench estep)
    from brax.envs.base import Env


class MemberSettings(NamedTuple):
    """Scalar settings that may differ between the members of a vmapped sweep (all traced, no recompile).

    Every algorithm gets the same settings and reads what it needs; `members.SweepMembers` builds them.
    """

    cost_threshold: jax.Array  # ε1: per-state threshold on Q_c derived from the episodic cost limit
    kl_bound: jax.Array  # ε: CVPO's E-step KL bound
    cost_limit: jax.Array  # the episodic cost limit itself (Lagrangian baselines, CSC)


class OffPolicyLearner(NamedTuple):
    """A learner the replay trainer drives (CVPO, SAC-Lag, TD3-Lag, DDPG-Lag).

    init(key) -> state; `state.params` is the pytree `act` takes (evaluated and checkpointed).
    update(state, batch: Transition [B], settings, key) -> (state, metrics: dict of scalars).
    act(params, obs [N, O], key, deterministic: bool) -> actions [N, A] inside the action box.
    observe_episodes(state, mean episodic cost [], settings) -> state, called each time a batch of episodes
        has ended (the episodic PID multiplier); None when the learner does not need it.
    """

    init: Callable[[jax.Array], Any]
    update: Callable
    act: Callable
    batch_size: int  # replay transitions per update
    observe_episodes: Optional[Callable] = None


@struct.dataclass
class Rollout:
    """One rollout of every environment of a member, time-major (what an on-policy update learns from)."""

    obs: jax.Array  # [T, E, O]
    action: jax.Array  # [T, E, A], as sampled (before clipping; the env clips)
    log_prob: jax.Array  # [T, E], log π_old(action | obs) at sampling time
    reward: jax.Array  # [T, E]
    cost: jax.Array  # [T, E]
    next_obs: jax.Array  # [T, E, O], the true next observation, before any reset
    terminal: jax.Array  # [T, E], 1: the reward value stops at next_obs (a termination or a reached goal)
    truncated: jax.Array  # [T, E], 1: the episode was cut by the time limit after this step
    terminated: jax.Array  # [T, E], 1: the task ended the episode after this step (no value of any kind)


class OnPolicyLearner(NamedTuple):
    """A learner the rollout trainer drives (PPO-Lag, TRPO-Lag, CPO, TRPO, CSC).

    init(key) -> state; `state.params` is the pytree `act` takes.
    act(params, obs [N, O], key, deterministic: bool) -> actions [N, A] clipped to [-1, 1] (evaluation).
    explore(state, obs [E, O], key, settings) -> (action [E, A] unclipped sample, log_prob [E],
        metrics: dict of scalars, averaged over the chunk's steps).
    update(state, rollout, episode_cost [], settings, key) -> (state, metrics: dict of scalars), where
        episode_cost is the mean cost of the episodes that ended in this rollout (NaN if none ended).
    """

    init: Callable[[jax.Array], Any]
    act: Callable
    explore: Callable
    update: Callable


class Schedule(NamedTuple):
    """Iteration counts derived from the config (one iteration = one step of every env of a member)."""

    iterations_per_chunk: int
    warmup_iterations: int
    total_iterations: int  # rounded up to whole chunks
    episode_length: int

    @property
    def total_chunks(self) -> int:
        return self.total_iterations // self.iterations_per_chunk


class Trainer(NamedTuple):
    """Vmapped-over-members entry points (all jitted); the same for every algorithm."""

    init: Callable[[jax.Array], Any]  # keys [N, 2] -> train state [N] (with `.learner.params`)
    run_chunk: Callable  # (state [N], settings [N], first_iteration) -> (state, metrics [N])
    evaluate: Callable  # (params [N], keys [N, 2]) -> metrics [N]
    learner: OffPolicyLearner | OnPolicyLearner
    schedule: Schedule
    env: "Env"

    @classmethod
    def over_members(cls, init: Callable, run_chunk: Callable, evaluate: Callable, learner, schedule: Schedule,
                     env: "Env") -> "Trainer":
        """The trainer from one member's init(key), run_chunk(state, settings, first_iteration) and
        evaluate(params, key): each vmapped over the member axis once and jitted (the chunk donates its state)."""
        return cls(init=jax.jit(jax.vmap(init)),
                   run_chunk=jax.jit(jax.vmap(run_chunk, in_axes=(0, 0, None)), donate_argnums=0),
                   evaluate=jax.jit(jax.vmap(evaluate)), learner=learner, schedule=schedule, env=env)
