"""cvpo-jax: Constrained Variational Policy Optimization in JAX."""

import warnings

# jaxopt is unmaintained and announces it with a DeprecationWarning on import; we depend on its L-BFGS-B
# on purpose (see estep.py), so that one warning is filtered here and nothing else is silenced.
warnings.filterwarnings("ignore", message=r".*jaxopt.*", category=DeprecationWarning)

__version__ = "0.1.0"
