"""Gaussian policy maths against NumPy/SciPy, and the policy network's output constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cvpo_jax import networks
from cvpo_jax.policy import Gaussian, action_in_box, entropy, kl, kl_covariance, kl_mean, log_prob, sample

A = 3  # action size: large enough that off-diagonal terms matter


# Compiled once per shape: on a shared CPU a whole-function compile is far cheaper than op-by-op dispatch.
_log_prob = jax.jit(log_prob)
_kl_terms = jax.jit(lambda old, new: (kl_mean(old, new), kl_covariance(old, new), kl(old, new)))


def _random_tril(rng: np.random.Generator, batch: tuple, size: int, diag: bool) -> np.ndarray:
    """Random lower Cholesky factors with a well-conditioned positive diagonal. # [*batch, size, size]"""
    tril = np.tril(rng.normal(scale=0.4, size=batch + (size, size)), k=-1)
    if diag:
        tril = np.zeros_like(tril)
    return tril + np.eye(size) * rng.uniform(0.5, 1.5, size=batch + (size,))[..., None, :]


def _random_gaussian(rng, batch=(4,), diag=False) -> Gaussian:
    mean = rng.normal(size=batch + (A,))
    tril = _random_tril(rng, batch, A, diag)
    return Gaussian(jnp.asarray(mean, jnp.float32), jnp.asarray(tril, jnp.float32))


def _np_kl(mu0, cov0, mu1, cov1) -> float:
    """Closed-form KL(N(mu0, cov0) ‖ N(mu1, cov1)) in float64 NumPy, with explicit inverses."""
    cov1_inv = np.linalg.inv(cov1)
    d = mu1 - mu0
    log_det_ratio = np.log(np.linalg.det(cov1) / np.linalg.det(cov0))
    return 0.5 * (np.trace(cov1_inv @ cov0) + d @ cov1_inv @ d - len(mu0) + log_det_ratio)


def _cov(dist: Gaussian, b: int) -> np.ndarray:
    tril = np.asarray(dist.scale_tril[b], np.float64)
    return tril @ tril.T


@pytest.mark.parametrize("diag", [False, True])
def test_log_prob_matches_scipy_with_particle_axis(diag):
    rng = np.random.default_rng(0)
    dist = _random_gaussian(rng, (4,), diag)
    actions = rng.normal(size=(4, 5, A)).astype(np.float32)  # [B, K, A]
    got = np.asarray(_log_prob(dist, jnp.asarray(actions)))  # [B, K]
    assert got.shape == (4, 5)
    scipy_dists = [stats.multivariate_normal(np.asarray(dist.mean[b]), _cov(dist, b)) for b in range(4)]
    want = np.stack([scipy_dists[b].logpdf(actions[b]) for b in range(4)])  # [B, K]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # Without a particle axis: one action per state, [B, A] -> [B].
    got_single = np.asarray(_log_prob(dist, jnp.asarray(actions[:, 0])))
    np.testing.assert_allclose(got_single, want[:, 0], rtol=1e-5, atol=1e-4)


def test_log_prob_unbatched_dist_over_samples():
    rng = np.random.default_rng(1)
    dist = _random_gaussian(rng, ())
    actions = rng.normal(size=(6, A))
    got = np.asarray(_log_prob(dist, jnp.asarray(actions, jnp.float32)))  # [N]
    tril = np.asarray(dist.scale_tril, np.float64)
    want = stats.multivariate_normal(np.asarray(dist.mean), tril @ tril.T).logpdf(actions)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_sample_shape_moments_and_reparameterisation():
    rng = np.random.default_rng(2)
    dist = _random_gaussian(rng)

    @jax.jit
    def run(dist):
        draws = sample(dist, jax.random.key(0), 20000)  # [B, K, A]
        # Reparameterised: d(sum of samples)/d(mean) = K per entry.
        sum_of_samples = lambda m: jnp.sum(sample(Gaussian(m, dist.scale_tril), jax.random.key(1), 7))
        grad_mean = jax.grad(sum_of_samples)(dist.mean)
        return draws, grad_mean

    draws, grad_mean = run(dist)
    assert draws.shape == (4, 20000, A)
    for b in range(4):
        np.testing.assert_allclose(np.mean(np.asarray(draws[b]), 0), np.asarray(dist.mean[b]), atol=0.04)
        np.testing.assert_allclose(np.cov(np.asarray(draws[b]).T), _cov(dist, b), atol=0.06)
    np.testing.assert_allclose(np.asarray(grad_mean), 7.0, rtol=1e-6)


