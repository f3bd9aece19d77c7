"""Typed run configuration, `key=value` command-line overrides, per-environment presets and validation.

Why OmegaConf structured configs and not Hydra: the run command has to answer bad input with one line and
exit code 2 before anything compiles, write its run directory where the user says, and resume from a saved
config. Hydra owns the process for all three (its own error printer and exit codes, a changed working
directory, its own output folders). Seed and setting sweeps are a vmapped axis here (`num_seeds`,
`sweep.cost_limits`), not separate processes, so Hydra's multirun is not needed for the main use; OmegaConf
alone gives the same typed `a.b=value` overrides in a few lines we control.

Resolution order: dataclass defaults < the algorithm's presets (`cvpo_jax.algorithms`) < the task's presets
for that kind of algorithm (`OFF_POLICY_ENV_PRESETS`) < command-line overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf import errors as oc_errors


class ConfigError(ValueError):
    """A bad configuration value; its message is one line meant for the user."""


@dataclass
class NetworkConfig:
    """Policy and critic multilayer perceptrons."""

    hidden: List[int] = field(default_factory=lambda: [256, 256])
    """Hidden layer sizes, shared by the policy and the critics (paper Table 1: [256, 256], ReLU)."""
    covariance: str = "full"
    """Policy covariance: 'full' (Cholesky, as the original code) or 'diag'."""


@dataclass
class CVPOConfig:
    """CVPO's algorithm settings (paper Table 1 unless said otherwise)."""

    gamma: float = 0.99
    """Discount factor."""
    polyak: float = 0.995
    """Target-network averaging weight ρ: target ← ρ·target + (1 − ρ)·online."""
    batch_size: int = 300
    """B: replay states per update."""
    num_particles: int = 32
    """K: actions sampled per state from the target policy in the E-step."""
    mstep_iterations: int = 6
    """M: gradient steps of the M-step per update."""
    critic_lr: float = 1e-3
    """Adam learning rate of the reward and cost critics."""
    actor_lr: float = 2e-3
    """Adam learning rate of the policy."""
    actor_grad_clip: float = 0.01
    """Global gradient-norm clip of the policy step (original code: 0.01)."""
    kl_bound: float = 0.1
    """ε: E-step KL bound between q* and the old policy (Table 1 'E-step KL threshold ε2')."""
    kl_mean_bound: float = 1e-3
    """ε_μ: M-step bound on the mean part of KL(old ‖ new)."""
    kl_cov_bound: float = 1e-3
    """ε_Σ: M-step bound on the covariance part of KL(old ‖ new). The config released with the paper
    (cvpo-safe-rl script/config/config_cvpo.yaml, kl_var_constraint) uses 1e-3; Table 1 prints 1e-4. We follow
    the released code, the closest record of how the paper's runs were made; the authors' stated rule is
    ε_Σ ≤ ε_μ, which 1e-3 meets with ε_μ = 1e-3. `cvpo.kl_cov_bound=1e-4` gives Table 1."""
    dual_lr_mean: float = 1.0
    """Learning rate of the M-step multiplier α_μ (eq. 81)."""
    dual_lr_cov: float = 100.0
    """Learning rate of the M-step multiplier α_Σ (eq. 82)."""
    dual_max_mean: float = 0.1
    """Upper clip of α_μ (original code)."""
    dual_max_cov: float = 10.0
    """Upper clip of α_Σ (original code)."""
    mstep_mean_over_particles: bool = True
    """M-step likelihood as the original code: a mean over states and particles of q·log π, which weighs the
    KL penalties K times more than eq. (79)'s expectation Σ_k q·log π (False). With the multipliers capped at
    0.1 and 10, only this form keeps the policy near its trust region."""
    per_state_dual: bool = False
    """Solve one (η, λ) per state (paper Remark 4) instead of one for the batch."""
    dual_max_iter: int = 50
    """Iteration cap of the L-BFGS-B dual solve when it runs to tolerance (the CPU's loop)."""
    dual_solver: str = "lbfgsb"
    """E-step dual solver: lbfgsb (jaxopt's projected L-BFGS-B) or newton (projected Newton with the analytic
    2×2 Hessian and a vectorised line search, dual_fixed_iter iterations, no data-dependent loop)."""
    dual_loop: str = "auto"
    """How the solves run: auto (tolerance on the CPU, lockstep on accelerators, decided at compile time),
    tolerance (each to tol, one after another when vmapped: fastest on the CPU) or lockstep (all members and
    states together for dual_fixed_iter iterations: no host round trip per iteration on a GPU)."""
    dual_fixed_iter: int = 10
    """Iteration budget of the lockstep loop and of the newton solver. On 150 warm-started solves of a trained
    point_goal run (experiments/estep_budget.py), L-BFGS-B in lockstep reached tol in 89% of them with 10
    (97% with 12, 61% with 8; total variation to the converged weights p95 1.4e-4 at 10), Newton in 100%
    (4.4 iterations on average)."""


