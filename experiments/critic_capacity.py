"""Would a wider cost critic see the action effect the run's critic misses?

    python experiments/critic_capacity.py run=runs/suite_cpu/car_goal-cvpo points=<file.npz>
        [hidden=64x64,256x256] [updates=20000] [seed=0] [collect=0] [start=fresh|run] [readings=1]

`experiments/action_dependence.py ... save=<file.npz>` measures Monte-Carlo Q_c(s, a) for K actions at S states
of one member and saves them. This fits fresh cost critics of each width in `hidden` to that member's final
replay buffer, the way the run trains its own (one-step targets y = c + γ Q'_c(s', a'), a' from the member's
final policy, Polyak-averaged target critic, Adam at the run's critic learning rate and batch size), for
`updates` steps, and compares each with the Monte-Carlo values at the saved (state, action) pairs: the mean
level, the spread over the actions of a state, and the correlation over the actions with the Monte-Carlo means.
The run's own critic is printed beside them. A fresh critic at the run's width is the control: fitted the
same way on the same data, what it shows is what the width alone changes. Fitting on the final buffer is
policy evaluation on fixed data, not the run's moving target, so this says what the data and the width allow,
not what the run would have learned. `collect=N` fits on N fresh transitions of the member's exploring policy
instead (the run's num_envs envs on staggered episode clocks, so every step of the episode is present): with
N larger than the run's replay it asks whether more data of the same policy brings the fit to the Monte-Carlo
values. `start=run` continues the run's own cost critic (and its target) instead of fresh ones, at the run's
width: how far, and over how many updates, the data pull it (the run gives its critic about 3 updates per
iteration). `readings=R` prints the mean reading R times along each fit. Measurement only: it prints figures
and writes nothing.
"""

from __future__ import annotations

import sys

import numpy as np


