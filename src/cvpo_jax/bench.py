"""Benchmarks of the hot paths: `python -m cvpo_jax.bench {estep,env,train,gpu} [key=value ...]`.

Each prints its figures against a reference where one exists, and `json=PATH` writes the same figures.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "estep": "the E-step dual solve (jaxopt L-BFGS-B) against SciPy SLSQP",
    "env": "env-steps/s of each MJX task against MuJoCo's C stepping",
    "train": "the CVPO update split into critic, E-step and M-step, and the whole training loop",
    "gpu": "model estimates of the update, env step and loop on a GPU, from a deviceless compile",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:6s} {what}" for name, what in BENCHMARKS.items()]
        print("usage: python -m cvpo_jax.bench {estep,env,train,gpu} [key=value ...]\n" + "\n".join(lines))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"error: unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"cvpo_jax.benchmarks.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
