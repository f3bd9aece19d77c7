"""Flax networks for CVPO: a Gaussian policy (full or diagonal covariance), twin reward critics, cost critic.

Shape legend: S = batch shape (e.g. [B] states), P = particle shape (e.g. [K] actions per state),
O = observation size, A = action size.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cvpo_jax.policy import Gaussian

# Default covariance of the policy: "full" (a Cholesky factor), as in the original code (ORIG's
# CholeskyGaussianActor) and the paper (B.1, "a Multivariate Gaussian policy"). The M-step fits the policy
# to weighted particles whose improvement directions may be correlated across action dimensions, and the
# decoupled KL terms (eq. (78)) are written for a full Σ; the extra cost is an A×A triangular solve per
# state, negligible for the 2-dimensional Point and Car actions. "diag" is kept for ablations and speed.
DEFAULT_COVARIANCE = "full"


class MLP(nn.Module):
    """ReLU multilayer perceptron with a linear output layer."""

    hidden: Sequence[int]
    out_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [*S, D] -> [*S, out_size]
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
        return nn.Dense(self.out_size, name="output")(x)


class GaussianPolicyNet(nn.Module):
    """π(a|s) = N(μ(s), L(s) L(s)ᵀ) with μ(s) inside the action box [-1, 1].

    One torso feeds both heads (ORIG: a shared ReLU torso, then a mean layer and a Cholesky layer, which
    is the same as one output layer split in two).

    Attributes:
      hidden: torso widths.
      action_size: A.
      covariance: "full" (lower-triangular Cholesky factor) or "diag" (diagonal scale_tril).
      min_scale: added to the softplus diagonal so Σ stays positive definite (ORIG COV_MIN 1e-4).
      mean_clip: pre-squash mean logits are clipped to ±mean_clip (ORIG ±5).
      scale_clip: raw Cholesky entries, diagonal included (before its softplus), are clipped to this range
        (ORIG [-5, 20]); clipping bounds the off-diagonal correlations and keeps softplus well scaled.
    """

    hidden: Sequence[int]
    action_size: int
    covariance: str = DEFAULT_COVARIANCE
    min_scale: float = 1e-4
    mean_clip: float = 5.0
    scale_clip: tuple[float, float] = (-5.0, 20.0)

    @nn.compact
    def __call__(self, obs: jax.Array) -> Gaussian:  # [*S, O] -> mean [*S, A], scale_tril [*S, A, A]
        if self.covariance not in ("full", "diag"):
            raise ValueError(f"covariance must be 'full' or 'diag', got {self.covariance!r}")
        action_size = self.action_size
        rows, cols = np.tril_indices(action_size)  # row-major lower triangle, diagonal included
        num_scale = rows.size if self.covariance == "full" else action_size
        out = MLP(self.hidden, action_size + num_scale, name="torso")(obs)  # [*S, A + num_scale]
        mean_logits, scale_raw = out[..., :action_size], out[..., action_size:]

        # ORIG: low + (high − low)·sigmoid(clip(x)); on the box [-1, 1] that is exactly tanh(x / 2).
        mean = jnp.tanh(0.5 * jnp.clip(mean_logits, -self.mean_clip, self.mean_clip))  # [*S, A]

        scale_raw = jnp.clip(scale_raw, *self.scale_clip)  # [*S, num_scale]
        if self.covariance == "diag":
            scale = nn.softplus(scale_raw) + self.min_scale  # [*S, A]
            scale_tril = scale[..., None] * jnp.eye(action_size, dtype=scale.dtype)  # [*S, A, A]
        else:
            on_diagonal = jnp.asarray(rows == cols)  # [num_scale]
            entries = jnp.where(on_diagonal, nn.softplus(scale_raw) + self.min_scale, scale_raw)
            scale_tril = jnp.zeros(entries.shape[:-1] + (action_size, action_size), entries.dtype)
            scale_tril = scale_tril.at[..., rows, cols].set(entries)  # [*S, A, A]
        return Gaussian(mean=mean, scale_tril=scale_tril)


def _obs_action_input(obs: jax.Array, actions: jax.Array) -> jax.Array:
    """Concatenate states with actions, repeating each state over trailing particle axes of `actions`.

    obs [*S, O], actions [*S, *P, A] -> [*S, *P, O + A].
    """
    num_particle_axes = actions.ndim - obs.ndim
    obs = obs.reshape(obs.shape[:-1] + (1,) * num_particle_axes + obs.shape[-1:])
    obs = jnp.broadcast_to(obs, actions.shape[:-1] + obs.shape[-1:])
    return jnp.concatenate([obs, actions.astype(obs.dtype)], axis=-1)


class TwinQ(nn.Module):
    """Two independent Q(s, a) networks (ORIG's reward critic ensemble, num_q=2).

    Implemented as an `nn.vmap`-ed MLP: each member has its own parameters (leading axis 2, independently
    initialised), and both run as one batched matmul. Call: obs [*S, O], actions [*S, *P, A] -> [*S, *P, 2].
    """

    hidden: Sequence[int]

    @nn.compact
    def __call__(self, obs: jax.Array, actions: jax.Array) -> jax.Array:
        x = _obs_action_input(obs, actions)  # [*S, *P, O + A]
        ensemble = nn.vmap(
            MLP,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=-1,
            axis_size=2,
        )
        return ensemble(self.hidden, 1, name="ensemble")(x)[..., 0, :]  # [*S, *P, 1, 2] -> [*S, *P, 2]


class SingleQ(nn.Module):
    """One Q(s, a) network (ORIG's cost critic, num_qc=1). obs [*S, O], actions [*S, *P, A] -> [*S, *P]."""

    hidden: Sequence[int]

    @nn.compact
    def __call__(self, obs: jax.Array, actions: jax.Array) -> jax.Array:
        return MLP(self.hidden, 1, name="q")(_obs_action_input(obs, actions))[..., 0]


class Networks(NamedTuple):
    """The three CVPO modules; apply them as `networks.policy.apply(params.policy, obs)` etc."""

    policy: GaussianPolicyNet
    reward_critic: TwinQ
    cost_critic: SingleQ


class NetworkParams(NamedTuple):
    """Flax variable dicts ({"params": ...}) of the three modules, ready for `module.apply`."""

    policy: dict
    reward_critic: dict
    cost_critic: dict


def make_networks(
    observation_size: int,
    action_size: int,
    hidden: Sequence[int] = (256, 256),
    covariance: str = DEFAULT_COVARIANCE,
) -> Networks:
    """Policy, twin reward critic and cost critic with the same hidden widths (paper Table 1: [256, 256])."""
    if observation_size < 1 or action_size < 1:
        raise ValueError(f"sizes must be positive, got obs {observation_size}, action {action_size}")
    if covariance not in ("full", "diag"):
        raise ValueError(f"covariance must be 'full' or 'diag', got {covariance!r}")
    hidden = tuple(int(h) for h in hidden)
    return Networks(
        policy=GaussianPolicyNet(hidden=hidden, action_size=action_size, covariance=covariance),
        reward_critic=TwinQ(hidden=hidden),
        cost_critic=SingleQ(hidden=hidden),
    )


def init_params(networks: Networks, key: jax.Array, observation_size: int, action_size: int) -> NetworkParams:
    """Initialise all three modules from one key (independent sub-keys).

    Each `init` is jitted: compiling it whole is several times faster than running the initialisers
    op by op (which compiles every primitive separately).
    """
    policy_key, reward_key, cost_key = jax.random.split(key, 3)
    obs = jnp.zeros((1, observation_size), jnp.float32)  # [1, O]
    actions = jnp.zeros((1, action_size), jnp.float32)  # [1, A]
    return NetworkParams(
        policy=jax.jit(networks.policy.init)(policy_key, obs),
        reward_critic=jax.jit(networks.reward_critic.init)(reward_key, obs, actions),
        cost_critic=jax.jit(networks.cost_critic.init)(cost_key, obs, actions),
    )