@dataclass
class LagrangeConfig:
    """PID Lagrange multiplier (Stooke et al. 2020) of the Lagrangian baselines (sac_lag, td3_lag, ddpg_lag,
    ppo_lag, trpo_lag): λ = max(0, Kp·e + Ki·Σe + Kd·max(0, e − e_prev)) with e = episodic cost − limit,
    updated once per batch of finished episodes. Kp = Kd = 0 is plain gradient ascent on λ with step Ki."""

    kp: float = 0.05
    """Proportional gain."""
    ki: float = 0.01
    """Integral gain (the integral is kept non-negative)."""
    kd: float = 0.05
    """Derivative gain on the cost rising (only increases count, as Stooke et al.)."""
    initial: float = 0.0
    """λ before the first finished episodes."""
    max_multiplier: float = 100.0
    """Upper clip of λ."""


OFF_POLICY_MULTIPLIERS = ("qc_pid", "episodic_pid")  # the values of offpolicy.multiplier


@dataclass
class OffPolicyConfig:
    """The off-policy Lagrangian baselines sac_lag, td3_lag, ddpg_lag (critics, replay and acting as CVPO).

    Defaults follow the CVPO authors' released baselines (cvpo-safe-rl: safe_rl/policy/sac_lag.py,
    td3_lag.py, ddpg_lag.py, pid_controller.py; script/config/config_baseline.yaml): the multiplier from a
    PID on the batch's Q_c at every actor update, SAC's α fixed at 0.0085, replay 20k (`cvpo_jax.algorithms`
    presets), DDPG's actor lr 3e-4 (preset).
    """

    gamma: float = 0.99
    """Discount factor."""
    polyak: float = 0.995
    """Target-network averaging weight."""
    batch_size: int = 300
    """Replay transitions per update."""
    actor_lr: float = 1e-3
    """Adam learning rate of the policy."""
    critic_lr: float = 1e-3
    """Adam learning rate of the reward and cost critics."""
    multiplier: str = "qc_pid"
    """Where λ comes from. 'qc_pid' (the original's): a PID controller stepped at every actor update on the
    batch's mean Q_c(s, π(s)) against the per-state threshold ε1, gains `qc_pid_*`. 'episodic_pid' (Stooke
    et al.'s form): a PID on the mean episodic cost of each batch of finished episodes against the episodic
    limit, gains `lagrange.*`."""
    qc_pid_kp: float = 0.1
    """'qc_pid' proportional gain, on max(0, error) as the original (config_baseline.yaml KP)."""
    qc_pid_ki: float = 0.003
    """'qc_pid' integral gain (KI)."""
    qc_pid_kd: float = 0.001
    """'qc_pid' derivative gain on the error's rise (KD)."""
    normalize_by_multiplier: bool = False
    """Divide the actor loss by (1 + λ), which keeps the step size steady as λ grows. The original does not."""
    sac_initial_alpha: float = 0.0085
    """SAC's entropy temperature α (the original's fixed alpha 0.0085); the start value when tuned."""
    sac_tune_alpha: bool = False
    """Tune α towards `sac_target_entropy` (SAC v2). The original keeps α fixed."""
    sac_target_entropy: Optional[float] = None
    """SAC's target policy entropy when tuned; None is −(action size)."""
    sac_alpha_lr: float = 3e-4
    """Adam learning rate of log α when tuned."""
    exploration_noise: float = 0.1
    """TD3/DDPG: std of the Gaussian noise added to the deterministic action while acting."""
    target_noise: float = 0.2
    """TD3: std of the target-policy smoothing noise."""
    target_noise_clip: float = 0.5
    """TD3: clip of the target-policy smoothing noise."""
    policy_delay: int = 2
    """TD3: critic updates per policy update."""


