"""M-step loss, dual update and the scanned M-step against independent computations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from cvpo_jax import networks
from cvpo_jax.mstep import (
    MStepDuals,
    MStepSettings,
    MStepTargets,
    init_mstep_duals,
    mstep_dual_loss,
    mstep_loss,
    mstep_update,
    update_duals,
)
from cvpo_jax.policy import kl_covariance, kl_mean, sample

B, K, A, O = 32, 8, 2, 3
EPS_MEAN, EPS_COV = 1e-3, 1e-4
NUM_STEPS = 30


class Setup:
    """Tiny policy; old policy = a perturbed copy; particles from old; weights favouring action dim 0 > μ."""

    def __init__(self):
        self.nets = networks.make_networks(O, A, hidden=(16, 16))
        self.apply = self.nets.policy.apply
        # Everything below is built in one compiled call (compiling op by op is slow on a shared CPU).
        built = jax.jit(self._build)(jax.random.key(0))
        self.params, self.old_params, self.obs, self.old, self.particles, self.weights = built

    def _build(self, key):
        init_key, obs_key, noise_key, sample_key = jax.random.split(key, 4)
        obs = jax.random.normal(obs_key, (B, O))  # [B, O]
        params = self.nets.policy.init(init_key, obs)
        # Old = the policy at slightly different parameters, so the KL terms and their gradients are non-zero.
        old_params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(noise_key, x.shape), params)
        old = self.apply(old_params, obs)  # mean [B, A], scale_tril [B, A, A]
        particles = sample(old, sample_key, K)  # [B, K, A]
        weights = jax.nn.softmax(4.0 * particles[..., 0], axis=-1)  # [B, K], concentrated on one side
        return params, old_params, obs, old, particles, weights

    def loss(self, params, duals, **kw):
        return mstep_loss(
            params, self.apply, self.obs, self.particles, self.weights, self.old, duals,
            kl_mean_bound=EPS_MEAN, kl_cov_bound=EPS_COV, **kw,
        )


@pytest.fixture(scope="module")
def setup():
    return Setup()


def test_loss_matches_scipy(setup):
    duals = MStepDuals(jnp.float32(0.05), jnp.float32(3.0))

    @jax.jit
    def compute():
        return (
            setup.loss(setup.params, duals),
            setup.loss(setup.params, duals, average_over_particles=True)[1],
            setup.apply(setup.params, setup.obs),
        )

    (loss, aux), aux_mean, new = compute()
    to64 = lambda x: np.asarray(x, np.float64)
    ml, c_mean, c_cov = [], [], []
    for b in range(B):
        mu, mu_old = to64(new.mean[b]), to64(setup.old.mean[b])
        tril, tril_old = to64(new.scale_tril[b]), to64(setup.old.scale_tril[b])
        cov, cov_old = tril @ tril.T, tril_old @ tril_old.T
        a = to64(setup.particles[b])  # [K, A]
        log_p = stats.multivariate_normal(mu, cov_old).logpdf(a)  # mean head under Σ_old
        log_p = log_p + stats.multivariate_normal(mu_old, cov).logpdf(a)  # covariance head around μ_old
        ml.append(np.sum(to64(setup.weights[b]) * log_p))
        d = mu - mu_old
        c_mean.append(0.5 * d @ np.linalg.solve(cov_old, d))
        log_det_ratio = np.log(np.linalg.det(cov) / np.linalg.det(cov_old))
        c_cov.append(0.5 * (np.trace(np.linalg.solve(cov, cov_old)) - A + log_det_ratio))
    ml_loss, c_mean, c_cov = -np.mean(ml), np.mean(c_mean), np.mean(c_cov)
    np.testing.assert_allclose(aux["ml_loss"], ml_loss, rtol=1e-5)
    np.testing.assert_allclose(aux["kl_mean"], c_mean, rtol=1e-3)
    np.testing.assert_allclose(aux["kl_cov"], c_cov, rtol=1e-3, atol=1e-7)
    want = ml_loss + 0.05 * (c_mean - EPS_MEAN) + 3.0 * (c_cov - EPS_COV)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    # ORIG's normalisation: the likelihood term is divided by K.
    np.testing.assert_allclose(aux_mean["ml_loss"], ml_loss / K, rtol=1e-5)


def test_gradients_reach_only_the_policy(setup):
    """Policy gets ML + α·∇C; multipliers, old policy, particles and weights get exactly zero."""
    duals = MStepDuals(jnp.float32(0.07), jnp.float32(2.0))

    def loss_all(params, duals, old, particles, weights):
        return mstep_loss(params, setup.apply, setup.obs, particles, weights, old, duals,
                          kl_mean_bound=EPS_MEAN, kl_cov_bound=EPS_COV)[0]

    def mean_kl(fn, p):
        return jnp.mean(fn(setup.old, setup.apply(p, setup.obs)))

    @jax.jit
    def all_grads():
        grads = jax.grad(loss_all, argnums=(0, 1, 2, 3, 4))(
            setup.params, duals, setup.old, setup.particles, setup.weights
        )
        # ∇θ loss = ∇θ ML + α_μ ∇θ C_μ + α_Σ ∇θ C_Σ, with ∇C computed independently from the KL functions.
        g_ml = jax.grad(lambda p: setup.loss(p, init_mstep_duals())[0])(setup.params)
        g_cm = jax.grad(functools.partial(mean_kl, kl_mean))(setup.params)
        g_cc = jax.grad(functools.partial(mean_kl, kl_covariance))(setup.params)
        return grads, g_ml, g_cm, g_cc

    (g_params, g_duals, g_old, g_particles, g_weights), g_ml, g_cm, g_cc = all_grads()
    for g in jax.tree.leaves((g_duals, g_old, g_particles, g_weights)):
        assert np.all(np.asarray(g) == 0.0)
    want = jax.tree.map(lambda a, b, c: a + 0.07 * b + 2.0 * c, g_ml, g_cm, g_cc)
    for got_leaf, want_leaf in zip(jax.tree.leaves(g_params), jax.tree.leaves(want)):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-6)
    assert optax.tree.norm(g_cm) > 0 and optax.tree.norm(g_cc) > 0 and optax.tree.norm(g_ml) > 0


def test_update_duals_follows_eqs_81_82():
    kw = dict(kl_mean_bound=EPS_MEAN, kl_cov_bound=EPS_COV)
    duals = MStepDuals(jnp.float32(0.05), jnp.float32(1.0))
    # KL above the bound -> multipliers grow by lr·(KL − ε); below -> shrink; clipped to [0, max].
    up = update_duals(duals, jnp.float32(3e-3), jnp.float32(5e-4), **kw)
    np.testing.assert_allclose(up.alpha_mean, 0.05 + 1.0 * (3e-3 - EPS_MEAN), rtol=1e-6)
    np.testing.assert_allclose(up.alpha_cov, 1.0 + 100.0 * (5e-4 - EPS_COV), rtol=1e-6)
    down = update_duals(duals, jnp.float32(0.0), jnp.float32(0.0), lr_mean=100.0, lr_cov=1e5, **kw)
    assert float(down.alpha_mean) == 0.0 and float(down.alpha_cov) == 0.0
    capped = update_duals(duals, jnp.float32(10.0), jnp.float32(10.0), **kw)
    np.testing.assert_allclose([capped.alpha_mean, capped.alpha_cov], [0.1, 10.0], rtol=1e-6)
    # The dual loss's gradient is (ε − KL) in α and zero in the KLs: nothing flows back to the policy.
    g_duals, g_kl_mean, g_kl_cov = jax.grad(mstep_dual_loss, argnums=(0, 1, 2))(
        duals, jnp.float32(3e-3), jnp.float32(5e-4), **kw
    )
    np.testing.assert_allclose(
        [g_duals.alpha_mean, g_duals.alpha_cov], [EPS_MEAN - 3e-3, EPS_COV - 5e-4], rtol=1e-6
    )
    assert float(g_kl_mean) == 0.0 and float(g_kl_cov) == 0.0
    g_update = jax.grad(lambda c: sum(update_duals(duals, c, c, **kw)))(jnp.float32(3e-3))
    assert float(g_update) == 0.0


@pytest.fixture(scope="module")
def run_mstep(setup):
    """One compiled M-step (NUM_STEPS iterations); bounds and multiplier settings are traced arguments."""
    optimizer = optax.adam(2e-3)

    @jax.jit
    def run(params, hyper):
        targets = MStepTargets(setup.obs, setup.particles, setup.weights, setup.old)
        return mstep_update(params, optimizer.init(params), init_mstep_duals(), optimizer, setup.apply, targets,
                            MStepSettings(**hyper), num_steps=NUM_STEPS)

    return run


def _hyper(**overrides):
    hyper = dict(
        kl_mean_bound=EPS_MEAN, kl_cov_bound=EPS_COV, lr_mean=1.0, lr_cov=100.0, max_mean=0.1, max_cov=10.0
    )
    hyper.update(overrides)
    return {k: jnp.float32(v) for k, v in hyper.items()}


@functools.partial(jax.jit, static_argnums=0)
def _distance_to_weighted_mean(setup, params):
    target = jnp.sum(setup.weights[..., None] * setup.particles, axis=1)  # [B, A] the E-step's weighted mean
    return jnp.mean(jnp.linalg.norm(setup.apply(params, setup.obs).mean - target, axis=-1))


def test_mstep_moves_toward_weighted_mean_within_trust_region(setup, run_mstep):
    """Old policy = its own starting point (particles are resampled from it). The fit moves the mean toward
    the weighted particles; multipliers grow while the KL exceeds its bound; with multipliers strong enough
    (raised caps) the KL ends within a small multiple of ε while the unconstrained fit overshoots it."""
    start = setup.old_params
    d0 = _distance_to_weighted_mean(setup, start)

    # ORIG settings (Table 1 dual learning rates, ORIG caps).
    params, _, duals, m = run_mstep(start, _hyper())
    assert _distance_to_weighted_mean(setup, params) < d0
    assert float(duals.alpha_mean) > 0 and float(duals.alpha_cov) > 0  # grew from 0: KL went above ε

    # No penalty at all (multipliers capped at 0): the KL runs far past the bounds.
    free_params, _, free_duals, free = run_mstep(start, _hyper(max_mean=0.0, max_cov=0.0))
    assert float(free_duals.alpha_mean) == 0.0
    assert float(free["kl_mean_final"]) > 10 * EPS_MEAN and float(free["kl_cov_final"]) > 10 * EPS_COV

    # Strong multipliers: KL held near the bounds, yet still progress toward the weighted mean.
    strong_params, _, strong_duals, strong = run_mstep(
        start, _hyper(lr_mean=1e3, lr_cov=1e4, max_mean=1e3, max_cov=1e3)
    )
    assert float(strong["kl_mean_final"]) < 3 * EPS_MEAN and float(strong["kl_cov_final"]) < 3 * EPS_COV
    assert _distance_to_weighted_mean(setup, strong_params) < d0
    assert float(strong_duals.alpha_mean) > 0.1 and float(strong_duals.alpha_cov) > 10.0
    for metrics in (m, free, strong):
        assert all(np.isfinite(float(v)) for v in metrics.values())


def test_scan_equals_python_loop(setup):
    """The scanned M-step equals a plain loop of (update_duals, clipped Adam step) written out here."""
    optimizer = optax.adam(2e-3)
    kw = dict(kl_mean_bound=EPS_MEAN, kl_cov_bound=EPS_COV)

    @jax.jit
    def loop_step(params, opt_state, duals):
        new = setup.apply(params, setup.obs)
        duals = update_duals(
            duals, jnp.mean(kl_mean(setup.old, new)), jnp.mean(kl_covariance(setup.old, new)), **kw
        )
        grads = jax.grad(lambda p: setup.loss(p, duals)[0])(params)
        norm = optax.tree.norm(grads)
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, 0.01 / (norm + 1e-6)), grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, duals

    params, opt_state, duals = setup.old_params, optimizer.init(setup.old_params), init_mstep_duals()
    for _ in range(2):
        params, opt_state, duals = loop_step(params, opt_state, duals)

    scanned = jax.jit(functools.partial(mstep_update, optimizer=optimizer, apply_policy=setup.apply,
                                        settings=MStepSettings(**kw), num_steps=2))
    got_params, _, got_duals, _ = scanned(
        setup.old_params, optimizer.init(setup.old_params), init_mstep_duals(),
        targets=MStepTargets(setup.obs, setup.particles, setup.weights, setup.old),
    )
    for got, want in zip(jax.tree.leaves((got_params, got_duals)), jax.tree.leaves((params, duals))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_diag_head_loss_and_zero_kl_at_old_policy():
    """The diagonal head works end to end; at θ = θ_old both KL terms vanish and the gradient is finite."""
    nets = networks.make_networks(O, A, hidden=(16, 16), covariance="diag")

    @jax.jit
    def run(key):
        init_key, obs_key, sample_key = jax.random.split(key, 3)
        obs = jax.random.normal(obs_key, (B, O))
        params = nets.policy.init(init_key, obs)
        old = nets.policy.apply(params, obs)
        particles = sample(old, sample_key, K)
        weights = jax.nn.softmax(4.0 * particles[..., 0], axis=-1)
        grad_fn = jax.grad(mstep_loss, has_aux=True)
        duals = MStepDuals(jnp.float32(0.1), jnp.float32(10.0))
        return grad_fn(
            params, nets.policy.apply, obs, particles, weights, old, duals,
            kl_mean_bound=EPS_MEAN, kl_cov_bound=EPS_COV,
        )

    grads, aux = run(jax.random.key(5))
    np.testing.assert_allclose([aux["kl_mean"], aux["kl_cov"]], [0.0, 0.0], atol=1e-6)
    norm = float(optax.tree.norm(grads))
    assert np.isfinite(norm) and norm > 0
