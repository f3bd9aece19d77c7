"""`key=value` command lines for the tools that take a fixed set of options (evaluate, diagnostics, the
benchmarks, the experiment scripts). `python -m cvpo_jax.run` and the suite parse theirs with the config."""

from __future__ import annotations

import contextlib
import sys
from typing import Sequence


def parse_options(argv: Sequence[str], defaults: dict[str, str]) -> dict[str, str]:
    """The options `defaults` names, each given as key=value or left at its default.

    Raises ValueError (one line: the bad argument and the allowed keys) on an argument that is not key=value
    or names another key; values stay strings for the caller to convert and check."""
    options = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise ValueError(f"bad argument {arg!r}; allowed: {', '.join(k + '=...' for k in options)}")
        options[key] = value
    return options


@contextlib.contextmanager
def exit_on_bad_input():
    """Wrap a tool's input checks: a ValueError raised inside (a bad option, a run directory that does not fit)
    prints as one `error: ...` line and exits with status 2, without a traceback."""
    try:
        yield
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