@dataclass
class OnPolicyConfig:
    """The on-policy methods ppo_lag, trpo_lag, cpo, trpo and csc: rollouts, GAE, value fits, policy step."""

    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.97
    """GAE λ for the reward and the cost advantages."""
    rollout_length: Optional[int] = None
    """Steps per environment between policy updates; None is one episode length."""
    value_lr: float = 1e-3
    """Adam learning rate of the reward and cost value networks."""
    value_epochs: int = 10
    """Passes over the rollout fitting the value networks."""
    num_minibatches: int = 8
    """Minibatches per pass (PPO policy and value fits)."""
    actor_lr: float = 3e-4
    """PPO: Adam learning rate of the policy."""
    ppo_epochs: int = 10
    """PPO: passes over the rollout per update."""
    ppo_clip: float = 0.2
    """PPO: ratio clip."""
    target_kl: float = 0.01
    """δ: KL trust region of TRPO/CPO/CSC steps; PPO stops its epochs early at 1.5·δ."""
    cg_iterations: int = 10
    """Conjugate-gradient iterations for F⁻¹g."""
    cg_damping: float = 0.1
    """Damping added to the Fisher-vector product."""
    line_search_steps: int = 10
    """Backtracking line-search steps."""
    backtrack_coeff: float = 0.8
    """Step shrink factor per line-search step."""
    entropy_coef: float = 0.0
    """Entropy bonus of the policy objective."""


@dataclass
class CSCConfig:
    """Conservative Safety Critics (Bharadhwaj et al. 2021) settings (paper A.6 where given)."""

    cql_alpha: float = 0.5
    """α of CQL(ζ) with the sign reversed, so Q_C over-estimates."""
    safety_critic_lr: float = 2e-4
    """η_Q: Adam learning rate of the safety critic."""
    lambda_lr: float = 4e-2
    """η_λ: learning rate of the multiplier (eq. 9)."""
    critic_updates: int = 32
    """N: safety-critic gradient steps per epoch (one rollout), on replay minibatches."""
    batch_size: int = 256
    """Replay minibatch size for the safety critic."""
    max_resamples: int = 100
    """Cap on rejection-sampling draws per action while acting (paper A.4: 100)."""
    when_all_rejected: str = "last_draw"
    """What is executed when all `max_resamples` draws are rejected: last_draw (the paper: its loop stops and
    the last draw, a plain sample of π, is executed) or safest (the draw with the lowest Q_C)."""
    num_particles: int = 16
    """Draws from π per state estimating E_{a~π}Q_C (CQL(ζ) term, baseline of Â_C, policy cost term)."""
    polyak: float = 0.995
    """Target safety-critic averaging weight."""
    cost_units: Optional[str] = None
    """Units in which χ and V̂_C meet Q_C: episodic (as they are, the paper's: the cost is a single failure
    event, so Q_C, χ and V̂_C are probabilities of failure) or per_state (an episodic cost spread over the
    episode's steps, for a per-step cost). None: the task's, episodic when `env.cost_is_failure` (the traps
    tasks), else per_state."""


@dataclass
class SweepConfig:
    """Scalar settings that vary across the vmapped member axis (crossed with the seeds)."""

    cost_limits: List[float] = field(default_factory=list)
    """Episodic cost limits to train side by side; empty means just `cost_limit`."""


