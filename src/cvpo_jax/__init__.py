"""cvpo-jax: Constrained Variational Policy Optimization in JAX."""

import os
import warnings

# Multithreaded OpenBLAS deadlocks when XLA's CPU backend runs two of its triangular solves at once (seen
# here with batched solves in one jitted program); one BLAS thread per call avoids it. Set before jaxlib
# loads its BLAS; a user's explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# jaxopt is unmaintained and announces it with a DeprecationWarning on import; we depend on its L-BFGS-B
# on purpose (see estep.py), so that one warning is filtered here and nothing else is silenced.
warnings.filterwarnings("ignore", message=r".*jaxopt.*", category=DeprecationWarning)

__version__ = "0.1.0"
