"""Benchmark of the E-step dual solve: jitted jaxopt L-BFGS-B (`cvpo_jax.estep.solve_dual`) against SciPy SLSQP.

Usage: python -m cvpo_jax.bench estep [key=value ...]   (or python -m cvpo_jax.benchmarks.estep ...)

Options:
  sizes=300x32,4096x32   B×K problem sizes (comma separated)
  problems=16            problems per vmapped call (the "many seeds" case)
  repeats=7              timed repeats per measurement (the median is reported)
  seed=0                 data seed
  json=PATH              also write the figures as JSON

For each size it times (after compilation, which is reported separately) one solve of a tight problem
(λ > 0) and one jit(vmap) call over `problems` problems with a mix of slack, tight and infeasible
constraints, and the same problems solved by SciPy SLSQP in float64: once with ORIG's settings (bounds
[1e-6, 1e5], tol 1e-3, maxiter 10, first start η = λ = 0.1, no gradient) and once converged (tol 1e-6,
maxiter 500).  Agreement is measured against the converged SciPy optimum on the feasible problems.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

import cvpo_jax  # noqa: F401  (filters jaxopt's deprecation warning before jaxopt is imported)
import jax
import jax.numpy as jnp

from cvpo_jax.core.members import cost_threshold_from_episode_limit
from cvpo_jax.estep import solve_dual

KL_BOUND = 0.1  # ε, paper Table 1
COST_THRESHOLD = cost_threshold_from_episode_limit(10, 400, 0.99)  # ε1 = 2.455 (Goal/Button tasks)
ORIG_SLSQP = dict(bounds=[(1e-6, 1e5), (1e-6, 1e5)], tol=1e-3, maxiter=10)
CONVERGED_SLSQP = dict(bounds=[(1e-6, 1e5), (1e-6, 1e5)], tol=1e-6, maxiter=500)


class UsageError(Exception):
    """A bad command-line option (reported in one line, exit code 2)."""


@dataclass
class Options:
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(300, 32), (4096, 32)])
    problems: int = 16
    repeats: int = 7
    seed: int = 0
    json: str | None = None


def parse_args(argv: list[str]) -> Options:
    opts = Options()
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not value:
            raise UsageError(f"expected key=value, got {arg!r}")
        try:
            if key == "sizes":
                sizes = []
                for item in value.split(","):
                    b, x, k = item.lower().partition("x")
                    if not x:
                        raise ValueError
                    sizes.append((int(b), int(k)))
                if any(b < 1 or k < 1 for b, k in sizes):
                    raise ValueError
                opts.sizes = sizes
            elif key in ("problems", "repeats", "seed"):
                number = int(value)
                if number < (0 if key == "seed" else 1):
                    raise ValueError
                setattr(opts, key, number)
            elif key == "json":
                parent = os.path.dirname(os.path.abspath(value))
                if not os.path.isdir(parent):
                    raise UsageError(f"json: directory {parent!r} does not exist")
                opts.json = value
            else:
                raise UsageError(f"unknown option {key!r} (known: sizes, problems, repeats, seed, json)")
        except ValueError:
            raise UsageError(f"bad value for {key}: {value!r}") from None
    return opts


# ----------------------------------------------------------------------------------------------------------
# Data


def make_problem(rng: np.random.Generator, b: int, k: int, cost_level: float) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic critic outputs for B states × K particles, float64.

    Q_r ~ N(m_b, 1) with state values m_b ~ N(0, 10²).  Q_c ≥ 0: a per-state hazard level uniform on
    [0, 2·cost_level] plus a part that grows with the particle's reward advantage (rewarding actions are
    riskier, so the constraint costs reward) and noise.  cost_level near ε1 gives tight constraints, below
    it slack ones, well above it infeasible ones.
    """
    m = rng.normal(0.0, 10.0, (b, 1))
    q_r = m + rng.normal(size=(b, k))
    hazard = rng.uniform(0.0, 2.0 * cost_level, (b, 1))
    q_c = np.maximum(hazard + 0.7 * (q_r - m) + 0.5 * rng.normal(size=(b, k)), 0.0)
    return q_r, q_c


def cost_levels(n: int) -> list[float]:
    """A spread of cost levels around ε1 (calibrated for K 32, ε 0.1): up to ~2.3 the constraint is slack
    (λ = 0), up to ~2.9 tight, above that infeasible."""
    return list(np.linspace(1.8, 3.1, n)) if n > 1 else [2.6]


# ----------------------------------------------------------------------------------------------------------
# SciPy reference (ORIG's formulation: SLSQP on the batch dual, numerical gradient)