@dataclass
class RunConfig:
    """Everything `python -m cvpo_jax.run` reads."""

    env: str = "point_goal"
    """Task name; see cvpo_jax.envs.names()."""
    algo: str = "cvpo"
    """Training algorithm: a name in the table of `cvpo_jax.algorithms` (`python -m cvpo_jax.run help`)."""
    seed: int = 0
    """Base random seed; member i of the sweep uses seed + i."""
    num_seeds: int = 1
    """Independent seeds trained side by side in one program (a vmapped axis, one compile)."""
    devices: int = 1
    """Accelerators to shard the member axis over (members must divide evenly)."""
    episode_length: Optional[int] = None
    """Steps per episode; None takes the task's preset (CVPO tasks 400, circle 300)."""
    cost_limit: Optional[float] = None
    """Episodic cost limit; None takes the task's preset (CVPO tasks 10, circle 20)."""
    total_env_steps: int = 200_000
    """Environment steps per member before training stops."""
    num_envs: int = 8
    """Environments stepped in parallel per member."""
    warmup_env_steps: int = 4000
    """Uniform-random actions for this many env steps before learning starts (original: 4000; circle 2000)."""
    warmup_updates: Optional[int] = None
    """Off-policy methods: updates run on the warm-up data at the end of the warm-up, before the policy
    first acts; None is warmup_env_steps // 2, as the original (safe_rl/worker/off_policy_worker.py)."""
    updates_per_iteration: int = 1
    """Gradient updates after each step of the `num_envs` environments (off-policy methods; their presets in
    `cvpo_jax.algorithms` set 2 per step of 15 envs, the original's 0.133 updates per env step)."""
    replay_capacity: int = 80_000
    """Transitions kept per member (original: 80k)."""
    reset_refill_period: Optional[int] = None
    """Iterations between refills of the pool of ready reset states, one per environment, that an environment
    whose episode ended (terminated or truncated) restarts from (core/acting.py): a refill is one vmapped reset.
    An env whose episodes end twice between refills restarts from the same state again (train/reused_resets).
    None: 16 for a task that can terminate, the episode length for one that cannot (`env.terminates`)."""
    stagger_episode_clocks: bool = True
    """Cut env i's first episode after T − ⌊i·T/E⌋ steps so that the envs run at evenly spread points of their
    episodes (core/acting.py). The original steps one env, whose replay holds every point of the episode;
    envs in lock-step (false) fill a replay of fewer than num_envs × episode_length transitions with one
    window of the episode only (Car-Circle: 32 envs × 300 steps against replay 8000). Shortened first
    episodes are left out of the training-episode metrics. It acts at a run's start: a resumed run keeps the
    clocks its checkpoint holds (runs started before this option existed ran in lock-step)."""
    chunk_env_steps: int = 2000
    """Env steps per member inside one jitted call; Python only runs between chunks."""
    eval_every_env_steps: int = 20_000
    """Evaluation interval (env steps per member)."""
    eval_episodes: int = 20
    """Evaluation episodes (run in parallel) with the policy mean (the original: 20 per epoch)."""
    checkpoint_every_env_steps: int = 20_000
    """Checkpoint interval; a killed run loses at most this much."""
    checkpoints_kept: int = 2
    """How many of the newest checkpoints a run keeps (older ones are deleted as new ones are written)."""
    out_dir: str = "runs"
    """Parent folder of run directories."""
    run_name: Optional[str] = None
    """Run directory name; default <env>-<algo>-<timestamp>."""
    resume: Optional[str] = None
    """A run directory to continue from its last checkpoint."""
    print_config: bool = False
    """Print the resolved configuration as YAML and exit."""
    progress: bool = True
    """Show a progress bar."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    cvpo: CVPOConfig = field(default_factory=CVPOConfig)
    lagrange: LagrangeConfig = field(default_factory=LagrangeConfig)
    offpolicy: OffPolicyConfig = field(default_factory=OffPolicyConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    csc: CSCConfig = field(default_factory=CSCConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


# Per-task presets beyond the episode length and cost limit (which the tasks carry themselves), for the
# off-policy methods the CVPO authors ran (cvpo, sac_lag, td3_lag, ddpg_lag). Car-Circle follows their
# script/circle.py, whose grid overrides these keys for all four methods: warm-up 2000, replay 8000, actor lr
# 6.4e-3, critic lr 1.5e-3, episode_rerun_num 28 (28 / batch 300 = 0.093 updates per env step: here 3 updates
# per step of 32 envs, 0.094), and for CVPO K 64 and 29 M-step iterations.
OFF_POLICY_ENV_PRESETS: dict[str, dict[str, Any]] = {
    "car_circle": {
        "warmup_env_steps": 2000,
        "replay_capacity": 8000,
        "num_envs": 32,
        "updates_per_iteration": 3,
        "cvpo.num_particles": 64,
        "cvpo.mstep_iterations": 29,
        "cvpo.actor_lr": 6.4e-3,
        "cvpo.critic_lr": 1.5e-3,
        "offpolicy.actor_lr": 6.4e-3,
        "offpolicy.critic_lr": 1.5e-3,
    },
}


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _field_type(key: str) -> str:
    node: Any = RunConfig()
    *parents, leaf = key.split(".")
    for p in parents:
        node = getattr(node, p)
    for f in dataclasses.fields(node):
        if f.name == leaf:
            return str(f.type).replace("typing.", "")
    return "?"


def _parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"argument {arg!r} is not of the form key=value (e.g. env=point_goal)")
        key, value = arg.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def _unknown_key_message(key: str) -> str:
    known = _all_keys(RunConfig())
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown option {key!r}: {hint}allowed: {', '.join(known)}"


def _merge(base: Any, pairs: list[tuple[str, Any]], *, from_user: bool) -> Any:
    known = set(_all_keys(RunConfig()))
    for key, value in pairs:
        if key not in known:
            raise ConfigError(_unknown_key_message(key))
        try:
            update = OmegaConf.from_dotlist([f"{key}={value}"]) if from_user else OmegaConf.create({})
            if not from_user:
                OmegaConf.update(update, key, value)
            base = OmegaConf.merge(base, update)
        except (oc_errors.ValidationError, oc_errors.GrammarParseError, oc_errors.OmegaConfBaseException) as e:
            expected = _field_type(key)
            raise ConfigError(f"{key}={value}: expected a value of type {expected}") from e
    return base


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value}: {allowed}")


def validate(cfg: RunConfig, env_names: Sequence[str]) -> None:
    """Reject impossible settings with a one-line ConfigError naming the key and what is allowed."""
    from cvpo_jax import algorithms

    c = cfg.cvpo
    _check(cfg.env in env_names, "env", cfg.env, f"unknown environment; allowed: {', '.join(env_names)}")
    _check(cfg.algo in algorithms.ALGORITHMS, "algo", cfg.algo,
           f"unknown algorithm; allowed: {', '.join(algorithms.names())}")
    _check(cfg.num_seeds >= 1, "num_seeds", cfg.num_seeds, "must be >= 1")
    _check(cfg.devices >= 1, "devices", cfg.devices, "must be >= 1")
    _check(cfg.episode_length is None or cfg.episode_length >= 1, "episode_length", cfg.episode_length,
           "must be >= 1")
    _check(cfg.cost_limit is None or cfg.cost_limit >= 0, "cost_limit", cfg.cost_limit, "must be >= 0")
    for limit in cfg.sweep.cost_limits:
        _check(limit >= 0, "sweep.cost_limits", list(cfg.sweep.cost_limits), "every limit must be >= 0")
    _check(cfg.total_env_steps >= 1, "total_env_steps", cfg.total_env_steps, "must be >= 1")
    _check(cfg.num_envs >= 1, "num_envs", cfg.num_envs, "must be >= 1")
    _check(cfg.warmup_env_steps >= 0, "warmup_env_steps", cfg.warmup_env_steps, "must be >= 0")
    _check(cfg.warmup_updates is None or cfg.warmup_updates >= 0, "warmup_updates", cfg.warmup_updates,
           "must be >= 0 (or null: warmup_env_steps // 2)")
    _check(not cfg.warmup_updates or cfg.warmup_env_steps > 0, "warmup_updates", cfg.warmup_updates,
           "needs warmup_env_steps > 0: the updates learn from the warm-up's data")
    _check(cfg.updates_per_iteration >= 0, "updates_per_iteration", cfg.updates_per_iteration, "must be >= 0")
    _check(cfg.reset_refill_period is None or cfg.reset_refill_period >= 1, "reset_refill_period",
           cfg.reset_refill_period, "must be >= 1 (or null: chosen from the task)")
    _check(cfg.chunk_env_steps >= cfg.num_envs, "chunk_env_steps", cfg.chunk_env_steps,
           f"must be >= num_envs ({cfg.num_envs}): a chunk steps every environment at least once")
    _check(cfg.replay_capacity >= cfg.num_envs, "replay_capacity", cfg.replay_capacity,
           f"must be >= num_envs ({cfg.num_envs})")
    batch_key = algorithms.get(cfg.algo).replay_batch_key
    if batch_key is not None:
        batch_size = algorithms.config_value(cfg, batch_key)
        _check(cfg.replay_capacity >= batch_size, "replay_capacity", cfg.replay_capacity,
               f"must be >= {batch_key} ({batch_size})")
    _check(cfg.eval_every_env_steps >= 1, "eval_every_env_steps", cfg.eval_every_env_steps, "must be >= 1")
    _check(cfg.eval_episodes >= 1, "eval_episodes", cfg.eval_episodes, "must be >= 1")
    _check(cfg.checkpoint_every_env_steps >= 1, "checkpoint_every_env_steps", cfg.checkpoint_every_env_steps,
           "must be >= 1")
    _check(cfg.checkpoints_kept >= 1, "checkpoints_kept", cfg.checkpoints_kept, "must be >= 1")
    _check(len(cfg.network.hidden) >= 1 and all(h >= 1 for h in cfg.network.hidden), "network.hidden",
           list(cfg.network.hidden), "must be a non-empty list of positive sizes, e.g. [256,256]")
    _check(cfg.network.covariance in ("full", "diag"), "network.covariance", cfg.network.covariance,
           "allowed: full, diag")
    _check(0.0 < c.gamma < 1.0, "cvpo.gamma", c.gamma, "must be in (0, 1)")
    _check(0.0 <= c.polyak < 1.0, "cvpo.polyak", c.polyak, "must be in [0, 1)")
    _check(c.batch_size >= 1, "cvpo.batch_size", c.batch_size, "must be >= 1")
    _check(c.num_particles >= 1, "cvpo.num_particles", c.num_particles, "K must be >= 1")
    _check(c.mstep_iterations >= 1, "cvpo.mstep_iterations", c.mstep_iterations, "must be >= 1")
    for name in ("critic_lr", "actor_lr", "actor_grad_clip", "kl_bound", "kl_mean_bound", "kl_cov_bound",
                 "dual_lr_mean", "dual_lr_cov", "dual_max_mean", "dual_max_cov"):
        value = getattr(c, name)
        _check(value > 0, f"cvpo.{name}", value, "must be > 0")
    _check(c.dual_max_iter >= 1, "cvpo.dual_max_iter", c.dual_max_iter, "must be >= 1")
    _check(c.dual_fixed_iter >= 1, "cvpo.dual_fixed_iter", c.dual_fixed_iter, "must be >= 1")
    _check(c.dual_solver in ("lbfgsb", "newton"), "cvpo.dual_solver", c.dual_solver, "allowed: lbfgsb, newton")
    _check(c.dual_loop in ("auto", "tolerance", "lockstep"), "cvpo.dual_loop", c.dual_loop,
           "allowed: auto, tolerance, lockstep")
    _validate_baselines(cfg)


def _validate_baselines(cfg: RunConfig) -> None:
    lag, off, on, csc = cfg.lagrange, cfg.offpolicy, cfg.onpolicy, cfg.csc
    for name in ("kp", "ki", "kd", "initial"):
        _check(getattr(lag, name) >= 0, f"lagrange.{name}", getattr(lag, name), "must be >= 0")
    _check(lag.max_multiplier > 0, "lagrange.max_multiplier", lag.max_multiplier, "must be > 0")
    for section, name in (("offpolicy", off), ("onpolicy", on)):
        _check(0.0 < name.gamma < 1.0, f"{section}.gamma", name.gamma, "must be in (0, 1)")
    _check(0.0 <= off.polyak < 1.0, "offpolicy.polyak", off.polyak, "must be in [0, 1)")
    _check(off.batch_size >= 1, "offpolicy.batch_size", off.batch_size, "must be >= 1")
    for name in ("actor_lr", "critic_lr", "sac_initial_alpha", "sac_alpha_lr"):
        _check(getattr(off, name) > 0, f"offpolicy.{name}", getattr(off, name), "must be > 0")
    for name in ("exploration_noise", "target_noise", "target_noise_clip"):
        _check(getattr(off, name) >= 0, f"offpolicy.{name}", getattr(off, name), "must be >= 0")
    _check(off.policy_delay >= 1, "offpolicy.policy_delay", off.policy_delay, "must be >= 1")
    _check(off.multiplier in OFF_POLICY_MULTIPLIERS, "offpolicy.multiplier", off.multiplier,
           f"allowed: {', '.join(OFF_POLICY_MULTIPLIERS)}")
    for name in ("qc_pid_kp", "qc_pid_ki", "qc_pid_kd"):
        _check(getattr(off, name) >= 0, f"offpolicy.{name}", getattr(off, name), "must be >= 0")
    _check(0.0 <= on.gae_lambda <= 1.0, "onpolicy.gae_lambda", on.gae_lambda, "must be in [0, 1]")
    _check(on.rollout_length is None or on.rollout_length >= 1, "onpolicy.rollout_length", on.rollout_length,
           "must be >= 1 (or null: one episode)")
    for name in ("value_lr", "actor_lr", "ppo_clip", "target_kl", "backtrack_coeff"):
        _check(getattr(on, name) > 0, f"onpolicy.{name}", getattr(on, name), "must be > 0")
    _check(on.backtrack_coeff < 1, "onpolicy.backtrack_coeff", on.backtrack_coeff, "must be < 1")
    _check(on.cg_damping >= 0, "onpolicy.cg_damping", on.cg_damping, "must be >= 0")
    _check(on.entropy_coef >= 0, "onpolicy.entropy_coef", on.entropy_coef, "must be >= 0")
    for name in ("value_epochs", "num_minibatches", "ppo_epochs", "cg_iterations", "line_search_steps"):
        _check(getattr(on, name) >= 1, f"onpolicy.{name}", getattr(on, name), "must be >= 1")
    _check(csc.cql_alpha >= 0, "csc.cql_alpha", csc.cql_alpha, "must be >= 0")
    for name in ("safety_critic_lr", "lambda_lr"):
        _check(getattr(csc, name) > 0, f"csc.{name}", getattr(csc, name), "must be > 0")
    for name in ("critic_updates", "batch_size", "max_resamples", "num_particles"):
        _check(getattr(csc, name) >= 1, f"csc.{name}", getattr(csc, name), "must be >= 1")
    _check(0.0 <= csc.polyak < 1.0, "csc.polyak", csc.polyak, "must be in [0, 1)")
    _check(csc.when_all_rejected in ("last_draw", "safest"), "csc.when_all_rejected", csc.when_all_rejected,
           "allowed: last_draw, safest")
    _check(csc.cost_units in (None, "episodic", "per_state"), "csc.cost_units", csc.cost_units,
           "allowed: episodic, per_state (or unset: the task's)")


def warmup_updates(cfg: RunConfig) -> int:
    """Updates of the off-policy methods at the end of the warm-up (`warmup_updates`, None: half the warm-up)."""
    return cfg.warmup_env_steps // 2 if cfg.warmup_updates is None else int(cfg.warmup_updates)


def fill_task_presets(cfg: "RunConfig", env) -> "RunConfig":
    """Settings left unset take the task's own: episode length and cost limit (`env.episode_length`,
    `env.cost_limit`), and CSC's cost units (episodic when `env.cost_is_failure`, else per_state).

    Every entry point that builds a trainer calls this (run, bench train), so an algorithm may rely on both.
    """
    if cfg.episode_length is None:
        cfg.episode_length = int(env.episode_length)
    if cfg.cost_limit is None:
        cfg.cost_limit = float(env.cost_limit)
    if cfg.csc.cost_units is None:
        cfg.csc.cost_units = "episodic" if getattr(env, "cost_is_failure", False) else "per_state"
    return cfg


def load_config(argv: Sequence[str], env_names: Sequence[str], *, base: Optional[RunConfig] = None) -> RunConfig:
    """Build the RunConfig from `key=value` arguments: defaults, then the env preset, then the overrides.

    `base` replaces the defaults (resume uses the saved config of the run). Raises ConfigError.
    """
    from cvpo_jax import algorithms

    pairs = _parse_overrides(argv)
    merged = OmegaConf.structured(base if base is not None else RunConfig())
    env, algo = dict(pairs).get("env", merged.env), dict(pairs).get("algo", merged.algo)
    if base is None and algo in algorithms.ALGORITHMS:
        algorithm = algorithms.get(algo)
        merged = _merge(merged, list(algorithm.presets.items()), from_user=False)
        if algorithm.trainer == algorithms.REPLAY and env in OFF_POLICY_ENV_PRESETS:
            merged = _merge(merged, list(OFF_POLICY_ENV_PRESETS[env].items()), from_user=False)
    merged = _merge(merged, pairs, from_user=True)
    cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg, env_names)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_file(path: str) -> RunConfig:
    """Read a saved run's config.yaml back into a RunConfig (unknown keys are an error)."""
    try:
        loaded = OmegaConf.merge(OmegaConf.structured(RunConfig()), OmegaConf.load(path))
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(f"{path}: not a config this version can read ({type(e).__name__})") from e
    return OmegaConf.to_object(loaded)  # type: ignore[return-value]
