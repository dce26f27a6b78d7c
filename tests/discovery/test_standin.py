"""The weight-free stand-in backbone: shape, determinism, and discriminative similarities."""

import numpy as np
import pytest

from hassod_jax.discovery import standin


def test_rgb_to_lab_matches_skimage():
    color = pytest.importorskip("skimage.color")
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    np.testing.assert_allclose(standin.rgb_to_lab(rgb), color.rgb2lab(rgb), atol=2e-3)


def scene():
    """Left half: flat red with noise; right half: blue/white stripes; a green square."""
    rng = np.random.default_rng(1)
    img = np.zeros((480, 480, 3), np.float64)
    img[:, :240] = (200, 40, 40)
    img[:, :240] += rng.normal(0, 8, size=(480, 240, 3))
    xx = np.arange(240, 480)
    stripe = (np.sin(2 * np.pi * xx / 10) > 0)[None, :, None]
    img[:, 240:] = np.where(stripe, (230, 230, 255), (30, 30, 160))
    img[160:320, 80:200] = (40, 180, 60)
    return np.clip(img, 0, 255).astype(np.uint8)


def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_standin_features_shape_determinism_and_similarity():
    img = scene()
    f = standin.standin_features(img, grid=(60, 60))
    assert f.shape == (60, 60, standin.FEATURE_DIM) and f.dtype == np.float32
    np.testing.assert_array_equal(f, standin.standin_features(img, grid=(60, 60)))
    red1, red2 = f[5, 5], f[50, 20]
    stripe1, stripe2 = f[5, 40], f[50, 55]
    green1, green2 = f[25, 12], f[35, 22]
    same = [cos(red1, red2), cos(stripe1, stripe2), cos(green1, green2)]
    diff = [cos(red1, stripe1), cos(red1, green1), cos(stripe1, green1), cos(red2, stripe2)]
    assert min(same) > 0.9
    assert max(diff) < min(same) - 0.3
    # Another input size is resized to grid * 8; a size that is a multiple of the grid is not.
    small = standin.standin_features(img[::2, ::2], grid=(30, 30))
    assert small.shape == (30, 30, standin.FEATURE_DIM)
    odd = standin.standin_features(img[:100, :77], grid=(12, 9))
    assert odd.shape == (12, 9, standin.FEATURE_DIM) and np.isfinite(odd).all()
    with pytest.raises(ValueError, match="uint8"):
        standin.standin_features(img.astype(np.float32))