def scipy_dual(x: np.ndarray, q_r: np.ndarray, q_c: np.ndarray, eps1: float, eps: float) -> float:
    eta, lam = x
    comb = q_r - lam * q_c  # [B, K]
    top = comb.max(axis=1)  # [B]
    return float(
        eta * eps + lam * eps1 + np.mean(top) + eta * np.mean(np.log(np.mean(np.exp((comb - top[:, None]) / eta), axis=1)))
    )


def scipy_solve(q_r: np.ndarray, q_c: np.ndarray, settings: dict[str, Any]) -> tuple[float, float, float]:
    from scipy.optimize import minimize  # scipy is a test/benchmark dependency only

    res = minimize(
        scipy_dual, np.array([0.1, 0.1]), args=(q_r, q_c, COST_THRESHOLD, KL_BOUND), method="SLSQP",
        bounds=settings["bounds"], tol=settings["tol"], options={"maxiter": settings["maxiter"]},
    )
    return float(res.fun), float(res.x[0]), float(res.x[1])


# ----------------------------------------------------------------------------------------------------------
# Timing


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# The JAX solvers compared: the default (on this platform's loop) and the accelerator shapes run here.
JAX_SOLVERS = {
    "jaxopt L-BFGS-B f32 (jit)": {},
    "jaxopt L-BFGS-B f32 lockstep, budget 10": {"loop": "lockstep", "fixed_iter": 10},
    "projected Newton f32, 10 it": {"solver": "newton", "fixed_iter": 10},
}


def jax_solver(vmapped: bool, **kw):
    def one(q_r, q_c):  # [B, K] each
        return solve_dual(q_r, q_c, cost_threshold=COST_THRESHOLD, kl_bound=KL_BOUND, **kw)

    return jax.jit(jax.vmap(one) if vmapped else one)


@dataclass
class Row:
    size: str  # "B×K" or "N×B×K"
    case: str  # "single" or "vmap N"
    solver: str
    compile_s: float | None
    time_ms: float  # per call (a vmapped call solves N problems)
    time_per_problem_ms: float
    speedup_vs_jax: float | None  # this solver's time / the jaxopt time (> 1: jaxopt faster)
    rel_dg: float | None  # max over feasible problems of |g − g_ref| / |g_ref| (ref: SciPy converged)
    worst_signed_dg: float | None  # max of (g − g_ref) / |g_ref|: ≤ 0 means never above the reference
    d_eta: float | None  # max |η − η_ref|
    d_lam: float | None  # max |λ − λ_ref|
    iterations: str = ""
    notes: str = ""


def bench_case(b: int, k: int, n: int, repeats: int, rng: np.random.Generator) -> list[Row]:
    """One size: N = 1 (a tight problem) or N problems in one vmapped call."""
    levels = cost_levels(n)
    data = [make_problem(rng, b, k, level) for level in levels]
    q_r = np.stack([d[0] for d in data])  # [N, B, K] float64
    q_c = np.stack([d[1] for d in data])
    vmapped = n > 1
    args = (jnp.asarray(q_r, jnp.float32), jnp.asarray(q_c, jnp.float32))
    if not vmapped:
        args = (args[0][0], args[1][0])

    solved = {}
    for name, kw in JAX_SOLVERS.items():
        fn = jax_solver(vmapped, **kw)
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        sol = jax.block_until_ready(compiled(*args))
        solved[name] = (compile_s, median_time(lambda c=compiled: c(*args), repeats), sol)
    default = next(iter(JAX_SOLVERS))
    t_jax = solved[default][1]
    sol = solved[default][2]

    lam = np.atleast_1d(np.asarray(sol.lam, float))
    infeasible = np.atleast_1d(np.asarray(sol.infeasible))

    ref = [scipy_solve(q_r[i], q_c[i], CONVERGED_SLSQP) for i in range(n)]
    orig = [scipy_solve(q_r[i], q_c[i], ORIG_SLSQP) for i in range(n)]
    t_conv = median_time(lambda: [scipy_solve(q_r[i], q_c[i], CONVERGED_SLSQP) for i in range(n)], repeats)
    t_orig = median_time(lambda: [scipy_solve(q_r[i], q_c[i], ORIG_SLSQP) for i in range(n)], repeats)

    feasible = [i for i in range(n) if not infeasible[i]]

    def agreement(points: list[tuple[float, float]]) -> tuple[float | None, ...]:
        if not feasible:
            return None, None, None, None
        signed, de, dl = [], [], []
        for i in feasible:
            g_ref, eta_ref, lam_ref = ref[i]
            # both optima evaluated with the same float64 dual, so only the points differ
            g = scipy_dual(np.array(points[i]), q_r[i], q_c[i], COST_THRESHOLD, KL_BOUND)
            signed.append((g - g_ref) / abs(g_ref))
            de.append(abs(points[i][0] - eta_ref))
            dl.append(abs(points[i][1] - lam_ref))
        return max(abs(v) for v in signed), max(signed), max(de), max(dl)

    case = f"vmap {n}" if vmapped else "single"
    size = f"{n}x{b}x{k}" if vmapped else f"{b}x{k}"
    mix = (
        f"lam>0: {int(np.sum(lam > 0))}/{n}, infeasible: {int(np.sum(infeasible))}/{n}"
        + (" (excluded from agreement)" if np.any(infeasible) else "")
    )
    rows = []
    for name, (compile_s, t, solution) in solved.items():
        its = np.atleast_1d(np.asarray(solution.iterations))
        e = np.atleast_1d(np.asarray(solution.eta, float))
        la = np.atleast_1d(np.asarray(solution.lam, float))
        conv = np.atleast_1d(np.asarray(solution.converged))
        notes = mix if name == default else f"converged {int(conv.sum())}/{n}"
        rows.append(Row(size, case, name, compile_s, 1e3 * t, 1e3 * t / n, t / t_jax,
                        *agreement([(e[i], la[i]) for i in range(n)]),
                        iterations=f"{int(its.min())}-{int(its.max())}" if n > 1 else str(int(its[0])), notes=notes))
    rows += [
        Row(size, case, "SciPy SLSQP f64 ORIG (tol 1e-3, 10 it)", None, 1e3 * t_orig, 1e3 * t_orig / n,
            t_orig / t_jax, *agreement([(o[1], o[2]) for o in orig])),
        Row(size, case, "SciPy SLSQP f64 converged (tol 1e-6)", None, 1e3 * t_conv, 1e3 * t_conv / n,
            t_conv / t_jax, *([0.0] * 4 if feasible else [None] * 4), notes="reference optimum"),
    ]
    return rows


