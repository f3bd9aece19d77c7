"""`python -m cvpo_jax.diagnostics run=<run dir> [episodes=N]`: do the critics know what the policy costs?

For a replay method's run (CVPO, SAC-Lag, TD3-Lag, DDPG-Lag), loads the last checkpoint, runs `episodes`
training-mode episodes per member (the exploring policy, as the replay data comes from), and compares the
critics with what actually happened: Q_c(s_t, a_t) against the discounted cost that followed,
G^c_t = Σ_k γ^k c_{t+k}, and Q_r against the discounted reward, at the steps t < T of a training episode.
The critics bootstrap through the time limit (it is not a termination), so the episodes are run H steps past
T (γ^H ≤ 0.01) and the Monte-Carlo sums see that far. Q_r stops at a reached goal (the original's terminal
flag) while the Monte-Carlo reward goes on, so on the goal tasks Q_r sits below it by design; Q_c does not
stop there, so it should match its Monte-Carlo cost. On a task that terminates (a death, a fall), nothing
counts after the termination: the sums stop there and the means are over the states visited before it.

A cost critic that sits below the Monte-Carlo cost lets the E-step believe a policy meets ε1 when it does not.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional, Sequence

import numpy as np

DEFAULTS = {"run": "", "episodes": "8"}


def discounted_returns(values: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = Σ_k γ^k v_{t+k} along axis 0 (time), cut at the end of the array. values [T, ...]."""
    out = np.zeros_like(values, dtype=np.float64)
    running = np.zeros(values.shape[1:], np.float64)
    for t in range(values.shape[0] - 1, -1, -1):
        running = values[t] + gamma * running
        out[t] = running
    return out


def action_effect_f_test(returns: np.ndarray, permutations: int = 0, seed: int = 0) -> tuple[float, float, int, int]:
    """Is there an action effect beyond rollout noise? returns [K actions, R repeats] of one state, or
    [S, K, R] for S states pooled (each state with its own action and repeat means).

    Two-way analysis of variance without replication: action and repeat (its shared random numbers) as the two
    factors, their interaction as the noise. Under "the action does not matter" F follows F(df_action, df_noise)
    if the noise is normal. Costs are not (a car that stays in a hazard is a long tail), so with `permutations`
    > 0 the p-value is a permutation test's instead: the actions of a state are drawn independently from one
    policy, so under that hypothesis the K returns of one repeat are exchangeable, and shuffling them within
    each repeat gives F's exact null distribution. Returns (F, p, df_action, df_noise); F and p are nan when
    every action gave every repeat the same return (no noise to measure against: the action changed nothing).
    """
    returns = np.asarray(returns, np.float64)
    returns = returns.reshape(-1, *returns.shape[-2:])  # [S, K, R]
    s, k, r = returns.shape
    df_action, df_noise = s * (k - 1), s * (k - 1) * (r - 1)

    def f_statistic(g):  # g [..., S, K, R]
        action_means, repeat_means = g.mean(-1, keepdims=True), g.mean(-2, keepdims=True)
        grand = g.mean((-2, -1), keepdims=True)
        ss_action = r * np.sum((action_means - grand) ** 2, axis=(-3, -2, -1))
        ss_noise = np.sum((g - action_means - repeat_means + grand) ** 2, axis=(-3, -2, -1))
        return ss_action, ss_noise

    ss_action, ss_noise = f_statistic(returns)
    if ss_noise <= 1e-12 * max(1.0, np.sum(returns ** 2)):
        return float("nan"), float("nan"), df_action, df_noise
    f_value = float((ss_action / df_action) / (ss_noise / df_noise))
    if permutations > 0:
        rng = np.random.default_rng(seed)
        shuffled = rng.permuted(np.broadcast_to(returns, (permutations, s, k, r)), axis=-2)  # within each repeat
        perm_action, perm_noise = f_statistic(shuffled)
        perm_f = (perm_action / df_action) / np.maximum(perm_noise / df_noise, 1e-300)
        return f_value, float((1 + np.sum(perm_f >= f_value * (1 - 1e-12))) / (1 + permutations)), df_action, df_noise
    from scipy.stats import f as f_distribution

    return f_value, float(f_distribution.sf(f_value, df_action, df_noise)), df_action, df_noise


def weighted_spread(particles: np.ndarray, weights: np.ndarray, old_mean: np.ndarray,
                    old_std: np.ndarray) -> dict[str, float]:
    """Where the E-step's q* puts the M-step's covariance target, relative to the old policy's variance.

    CVPO's covariance head is fitted around the *old* mean (mstep.py, MPO's decoupling), so its per-dimension
    target is the q*-weighted second moment m2 = Σ_k w_k (a_k − μ_old)²; the fitted σ moves towards √m2.
    Under an exponential tilt of a Gaussian (q* ∝ π_old · exp(g·a), a score linear in the action) the
    tilted distribution keeps the variance σ² and moves its mean by σ² g, so m2 = σ² + shift²: a linear score
    widens the target, only a score curved around μ_old narrows it.

    Args:
      particles: [B, K, A] actions drawn from the old policy. weights: [B, K] q* on them, rows summing to 1.
      old_mean, old_std: [B, A] the old policy's mean and per-dimension standard deviation.

    Returns, averaged over states and dimensions (each a ratio to σ_old² or in units of σ_old):
      "target_to_old": m2 / σ² (> 1: the M-step pulls σ up);
      "uniform_to_old": the same with uniform weights (sampling noise alone; 1 in expectation);
      "shift_sq": ((E_q[a] − μ_old) / σ)², the squared mean shift, m2/σ² = variance part + this;
      "tilted_variance": Var_q(a) / σ² about q*'s own mean (what a free Gaussian fit would take).
    """
    z = (particles - old_mean[:, None, :]) / old_std[:, None, :]  # [B, K, A] in units of σ_old
    w = weights[:, :, None]  # [B, K, 1]
    target = np.sum(w * z**2, axis=1)  # [B, A]
    shift = np.sum(w * z, axis=1)  # [B, A]
    return {"target_to_old": float(np.mean(target)), "uniform_to_old": float(np.mean(z**2)),
            "shift_sq": float(np.mean(shift**2)), "tilted_variance": float(np.mean(target - shift**2))}