def test_entropy_matches_scipy():
    rng = np.random.default_rng(3)
    dist = _random_gaussian(rng, (3,))
    want = [stats.multivariate_normal(np.zeros(A), _cov(dist, b)).entropy() for b in range(3)]
    np.testing.assert_allclose(np.asarray(entropy(dist)), want, rtol=1e-5)


@pytest.mark.parametrize("diag", [False, True])
def test_kl_terms_match_closed_form(diag):
    """C_μ = KL(old ‖ N(μ, Σ_old)), C_Σ = KL(old ‖ N(μ_old, Σ)), kl = KL(old ‖ new), all vs float64 NumPy."""
    rng = np.random.default_rng(4)
    old, new = _random_gaussian(rng, (4,), diag), _random_gaussian(rng, (4,), diag)
    c_mean, c_cov, full = (np.asarray(x) for x in _kl_terms(old, new))
    for b in range(4):
        mu0, mu1 = np.asarray(old.mean[b], np.float64), np.asarray(new.mean[b], np.float64)
        cov0, cov1 = _cov(old, b), _cov(new, b)
        np.testing.assert_allclose(c_mean[b], _np_kl(mu0, cov0, mu1, cov0), rtol=1e-4)
        d = mu1 - mu0
        np.testing.assert_allclose(c_mean[b], 0.5 * d @ np.linalg.inv(cov0) @ d, rtol=1e-4)
        np.testing.assert_allclose(c_cov[b], _np_kl(mu0, cov0, mu0, cov1), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(full[b], _np_kl(mu0, cov0, mu1, cov1), rtol=1e-4)


@pytest.mark.parametrize("diag", [False, True])
def test_decoupled_terms_sum_to_full_kl_when_one_part_is_shared(diag):
    """Eq. (78): C_μ + C_Σ = KL(old ‖ new) when only the mean or only the covariance moved; each term
    vanishes when its part is unchanged."""
    rng = np.random.default_rng(5)
    old, other = _random_gaussian(rng, (4,), diag), _random_gaussian(rng, (4,), diag)
    mean_moved = Gaussian(other.mean, old.scale_tril)
    cov_moved = Gaussian(old.mean, other.scale_tril)
    for new in (mean_moved, cov_moved):
        c_mean, c_cov, full = _kl_terms(old, new)
        np.testing.assert_allclose(np.asarray(c_mean + c_cov), np.asarray(full), rtol=1e-5, atol=1e-6)
    c_mean, c_cov, _ = _kl_terms(old, cov_moved)
    np.testing.assert_allclose(np.asarray(c_mean), 0.0, atol=1e-7)
    assert np.all(np.asarray(c_cov) > 0)
    c_mean, c_cov, _ = _kl_terms(old, mean_moved)
    np.testing.assert_allclose(np.asarray(c_cov), 0.0, atol=1e-5)
    assert np.all(np.asarray(c_mean) > 0)
    np.testing.assert_allclose(np.asarray(_kl_terms(old, old)[2]), 0.0, atol=1e-5)


def test_kl_terms_match_monte_carlo():
    """KL(old ‖ new) ≈ E_old[log p_old − log p_new]; C_μ, C_Σ ≈ the same with the decoupled new densities;
    and C_μ + C_Σ ≈ the full KL when only the mean moved."""
    rng = np.random.default_rng(6)
    old, new = _random_gaussian(rng), _random_gaussian(rng)
    mean_moved, cov_moved = Gaussian(new.mean, old.scale_tril), Gaussian(old.mean, new.scale_tril)

    @jax.jit
    def mc_kls(key):
        draws = sample(old, key, 100_000)  # [B, N, A]
        log_old = log_prob(old, draws)  # [B, N]
        targets = (new, mean_moved, cov_moved)
        return [jnp.mean(log_old - log_prob(target, draws), axis=-1) for target in targets]

    mc_full, mc_mean_moved, mc_cov_moved = (np.asarray(x) for x in mc_kls(jax.random.key(3)))
    c_mean, c_cov, full = (np.asarray(x) for x in _kl_terms(old, new))
    tol = dict(rtol=0.03, atol=0.02)
    np.testing.assert_allclose(mc_full, full, **tol)
    np.testing.assert_allclose(mc_mean_moved, c_mean, **tol)  # C_μ = KL(old ‖ N(μ, Σ_old))
    np.testing.assert_allclose(mc_cov_moved, c_cov, **tol)  # C_Σ = KL(old ‖ N(μ_old, Σ))
    c_mean_mm, c_cov_mm, _ = _kl_terms(old, mean_moved)
    np.testing.assert_allclose(mc_mean_moved, np.asarray(c_mean_mm + c_cov_mm), **tol)


def test_kl_terms_depend_only_on_their_own_head():
    rng = np.random.default_rng(7)
    old, new = _random_gaussian(rng), _random_gaussian(rng)

    @jax.jit
    def grads(new):
        return (
            jax.grad(lambda d: jnp.sum(kl_mean(old, d)))(new),
            jax.grad(lambda d: jnp.sum(kl_covariance(old, d)))(new),
        )

    g_mean, g_cov = grads(new)
    assert np.all(np.asarray(g_mean.scale_tril) == 0) and np.any(np.asarray(g_mean.mean) != 0)
    assert np.all(np.asarray(g_cov.mean) == 0) and np.any(np.asarray(g_cov.scale_tril) != 0)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_policy_net_outputs_valid_gaussian(covariance):
    net = networks.make_networks(5, A, hidden=(16, 16), covariance=covariance).policy
    obs = 10.0 * jax.random.normal(jax.random.key(1), (32, 5))  # large inputs push the clips

    @jax.jit
    def run(key):
        params = net.init(key, obs)
        dist = net.apply(params, obs)
        return dist, net.apply(params, obs[0]), log_prob(dist, sample(dist, key, 4))

    dist, single, log_p = run(jax.random.key(0))
    mean, tril = np.asarray(dist.mean), np.asarray(dist.scale_tril)
    assert mean.shape == (32, A) and tril.shape == (32, A, A)
    assert np.all(np.abs(mean) <= 1.0)
    assert np.all(np.triu(tril, k=1) == 0)
    diag = np.diagonal(tril, axis1=-2, axis2=-1)
    assert np.all(diag >= 1e-4)
    off_diag = tril - diag[..., None] * np.eye(A)
    if covariance == "diag":
        assert np.all(off_diag == 0)
    else:
        assert np.any(off_diag != 0) and np.all(np.abs(off_diag) <= 20.0)
    # An unbatched observation gives the same distribution.
    np.testing.assert_allclose(np.asarray(single.mean), mean[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(single.scale_tril), tril[0], rtol=1e-5, atol=1e-6)
    assert log_p.shape == (32, 4) and np.all(np.isfinite(np.asarray(log_p)))


def test_policy_net_rejects_unknown_covariance():
    with pytest.raises(ValueError):
        networks.make_networks(5, A, covariance="spherical")


def test_action_in_box_is_the_clipped_mean_or_the_clipped_draw():
    rng = np.random.default_rng(3)
    dist = _random_gaussian(rng, batch=(64,))
    dist = dist._replace(mean=3.0 * dist.mean)  # means outside the box on some rows
    np.testing.assert_array_equal(action_in_box(dist, jax.random.PRNGKey(0), True), np.clip(dist.mean, -1, 1))
    drawn = np.asarray(action_in_box(dist, jax.random.PRNGKey(1), False))
    np.testing.assert_array_equal(drawn, np.clip(np.asarray(sample(dist, jax.random.PRNGKey(1), 1))[:, 0], -1, 1))
    assert drawn.shape == (64, A) and np.abs(drawn).max() <= 1.0 and (np.abs(drawn) == 1.0).any()
