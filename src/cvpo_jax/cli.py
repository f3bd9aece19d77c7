"""`key=value` command lines for the tools that take a fixed set of options (evaluate, diagnostics, the
benchmarks, the experiment scripts). `python -m cvpo_jax.run` and the suite parse theirs with the config."""

from __future__ import annotations

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