def critic_check(run_dir: str, episodes: int = 8) -> list[dict[str, float]]:
    """Per member: mean Q_c, Monte-Carlo discounted cost, mean Q_r, Monte-Carlo discounted reward."""
    import jax
    import jax.numpy as jnp
    from brax.envs.wrappers.training import EpisodeWrapper, VmapWrapper

    from cvpo_jax import algorithms, networks, saved_run
    from cvpo_jax.config import from_yaml_file

    cfg = from_yaml_file(os.path.join(run_dir, "config.yaml"))
    algorithm = algorithms.get(cfg.algo)
    if algorithm.trainer != algorithms.REPLAY:
        raise ValueError(f"run={run_dir}: {cfg.algo} has no Q critics (a replay method's run is needed)")
    run = saved_run.load(run_dir, cfg)
    env, trainer, members, params = run.env, run.trainer, run.members, run.state.learner.params
    nets = networks.make_networks(env.observation_size, env.action_size, hidden=tuple(cfg.network.hidden),
                                  covariance=cfg.network.covariance)
    gamma = float(algorithms.config_value(cfg, algorithm.gamma_key))
    episode_length = int(cfg.episode_length)
    tail = math.ceil(math.log(0.01) / math.log(gamma))  # γ^tail ≤ 0.01
    length = episode_length + tail
    rollout_env = EpisodeWrapper(VmapWrapper(env), length, 1)

    def member_rollout(member_params, key):
        reset_key, act_key = jax.random.split(key)
        state = rollout_env.reset(jax.random.split(reset_key, episodes))

        def step(carry, k):
            state, alive = carry
            action = trainer.learner.act(member_params, state.obs, k)  # [E, A] exploring, inside the box
            q_c = nets.cost_critic.apply(member_params.cost_critic, state.obs, action)  # [E]
            q_r = jnp.min(nets.reward_critic.apply(member_params.reward_critic, state.obs, action), axis=-1)
            state = rollout_env.step(state, action)
            # Nothing is earned or paid after a termination (the Monte-Carlo sums stop there).
            cost, reward = jnp.where(alive, state.info["cost"], 0.0), jnp.where(alive, state.reward, 0.0)
            return (state, alive & (state.done <= 0)), (q_c, q_r, cost, reward, alive)

        alive = jnp.ones((episodes,), jnp.bool_)
        _, out = jax.lax.scan(step, (state, alive), jax.random.split(act_key, length))
        return out  # each [T, E]

    keys = jax.vmap(lambda k: jax.random.fold_in(k, 12345))(members.keys())
    q_c, q_r, cost, reward, alive = jax.device_get(jax.jit(jax.vmap(member_rollout))(params, keys))  # [N, T, E]
    compared = slice(0, episode_length)

    def masked_mean(x, mask):
        return float(np.sum(np.where(mask, x, 0.0)[compared]) / max(np.sum(mask[compared]), 1))

    rows = []
    for m in range(members.size):
        mc_cost = discounted_returns(np.asarray(cost[m], np.float64), gamma)
        mc_reward = discounted_returns(np.asarray(reward[m], np.float64), gamma)
        rows.append({
            "member": m, "seed": members.seeds[m], "cost_threshold": members.cost_thresholds[m],
            # Means over the states visited before a termination.
            "q_c": masked_mean(q_c[m], alive[m]), "mc_cost": masked_mean(mc_cost, alive[m]),
            "q_r": masked_mean(q_r[m], alive[m]), "mc_reward": masked_mean(mc_reward, alive[m]),
            "episode_cost": float(np.mean(np.sum(cost[m][compared], 0))), "compared_steps": episode_length,
        })
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from cvpo_jax.cli import parse_options

    try:
        options = parse_options(argv, DEFAULTS)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = options["run"]
    if not run_dir or not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        print(f"error: run={run_dir}: give a run directory made by cvpo_jax.run", file=sys.stderr)
        return 2
    try:
        episodes = int(options["episodes"])
        if episodes < 1:
            raise ValueError
    except ValueError:
        print(f"error: episodes={options['episodes']}: expected a positive integer", file=sys.stderr)
        return 2
    try:
        rows = critic_check(run_dir, episodes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"critics against Monte-Carlo returns of {episodes} exploring episodes per member "
          f"(steps 0..{rows[0]['compared_steps'] - 1} of each episode)")
    print(f"{'member':>6} {'seed':>5} {'eps1':>6} {'Q_c':>8} {'MC cost':>8} {'Q_r':>8} {'MC reward':>9} "
          f"{'ep. cost':>8}")
    for r in rows:
        print(f"{r['member']:>6} {r['seed']:>5} {r['cost_threshold']:>6.3f} {r['q_c']:>8.3f} {r['mc_cost']:>8.3f} "
              f"{r['q_r']:>8.3f} {r['mc_reward']:>9.3f} {r['episode_cost']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
