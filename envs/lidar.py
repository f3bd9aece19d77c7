"""Safety-Gym's pseudo-lidar: a 16-bin "closeness" histogram of object positions around the robot.

For each object: take its ego-frame (x, y), read max(0, maxd - dist) / maxd into the bin of its angle, and
alias into the two neighbouring bins in proportion to where the angle falls inside its bin; every bin keeps
the maximum over objects. Objects have z = 0 and the robot keeps its own height, as Safety-Gymnasium does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ego_xy(robot_pos: jax.Array, robot_mat: jax.Array, points_xy: jax.Array) -> jax.Array:
    """Body-frame (x, y) of world points [N, 2] seen from a robot at robot_pos [3] with rotation
    robot_mat [3, 3]. Returns [N, 2]."""
    world = jnp.concatenate([points_xy, jnp.zeros_like(points_xy[:, :1])], axis=1) - robot_pos  # [N, 3]
    return (world @ robot_mat)[:, :2]  # row vector times R == R^T v


def pseudo_lidar_ego(ego: jax.Array, max_dist: float, num_bins: int = 16,
                     visible: jax.Array | None = None) -> jax.Array:
    """Lidar [num_bins] from body-frame points ego [N, 2]; `visible` [N] (0/1) masks objects out."""
    bin_size = 2 * jnp.pi / num_bins
    dist = jnp.hypot(ego[:, 0], ego[:, 1])  # [N]
    angle = jnp.mod(jnp.arctan2(ego[:, 1], ego[:, 0]), 2 * jnp.pi)  # [N]
    # Float rounding can put an angle a hair under 2*pi into bin num_bins: keep it in the last bin.
    bin_idx = jnp.minimum(jnp.floor(angle / bin_size).astype(jnp.int32), num_bins - 1)  # [N]
    reading = jnp.maximum(0.0, max_dist - dist) / max_dist  # [N]
    if visible is not None:
        reading = reading * visible
    alias = jnp.clip((angle - bin_idx * bin_size) / bin_size, 0.0, 1.0)  # [N]
    one_hot = lambda i: jax.nn.one_hot(jnp.mod(i, num_bins), num_bins)  # [N, num_bins]
    contributions = jnp.stack([
        one_hot(bin_idx) * reading[:, None],
        one_hot(bin_idx + 1) * (alias * reading)[:, None],
        one_hot(bin_idx - 1) * ((1 - alias) * reading)[:, None],
    ])  # [3, N, num_bins]
    return jnp.max(contributions, axis=(0, 1)) if ego.shape[0] else jnp.zeros(num_bins)


def pseudo_lidar(robot_pos: jax.Array, robot_mat: jax.Array, points_xy: jax.Array, max_dist: float,
                 num_bins: int = 16, visible: jax.Array | None = None) -> jax.Array:
    """Lidar [num_bins] of world points [N, 2] around a robot at robot_pos [3], rotation robot_mat [3, 3]."""
    return pseudo_lidar_ego(ego_xy(robot_pos, robot_mat, points_xy), max_dist, num_bins, visible)
