"""Object placement by rejection sampling, vectorised for JAX.

Safety-Gym places objects one at a time (robot first), each uniform in the extents shrunk by its keepout,
rejecting a draw closer than the sum of keepouts to any object already placed (100 draws per object; a
layout with an object that found no spot is thrown away and redrawn, up to 10000 times). Here each
object's 100 draws are made at once and the first valid one is kept (a scan over objects), and whole
layouts are redrawn in a while-loop until one is complete: the same distribution as Safety-Gym's. If
max_layouts attempts all fail, the last layout is kept with its best draws and `ok` is False.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Item:
    """A kind of object to place: `count` copies with a keepout radius; the first len(locations) copies sit
    at fixed (x, y) locations (still checked against everything placed before them, like Safety-Gym)."""

    name: str
    count: int
    keepout: float
    locations: tuple[tuple[float, float], ...] = ()


def _uniform_xy(rng: jax.Array, extents, keepout: float, n: int) -> jax.Array:
    xmin, ymin, xmax, ymax = extents
    lo = jnp.array([xmin + keepout, ymin + keepout])
    hi = jnp.array([xmax - keepout, ymax - keepout])
    return jax.random.uniform(rng, (n, 2), minval=lo, maxval=hi)  # [n, 2]


def _first_valid(cands: jax.Array, placed_xy: jax.Array, placed_keepout: jax.Array, keepout: float):
    """Pick the first candidate [T, 2] at least keepout + placed_keepout from all placed [P, 2]; if there is
    none, the candidate with the largest worst-case slack. Returns (xy [2], ok)."""
    if placed_xy.shape[0] == 0:
        return cands[0], jnp.array(True)
    dist = jnp.linalg.norm(cands[:, None, :] - placed_xy[None, :, :], axis=-1)  # [T, P]
    slack = jnp.min(dist - (keepout + placed_keepout)[None, :], axis=1)  # [T]
    valid = slack >= 0
    ok = jnp.any(valid)
    idx = jnp.where(ok, jnp.argmax(valid), jnp.argmax(slack))
    return cands[idx], ok


def _slots(items: tuple[Item, ...]):
    """Flatten items into per-object arrays: keepout [S], fixed [S] (bool), location [S, 2]."""
    keepout, fixed, loc = [], [], []
    for item in items:
        for i in range(item.count):
            keepout.append(item.keepout)
            fixed.append(i < len(item.locations))
            loc.append(item.locations[i] if i < len(item.locations) else (0.0, 0.0))
    return (jnp.asarray(keepout, jnp.float32).reshape(-1), jnp.asarray(fixed, bool).reshape(-1),
            jnp.asarray(loc, jnp.float32).reshape(-1, 2))


def _sample_once(rng: jax.Array, items: tuple[Item, ...], extents, tries: int):
    """One layout attempt. A scan over objects (not a Python loop) so XLA compiles one placement step."""
    keepout, fixed, loc = _slots(items)
    n = keepout.shape[0]
    xmin, ymin, xmax, ymax = extents

    def place(carry, k):
        placed_xy, ok, rng = carry  # [n, 2], [], key
        rng, key = jax.random.split(rng)
        lo = jnp.array([xmin, ymin]) + keepout[k]
        hi = jnp.array([xmax, ymax]) - keepout[k]
        cands = jax.random.uniform(key, (tries, 2), minval=lo, maxval=hi)  # [tries, 2]
        cands = jnp.where(fixed[k], jnp.broadcast_to(loc[k], cands.shape), cands)
        dist = jnp.linalg.norm(cands[:, None, :] - placed_xy[None, :, :], axis=-1)  # [tries, n]
        slack = dist - (keepout[k] + keepout)[None, :]
        slack = jnp.where(jnp.arange(n)[None, :] < k, slack, jnp.inf)  # only objects placed before k
        slack = jnp.min(slack, axis=1)  # [tries]
        valid = slack >= 0
        idx = jnp.where(jnp.any(valid), jnp.argmax(valid), jnp.argmax(slack))
        return (placed_xy.at[k].set(cands[idx]), ok & jnp.any(valid), rng), None

    (placed_xy, ok, _), _ = jax.lax.scan(place, (jnp.zeros((n, 2)), jnp.array(True), rng), jnp.arange(n))
    out, start = {}, 0
    for item in items:
        out[item.name] = placed_xy[start:start + item.count]  # [count, 2]
        start += item.count
    return out, ok


def sample_layout(rng: jax.Array, items: tuple[Item, ...], extents, tries: int = 100,
                  max_layouts: int = 10000):
    """Place `items` in order; redraw whole layouts until one is complete (at most max_layouts), like
    Safety-Gym. Returns ({name: xy [count, 2]}, ok). Under vmap the loop runs until every env has its
    layout; Button1 completes ~1 attempt in 20, so a batch of 1024 needs ~150 attempts (a few seconds)."""

    def attempt(carry):
        key, _, _, n = carry
        key, sub = jax.random.split(key)
        layout, ok = _sample_once(sub, items, extents, tries)
        return key, layout, ok, n + 1

    key, sub = jax.random.split(rng)
    first, ok = _sample_once(sub, items, extents, tries)
    carry = jax.lax.while_loop(lambda c: ~c[2] & (c[3] < max_layouts), attempt, (key, first, ok, 1))
    return carry[1], carry[2]


def resample_point(rng: jax.Array, extents, keepout: float, others_xy: jax.Array,
                   others_keepout: jax.Array, tries: int = 64):
    """One new object (the goal after it is reached) that keeps clear of others_xy [K, 2] with keepouts
    others_keepout [K]. Returns (xy [2], ok)."""
    cands = _uniform_xy(rng, extents, keepout, tries)
    return _first_valid(cands, others_xy, others_keepout, keepout)


def random_yaw(rng: jax.Array, shape=()) -> jax.Array:
    return jax.random.uniform(rng, shape, minval=0.0, maxval=2 * jnp.pi)


def yaw_quat(yaw: jax.Array) -> jax.Array:
    """Quaternion(s) (w, x, y, z) [..., 4] of rotations about z."""
    z = jnp.zeros_like(yaw)
    return jnp.stack([jnp.cos(yaw / 2), z, z, jnp.sin(yaw / 2)], axis=-1)
