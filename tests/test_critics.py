"""Bellman targets, Polyak averaging and critic losses against hand-computed NumPy values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvpo_jax import networks
from cvpo_jax.critics import cost_critic_loss, cost_target, polyak_update, reward_critic_loss, reward_target

B, O, A = 32, 3, 2


def test_reward_target_hand_computed():
    reward = jnp.array([1.0, -0.5, 2.0])
    done = jnp.array([0.0, 1.0, 0.0])
    next_q = jnp.array([[3.0, 2.0], [5.0, 7.0], [-1.0, 4.0]])  # [B, 2]
    got = reward_target(reward, done, next_q, 0.9)
    np.testing.assert_allclose(got, [1.0 + 0.9 * 2.0, -0.5, 2.0 + 0.9 * -1.0], rtol=1e-6)
    # Boolean done is accepted.
    np.testing.assert_allclose(reward_target(reward, done.astype(bool), next_q, 0.9), got)


def test_cost_target_ignores_done_unless_asked():
    cost = jnp.array([0.0, 1.0, 1.0])
    done = jnp.array([False, True, False])  # e.g. a goal reached: the episode (and its costs) continue
    next_qc = jnp.array([4.0, 6.0, 0.5])
    np.testing.assert_allclose(
        cost_target(cost, done, next_qc, 0.99), [0.99 * 4.0, 1.0 + 0.99 * 6.0, 1.0 + 0.99 * 0.5], rtol=1e-6
    )
    np.testing.assert_allclose(
        cost_target(cost, done, next_qc, 0.99, mask_done=True), [0.99 * 4.0, 1.0, 1.0 + 0.99 * 0.5], rtol=1e-6
    )


def test_polyak_update_hand_computed():
    target = {"w": jnp.array([1.0, 2.0]), "b": (jnp.array(10.0),)}
    online = {"w": jnp.array([3.0, -2.0]), "b": (jnp.array(0.0),)}
    got = polyak_update(target, online, 0.995)
    np.testing.assert_allclose(got["w"], [0.995 * 1 + 0.005 * 3, 0.995 * 2 - 0.005 * 2], rtol=1e-6)
    np.testing.assert_allclose(got["b"][0], 9.95, rtol=1e-6)
    # ρ = 1 keeps the target, ρ = 0 copies the online parameters.
    np.testing.assert_allclose(polyak_update(target, online, 1.0)["w"], target["w"])
    np.testing.assert_allclose(polyak_update(target, online, 0.0)["w"], online["w"])


@pytest.fixture(scope="module")
def critics():
    nets = networks.make_networks(O, A, hidden=(16, 16))
    params = networks.init_params(nets, jax.random.key(0), O, A)
    keys = jax.random.split(jax.random.key(1), 3)
    obs = jax.random.normal(keys[0], (B, O))  # [B, O]
    actions = jax.random.uniform(keys[1], (B, A), minval=-1.0, maxval=1.0)  # [B, A]
    target = jnp.sin(obs[:, 0]) + actions[:, 1]  # [B], a fixed regression target
    return nets, params, obs, actions, target


def test_init_params_and_q_shapes(critics):
    nets, params, obs, actions, _ = critics

    @jax.jit
    def q_values(p):
        q_twin = nets.reward_critic.apply(p.reward_critic, obs, actions)
        return q_twin, nets.cost_critic.apply(p.cost_critic, obs, actions)

    q_twin, q_cost = q_values(params)
    assert q_twin.shape == (B, 2) and q_cost.shape == (B,)
    assert not np.allclose(q_twin[:, 0], q_twin[:, 1])  # independently initialised heads
    assert jax.tree.leaves(params.reward_critic)[0].shape[0] == 2  # one parameter slice per head
    assert params.policy["params"]["torso"]["output"]["kernel"].shape[-1] == A + A * (A + 1) // 2


def test_critic_losses_match_numpy(critics):
    nets, params, obs, actions, target = critics

    @jax.jit
    def run(p):
        q_twin = nets.reward_critic.apply(p.reward_critic, obs, actions)
        q_cost = nets.cost_critic.apply(p.cost_critic, obs, actions)
        r_loss, _ = reward_critic_loss(p.reward_critic, nets.reward_critic.apply, obs, actions, target)
        c_loss, _ = cost_critic_loss(p.cost_critic, nets.cost_critic.apply, obs, actions, target)
        g_target = jax.grad(
            lambda y: reward_critic_loss(p.reward_critic, nets.reward_critic.apply, obs, actions, y)[0]
        )(target)
        return q_twin, q_cost, r_loss, c_loss, g_target

    q_twin, q_cost, r_loss, c_loss, g_target = (np.asarray(x, np.float64) for x in run(params))
    y = np.asarray(target, np.float64)
    # ORIG: the sum of the two heads' MSEs.
    want_r_loss = np.mean((q_twin[:, 0] - y) ** 2) + np.mean((q_twin[:, 1] - y) ** 2)
    np.testing.assert_allclose(r_loss, want_r_loss, rtol=1e-5)
    np.testing.assert_allclose(c_loss, np.mean((q_cost - y) ** 2), rtol=1e-5)
    assert np.all(g_target == 0.0)  # the target is a constant of the regression


def test_critic_losses_decrease_on_fixed_batch(critics):
    nets, params, obs, actions, target = critics
    optimizer = optax.adam(1e-2)

    @jax.jit
    def train(p):
        def step(carry, _):
            p, opt_state = carry
            grads, aux = jax.grad(
                lambda q: (
                    reward_critic_loss(q[0], nets.reward_critic.apply, obs, actions, target)[0]
                    + cost_critic_loss(q[1], nets.cost_critic.apply, obs, actions, target)[0],
                    None,
                ),
                has_aux=True,
            )(p)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            p = optax.apply_updates(p, updates)
            losses = (
                reward_critic_loss(p[0], nets.reward_critic.apply, obs, actions, target)[0],
                cost_critic_loss(p[1], nets.cost_critic.apply, obs, actions, target)[0],
            )
            return (p, opt_state), losses

        p = (p.reward_critic, p.cost_critic)
        first = (
            reward_critic_loss(p[0], nets.reward_critic.apply, obs, actions, target)[0],
            cost_critic_loss(p[1], nets.cost_critic.apply, obs, actions, target)[0],
        )
        _, history = jax.lax.scan(step, (p, optimizer.init(p)), None, length=100)
        return first, history

    (r0, c0), (r_hist, c_hist) = train(params)
    assert float(r_hist[-1]) < 0.2 * float(r0) and float(c_hist[-1]) < 0.2 * float(c0)
