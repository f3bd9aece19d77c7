"""The gradient step every learner takes: value_and_grad, an optional torch-style norm clip, the optimiser.

One place for the plumbing (`value_and_grad` → clip → `optimizer.update` → `apply_updates`) so that a
learner's code shows its loss and its bookkeeping, not the optimiser's.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class GradientStep(NamedTuple):
    params: Any  # after the step
    opt_state: Any
    loss: jax.Array  # [] at the parameters before the step
    aux: Any  # the loss's auxiliary output ({} when it has none)
    grad_norm: jax.Array  # [] global norm of the gradient before any clip


def clip_by_global_norm(grads: Any, max_norm: float) -> tuple[Any, jax.Array]:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.

    (optax.clip_by_global_norm scales by max_norm / norm; the CVPO original uses torch's rule.)
    Returns (clipped gradients, norm before the clip).
    """
    norm = optax.tree.norm(grads)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale, grads), norm


def gradient_step(loss_fn: Callable, params: Any, opt_state: Any, optimizer: optax.GradientTransformation,
                  *args: Any, has_aux: bool = False, max_grad_norm: Optional[float] = None,
                  **kwargs: Any) -> GradientStep:
    """One optimiser step on `loss_fn(params, *args, **kwargs)` (returning (loss, aux) when has_aux).

    `max_grad_norm` clips the gradient's global norm first (None: no clip).
    """
    if has_aux:
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args, **kwargs)
    else:
        loss, grads = jax.value_and_grad(loss_fn)(params, *args, **kwargs)
        aux = {}
    if max_grad_norm is None:
        grad_norm = optax.tree.norm(grads)
    else:
        grads, grad_norm = clip_by_global_norm(grads, max_grad_norm)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return GradientStep(optax.apply_updates(params, updates), opt_state, loss, aux, grad_norm)