def fmt(x: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return "-".rjust(width) if x is None else format(x, spec)


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'size':>11} {'case':>7} {'solver':<40} {'compile s':>9} {'ms/call':>9} {'ms/problem':>10} "
        f"{'x jaxopt':>8} {'|dg|/|g|':>9} {'max dg/|g|':>10} {'|d eta|':>9} {'|d lam|':>9} {'iters':>6}  notes"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.size:>11} {r.case:>7} {r.solver:<40} {fmt(r.compile_s, '9.2f')} {r.time_ms:9.2f} "
            f"{r.time_per_problem_ms:10.3f} {fmt(r.speedup_vs_jax, '8.2f')} {fmt(r.rel_dg, '9.1e')} "
            f"{fmt(r.worst_signed_dg, '10.1e')} "
            f"{fmt(r.d_eta, '9.1e')} {fmt(r.d_lam, '9.1e')} {r.iterations:>6}  {r.notes}"
        )


def main(argv: list[str]) -> int:
    try:
        opts = parse_args(list(argv))
    except UsageError as err:
        print(f"estep benchmark: error: {err}", file=sys.stderr)
        return 2

    print(
        f"E-step dual solve: eps={KL_BOUND}, eps1={COST_THRESHOLD:.4f}, jax {jax.__version__} on "
        f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}), repeats={opts.repeats} "
        f"(median), jaxopt float32 tol 1e-5 max_iter 50, cold start\n"
        "'x jaxopt' = that solver's time / jaxopt's; agreement (feasible problems only) against converged SLSQP: "
        "|dg|/|g| max relative gap of the dual value, 'max dg/|g|' its largest signed value (< 0: jaxopt's "
        "optimum is lower, i.e. better, than the reference everywhere), |d eta|, |d lam| max absolute gaps"
    )
    rng = np.random.default_rng(opts.seed)
    rows: list[Row] = []
    for b, k in opts.sizes:
        for n in (1, opts.problems):
            rows.extend(bench_case(b, k, n, opts.repeats, rng))
    print_table(rows)

    if opts.json:
        payload = {
            "kl_bound": KL_BOUND,
            "cost_threshold": COST_THRESHOLD,
            "jax_version": jax.__version__,
            "backend": jax.devices()[0].platform,
            "options": {**asdict(opts), "sizes": [f"{b}x{k}" for b, k in opts.sizes]},
            "rows": [asdict(r) for r in rows],
        }
        try:
            with open(opts.json, "w") as fh:
                json.dump(payload, fh, indent=2)
        except OSError as err:
            print(f"estep benchmark: error: cannot write {opts.json}: {err.strerror}", file=sys.stderr)
            return 2
        print(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
