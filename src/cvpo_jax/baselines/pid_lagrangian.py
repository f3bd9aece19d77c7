"""PID Lagrange multipliers as pure functions over a small pytree: two forms.

`qc_pid_update` is the CVPO authors' controller for their off-policy baselines (the default of sac_lag,
td3_lag, ddpg_lag): stepped at every actor update on the batch's Q_c against the per-state threshold ε1.

`pid_update` is Stooke, Achiam & Abbeel's (2020), on the episodic cost (the on-policy Lagrangian methods, and
the off-policy ones with `offpolicy.multiplier=episodic_pid`). The multiplier follows the constraint error e = J_c − d (episodic cost minus its limit):

    I ← max(0, I + e)                       integral, kept non-negative (no "credit" for being safe)
    D = max(0, e − e_prev)                  derivative, only when the cost is rising (their Algorithm 2)
    λ = clip(Kp·e + Ki·I + Kd·D, 0, λ_max)

With Kp = Kd = 0 this is projected gradient ascent on λ with step Ki, the plain Lagrangian method. The
proportional and derivative terms react to a cost overshoot before the integral has built up, which damps
the oscillation of the plain method. The gains act on episodic-cost units (e of a few tens on the Safety-Gym
tasks); the defaults are in `config.LagrangeConfig`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PIDState(NamedTuple):
    multiplier: jax.Array  # λ ≥ 0, the value the loss uses
    integral: jax.Array  # I ≥ 0
    previous_error: jax.Array  # e of the last update


class PIDGains(NamedTuple):
    kp: float
    ki: float
    kd: float
    max_multiplier: float


def init_pid(gains: PIDGains, initial_multiplier: float = 0.0) -> PIDState:
    """λ starts at `initial_multiplier`; the integral is preset to match, so a zero error keeps λ there."""
    integral = initial_multiplier / gains.ki if gains.ki > 0 else 0.0
    return PIDState(multiplier=jnp.float32(initial_multiplier), integral=jnp.float32(integral),
                    previous_error=jnp.float32(0.0))


def pid_update(state: PIDState, episode_cost: jax.Array, cost_limit: jax.Array, gains: PIDGains) -> PIDState:
    """One controller step from the mean episodic cost of the episodes that just ended."""
    error = jnp.asarray(episode_cost, jnp.float32) - cost_limit
    integral = jnp.maximum(0.0, state.integral + error)
    derivative = jnp.maximum(0.0, error - state.previous_error)
    raw = gains.kp * error + gains.ki * integral + gains.kd * derivative
    multiplier = jnp.clip(raw, 0.0, gains.max_multiplier)
    return PIDState(multiplier=multiplier, integral=integral, previous_error=error)


def gains_from_config(lagrange) -> PIDGains:
    return PIDGains(kp=lagrange.kp, ki=lagrange.ki, kd=lagrange.kd, max_multiplier=lagrange.max_multiplier)


class QcPIDGains(NamedTuple):
    kp: float
    ki: float
    kd: float


def qc_pid_update(state: PIDState, q_c: jax.Array, threshold: jax.Array, gains: QcPIDGains) -> PIDState:
    """The CVPO authors' controller (cvpo-safe-rl safe_rl/policy/pid_controller.py), one step per actor update.

        e = mean_b(Q_c(s_b, π(s_b)) − ε1)           error of this batch, in per-state Q_c units
        I ← max(0, I + e)                          integral, kept non-negative
        D = max(0, e − e_prev)                     derivative, rises only
        λ = max(0, Kp·max(0, e) + Ki·I + Kd·D)     the proportional term too acts only on a violation

    Args:
      state: the controller (`init_pid` with initial 0 and any gains starts it at zero).
      q_c: [B] cost critic at the batch states and the policy's actions (held constant).
      threshold: ε1 (`MemberSettings.cost_threshold`). gains: Kp, Ki, Kd (original 0.1, 0.003, 0.001).
    """
    error = jnp.mean(jax.lax.stop_gradient(q_c) - threshold)
    integral = jnp.maximum(0.0, state.integral + error)
    derivative = jnp.maximum(0.0, error - state.previous_error)
    multiplier = jnp.maximum(0.0, gains.kp * jnp.maximum(0.0, error) + gains.ki * integral + gains.kd * derivative)
    return PIDState(multiplier=multiplier, integral=integral, previous_error=error)
