"""The layering the code promises (no JAX compiles here):

- `cvpo_jax.core` is below every algorithm: it imports no learner module;
- no baseline imports CVPO's update (`cvpo_jax.cvpo`, `estep`, `mstep`) or a trainer;
- module-level imports form no cycle;
- the algorithm table is the one list of algorithms, and every factory in it exists;
- the commands recorded under experiments/results still parse against today's options.
"""

from __future__ import annotations

import ast
import glob
import os
import shlex

import pytest

from cvpo_jax import algorithms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src", "cvpo_jax")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.join(ROOT, "src"))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, *, top_level_only: bool) -> set[str]:
    """cvpo_jax modules imported by the file (`from cvpo_jax import x` counts as cvpo_jax.x)."""
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cvpo_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cvpo_jax"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


MODULES = {_module_name(p): p for p in glob.glob(os.path.join(SRC, "**", "*.py"), recursive=True)}
CVPO_MODULES = {"cvpo_jax.cvpo", "cvpo_jax.estep", "cvpo_jax.mstep"}
TRAINERS = {"cvpo_jax.core.replay_trainer", "cvpo_jax.core.rollout_trainer"}


def _known(imported: set[str]) -> set[str]:
    return {m for m in imported if m in MODULES}


def test_core_imports_no_algorithm():
    for name, path in MODULES.items():
        if name.startswith("cvpo_jax.core"):
            bad = {m for m in _known(_imports(path, top_level_only=False))
                   if m in CVPO_MODULES or m.startswith("cvpo_jax.baselines")}
            assert not bad, f"{name} imports {bad}"


def test_no_baseline_imports_cvpo_or_a_trainer():
    for name, path in MODULES.items():
        if name.startswith("cvpo_jax.baselines"):
            bad = _known(_imports(path, top_level_only=False)) & (CVPO_MODULES | TRAINERS)
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycles_at_module_level():
    graph = {name: _known(_imports(path, top_level_only=True)) - {name} for name, path in MODULES.items()}

    def visit(node, stack):
        if node in stack:
            raise AssertionError(" -> ".join(stack[stack.index(node):] + [node]))
        for nxt in graph.get(node, ()):
            visit(nxt, stack + [node])

    for name in graph:
        visit(name, [])


def test_algorithm_table_factories_exist_and_match_their_trainer():
    import importlib

    for algo in algorithms.ALGORITHMS.values():
        module, function = algo.learner_factory.split(":")
        assert callable(getattr(importlib.import_module(module), function)), algo.name
        assert algo.trainer in (algorithms.REPLAY, algorithms.ROLLOUT)
    with pytest.raises(ValueError, match="allowed: cvpo"):
        algorithms.get("nope")


def _recorded_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "results", "*", "command.txt"))):
        text = open(path).read().replace("\\\n", " ")
        for line in text.splitlines():
            if line.startswith("python -m cvpo_jax.run "):
                commands.append((os.path.relpath(path, ROOT), shlex.split(line)[3:]))
    return commands


@pytest.mark.parametrize("path,args", _recorded_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_recorded_commands_still_resolve(path, args):
    from cvpo_jax import run

    cfg = run.resolve(args)
    assert cfg.algo in algorithms.ALGORITHMS and cfg.episode_length and cfg.cost_limit is not None, path
