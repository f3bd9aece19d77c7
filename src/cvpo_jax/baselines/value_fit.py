"""The value fit of the on-policy methods (PPO, TRPO, CPO, CSC) and the minibatch plan PPO's epochs share.

`fit_values` regresses a pytree of value networks (PPO/TRPO/CPO: the reward and the cost value; CSC: the
reward value alone) onto a matching pytree of λ-returns with shuffled minibatch passes of one optimiser.
The losses of the networks are summed, so one optimiser over the whole pytree is the same as one per network
for any per-parameter optimiser (Adam, SGD): each network's gradient is that of its own loss only.

Shuffling: pass e draws the permutation `jax.random.permutation(fold_in(key, e), N)` and cuts it into
`N // size` minibatches of `size = max(1, N // num_minibatches)` rows; the remainder of a pass is left out.

Shape legend: N = samples (T·E of a rollout), O = observation size, S = any batch shape.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cvpo_jax.core.gradients import gradient_step


class ValueFitSettings(NamedTuple):
    """How long the value fit runs (static Python ints)."""

    epochs: int  # shuffled passes over the N samples
    num_minibatches: int  # minibatches per pass

    @classmethod
    def from_config(cls, onpolicy) -> "ValueFitSettings":
        """From `cfg.onpolicy` (`config.OnPolicyConfig`): value_epochs, num_minibatches."""
        return cls(epochs=int(onpolicy.value_epochs), num_minibatches=int(onpolicy.num_minibatches))


class ValueFit(NamedTuple):
    params: Any  # the fitted pytree of value-network parameters
    opt_state: Any  # the optimiser's state after the fit
    losses: Any  # pytree like `returns` of [] mean squared errors on all N samples after the fit


def minibatch_plan(num_samples: int, num_minibatches: int) -> tuple[int, int]:
    """(minibatch size, minibatches per pass); the remainder of a shuffled pass is left out."""
    size = max(1, num_samples // num_minibatches)
    return size, num_samples // size


def minibatch_indices(key: jax.Array, step: jax.Array, num_samples: int, size: int,
                      per_pass: int) -> jax.Array:
    """Rows [size] (int32) of minibatch `step` (counted over all passes): slice step % per_pass of the
    permutation of pass step // per_pass, which is `permutation(fold_in(key, pass), num_samples)`."""
    perm = jax.random.permutation(jax.random.fold_in(key, step // per_pass), num_samples)
    return jax.lax.dynamic_slice_in_dim(perm, (step % per_pass) * size, size)


def value_losses(apply_value: Callable, params: Any, obs: jax.Array, returns: Any) -> Any:
    """Mean squared error of each value network to its returns.

    Args:
      apply_value: (params of one network, obs [*S, O]) -> values [*S].
      params: pytree of value-network parameters with `returns` as a prefix (one network per returns leaf).
      obs: [N, O] the states, shared by all networks.
      returns: pytree of regression targets [N].

    Returns:
      pytree like `returns` of [] losses mean_n (V(s_n) − R_n)².
    """
    return jax.tree.map(lambda ret, p: jnp.mean(jnp.square(apply_value(p, obs) - ret)), returns, params)


def fit_values(apply_value: Callable, optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
               obs: jax.Array, returns: Any, key: jax.Array, settings: ValueFitSettings) -> ValueFit:
    """`settings.epochs` shuffled passes of minibatch optimiser steps on the summed squared errors.

    Args:
      apply_value: (params of one network, obs [*S, O]) -> values [*S].
      optimizer: one optimiser over the whole `params` pytree; `opt_state` is its state.
      params: pytree of value-network parameters with `returns` as a prefix, e.g. (reward params, cost
        params) for returns (reward returns, cost returns), or one network's params for one array.
      obs: [N, O]. returns: pytree of [N] λ-returns.
      key: shuffles the passes (see the module doc).
      settings: epochs and minibatches per pass.

    Returns:
      ValueFit(params, opt_state, losses on all N samples after the fit).
    """
    n = obs.shape[0]
    size, per_pass = minibatch_plan(n, settings.num_minibatches)

    def loss(value_params, idx):
        batch = obs[idx]
        batch_returns = jax.tree.map(lambda ret: ret[idx], returns)
        return functools.reduce(operator.add, jax.tree.leaves(
            value_losses(apply_value, value_params, batch, batch_returns)))

    def step(carry, s):
        value_params, state = carry
        idx = minibatch_indices(key, s, n, size, per_pass)
        fitted = gradient_step(loss, value_params, state, optimizer, idx)
        return (fitted.params, fitted.opt_state), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), jnp.arange(settings.epochs * per_pass))
    return ValueFit(params=params, opt_state=opt_state, losses=value_losses(apply_value, params, obs, returns))
