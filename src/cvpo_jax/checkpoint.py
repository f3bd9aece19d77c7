"""Checkpoints of the whole training state (learner, replay, environments, keys) with orbax.

Saves are synchronous and orbax commits each one atomically (written aside, then renamed), so a run killed
at any moment, SIGKILL included, keeps its last complete checkpoint. The newest `keep` are kept (the run
option `checkpoints_kept`, default 2).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def _manager(run_dir: str, keep: Optional[int] = None) -> ocp.CheckpointManager:
    """keep: how many checkpoints a save leaves (None: all; readers never delete)."""
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False),
    )


def _non_empty_leaves(tree: Any) -> dict[str, Any]:
    """The leaves of `tree` that hold data, keyed by their position: orbax refuses zero-size arrays, and
    mjx.Data has some (for example `act` of a model without actuator activations)."""
    return {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(tree)) if leaf.size}


def save(run_dir: str, iteration: int, state: Any, keep: int = 2) -> None:
    """Save `state` as the checkpoint of `iteration` (iterations done per member), keeping the newest `keep`."""
    manager = _manager(run_dir, keep)
    manager.save(iteration, args=ocp.args.StandardSave(_non_empty_leaves(state)))
    manager.wait_until_finished()
    manager.close()


def latest_iteration(run_dir: str) -> Optional[int]:
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return None
    manager = _manager(run_dir)
    step = manager.latest_step()
    manager.close()
    return step


class CheckpointMismatch(ValueError):
    """The saved state does not fit the training state this version builds (another version wrote it)."""


def restore(run_dir: str, iteration: int, like: Any) -> Any:
    """Restore the checkpoint of `iteration` into the structure, shapes and shardings of `like`.

    Raises CheckpointMismatch (one line) when the saved arrays do not fit `like`: a checkpoint written by a
    version of cvpo_jax whose training state differs (for example before per-env restarts, issue 14)."""
    abstract = {
        key: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        for key, x in _non_empty_leaves(like).items()
    }
    manager = _manager(run_dir)
    try:
        saved = manager.restore(iteration, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointMismatch(
            f"run={run_dir}: the checkpoint at iteration {iteration} does not fit the training state of this "
            f"version of cvpo_jax (written by another version? {reason[:160]})") from None
    finally:
        manager.close()
    leaves, treedef = jax.tree.flatten(like)
    return jax.tree.unflatten(treedef, [saved.get(str(i), leaf) for i, leaf in enumerate(leaves)])
