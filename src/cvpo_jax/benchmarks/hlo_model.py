"""A launch-cost model of an optimized XLA module, read from its HLO text (`compiled.as_text()`).

On a GPU a small program like the CVPO update is bound by launches and host synchronisation, not by FLOPs:
every kernel-producing instruction (fusion, custom call, copy, sort, ...) is one launch; every evaluation of
the condition of a `while` whose trip count XLA cannot prove, and every `conditional`, copies a predicate or
branch index to the host before the next launch (a device-to-host round trip). This module walks the
schedule from the entry computation, multiplying loop bodies by their trip counts, and counts:

- kernel launches, in total and per loop iteration;
- host round trips: (trips + 1) condition reads per data-dependent `while` (the condition is evaluated once
  more than the body runs), one per `conditional`; a `while` with `known_trip_count` in its backend config
  costs none (XLA runs it from the host with the count, without reading the predicate back);
- FLOPs (2·M·N·K per dot, one per element for the arithmetic inside fusions) and bytes (operands + result of
  each launch), a lower bound on memory traffic.

Trip counts of data-dependent loops are not in the HLO: the caller gives them per loop (matched on the loop's
source location, e.g. ``lbfgsb.py``) or they default to an assumed count. Every figure derived from this is a
model estimate, not a measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from typing import Mapping, Optional

# Instructions that launch nothing: bookkeeping, views and control flow (control flow is walked into).
_NO_LAUNCH = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
    "after-all", "add-dependency", "opt-barrier", "partition-id", "replica-id", "domain", "copy-done",
    "async-done", "send-done", "recv-done", "all-reduce-done", "all-gather-done", "collective-permute-done",
    "get-dimension-size", "iota",
}
_ARITHMETIC = {
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "exponential", "log", "log-plus-one",
    "exponential-minus-one", "sqrt", "rsqrt", "power", "tanh", "logistic", "negate", "abs", "compare",
    "select", "clamp", "sine", "cosine", "atan2", "floor", "ceil", "round-nearest-even", "sign", "cbrt",
    "remainder", "erf", "and", "or", "not", "xor",
}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+)\s*=\s*(?P<shape>.*?)\s(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[subfc]\d+|bf16)\[(?P<dims>[0-9,]*)\]")


@dataclasses.dataclass
class Instruction:
    name: str
    op: str
    shape: str
    rest: str  # operands and attributes, as printed

    def attr(self, key: str) -> Optional[str]:
        m = re.search(rf"\b{key}=%([^\s,}}]+)", self.rest)
        return m.group(1) if m else None

    def branches(self) -> list[str]:
        m = re.search(r"branch_computations=\{([^}]*)\}", self.rest)
        if m:
            return [b.strip().lstrip("%") for b in m.group(1).split(",") if b.strip()]
        return [b for b in (self.attr("true_computation"), self.attr("false_computation")) if b]

    def known_trip_count(self) -> Optional[int]:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', self.rest)
        return int(m.group(1)) if m else None

    def stack_frame(self) -> Optional[int]:
        m = re.search(r"stack_frame_id=(\d+)", self.rest)
        return int(m.group(1)) if m else None

    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.rest)
        return m.group(1) if m else ""


def _elements(shape: str) -> int:
    """Elements of the first array in a shape string (a tuple's first leaf)."""
    m = _ARRAY.search(shape)
    if not m:
        return 1
    return math.prod(int(d) for d in m.group("dims").split(",") if d) if m.group("dims") else 1


def _bytes(shape: str) -> int:
    """Bytes of every array in a shape string (all leaves of a tuple)."""
    total = 0
    for m in _ARRAY.finditer(shape):
        dims = [int(d) for d in m.group("dims").split(",") if d]
        total += math.prod(dims) * _DTYPE_BYTES.get(m.group("dtype"), 4)
    return total


@dataclasses.dataclass
class HloModule:
    computations: dict[str, list[Instruction]]
    entry: str
    frames: dict[int, tuple[str, str, int, int]]  # stack frame id -> (file, function, line, parent id)

    @classmethod
    def parse(cls, text: str) -> "HloModule":
        computations: dict[str, list[Instruction]] = {}
        entry, current = "", None
        files: dict[int, str] = {}
        functions: dict[int, str] = {}
        locations: dict[int, tuple[int, int, int]] = {}
        frames_raw: dict[int, tuple[int, int]] = {}
        section = None
        for line in text.splitlines():
            stripped = line.strip()
            if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                section = stripped
                continue
            if current is None and section and stripped and stripped[0].isdigit():
                key, _, value = stripped.partition(" ")
                if section == "FileNames":
                    files[int(key)] = value.strip('"')
                elif section == "FunctionNames":
                    functions[int(key)] = value.strip('"')
                elif section == "FileLocations":
                    f = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", value)
                    if f:
                        locations[int(key)] = (int(f.group(1)), int(f.group(2)), int(f.group(3)))
                elif section == "StackFrames":
                    f = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", value)
                    if f:
                        frames_raw[int(key)] = (int(f.group(1)), int(f.group(2)))
                continue
            m = _COMPUTATION.match(line)
            if m:
                section = None
                current = m.group("name")
                computations[current] = []
                if m.group("entry"):
                    entry = current
                continue
            if stripped == "}":
                current = None
                continue
            if current is not None:
                i = _INSTRUCTION.match(line)
                if i:
                    computations[current].append(Instruction(i.group("name"), i.group("op"), i.group("shape"),
                                                             i.group("rest")))
        if not entry:
            raise ValueError("no ENTRY computation in the HLO text")
        frames = {}
        for fid, (loc, parent) in frames_raw.items():
            file_id, func_id, line_no = locations.get(loc, (0, 0, 0))
            frames[fid] = (files.get(file_id, "?"), functions.get(func_id, "?"), line_no, parent)
        return cls(computations, entry, frames)

    def source(self, inst: Instruction, depth: int = 3) -> str:
        """The loop label `labelled_while_loops` put in the op_name, else `file:function:line` of the
        instruction's innermost frames (innermost first), else its op_name."""
        labels = re.findall(r"loop\[([^\]]*)\]", inst.op_name())
        if labels:
            return labels[-1]
        fid, parts = inst.stack_frame(), []
        while fid and fid in self.frames and len(parts) < depth:
            file, func, line, parent = self.frames[fid]
            parts.append(f"{file.rsplit('/', 1)[-1]}:{func}:{line}")
            fid = parent if parent != fid else None
        return " < ".join(parts) if parts else inst.op_name()


@dataclasses.dataclass
class LoopCount:
    """One `while` of the program (per execution of its parent)."""

    source: str  # where it comes from in the Python code
    trips: float  # iterations per execution
    known: bool  # trip count proven by XLA (no round trips)
    assumed: bool  # trips assumed, not measured (data-dependent loops without a given count)
    executions: float  # how often the loop runs per program execution
    launches_per_trip: int  # launches of one iteration (body + condition), nested loops included


@dataclasses.dataclass
class LaunchCount:
    launches: float = 0.0
    round_trips: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    conditionals: float = 0.0
    loops: list = dataclasses.field(default_factory=list)

    def add(self, other: "LaunchCount", times: float) -> None:
        self.launches += times * other.launches
        self.round_trips += times * other.round_trips
        self.flops += times * other.flops
        self.bytes += times * other.bytes
        self.conditionals += times * other.conditionals
        for loop in other.loops:
            self.loops.append(dataclasses.replace(loop, executions=loop.executions * times))


def _fusion_flops(module: HloModule, name: Optional[str], seen: int = 0) -> float:
    flops = 0.0
    for inst in module.computations.get(name or "", []):
        if inst.op == "dot":
            flops += _dot_flops(module, inst, name)
        elif inst.op in _ARITHMETIC:
            flops += _elements(inst.shape)
        elif inst.op == "fusion" and seen < 4:
            flops += _fusion_flops(module, inst.attr("calls"), seen + 1)
        elif inst.op in ("reduce", "reduce-window"):
            operand = re.match(r"\s*([^%]*)%", inst.rest)
            flops += _elements(operand.group(1)) if operand and operand.group(1) else _elements(inst.shape)
    return flops


def _operand_shapes(module: HloModule, comp: str, inst: Instruction) -> list[str]:
    """Shapes of the instruction's operands, looked up in its computation (operands print as %names)."""
    by_name = {i.name: i.shape for i in module.computations.get(comp, [])}
    args = inst.rest.split(")", 1)[0]
    out = []
    for token in re.findall(r"%([^\s,)]+)", args):
        if token in by_name:
            out.append(by_name[token])
    # Operands may also print with their shapes inline: "f32[3,4]{1,0} %p".
    if not out:
        out = [m.group(0) for m in _ARRAY.finditer(args)]
    return out


def _dot_flops(module: HloModule, inst: Instruction, comp: str) -> float:
    operands = _operand_shapes(module, comp, inst)
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.rest)
    if not operands or not m:
        return 2.0 * _elements(inst.shape)
    lhs = _ARRAY.search(operands[0])
    dims = [int(d) for d in lhs.group("dims").split(",") if d] if lhs else []
    contracted = math.prod(dims[int(d)] for d in m.group(1).split(",") if d) if dims else 1
    return 2.0 * _elements(inst.shape) * contracted


