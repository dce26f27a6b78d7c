"""Permutohedral lattice filter: against pydensecrf's own lattice, and its Gaussian properties.

pydensecrf does not expose its lattice, but its filter can be read off one mean-field step:
with two labels, a zero-free unary U, Potts weight w and NO_NORMALIZATION,
log Q1[0] - log Q1[1] = -(U0 - U1) + w (K Q0[0] - K Q0[1]), Q0 = softmax(-U), which gives
K applied to any signal in (0, 1) (float64 on our side of the extraction).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hassod_jax.discovery.lattice import build_lattice, lattice_filter


@pytest.fixture
def dcrf():
    """pydensecrf, for the tests that compare with it (the others need no pydensecrf)."""
    return pytest.importorskip("pydensecrf.densecrf")


# Always jitted: op-by-op dispatch of the lattice build is far slower than compiling it.
_build = jax.jit(build_lattice, static_argnums=(1, 2))
_filter = jax.jit(lattice_filter)


def _pydensecrf_filter(dcrf, feat_dn, signal, w=0.05):
    """K(signal) as pydensecrf's lattice computes it; feat_dn (d, N) float32, signal in (0,1)."""
    n = feat_dn.shape[1]

    def one_step(a):
        u = -np.log(np.stack([a, 1 - a])).astype(np.float32)
        crf = dcrf.DenseCRF(n, 2)
        crf.setUnaryEnergy(np.ascontiguousarray(u))
        crf.addPairwiseEnergy(
            np.ascontiguousarray(feat_dn),
            compat=w,
            kernel=dcrf.DIAG_KERNEL,
            normalization=dcrf.NO_NORMALIZATION,
        )
        q = np.array(crf.inference(1)).astype(np.float64)
        q0 = np.exp(-u.astype(np.float64))
        q0 /= q0.sum(0)
        # K q0[0] - K q0[1] = K(2 q0[0] - 1)
        return (np.log(q[0]) - np.log(q[1]) + (u[0].astype(np.float64) - u[1])) / w, q0[0]

    diff_a, a0 = one_step(signal)
    diff_c, _ = one_step(np.full(n, 0.75))  # K(0.5) = 0.5 K(1)
    k1 = diff_c / 0.5
    return (diff_a + k1) / 2, a0, k1


