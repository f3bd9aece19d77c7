"""Does the true cost depend on the action more than the cost critic says?

    python experiments/action_dependence.py run=runs/suite_cpu/car_goal-cvpo [member=0] [states=16]
        [particles=8] [repeats=4] [branch_at=200] [save=<file.npz>]

The E-step can only lower E_q[Q_c] as far as Q_c varies with the action within a state
(experiments/estep_particles.py measures that spread). This measures the same spread on the real cost:
`states` exploring episodes of one member of a replay run are played to step `branch_at`; at each of those
states `particles` actions are drawn from the exploring policy, and from each (state, action) the episode is
continued `repeats` times with the exploring policy for H steps (γ^H ≤ 0.01), the same random numbers for every
action of a state (common random numbers). The discounted cost of each continuation, averaged over the repeats,
is a Monte-Carlo Q_c(s, a). Shared random numbers do not make the differences between actions noise-free: once
a first action changes the path, the same numbers drive different contacts and the continuations decorrelate.
So the Monte-Carlo spread over actions holds rollout noise, and whether any action effect stands out of it is
tested (`diagnostics.action_effect_f_test`: action × repeat analysis of variance, per state and pooled, its
p-value from 2000 permutations of the actions within each repeat, as the costs are far from normal).
Printed: per state the critic's Q_c and the Monte-Carlo Q_c, each as mean and standard deviation over the
actions, their correlation over the actions, the Monte-Carlo standard error of one action's estimate, and the
test's F and p (nan where every action gave every repeat the same cost). `save=` also writes the states'
observations, the actions and the Monte-Carlo returns to an .npz file, for experiments/critic_capacity.py.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np


def main(argv: list[str]) -> int:
    from cvpo_jax.cli import exit_on_bad_input, parse_options

    with exit_on_bad_input():
        options = parse_options(argv, {"run": "", "member": "0", "states": "16", "particles": "8", "repeats": "4",
                                       "branch_at": "200", "save": ""})
        member, states, particles, repeats, branch_at = (int(options[k]) for k in
                                                         ("member", "states", "particles", "repeats", "branch_at"))
        save_dir = os.path.dirname(os.path.abspath(options["save"])) if options["save"] else ""
        if save_dir and not os.path.isdir(save_dir):
            raise ValueError(f"save={options['save']}: no directory {save_dir} to write into")
    import jax
    import jax.numpy as jnp
    from brax.envs.wrappers.training import EpisodeWrapper, VmapWrapper

    from cvpo_jax import algorithms, networks, saved_run
    from cvpo_jax.diagnostics import action_effect_f_test, discounted_returns

    with exit_on_bad_input():
        run = saved_run.load(options["run"])
        params = run.member_params(member)
    cfg, env, trainer = run.cfg, run.env, run.trainer
    algorithm = algorithms.get(cfg.algo)
    if algorithm.trainer != algorithms.REPLAY:
        print(f"error: run={options['run']}: needs a replay method's run (its config says algo={cfg.algo})",
              file=sys.stderr)
        return 2
    nets = networks.make_networks(env.observation_size, env.action_size, hidden=tuple(cfg.network.hidden),
                                  covariance=cfg.network.covariance)
    gamma = float(algorithms.config_value(cfg, algorithm.gamma_key))
    horizon = math.ceil(math.log(0.01) / math.log(gamma))
    rollout_env = EpisodeWrapper(VmapWrapper(env), branch_at + horizon + 1, 1)
    act = trainer.learner.act

    @jax.jit
    def measure(key):
        reset_key, play_key, particle_key, continue_key = jax.random.split(key, 4)
        state = rollout_env.reset(jax.random.split(reset_key, states))

        def play(state, k):
            return rollout_env.step(state, act(params, state.obs, k)), None

        state, _ = jax.lax.scan(play, state, jax.random.split(play_key, branch_at))  # [S] states at branch_at
        first = jax.vmap(lambda k: act(params, state.obs, k))(jax.random.split(particle_key, particles))  # [K,S,A]
        first = jnp.swapaxes(first, 0, 1)  # [S, K, A]
        q_critic = jax.vmap(lambda a: nets.cost_critic.apply(params.cost_critic, state.obs, a), 1, 1)(first)  # [S,K]

        # Branch every state into K actions × R repeats: env batch [S·K·R], ordered (s, k, r).
        copies = particles * repeats
        branched = jax.tree.map(lambda x: jnp.repeat(x, copies, axis=0), state)
        actions = jnp.repeat(first.reshape(states * particles, -1), repeats, axis=0)
        branched = rollout_env.step(branched, actions)

        def continue_(carry, k):
            state, alive = carry
            obs = state.obs.reshape(states, particles, repeats, -1)
            # The same key for every action of a state: the noise of repeat r is shared across the K actions.
            keys = jax.random.split(k, states * repeats)
            keys = keys.reshape(states, repeats, *keys.shape[1:])

            def one(o, kk):  # one env's exploring action
                return act(params, o[None], kk)[0]

            per_state = jax.vmap(jax.vmap(jax.vmap(one), (0, None)))  # over S, then K (key shared), then R
            action = per_state(obs, keys).reshape(states * copies, -1)
            new_state = rollout_env.step(state, action)
            cost = jnp.where(alive, new_state.info["cost"], 0.0)
            return (new_state, alive & (new_state.done <= 0)), cost

        first_cost = branched.info["cost"]
        alive = branched.done <= 0
        _, costs = jax.lax.scan(continue_, (branched, alive), jax.random.split(continue_key, horizon))
        return state.obs, first, q_critic, first_cost, costs  # [S,O], [S,K,A], [S,K], [S·K·R], [H, S·K·R]

    obs, first, q_critic, first_cost, costs = jax.device_get(measure(jax.random.PRNGKey(member)))
    series = np.concatenate([np.asarray(first_cost, np.float64)[None], np.asarray(costs, np.float64)], axis=0)
    returns = discounted_returns(series, gamma)[0].reshape(states, particles, repeats)  # G from (s, a)
    q_mc, q_mc_se = returns.mean(-1), returns.std(-1) / math.sqrt(repeats)  # [S, K]
    q_critic = np.asarray(q_critic, np.float64)
    if options["save"]:
        np.savez(options["save"], obs=obs, actions=first, returns=returns, q_critic=q_critic, member=member,
                 iteration=run.iteration)

    print(f"{cfg.algo} on {cfg.env}, member {member}, checkpoint iteration {run.iteration}: {states} states at "
          f"step {branch_at}, {particles} actions each, {repeats} continuations of {horizon} steps per action")
    print(f"{'state':>5} {'critic mean':>11} {'critic std_a':>12} {'MC mean':>8} {'MC std_a':>8} {'corr_a':>6} "
          f"{'MC s.e.':>7} {'F':>6} {'p':>6}")
    corrs = []
    for s in range(states):
        ok = np.std(q_mc[s]) > 0 and np.std(q_critic[s]) > 0
        corr = float(np.corrcoef(q_critic[s], q_mc[s])[0, 1]) if ok else float("nan")
        corrs.append(corr)
        f_value, p_value, _, _ = action_effect_f_test(returns[s], permutations=2000)
        print(f"{s:>5} {q_critic[s].mean():>11.3f} {q_critic[s].std():>12.3f} {q_mc[s].mean():>8.3f} "
              f"{q_mc[s].std():>8.3f} {corr:>6.2f} {q_mc_se[s].mean():>7.3f} {f_value:>6.2f} {p_value:>6.3f}")
    f_value, p_value, df_action, df_noise = action_effect_f_test(returns, permutations=2000)
    print(f"{'all':>5} {q_critic.mean():>11.3f} {q_critic.std(-1).mean():>12.3f} {q_mc.mean():>8.3f} "
          f"{q_mc.std(-1).mean():>8.3f} {np.nanmean(corrs):>6.2f} {q_mc_se.mean():>7.3f} {f_value:>6.2f} "
          f"{p_value:>6.3f}")
    print(f"pooled test of an action effect over the states: F({df_action}, {df_noise}) = {f_value:.2f}, "
          f"permutation p = {p_value:.3g} (2000 permutations; {1 / 2001:.1g} is the smallest it can say)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