def _gemm_flops(module: HloModule, inst: Instruction, comp: str) -> float:
    """cuBLAS gemm custom calls carry their dimension numbers in the backend config."""
    operands = _operand_shapes(module, comp, inst)
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.rest)
    if not operands or not m:
        return 0.0
    lhs = _ARRAY.search(operands[0])
    dims = [int(d) for d in lhs.group("dims").split(",") if d] if lhs else []
    idx = [int(d.strip('" ')) for d in m.group(1).split(",") if d.strip('" ')]
    contracted = math.prod(dims[i] for i in idx) if dims else 1
    return 2.0 * _elements(inst.shape) * contracted


def count_launches(module: HloModule, trip_counts: Mapping[str, float] | None = None,
                   unknown_trips: float = 3.0,
                   costly_branch_odds: Mapping[str, float] | None = None) -> LaunchCount:
    """Walk the entry computation. trip_counts: {substring of a loop's source: iterations}.

    A `conditional` is priced at its costliest branch (an upper bound), unless its source matches a key of
    costly_branch_odds: {substring of the source: probability p that the costliest branch runs}, when it is
    priced at p·costliest + (1 − p)·cheapest (e.g. the reset pool's refill, taken once per refill period).
    Its round trip is paid either way."""
    trip_counts = dict(trip_counts or {})
    costly_branch_odds = dict(costly_branch_odds or {})
    memo: dict[str, LaunchCount] = {}

    def walk(comp: str) -> LaunchCount:
        if comp in memo:
            return memo[comp]
        total = LaunchCount()
        for inst in module.computations.get(comp, []):
            if inst.op == "while":
                body, cond = inst.attr("body"), inst.attr("condition")
                body_count, cond_count = walk(body), walk(cond)
                known = inst.known_trip_count()
                source = module.source(inst)
                if known is not None:
                    trips, assumed = float(known), False
                else:
                    match = [v for k, v in trip_counts.items() if k in source]
                    trips, assumed = (float(match[0]), False) if match else (unknown_trips, True)
                per_trip = int(round(body_count.launches + (0 if known is not None else cond_count.launches)))
                total.add(body_count, trips)
                if known is None:
                    total.add(cond_count, trips + 1)
                    total.round_trips += trips + 1
                total.loops.append(LoopCount(source, trips, known is not None, assumed, 1.0, per_trip))
            elif inst.op == "conditional":
                branches = [walk(b) for b in inst.branches()]
                if branches:
                    costliest = max(branches, key=lambda c: c.launches)
                    source = module.source(inst)
                    odds = [v for k, v in costly_branch_odds.items() if k in source]
                    if odds:
                        total.add(costliest, float(odds[0]))
                        total.add(min(branches, key=lambda c: c.launches), 1.0 - float(odds[0]))
                    else:
                        total.add(costliest, 1.0)
                total.round_trips += 1
                total.conditionals += 1
            elif inst.op == "call":
                target = inst.attr("to_apply") or inst.attr("calls")
                if target:
                    total.add(walk(target), 1.0)
            elif inst.op in _NO_LAUNCH or inst.op.endswith("-done"):
                continue
            else:
                total.launches += 1
                total.bytes += _bytes(inst.shape) + sum(_bytes(s) for s in _operand_shapes(module, comp, inst))
                if inst.op == "fusion":
                    total.flops += _fusion_flops(module, inst.attr("calls"))
                elif inst.op == "custom-call" and "gemm" in inst.rest:
                    total.flops += _gemm_flops(module, inst, comp)
                elif inst.op == "dot":
                    total.flops += _dot_flops(module, inst, comp)
        memo[comp] = total
        return total

    return walk(module.entry)


