"""An on-device circular replay buffer as pure functions over a pytree of arrays.

Transitions arrive `num_envs` at a time from the vectorised environments; the capacity is rounded to a
multiple of that so an insert is one `dynamic_update_slice` that never wraps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Transition:
    """One environment step; leading axes are whatever the caller stacks ([N] per insert)."""

    obs: jax.Array  # [..., O]
    action: jax.Array  # [..., A]
    reward: jax.Array  # [...]
    cost: jax.Array  # [...]
    next_obs: jax.Array  # [..., O]
    terminal: jax.Array  # [...] 1.0 where the reward's bootstrap stops: a termination, or a reached goal (as
    #   the original; that episode goes on)
    truncated: jax.Array  # [...] 1.0 where the time limit ended the episode (next_obs still has a value)
    terminated: jax.Array  # [...] 1.0 where the task ended the episode (a death, a fall): no value of any
    #   kind, reward or cost, after next_obs


@struct.dataclass
class ReplayState:
    data: Transition  # every leaf [capacity, ...]
    insert_at: jax.Array  # int32 scalar: next row to write
    size: jax.Array  # int32 scalar: rows filled so far


def rounded_capacity(capacity: int, insert_size: int) -> int:
    """The capacity actually used: `capacity` rounded up to a multiple of the insert size."""
    return -(-capacity // insert_size) * insert_size


def init(example: Transition, capacity: int) -> ReplayState:
    """An empty buffer shaped like one `example` transition (no leading axis) repeated `capacity` times."""
    data = jax.tree.map(lambda x: jnp.zeros((capacity,) + jnp.shape(x), jnp.asarray(x).dtype), example)
    return ReplayState(data=data, insert_at=jnp.int32(0), size=jnp.int32(0))


def insert(state: ReplayState, batch: Transition) -> ReplayState:
    """Write `batch` (leaves [N, ...], capacity a multiple of N) over the oldest rows."""
    n = jax.tree.leaves(batch)[0].shape[0]
    capacity = jax.tree.leaves(state.data)[0].shape[0]
    data = jax.tree.map(
        lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), state.insert_at, 0),
        state.data,
        batch,
    )
    return ReplayState(
        data=data,
        insert_at=(state.insert_at + n) % capacity,
        size=jnp.minimum(state.size + n, capacity),
    )


def sample(state: ReplayState, key: jax.Array, batch_size: int) -> Transition:
    """Uniform sample with replacement of `batch_size` filled rows (leaves [batch_size, ...])."""
    index = jax.random.randint(key, (batch_size,), 0, jnp.maximum(state.size, 1))
    return jax.tree.map(lambda buf: buf[index], state.data)


def tree_size_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
