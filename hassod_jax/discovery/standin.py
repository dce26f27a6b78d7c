"""A weight-free stand-in for DINO features, for the demo and tests only.

It is NOT a learned representation: each patch of the resized image is described by
hand-made colour and texture statistics, so HAC groups regions of uniform colour/texture
(exactly what the synthetic scenes are built from) and nothing semantic. Real runs use
DINO ViT keys (`hassod_jax.models.vit`).

Per patch (patch = `size / grid` pixels of the Lanczos-resized image, 8x8 for a 60x60 grid
on 480x480), D = 12 features:
  - mean CIE Lab colour (3), weight 1 on L/100 and a/100, b/100;
  - standard deviation of Lab within the patch (3), weight 1 on the same scale;
  - gradient-orientation energy (4 bins over 0..180 degrees, Sobel gradients of L), as
    fractions of the patch's energy, weight 0.5; plus log gradient energy (1), weight 0.1;
  - a constant (1 feature) so that cosine similarity does not blow up patches that happen
    to be near the image mean.
(Weights were chosen on generated scenes by the recall of HAC regions against their ground
truth; smoothing over neighbouring patches was tried and lowered it by blurring boundaries.)
Features are centred by subtracting the image's mean feature (except the constant), so
the cosine similarity that HAC uses compares patches relative to the whole image.
"""

import numpy as np
from scipy import ndimage

FEATURE_DIM = 12


def rgb_to_lab(rgb):
    """(..., 3) uint8 or float RGB in [0, 255] -> (..., 3) float32 CIE Lab (D65, sRGB).

    Standard sRGB -> linear -> XYZ -> Lab formulas (as in scikit-image's rgb2lab).
    """
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array(
        [
            [0.412453, 0.357580, 0.180423],
            [0.212671, 0.715160, 0.072169],
            [0.019334, 0.119193, 0.950227],
        ]
    )
    xyz = lin @ m.T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lab_l = np.where(
        xyz[..., 1] > 0.008856, 116.0 * np.cbrt(xyz[..., 1]) - 16.0, 903.3 * xyz[..., 1]
    )
    lab_a = 500.0 * (f[..., 0] - f[..., 1])
    lab_b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([lab_l, lab_a, lab_b], axis=-1).astype(np.float32)


def _patch_mean(x, gh, gw):
    """(gh*p, gw*p, C) -> (gh, gw, C) mean over p x p blocks."""
    h, w, c = x.shape
    return x.reshape(gh, h // gh, gw, w // gw, c).mean(axis=(1, 3))


def standin_features(img_uint8, grid=(60, 60)):
    """(H, W, 3) uint8 image -> (gh, gw, FEATURE_DIM) float32 per-patch features.

    The image is resized with Lanczos to (gh * 8, gw * 8) unless it already has a size that
    is a multiple of the grid (then patches are size / grid pixels). Deterministic.
    """
    from hassod_jax.data.images import resize_uint8

    img = np.asarray(img_uint8)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img_uint8 must be (H, W, 3) uint8, got {img.dtype} {img.shape}")
    gh, gw = int(grid[0]), int(grid[1])
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    h, w = img.shape[:2]
    if h % gh or w % gw or h < gh or w < gw:
        img = resize_uint8(img, (gh * 8, gw * 8))
    lab = rgb_to_lab(img).astype(np.float64)
    lab_scaled = lab / 100.0

    mean = _patch_mean(lab_scaled, gh, gw)
    sq = _patch_mean(lab_scaled**2, gh, gw)
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))

    gy = ndimage.sobel(lab[..., 0], axis=0)
    gx = ndimage.sobel(lab[..., 0], axis=1)
    energy = gx**2 + gy**2
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    bins = np.minimum((angle / (np.pi / 4)).astype(np.int64), 3)
    hist = np.stack([energy * (bins == k) for k in range(4)], axis=-1)
    hist = _patch_mean(hist, gh, gw)
    total = hist.sum(axis=-1, keepdims=True)
    orient = hist / np.maximum(total, 1e-9)
    log_energy = np.log1p(total / 100.0)

    feats = np.concatenate([mean, std, 0.5 * orient, 0.1 * log_energy], axis=-1)
    feats = feats - feats.mean(axis=(0, 1), keepdims=True)
    const = np.full((gh, gw, 1), 0.05)
    return np.concatenate([feats, const], axis=-1).astype(np.float32)
