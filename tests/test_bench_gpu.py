"""The GPU cost model (`benchmarks/hlo_model.py`) on programs whose loops and branches are known, and the
`bench gpu` command (its deviceless GPU compile needs jax's CUDA plugin, the `gpu-plan` extra)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax.benchmarks import gpu, hlo_model

def _has_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


HAS_CUDA_PLUGIN = _has_cuda_plugin()


def program(x, n):
    """A known-count loop of 7, a data-dependent loop of n trips, one conditional."""
    x = jax.lax.fori_loop(0, 7, lambda i, c: jnp.sin(c) @ c, x)
    x = jax.lax.while_loop(lambda c: c[1] < n, lambda c: (jnp.cos(c[0]) * 2.0 + c[0].T, c[1] + 1), (x, 0))[0]
    return jax.lax.cond(n > 2, lambda y: jnp.exp(y) @ y, lambda y: y, x)


@pytest.fixture(scope="module")
def module():
    with hlo_model.labelled_while_loops():
        text = jax.jit(program).lower(jnp.ones((8, 8)), 3).compile().as_text()
    return hlo_model.HloModule.parse(text)


def test_loops_are_found_and_classified(module):
    counts = hlo_model.count_launches(module, unknown_trips=3)
    known = [loop for loop in counts.loops if loop.known]
    unknown = [loop for loop in counts.loops if not loop.known]
    assert [loop.trips for loop in known] == [7.0]
    assert len(unknown) == 1 and unknown[0].assumed and unknown[0].trips == 3.0
    assert unknown[0].source == "test_bench_gpu.py:program"  # the label labelled_while_loops put there
    assert counts.conditionals == 1


def test_trip_counts_multiply_launches_and_round_trips(module):
    three = hlo_model.count_launches(module, {"test_bench_gpu.py:program": 3})
    five = hlo_model.count_launches(module, {"test_bench_gpu.py:program": 5})
    per_trip = next(loop for loop in five.loops if not loop.known).launches_per_trip
    assert per_trip >= 1 and not next(loop for loop in five.loops if not loop.known).assumed
    assert five.launches - three.launches == pytest.approx(2 * per_trip)
    # (trips + 1) condition reads of the data-dependent loop, one for the conditional, none for the known loop
    assert three.round_trips == 3 + 1 + 1 and five.round_trips == 5 + 1 + 1
    # the FLOPs of the known loop's 7 matmuls (2·8³ each) are counted 7 times at least
    assert five.flops >= 7 * 2 * 8**3


def test_counting_while_loops_records_the_slowest_member():
    trips: dict = {}
    with hlo_model.labelled_while_loops(trips):
        def count_to(n):
            return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 1.5), (0, 1.0))[1]
        out = jax.jit(jax.vmap(count_to))(jnp.asarray([1, 4, 2]))
        jax.block_until_ready(out)
    np.testing.assert_allclose(np.asarray(out), [1.5, 1.5**4, 1.5**2])  # values unchanged by the counter
    assert trips == {"test_bench_gpu.py:count_to": [4]}  # one execution, lockstep over the batch
    assert jax.lax.while_loop.__name__ == "while_loop"  # restored


def test_handwritten_hlo_conditional_takes_the_costliest_branch():
    text = """HloModule m, is_scheduled=true

%cheap (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %f = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused
}

%costly (q: f32[4]) -> f32[4] {
  %q = f32[4]{0} parameter(0)
  %a = f32[4]{0} fusion(%q), kind=kLoop, calls=%fused
  ROOT %b = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused
}

%fused (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %y = f32[4]{0} exponential(%x)
}

