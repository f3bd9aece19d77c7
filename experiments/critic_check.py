"""Does our TD cost critic find Q_c^π when π is held fixed? A check of the critic machinery alone.

    python experiments/critic_check.py [env=point_goal] [envs=32] [steps=1000] [updates=20000] [hidden=64]
                                       [run=<replay run dir> [member=0]]   (that member's exploring policy)

The trained runs' cost critics read below the Monte-Carlo cost of their own policy (experiments/README.md).
Two explanations differ in what they predict here: a defect in the TD machinery (targets, data, time limits)
would make a critic trained on a *fixed* policy's data read low too; the actor exploiting the critic's errors
(the policy moves to where Q_c is under-estimated, a minimisation bias like the over-estimation bias of Q_r)
would not, because a fixed policy does not search the critic.

It rolls out the uniform random policy in `envs` environments for `steps` steps from a reset (no time limit
inside: one long episode each), trains a fresh cost critic on all the transitions with the trainers' own
pieces (`critics.cost_target`, unmasked as in training; target network with polyak 0.995; next action drawn
from the same uniform policy; Adam 1e-3; batch 128; 64×64), and compares Q_c(s_t, a_t) with the discounted
Monte-Carlo cost G_t = Σ_k γ^k c_{t+k} on the first half of each trajectory (where the cut at `steps`
changes G_t by at most γ^(steps/2), 0.7% at 1000).
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    options = {"env": "point_goal", "envs": "32", "steps": "1000", "updates": "20000", "hidden": "64", "run": "",
               "member": "0"}
    from cvpo_jax.cli import exit_on_bad_input, parse_options

    with exit_on_bad_input():
        options = parse_options(argv, options)
    import jax
    import jax.numpy as jnp
    import optax
    from brax.envs.wrappers.training import EpisodeWrapper, VmapWrapper

    from cvpo_jax import critics, envs, networks
    from cvpo_jax.core.gradients import gradient_step
    from cvpo_jax.diagnostics import discounted_returns

    gamma, polyak, batch_size = 0.99, 0.995, 128
    num_envs, steps, updates = int(options["envs"]), int(options["steps"]), int(options["updates"])
    hidden = int(options["hidden"])
    if options["run"]:
        from cvpo_jax import saved_run
        from cvpo_jax.core.members import one_member

        run = saved_run.load(options["run"])
        cfg, env, trainer, restored = run.cfg, run.env, run.trainer, run.state
        options["env"] = cfg.env
        member = int(options["member"])
        policy_params = one_member(restored.learner.params, member)

        def act(obs, key):  # the run's exploring policy (one member), as in training
            return trainer.learner.act(policy_params, obs, key)
    else:
        env = envs.make(options["env"])

        def act(obs, key):  # the uniform random policy
            return jax.random.uniform(key, obs.shape[:-1] + (env.action_size,), minval=-1.0, maxval=1.0)
    rollout_env = EpisodeWrapper(VmapWrapper(env), steps + 1, 1)
    start = time.time()

    def rollout(key):
        reset_key, act_key = jax.random.split(key)
        state = rollout_env.reset(jax.random.split(reset_key, num_envs))

        def step(state, k):
            action = act(state.obs, k)
            next_state = rollout_env.step(state, action)
            return next_state, (state.obs, action, next_state.info["cost"], next_state.obs)

        _, out = jax.lax.scan(step, state, jax.random.split(act_key, steps))
        return out  # [T, E, ...]

    obs, action, cost, next_obs = jax.device_get(jax.jit(rollout)(jax.random.PRNGKey(0)))
    which = (f"the exploring policy of {options['run']} (member {options['member']})" if options["run"]
             else "the uniform policy")
    print(f"rollout: {num_envs} envs x {steps} steps of {which} on {options['env']}, "
          f"cost per step {cost.mean():.4f}, {time.time() - start:.0f} s")

    nets = networks.make_networks(env.observation_size, env.action_size, hidden=(hidden, hidden))
    params = networks.init_params(nets, jax.random.PRNGKey(1), env.observation_size, env.action_size).cost_critic
    target = params
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    flat = lambda x: jnp.asarray(x.reshape((steps * num_envs,) + x.shape[2:]))  # noqa: E731
    data = (flat(obs), flat(action), flat(cost), flat(next_obs))

    @jax.jit
    def train(params, target, opt_state, key):
        def one(carry, k):
            params, target, opt_state = carry
            index_key, action_key = jax.random.split(k)
            idx = jax.random.randint(index_key, (batch_size,), 0, steps * num_envs)
            o, a, c, o2 = (x[idx] for x in data)
            a2 = act(o2, action_key)  # the fixed policy's next action
            y = critics.cost_target(c, jnp.zeros_like(c), nets.cost_critic.apply(target, o2, a2), gamma)
            step = gradient_step(critics.cost_critic_loss, params, opt_state, optimizer, nets.cost_critic.apply,
                                 o, a, y, has_aux=True)
            target = critics.polyak_update(target, step.params, polyak)
            return (step.params, target, step.opt_state), step.loss

        (params, target, opt_state), losses = jax.lax.scan(one, (params, target, opt_state),
                                                           jax.random.split(key, 1000))
        return params, target, opt_state, losses[-1]

    half = steps // 2
    mc = discounted_returns(np.asarray(cost, np.float64), gamma)[:half]  # [T/2, E]
    print(f"Monte-Carlo discounted cost G_t on t < {half}: mean {mc.mean():.3f}")
    if options["run"]:  # the run's own cost critic, as trained alongside the moving policy, on the same (s, a)
        trained = np.asarray(jax.jit(jax.vmap(lambda o, a: nets.cost_critic.apply(policy_params.cost_critic, o, a)))(
            jnp.asarray(obs[:half]), jnp.asarray(action[:half])))
        print(f"the run's own cost critic on the same (s, a): mean {trained.mean():.3f}, "
              f"{trained.mean() / mc.mean():.3f} of G_t, corr {np.corrcoef(trained.ravel(), mc.ravel())[0, 1]:.2f}")
    print(f"{'updates':>8} {'TD loss':>9} {'mean Q_c':>9} {'mean G_t':>9} {'Q_c / G_t':>9} {'corr':>6}")
    key = jax.random.PRNGKey(2)
    for i in range(updates // 1000):
        key, k = jax.random.split(key)
        params, target, opt_state, loss = train(params, target, opt_state, k)
        if (i + 1) % max(1, updates // 5000) == 0 or i + 1 == updates // 1000:
            q = np.asarray(jax.jit(jax.vmap(lambda o, a: nets.cost_critic.apply(params, o, a)))(
                jnp.asarray(obs[:half]), jnp.asarray(action[:half])))
            corr = float(np.corrcoef(q.ravel(), mc.ravel())[0, 1])
            print(f"{(i + 1) * 1000:8d} {float(loss):9.4f} {q.mean():9.3f} {mc.mean():9.3f} "
                  f"{q.mean() / mc.mean():9.3f} "
                  f"{corr:6.2f}", flush=True)
    print(f"total {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