@dataclasses.dataclass(frozen=True)
class Pricing:
    """What one launch and one host round trip cost, and the device's peak rates (model inputs)."""

    launch_us: float = 4.0
    round_trip_us: float = 10.0
    peak_flops: float = 67e12  # H100 SXM FP32 (non-tensor-core) peak
    bandwidth: float = 3.35e12  # H100 SXM HBM3, bytes/s

    def launch_bound_s(self, c: LaunchCount) -> float:
        return 1e-6 * (self.launch_us * c.launches + self.round_trip_us * c.round_trips)

    def flop_bound_s(self, c: LaunchCount) -> float:
        return max(c.flops / self.peak_flops, c.bytes / self.bandwidth)

    def estimate_s(self, c: LaunchCount) -> float:
        """Launch-bound and FLOP/byte-bound costs add: tiny kernels do not overlap their launch latency."""
        return self.launch_bound_s(c) + self.flop_bound_s(c)


def summary(c: LaunchCount, pricing: Pricing) -> dict:
    return {
        "launches": round(c.launches), "round_trips": round(c.round_trips), "conditionals": round(c.conditionals),
        "flops": c.flops, "bytes": c.bytes,
        "launch_bound_ms": 1e3 * pricing.launch_bound_s(c), "flop_bound_ms": 1e3 * pricing.flop_bound_s(c),
        "estimate_ms": 1e3 * pricing.estimate_s(c),
        "loops": [dataclasses.asdict(loop) for loop in c.loops],
    }