def main(argv: list[str]) -> int:
    from cvpo_jax.cli import exit_on_bad_input, parse_options

    with exit_on_bad_input():
        options = parse_options(argv, {"run": "", "points": "", "hidden": "64x64,256x256", "updates": "20000",
                                       "seed": "0", "collect": "0", "start": "fresh", "readings": "1"})
        try:
            updates, seed, collect = int(options["updates"]), int(options["seed"]), int(options["collect"])
            readings = int(options["readings"])
            widths = [tuple(int(n) for n in h.split("x")) for h in options["hidden"].split(",")]
        except ValueError:
            widths, updates, collect, readings = [], 0, 0, 0
        if (updates < 1 or collect < 0 or not 1 <= readings <= updates or not widths
                or any(n < 1 for w in widths for n in w)):
            raise ValueError(f"updates={options['updates']}, seed={options['seed']}, hidden={options['hidden']}, "
                             f"collect={options['collect']}, readings={options['readings']}: need integers, "
                             "updates ≥ 1, collect ≥ 0, 1 ≤ readings ≤ updates and widths like 64x64,256x256")
        if options["start"] not in ("fresh", "run"):
            raise ValueError(f"start={options['start']}: allowed fresh (new critics) or run (the run's own)")
        try:
            points = np.load(options["points"])
            missing = {"obs", "actions", "returns", "q_critic", "member"} - set(points.files)
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"points={options['points']}: not an .npz written by experiments/action_dependence.py "
                             f"save= ({e})") from None
        if missing:
            raise ValueError(f"points={options['points']}: lacks {sorted(missing)}; write it with "
                             "experiments/action_dependence.py save=")
    import jax
    import jax.numpy as jnp
    import optax

    from cvpo_jax import critics, networks, policy, saved_run
    from cvpo_jax.core import replay
    from cvpo_jax.core.members import one_member
    from cvpo_jax.core.gradients import gradient_step

    member = int(points["member"])
    with exit_on_bad_input():
        run = saved_run.load(options["run"], algo="cvpo")
        params = run.member_params(member)
    cfg, env = run.cfg, run.env
    obs, actions, returns = (np.asarray(points[k]) for k in ("obs", "actions", "returns"))  # [S,O] [S,K,A] [S,K,R]
    q_mc = returns.mean(-1)  # [S, K]
    c = cfg.cvpo
    buffer = (one_member(run.state.replay, member) if collect == 0
              else collect_transitions(run, params, collect, jax.random.PRNGKey(seed + 1000)))
    run_nets = networks.make_networks(env.observation_size, env.action_size, hidden=tuple(cfg.network.hidden),
                                      covariance=cfg.network.covariance)
    optimizer = optax.adam(c.critic_lr)
    flat_obs = jnp.repeat(jnp.asarray(obs), actions.shape[1], axis=0)  # [S·K, O]
    flat_actions = jnp.asarray(actions.reshape(-1, actions.shape[-1]))  # [S·K, A]

    def fit(width, key, start):
        nets = networks.make_networks(env.observation_size, env.action_size, hidden=width,
                                      covariance=cfg.network.covariance)
        init_key, loop_key = jax.random.split(key)
        if start == "run":
            critic, target = params.cost_critic, one_member(run.state.learner.target_params, member).cost_critic
        else:
            critic = nets.cost_critic.init(init_key, jnp.zeros((1, env.observation_size)),
                                           jnp.zeros((1, env.action_size)))
            target = critic

        def step(carry, k):
            critic, target, opt_state = carry
            sample_key, action_key = jax.random.split(k)
            batch = replay.sample(buffer, sample_key, c.batch_size)
            next_dist = run_nets.policy.apply(params.policy, batch.next_obs)
            next_action = jnp.clip(policy.sample(next_dist, action_key, 1)[:, 0], -1.0, 1.0)
            next_q = nets.cost_critic.apply(target, batch.next_obs, next_action)
            y = critics.cost_target(batch.cost, batch.terminated, next_q, c.gamma, mask_done=True)
            out = gradient_step(critics.cost_critic_loss, critic, opt_state, optimizer, nets.cost_critic.apply,
                                batch.obs, batch.action, y, has_aux=True)
            return (out.params, critics.polyak_update(target, out.params, c.polyak), out.opt_state), out.loss

        def segment(carry, keys):  # updates // readings steps, then the mean reading at the points
            carry, losses = jax.lax.scan(step, carry, keys)
            return carry, (jnp.mean(nets.cost_critic.apply(carry[0], flat_obs, flat_actions)), losses)

        per = updates // readings
        keys = jax.random.split(loop_key, per * readings).reshape(readings, per, -1)
        (critic, _, _), (means, losses) = jax.lax.scan(segment, (critic, target, optimizer.init(critic)), keys)
        q = nets.cost_critic.apply(critic, flat_obs, flat_actions).reshape(q_mc.shape)
        return q, losses.reshape(-1)[-1000:].mean(), means

    def report(name, q, loss=None):
        corrs = [np.corrcoef(q[s], q_mc[s])[0, 1] for s in range(len(q))
                 if np.std(q[s]) > 0 and np.std(q_mc[s]) > 0]
        loss_text = "" if loss is None else f"{loss:>10.4f}"
        print(f"{name:>22} {q.mean():>8.3f} {q.std(-1).mean():>9.3f} {np.mean(corrs):>8.2f} {loss_text}")

    source = "the run's final replay" if collect == 0 else "fresh transitions of the exploring policy"
    print(f"cvpo on {cfg.env}, member {member}, checkpoint iteration {run.iteration}; {int(buffer.size)} {source};"
          f" {q_mc.shape[0]} states × {q_mc.shape[1]} actions; critics fitted for {updates} updates, "
          f"start={options['start']}")
    print(f"{'cost critic':>22} {'mean Q_c':>8} {'std_a':>9} {'corr_a':>8} {'TD loss':>10}")
    report("Monte-Carlo", q_mc)
    report(f"run's own {'x'.join(map(str, cfg.network.hidden))}", np.asarray(points["q_critic"]))
    run_width = tuple(cfg.network.hidden)
    fits = [(run_width, "run")] if options["start"] == "run" else [(w, "fresh") for w in widths]
    for i, (width, start) in enumerate(fits):
        q, loss, means = jax.device_get(jax.jit(fit, static_argnums=(0, 2))(width, jax.random.PRNGKey(seed + i),
                                                                           start))
        name = "run's, continued" if start == "run" else f"fresh {'x'.join(map(str, width))}"
        report(name, np.asarray(q, np.float64), float(loss))
        if readings > 1:
            per = updates // readings
            print(" " * 23 + "mean Q_c along the fit: " + ", ".join(
                f"{(r + 1) * per}: {float(m):.2f}" for r, m in enumerate(means)))
    return 0


def collect_transitions(run, params, count: int, key):
    """A replay of `count` (rounded up to whole steps of the run's envs) transitions of the exploring policy
    `params`, acted as training acts (core/acting.py) with staggered episode clocks."""
    import jax

    from cvpo_jax.core import replay
    from cvpo_jax.core.acting import make_acting

    cfg, num_envs = run.cfg, run.cfg.num_envs
    iterations = -(-count // num_envs)
    acting = make_acting(run.env, cfg.episode_length, num_envs, cfg.reset_refill_period, stagger=True)

    @jax.jit
    def play(key):
        reset_key, loop_key = jax.random.split(key)
        envs = acting.reset(reset_key)

        def step(carry, inputs):
            envs, buffer = carry
            i, k = inputs
            act_key, env_key = jax.random.split(k)
            out = acting.step(envs, run.trainer.learner.act(params, envs.obs, act_key), i, env_key)
            return (out.envs, replay.insert(buffer, out.transition)), None

        # One env's transition, as zeros of the right shapes: what the empty buffer is shaped like.
        shapes = jax.eval_shape(lambda e: acting.step(e, run.trainer.learner.act(params, e.obs, key),
                                                      jax.numpy.int32(0), key).transition, envs)
        example = jax.tree.map(lambda x: jax.numpy.zeros(x.shape[1:], x.dtype), shapes)
        buffer = replay.init(example, iterations * num_envs)
        (_, buffer), _ = jax.lax.scan(step, (envs, buffer),
                                      (jax.numpy.arange(iterations), jax.random.split(loop_key, iterations)))
        return buffer

    return play(key)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
