"""cvpo-jax: Constrained Variational Policy Optimization in JAX."""

import os
import warnings

# One BLAS thread per call: XLA's CPU backend already runs independent ops on its own intra-op pool, and
# extra BLAS threads only oversubscribe the cores. (An early hang with batched solves was first blamed on
# multithreaded OpenBLAS; the hang later traced with gdb was jaxlib splitting large batched LAPACK calls over
# XLA's pool and starving it, fixed for the Car in envs/robots.py, see envs/README.md "Speed".) Set before
# jaxlib loads its BLAS; a user's explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# jaxopt is unmaintained and announces it with a DeprecationWarning on import; we depend on its L-BFGS-B
# on purpose (see estep.py), so that one warning is filtered here and nothing else is silenced.
warnings.filterwarnings("ignore", message=r".*jaxopt.*", category=DeprecationWarning)

__version__ = "0.1.0"


def import_mjx_quietly() -> None:
    """Import mujoco.mjx without its two "Failed to import warp" lines.

    mujoco-mjx prints them (plain print, not a warning) when the optional NVIDIA Warp backend is absent, which
    is the normal case here (we use MJX's JAX backend). `cvpo_jax.envs` calls this before anything imports MJX
    (brax imports it too, and every command line imports the envs before brax), so a user's first output is
    not a false alarm. Anything else printed during the import is passed through.
    """
    import contextlib
    import io
    import sys

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        import mujoco.mjx  # noqa: F401
    for line in captured.getvalue().splitlines():
        if not (line.startswith("Failed to import warp") or line.startswith("Failed to import mujoco_warp")):
            print(line, file=sys.stdout)