_LOOP_HELPERS = ("/jax/", "/jaxlib/", "jaxopt/_src/loop.py", "hlo_model.py", "contextlib.py")


def _caller_label() -> str:
    """`file:function` of the nearest frame that is not jax itself or a loop helper (jaxopt's loop.py)."""
    import inspect

    for frame in inspect.stack()[2:]:
        path = frame.filename.replace("\\", "/")
        if not any(h in path for h in _LOOP_HELPERS):
            return f"{path.rsplit('/', 1)[-1]}:{frame.function}"
    return "?"


@contextlib.contextmanager
def labelled_while_loops(trips: Optional[dict] = None):
    """While active, every `jax.lax.while_loop` traced is put in a named scope `loop[file:function]` (so its
    HLO `while` carries the label in its op_name) and, when `trips` is a dict, counts its iterations:
    each execution appends the iterations it ran to trips[label] (the maximum over a vmapped batch, which
    is what a lockstep loop runs). Counting uses a host callback, so only trace programs to *run* under it
    (on the CPU); for compiling the label alone is enough (trips=None)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    original = jax.lax.while_loop

    def record(label, n):
        trips.setdefault(label, []).append(int(np.max(n)))
        return n

    def labelled(cond_fun, body_fun, init_val):
        label = _caller_label()
        with jax.named_scope(f"loop[{label}]"):
            if trips is None:
                return original(cond_fun, body_fun, init_val)
            out, n = original(lambda c: cond_fun(c[0]), lambda c: (body_fun(c[0]), c[1] + 1),
                              (init_val, jnp.zeros((), jnp.int32)))
            # The callback sees the whole vmapped batch at once ("expand_dims"), so it records the trips of
            # the batch's slowest member, what a lockstep loop runs. Its result is tied into every floating
            # leaf of the output so that it is not removed as dead code while any of them is used.
            seen = jax.pure_callback(functools.partial(record, label), jax.ShapeDtypeStruct((), jnp.int32), n,
                                     vmap_method="expand_dims")
            def tie(x):
                x = jnp.asarray(x)
                return x + 0.0 * seen.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

            return jax.tree.map(tie, out)

    # Traces cached from outside the context (jaxopt jits its solver steps) would skip the patch, and traces
    # made inside it must not leak out: start and end with empty caches.
    jax.clear_caches()
    jax.lax.while_loop = labelled
    try:
        yield trips
    finally:
        jax.lax.while_loop = original
        jax.clear_caches()


def mean_trips(trips: dict) -> dict[str, float]:
    return {label: float(sum(v) / len(v)) for label, v in trips.items() if v}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=float)