def _features(kind, rng):
    h, w = 36, 44
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "position":
        f = np.stack([xx.ravel() / np.float32(3), yy.ravel() / np.float32(3)], 1)
        bounds = ((0.0, (w - 1) / 3), (0.0, (h - 1) / 3))
    else:
        # A piecewise image with noise, positions / 7, colours / 13 (bilateral-like).
        img = np.where((xx < w // 2)[..., None], [200, 40, 90], [30, 150, 220])
        img = np.clip(img + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        pos = np.stack([xx.ravel() / np.float32(7), yy.ravel() / np.float32(7)], 1)
        col = img.reshape(-1, 3).astype(np.float32) / np.float32(13)
        f = np.concatenate([pos, col], 1)
        bounds = ((0.0, (w - 1) / 7), (0.0, (h - 1) / 7)) + ((0.0, 255 / 13),) * 3
    return f.astype(np.float32), bounds


@pytest.mark.parametrize("kind", ["position", "bilateral"])
def test_filter_matches_pydensecrf(kind, dcrf):
    rng = np.random.default_rng(0 if kind == "position" else 1)
    f, bounds = _features(kind, rng)
    signal = rng.uniform(0.1, 0.9, f.shape[0])
    ref, a0, ref1 = _pydensecrf_filter(dcrf, np.ascontiguousarray(f.T), signal)
    lat = _build(jnp.asarray(f), bounds, None)
    assert not bool(lat.overflow)
    x = np.stack([a0, np.ones_like(a0)], 1).astype(np.float32)
    out = np.asarray(_filter(lat, jnp.asarray(x)), np.float64)
    # The extraction through log-probabilities costs a few float32 ulps of the logits / w.
    np.testing.assert_allclose(out[:, 1], ref1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[:, 0], ref, rtol=3e-4, atol=1e-4)


def _grid(s, d, sigma):
    g = np.mgrid[tuple(slice(0, s) for _ in range(d))]
    pts = np.stack([a.ravel() for a in g], 1).astype(np.float32)
    return pts, pts / np.float32(sigma), tuple((0.0, (s - 1) / sigma) for _ in range(d))


@pytest.mark.parametrize("d,size,sigma", [(2, 41, 4.0), (3, 21, 3.0)])
def test_delta_gives_gaussian_blob(d, size, sigma):
    """A delta at the centre spreads into ~exp(-r^2 / (2 sigma^2)) (positions / sigma)."""
    pts, f, bounds = _grid(size, d, sigma)
    lat = _build(jnp.asarray(f), bounds, None)
    c = int(np.argmin(np.abs(pts - size // 2).sum(1)))
    x = np.zeros((len(f), 1), np.float32)
    x[c] = 1
    out = np.asarray(_filter(lat, jnp.asarray(x)), np.float64)[:, 0]
    rel = pts - pts[c]
    gauss = np.exp(-(rel**2).sum(1) / (2 * sigma**2))
    assert np.corrcoef(out, gauss)[0, 1] > 0.99
    std = np.sqrt((out[:, None] * rel**2).sum(0) / out.sum())
    np.testing.assert_allclose(std, sigma, rtol=0.06)
    # Mass within 25 % of the continuous Gaussian's (2 pi sigma^2)^(d/2) (lattice approx.).
    assert 0.75 < out.sum() / (2 * np.pi * sigma**2) ** (d / 2) < 1.05
    np.testing.assert_allclose((out[:, None] * rel).sum(0) / out.sum(), 0.0, atol=0.3)


def test_constant_and_symmetry():
    """K is linear and (nearly) symmetric: normalised filtering of a constant is that constant."""
    rng = np.random.default_rng(2)
    f, bounds = _features("bilateral", rng)
    lat = _build(jnp.asarray(f), bounds, None)
    n = f.shape[0]
    xy = rng.uniform(size=(n, 2)).astype(np.float32)
    vals = np.concatenate([np.ones((n, 1)), np.full((n, 1), 3.5), xy], 1).astype(np.float32)
    out = np.asarray(_filter(lat, jnp.asarray(vals)), np.float64)
    k1 = out[:, 0]
    assert np.all(k1 > 0.5)  # includes the point itself (weight ~1)
    np.testing.assert_allclose(out[:, 1] / k1, 3.5, rtol=1e-5)
    # Nearly symmetric: the blurs along the d+1 directions only commute on a complete
    # lattice, and the transpose would blur in reverse order.
    np.testing.assert_allclose(xy[:, 0] @ out[:, 3], xy[:, 1] @ out[:, 2], rtol=1e-3)
    # Channels are filtered independently (1-2 channels take the other slicing order).
    kxy = np.asarray(_filter(lat, jnp.asarray(xy)), np.float64)
    np.testing.assert_allclose(kxy, out[:, 2:], rtol=1e-5, atol=1e-6)


def test_capacity_overflow_and_vmap():
    rng = np.random.default_rng(3)
    f, bounds = _features("bilateral", rng)
    f2 = f.copy()
    f2[:, 2:] = f[::-1, 2:]  # other colours at the same positions
    full = _build(jnp.asarray(f), bounds, None)
    m = int(full.num_vertices)
    assert 0 < m < full.capacity
    x = jnp.asarray(rng.uniform(size=(f.shape[0], 3)).astype(np.float32))
    ref = np.asarray(_filter(full, x))
    tight = _build(jnp.asarray(f), bounds, m)
    assert not bool(tight.overflow)
    np.testing.assert_allclose(np.asarray(_filter(tight, x)), ref, rtol=1e-5, atol=1e-6)
    small = _build(jnp.asarray(f), bounds, m - 1)
    assert bool(small.overflow) and int(small.num_vertices) == m

    def one(feat, val):
        return lattice_filter(build_lattice(feat, bounds, capacity=m + 500), val)

    batch = jax.jit(jax.vmap(one))(jnp.stack([jnp.asarray(f), jnp.asarray(f2)]), jnp.stack([x, x]))
    np.testing.assert_allclose(np.asarray(batch[0]), ref, rtol=1e-5, atol=1e-6)
    ref2 = np.asarray(_filter(_build(jnp.asarray(f2), bounds, None), x))
    np.testing.assert_allclose(np.asarray(batch[1]), ref2, rtol=1e-5, atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="features must be"):
        build_lattice(jnp.zeros((5,)), ((0.0, 1.0),))
    with pytest.raises(ValueError, match="feature_bounds has"):
        build_lattice(jnp.zeros((5, 2)), ((0.0, 1.0),))
    with pytest.raises(ValueError, match="too large"):
        build_lattice(jnp.zeros((5, 5)), ((0.0, 1e6),) * 5)
    lat = jax.eval_shape(lambda f: build_lattice(f, ((0.0, 1.0),) * 2), jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match="values must be"):
        jax.eval_shape(lattice_filter, lat, jnp.zeros((4, 1)))