ENTRY %main (i: s32[], v: f32[4]) -> f32[4] {
  %i = s32[] parameter(0)
  %v = f32[4]{0} parameter(1)
  %c = f32[4]{0} copy(%v)
  ROOT %r = f32[4]{0} conditional(%i, %c, %c), branch_computations={%cheap, %costly}, metadata={op_name="jit(f)/refill/cond"}
}
"""
    module = hlo_model.HloModule.parse(text)
    counts = hlo_model.count_launches(module)
    assert counts.launches == 1 + 2 and counts.round_trips == 1 and counts.conditionals == 1
    assert counts.flops == 2 * 4  # two exponentials of 4 elements in the costly branch
    pricing = hlo_model.Pricing(launch_us=4.0, round_trip_us=10.0)
    assert pricing.launch_bound_s(counts) == pytest.approx(1e-6 * (4 * 3 + 10 * 1))
    # Taken one time in 16 (a refill period): 1/16 of the costly branch's 2 launches, 15/16 of the cheap one.
    weighted = hlo_model.count_launches(module, costly_branch_odds={"refill": 1 / 16})
    assert weighted.launches == pytest.approx(1 + 2 / 16 + 15 / 16)
    assert weighted.flops == pytest.approx(2 * 4 / 16 + 4 * 15 / 16) and weighted.round_trips == 1
    # A key that matches no conditional's source changes nothing.
    assert hlo_model.count_launches(module, costly_branch_odds={"warmup": 0.0}).launches == 3


def test_the_reset_pool_refill_is_priced_once_per_refill_period():
    # The acting step's one conditional is the pool refill; bench gpu must recognise it by its source.
    from cvpo_jax import envs
    from cvpo_jax.core.acting import make_acting

    env = envs.make("speed_limit")
    acting = make_acting(env, 8, 3, refill_period=4)
    state = acting.reset(jax.random.PRNGKey(0))
    text = jax.jit(acting.step).lower(state, jnp.zeros((3, env.action_size)), jnp.int32(0),
                                      jax.random.PRNGKey(1)).compile().as_text()
    module = hlo_model.HloModule.parse(text)
    conds = [i for insts in module.computations.values() for i in insts if i.op == "conditional"]
    assert len(conds) == 1
    branches = sorted(hlo_model.count_launches(module, costly_branch_odds={"": p}).launches for p in (0.0, 1.0))
    assert branches[1] > branches[0]  # the refill branch launches a reset, the other nothing much
    weighted = hlo_model.count_launches(module, costly_branch_odds=gpu._refill_odds(acting.refill_period))
    assert weighted.launches == pytest.approx(0.75 * branches[0] + 0.25 * branches[1])
    assert hlo_model.count_launches(module).launches == branches[1]  # unweighted: the costliest, every step


def test_bench_gpu_rejects_bad_options(capsys):
    for argv, words in ((["target=a100"], ["target=a100", "h100"]), (["parts=update,fft"], ["fft", "loop"]),
                        (["members=0"], ["members"]), (["tasks=nope"], ["nope", "point_goal"]),
                        (["cvpo.dual_solver=bfgs"], ["cvpo.dual_solver", "newton"])):
        assert gpu.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
        for word in words:
            assert word in err[0]


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="checks the message shown when the CUDA plugin is missing")
def test_bench_gpu_without_the_plugin_says_what_to_install(capsys):
    assert gpu.main(["parts=update", "network.hidden=[16,16]", "cvpo.batch_size=32", "cvpo.num_particles=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gpu-plan" in err[0]


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax's CUDA plugin: pip install -e '.[gpu-plan]'")
def test_bench_gpu_update_plan_end_to_end(tmp_path):
    """The deviceless H100 compile of a tiny update: lockstep L-BFGS-B has no round trip per iteration and
    10 members cost about what 1 does."""
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "cvpo_jax.bench", "gpu", "parts=update", "members=1,4", "network.hidden=[16,16]",
           "cvpo.batch_size=32", "cvpo.num_particles=8", f"json={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MODEL ESTIMATE" in proc.stdout
    import json

    plan = json.loads(out.read_text())
    one, four = plan["update"]
    assert one["conditionals"] == 0 and four["conditionals"] == 0
    assert four["estimate_ms"] <= 1.5 * one["estimate_ms"]
    lbfgsb = [loop for loop in four["loops"] if "fixed_budget" in loop["source"]]
    assert lbfgsb and lbfgsb[0]["known"] and lbfgsb[0]["trips"] == 10
