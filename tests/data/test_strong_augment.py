"""The Mean Teacher's strong view (docs/recipe.md, Mean Teacher; every parameter in
hassod_jax/data/strong_augment.py's docstring) against torchvision and PIL.

Every op with fixed parameters is compared bit for bit with torchvision.transforms.functional on
PIL images; the whole chain is replayed through the original's torchvision pipeline (ColorJitter,
RandomGrayscale, the original's GaussianBlur class, ToTensor, three RandomErasing, ToPILImage)
with its random sources fed the choices `strong_view` sampled.
"""

import dataclasses
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from hassod_jax.data import strong_augment as sa


def textured(h, w, seed=0):
    """A smooth colourful image plus noise (hue, saturation and contrast all matter)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    base = np.stack(
        [
            128 + 100 * np.sin(xx / 7.0 + yy / 11.0),
            128 + 90 * np.cos(yy / 5.0),
            128 + 80 * np.sin((xx - yy) / 9.0),
        ],
        axis=-1,
    )
    img = base + rng.normal(0, 25, size=base.shape)
    img[: h // 4, : w // 4] = rng.integers(0, 256, size=3)  # a flat patch
    img[-3:, -3:] = 255
    img[:2, -2:] = 0
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def pil(img):
    return Image.fromarray(img, "RGB")


def arr(p):
    return np.asarray(p, dtype=np.uint8)


IMAGES = [textured(37, 53, 0), textured(64, 48, 1), textured(5, 3, 2)]
GREYISH = np.repeat(textured(20, 30, 3)[..., :1], 3, axis=-1)  # R == G == B: hue undefined


# ----------------------------------------------------------------------------------------------
# Each op vs torchvision's PIL path, fixed parameters.


@pytest.mark.parametrize("factor", [0.0, 0.6, 0.73, 1.0, 1.2345, 1.4, 2.5])
@pytest.mark.parametrize("i", range(len(IMAGES) + 1))
def test_brightness_contrast_saturation_vs_torchvision(factor, i):
    img = (IMAGES + [GREYISH])[i]
    for ours, theirs in [
        (sa.adjust_brightness, TF.adjust_brightness),
        (sa.adjust_contrast, TF.adjust_contrast),
        (sa.adjust_saturation, TF.adjust_saturation),
    ]:
        out = ours(img, factor)
        ref = arr(theirs(pil(img), factor))
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_array_equal(out, ref, err_msg=f"{ours.__name__} factor {factor}")


@pytest.mark.parametrize(
    "hue", [-0.5, -0.1, -0.0999, -0.05, -1.0 / 255, -0.5 / 255, 0.0, 0.5 / 255, 0.03, 0.1, 0.5]
)
@pytest.mark.parametrize("i", range(len(IMAGES) + 1))
def test_adjust_hue_vs_torchvision(hue, i):
    img = (IMAGES + [GREYISH])[i]
    np.testing.assert_array_equal(sa.adjust_hue(img, hue), arr(TF.adjust_hue(pil(img), hue)))


def test_hue_shift_truncates_toward_zero_and_wraps():
    # torchvision: np.int32(hue * 255).astype(np.uint8); -0.1 * 255 = -25.5 -> -25 -> 231.
    assert sa.hue_shift(-0.1) == 231
    assert sa.hue_shift(0.1) == 25
    assert sa.hue_shift(-0.5 / 255) == 0  # a floor would give 255
    assert sa.hue_shift(-1.0 / 255) == 255
    for hue in np.linspace(-0.5, 0.5, 1001):
        assert sa.hue_shift(float(hue)) == int(np.int32(float(hue) * 255).astype(np.uint8))
    with pytest.raises(ValueError):
        sa.hue_shift(0.51)
    # The shift really happens: a pure red image's hue moves.
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 200
    assert not np.array_equal(sa.adjust_hue(red, 0.1), red)


@pytest.mark.parametrize("i", range(len(IMAGES) + 1))
def test_grayscale_vs_torchvision(i):
    img = (IMAGES + [GREYISH])[i]
    out = sa.to_grayscale(img)
    np.testing.assert_array_equal(out, arr(TF.rgb_to_grayscale(pil(img), num_output_channels=3)))
    np.testing.assert_array_equal(out, arr(T.Grayscale(num_output_channels=3)(pil(img))))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    # PIL's L = (19595 R + 38470 G + 7471 B + 2**15) >> 16 (ITU-R 601-2 luma, fixed point).
    r, g, b = (img[..., c].astype(np.int64) for c in range(3))
    np.testing.assert_array_equal(out[..., 0], (19595 * r + 38470 * g + 7471 * b + 32768) >> 16)


class OriginalGaussianBlur:
    """The original's GaussianBlur (augmentation_impl.py:619-634 of the original HASSOD code):
    PIL's ImageFilter.GaussianBlur(radius=sigma), sigma ~ U(0.1, 2.0)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x):
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.37, 2.0])
def test_gaussian_blur_vs_pil(sigma, monkeypatch):
    img = IMAGES[0]
    monkeypatch.setattr(random, "uniform", lambda a, b: sigma)
    out = sa.gaussian_blur(img, sigma)
    np.testing.assert_array_equal(out, arr(OriginalGaussianBlur()(pil(img))))
    assert not np.array_equal(out, img)


@pytest.mark.parametrize("seed", range(6))
def test_color_jitter_order_vs_torchvision(seed, monkeypatch):
    """ColorJitter with a fixed draw: our op ids 0..3 mean torchvision's, in the given order."""
    rng = np.random.default_rng(seed)
    order = tuple(int(i) for i in rng.permutation(4))
    factors = [float(rng.uniform(0.6, 1.4)) for _ in range(3)] + [float(rng.uniform(-0.1, 0.1))]
    jit = sa.JitterParams(order, *factors)

    def fake_get_params(b, c, s, h):
        assert b == (0.6, 1.4) and c == (0.6, 1.4) and s == (0.6, 1.4) and h == (-0.1, 0.1)
        return torch.tensor(order), *factors

    monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(fake_get_params))
    ref = T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)(pil(IMAGES[1]))
    np.testing.assert_array_equal(sa.color_jitter(IMAGES[1], jit), arr(ref))
    # The order matters on this image (so the test above can tell orders apart).
    rev = dataclasses.replace(jit, order=order[::-1])
    assert not np.array_equal(sa.color_jitter(IMAGES[1], rev), sa.color_jitter(IMAGES[1], jit))


# ----------------------------------------------------------------------------------------------
# ToTensor / ToPILImage and the wrapping uint8 cast.


def test_to_float_is_to_tensor_and_round_trips_every_uint8():
    img = IMAGES[0]
    ref = TF.to_tensor(pil(img)).permute(1, 2, 0).numpy()
    assert sa.to_float(img).dtype == np.float32
    np.testing.assert_array_equal(sa.to_float(img), ref)
    every = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
    np.testing.assert_array_equal(sa.float_to_uint8(sa.to_float(every)), every)
    np.testing.assert_array_equal(arr(TF.to_pil_image(TF.to_tensor(pil(every)))), every)


CAST_VALUES = np.array(
    "-1000.7 -300.2 -256.5 -256 -255.9 -128 -1.5 -1 -0.99 -0.5 -0 0 0.3 0.999 1 127.5 254.99 255"
    " 255.5 256 256.5 300.7 511.9 512 767.2 1000.3 1e6 -1e6 2e9 -2e9".split(),
    dtype=np.float32,
)


def test_uint8_cast_is_torchs_byte():
    np.testing.assert_array_equal(
        sa.torch_uint8_cast(CAST_VALUES), torch.from_numpy(CAST_VALUES).byte().numpy()
    )
    # Truncation toward zero, then wrap modulo 256 (not a clip).
    assert sa.torch_uint8_cast(np.float32(-1.5)) == 255
    assert sa.torch_uint8_cast(np.float32(-0.99)) == 0
    assert sa.torch_uint8_cast(np.float32(300.7)) == 44
    assert sa.torch_uint8_cast(np.float32(255.9)) == 255
    # Large arrays go through torch's vectorised kernel.
    x = np.random.default_rng(0).normal(0, 600, size=200_003).astype(np.float32)
    np.testing.assert_array_equal(sa.torch_uint8_cast(x), torch.from_numpy(x).byte().numpy())
    with pytest.raises(ValueError):
        sa.torch_uint8_cast(np.float32(np.nan))


def test_noise_wraps_like_to_pil_image():
    """N(0, 1) noise in [0, 1] units through `x * 255` and the uint8 cast, both torchvisions."""
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((40, 30, 3), dtype=np.float32)
    noise[0, 0] = [-0.01, 1.2, -4.0]  # -2.55 -> 254; 306 -> 50; -1020 -> 4
    ours = sa.float_to_uint8(noise)
    np.testing.assert_array_equal(ours[0, 0], [254, 50, 4])
    t = torch.from_numpy(noise).permute(2, 0, 1)
    # Older torchvision (the original's era): pic.mul(255).byte().
    np.testing.assert_array_equal(ours, t.mul(255).byte().permute(1, 2, 0).numpy())
    # The installed torchvision: (npimg * 255).astype(np.uint8).
    np.testing.assert_array_equal(ours, arr(TF.to_pil_image(t)))
    # Wrapping, not clipping: a clip would differ for most out-of-range noise.
    clipped = np.clip(noise * np.float32(255), 0, 255).astype(np.uint8)
    assert (ours != clipped).mean() > 0.3


# ----------------------------------------------------------------------------------------------
# RandomErasing.


def test_erase_vs_torchvision():
    img = sa.to_float(IMAGES[0])
    noise = np.random.default_rng(2).standard_normal((5, 9, 3), dtype=np.float32)
    out = sa.erase(img, (3, 7, 5, 9), noise)
    ref = TF.erase(
        torch.from_numpy(img).permute(2, 0, 1), 3, 7, 5, 9, torch.from_numpy(noise).permute(2, 0, 1)
    )
    np.testing.assert_array_equal(out, ref.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(out[3:8, 7:16], noise)
    keep = np.ones(img.shape[:2], bool)
    keep[3:8, 7:16] = False
    np.testing.assert_array_equal(out[keep], img[keep])
    assert not np.shares_memory(out, img)


SPECS = sa.DEFAULT_CONFIG.erasings


def rounded_bounds(eh, ew):
    """The (area, aspect) ranges that round to an (eh, ew) rectangle (round moves <= 0.5)."""
    lo_h, hi_h, lo_w, hi_w = max(eh - 0.5, 0), eh + 0.5, max(ew - 0.5, 0), ew + 0.5
    return lo_h * lo_w, hi_h * hi_w, lo_h / hi_w, (hi_h / lo_w if lo_w > 0 else math.inf)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("hw", [(37, 53), (480, 640), (12, 9)])
def test_random_erasing_params_in_range(spec, hw):
    h, w = hw
    rng = np.random.default_rng(3)
    n_none = 0
    for _ in range(300):
        e = sa.random_erasing_params(rng, h, w, spec.scale, spec.ratio)
        if e is None:
            n_none += 1
            continue
        assert 0 <= e.height < h and 0 <= e.width < w
        assert 0 <= e.top <= h - e.height and 0 <= e.left <= w - e.width
        assert e.noise.shape == (e.height, e.width, 3) and e.noise.dtype == np.float32
        a_lo, a_hi, r_lo, r_hi = rounded_bounds(e.height, e.width)
        assert a_lo <= spec.scale[1] * h * w + 1e-9 and a_hi >= spec.scale[0] * h * w - 1e-9
        assert r_lo <= spec.ratio[1] + 1e-9 and r_hi >= spec.ratio[0] - 1e-9
    if hw == (480, 640):
        assert n_none == 0


def test_random_erasing_attempts_fail_leave_image_unchanged():
    # A one-row image: eh < 1 needs sqrt(area * aspect) < 0.5, but area * aspect >= 1.5.
    rng = np.random.default_rng(4)
    state = rng.bit_generator.state
    assert sa.random_erasing_params(rng, 1, 100, (0.05, 0.2), (0.3, 3.3)) is None
    # Ten attempts of two uniforms each, and nothing else.
    ref = np.random.default_rng(4)
    ref.bit_generator.state = state
    ref.random(20)
    assert rng.random() == ref.random()
    # torchvision agrees: every attempt fails and the image comes back as it was.
    img = torch.rand(3, 1, 100)
    torch.manual_seed(0)
    for spec in SPECS:
        i, j, eh, ew, v = T.RandomErasing.get_params(img, spec.scale, spec.ratio, None)
        assert (i, j, eh, ew) == (0, 0, 1, 100) and v is img
    # Through strong_view: every erasing fires, none fits, the image is unchanged.
    only_erase = sa.StrongAugmentConfig(
        jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        erasings=tuple(dataclasses.replace(s, p=1.0) for s in SPECS),
    )
    line = textured(1, 100)
    out, params = sa.strong_view(line, np.random.default_rng(5), only_erase, return_params=True)
    assert params.erase_applied == (True, True, True) and params.erasings == (None, None, None)
    np.testing.assert_array_equal(out, line)


def torch_erasing_sample(h, w, spec, n, seed):
    torch.manual_seed(seed)
    img = torch.zeros(3, h, w)
    out = []
    for _ in range(n):
        i, j, eh, ew, v = T.RandomErasing.get_params(img, spec.scale, spec.ratio, None)
        out.append(None if v is img else (i, j, eh, ew))
    return out


def ours_erasing_sample(h, w, spec, n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        e = sa.random_erasing_params(rng, h, w, spec.scale, spec.ratio, channels=1)
        out.append(None if e is None else e.rect)
    return out


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("hw", [(100, 100), (20, 150)])
def test_random_erasing_distribution_matches_torchvision(spec, hw):
    """Our sampler and torchvision's, 3000 draws each (fixed seeds): the same distribution."""
    h, w = hw
    n = 3000
    ours = ours_erasing_sample(h, w, spec, n, seed=6)
    theirs = torch_erasing_sample(h, w, spec, n, seed=6)

    def stats(sample):
        rects = np.array([r for r in sample if r is not None], np.float64)
        fail = 1 - len(rects) / len(sample)
        i, j, eh, ew = rects.T
        return {
            "fail": fail,
            "area": np.mean(eh * ew) / (h * w),
            "log_aspect": np.mean(np.log((eh + 0.5) / (ew + 0.5))),
            "top": np.mean((i + eh / 2) / h),
            "left": np.mean((j + ew / 2) / w),
        }

    a, b = stats(ours), stats(theirs)
    assert abs(a["fail"] - b["fail"]) < 0.03, (a, b)
    assert abs(a["area"] - b["area"]) < 0.01, (a, b)
    assert abs(a["log_aspect"] - b["log_aspect"]) < 0.12, (a, b)
    assert abs(a["top"] - b["top"]) < 0.03 and abs(a["left"] - b["left"]) < 0.03, (a, b)
    assert abs(a["top"] - 0.5) < 0.03 and abs(a["left"] - 0.5) < 0.03, a


# ----------------------------------------------------------------------------------------------
# The whole chain replayed through the original's torchvision pipeline.


def original_strong_pipeline():
    """The original's strong pipeline (detection_utils.py:662-699 of the original HASSOD code)."""
    augmentation = T.Compose(
        [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([OriginalGaussianBlur([0.1, 2.0])], p=0.5),
        ]
    )
    erasing = T.Compose(
        [
            T.ToTensor(),
            T.RandomErasing(p=0.7, scale=(0.05, 0.2), ratio=(0.3, 3.3), value="random"),
            T.RandomErasing(p=0.5, scale=(0.02, 0.2), ratio=(0.1, 6), value="random"),
            T.RandomErasing(p=0.3, scale=(0.02, 0.2), ratio=(0.05, 8), value="random"),
            T.ToPILImage(),
        ]
    )
    return augmentation, erasing


def replay_torchvision(image, params, monkeypatch, old_to_pil=False):
    """Runs the original's pipeline on `image` with its randomness fed from `params`."""
    coins = iter(
        [params.jitter is not None, params.grayscale, params.blur_sigma is not None]
        + list(params.erase_applied)
    )
    calls = {"rand": 0}

    def fake_rand(*size, **kw):
        calls["rand"] += 1
        # 0.0 fires RandomApply (p < u false) and RandomGrayscale / RandomErasing (u < p).
        return torch.tensor([0.0 if next(coins) else 1.0])

    def fake_jitter_params(b, c, s, h):
        assert (b, c, s, h) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
        j = params.jitter
        return torch.tensor(j.order), j.brightness, j.contrast, j.saturation, j.hue

    erase_iter = iter([e for e, on in zip(params.erasings, params.erase_applied) if on])
    spec_iter = iter([s for s, on in zip(SPECS, params.erase_applied) if on])

    def fake_erasing_params(img, scale, ratio, value=None):
        spec = next(spec_iter)
        assert tuple(scale) == spec.scale and tuple(ratio) == spec.ratio and value is None
        e = next(erase_iter)
        if e is None:
            return 0, 0, img.shape[-2], img.shape[-1], img
        return e.top, e.left, e.height, e.width, torch.from_numpy(e.noise).permute(2, 0, 1)

    augmentation, erasing = original_strong_pipeline()
    if old_to_pil:  # torchvision before the NumPy cast: pic.mul(255).byte()
        erasing.transforms[-1] = lambda t: Image.fromarray(
            t.mul(255).byte().permute(1, 2, 0).numpy(), "RGB"
        )
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", fake_rand)
        m.setattr(T.ColorJitter, "get_params", staticmethod(fake_jitter_params))
        m.setattr(T.RandomErasing, "get_params", staticmethod(fake_erasing_params))
        m.setattr(random, "uniform", lambda a, b: params.blur_sigma)
        out = erasing(augmentation(pil(image)))
    assert calls["rand"] == 3 + len(SPECS)
    assert next(coins, "done") == "done" and next(erase_iter, "done") == "done"
    return arr(out)


@pytest.mark.parametrize("seed", range(40))
def test_strong_view_replayed_through_torchvision(seed, monkeypatch):
    image = IMAGES[seed % 2] if seed % 10 else textured(120, 90, seed)
    rng = np.random.default_rng(seed)
    out, params = sa.strong_view(image, rng, return_params=True)
    assert out.shape == image.shape and out.dtype == np.uint8
    ref = replay_torchvision(image, params, monkeypatch)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out, replay_torchvision(image, params, monkeypatch, True))
    # The float path (ToTensor -> erase x3 -> ToPILImage) gives the same bytes.
    x = sa.to_float(sa.apply_strong(image, dataclasses.replace(params, erasings=())))
    for e in params.erasings:
        if e is not None:
            x = sa.erase(x, e.rect, e.noise)
    np.testing.assert_array_equal(sa.float_to_uint8(x), out)


def test_replays_cover_every_branch():
    """The 40 replayed seeds exercise each op both on and off, and every jitter op first."""
    seen = {"jitter": set(), "gray": set(), "blur": set(), "first": set()}
    erased = [set() for _ in SPECS]
    for seed in range(40):
        image = IMAGES[seed % 2] if seed % 10 else textured(120, 90, seed)
        _, p = sa.strong_view(image, np.random.default_rng(seed), return_params=True)
        seen["jitter"].add(p.jitter is not None)
        seen["gray"].add(p.grayscale)
        seen["blur"].add(p.blur_sigma is not None)
        if p.jitter is not None:
            seen["first"].add(p.jitter.order[0])
        for k, e in enumerate(p.erasings):
            erased[k].add(e is not None)
    assert seen["jitter"] == seen["gray"] == seen["blur"] == {True, False}
    assert seen["first"] == {0, 1, 2, 3}
    assert all(s == {True, False} for s in erased)


# ----------------------------------------------------------------------------------------------
# Randomness: determinism, ranges, probabilities.


def test_deterministic_per_seed_and_seeds_differ():
    image = IMAGES[0]
    outs = []
    for seed in range(12):
        a, pa = sa.strong_view(image, np.random.default_rng([seed, 7, 3]), return_params=True)
        b, pb = sa.strong_view(image, np.random.default_rng([seed, 7, 3]), return_params=True)
        np.testing.assert_array_equal(a, b)
        assert pa.jitter == pb.jitter and pa.grayscale == pb.grayscale
        assert pa.blur_sigma == pb.blur_sigma and pa.erase_applied == pb.erase_applied
        outs.append(a)
    for i in range(len(outs)):
        for j in range(i):
            assert not np.array_equal(outs[i], outs[j]), (i, j)


def test_params_depend_on_shape_only():
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    a = sa.strong_view(IMAGES[1], rng_a, return_params=True)[1]
    b = sa.strong_view(textured(64, 48, 99), rng_b, return_params=True)[1]
    assert a.jitter == b.jitter and a.blur_sigma == b.blur_sigma
    assert [e and e.rect for e in a.erasings] == [e and e.rect for e in b.erasings]
    assert rng_a.random() == rng_b.random()


def test_probabilities_and_ranges():
    """4000 draws (fixed seed): each coin within 0.03 of its probability (> 4.5 sd)."""
    rng = np.random.default_rng(10)
    n = 4000
    draws = [sa.sample_strong_params(rng, 200, 300) for _ in range(n)]
    jit = [p.jitter for p in draws if p.jitter is not None]
    assert abs(len(jit) / n - 0.8) < 0.03
    assert abs(np.mean([p.grayscale for p in draws]) - 0.2) < 0.03
    sigmas = [p.blur_sigma for p in draws if p.blur_sigma is not None]
    assert abs(len(sigmas) / n - 0.5) < 0.03
    for k, spec in enumerate(SPECS):
        assert abs(np.mean([p.erase_applied[k] for p in draws]) - spec.p) < 0.03
        # 200 x 300: an attempt misses w.p. 0, 0.05, 0.14, so 10 misses w.p. <= 4e-9.
        assert all((p.erasings[k] is not None) == p.erase_applied[k] for p in draws)
    for name in ("brightness", "contrast", "saturation"):
        f = np.array([getattr(j, name) for j in jit])
        assert f.min() >= 0.6 and f.max() <= 1.4
        assert abs(f.mean() - 1.0) < 0.02 and f.min() < 0.62 and f.max() > 1.38
    hue = np.array([j.hue for j in jit])
    assert hue.min() >= -0.1 and hue.max() <= 0.1 and abs(hue.mean()) < 0.005
    sig = np.array(sigmas)
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(sig.mean() - 1.05) < 0.04
    orders = [j.order for j in jit]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert len(set(orders)) == 24
    first = np.bincount([o[0] for o in orders], minlength=4) / len(orders)
    assert np.all(np.abs(first - 0.25) < 0.03)


def test_zero_strength_skips_the_op_like_torchvision():
    cfg = sa.StrongAugmentConfig(jitter_prob=1.0, brightness=0.0, hue=0.0)
    p = sa.sample_strong_params(np.random.default_rng(11), 10, 10, cfg)
    assert p.jitter.brightness is None and p.jitter.hue is None
    assert p.jitter.contrast is not None and p.jitter.saturation is not None
    assert T.ColorJitter(brightness=0.0, hue=0.0).brightness is None


# ----------------------------------------------------------------------------------------------
# Geometry: no op moves a pixel.


OFF = sa.StrongAugmentConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, erasings=())


@pytest.mark.parametrize("hw", [(37, 53), (1, 1), (1, 7), (300, 2)])
def test_all_ops_off_leaves_the_image(hw):
    image = textured(*hw)
    for seed in range(5):
        out = sa.strong_view(image, np.random.default_rng(seed), OFF)
        np.testing.assert_array_equal(out, image)
        assert not np.shares_memory(out, image)
    np.testing.assert_array_equal(sa.apply_strong(image, sa.NO_OP), image)
    off_erasing = dataclasses.replace(
        OFF, erasings=tuple(dataclasses.replace(s, p=0.0) for s in SPECS)
    )
    np.testing.assert_array_equal(
        sa.strong_view(image, np.random.default_rng(0), off_erasing), image
    )


@pytest.mark.parametrize("hw", [(37, 53), (2, 3), (1, 1), (11, 1)])
def test_shape_and_dtype_kept(hw):
    image = textured(*hw)
    for seed in range(20):
        out = sa.strong_view(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
    with pytest.raises(ValueError):
        sa.strong_view(image.astype(np.float32), np.random.default_rng(0))


def test_colour_ops_commute_with_any_pixel_permutation():
    """Jitter (contrast's mean is permutation invariant) and grayscale act pixel by pixel."""
    image = IMAGES[0]
    h, w, _ = image.shape
    perm = np.random.default_rng(12).permutation(h * w)
    shuffled = image.reshape(-1, 3)[perm].reshape(image.shape)
    cfg = sa.StrongAugmentConfig(jitter_prob=1.0, grayscale_prob=0.5, blur_prob=0.0, erasings=())
    for seed in range(8):
        a = sa.strong_view(image, np.random.default_rng(seed), cfg)
        b = sa.strong_view(shuffled, np.random.default_rng(seed), cfg)
        np.testing.assert_array_equal(a.reshape(-1, 3)[perm].reshape(image.shape), b)
        assert not np.array_equal(a, image)


def flip_params(params, w):
    """The same choices for the horizontally flipped image."""
    erasings = tuple(
        None
        if e is None
        else sa.EraseParams(e.top, w - e.left - e.width, e.height, e.width, e.noise[:, ::-1])
        for e in params.erasings
    )
    return dataclasses.replace(params, erasings=erasings)


@pytest.mark.parametrize("seed", range(10))
def test_whole_chain_commutes_with_flips(seed):
    """Blur and erasing included: flipping before equals flipping after (nothing shifts)."""
    image = IMAGES[0]
    _, w, _ = image.shape
    cfg = sa.StrongAugmentConfig(blur_prob=1.0)
    out, params = sa.strong_view(image, np.random.default_rng(seed), cfg, return_params=True)
    flipped = sa.apply_strong(image[:, ::-1], flip_params(params, w))
    np.testing.assert_array_equal(flipped, out[:, ::-1])
    vflip = dataclasses.replace(params, erasings=())
    np.testing.assert_array_equal(
        sa.apply_strong(image[::-1], vflip), sa.apply_strong(image, vflip)[::-1]
    )


def test_blur_keeps_a_dot_in_place():
    img = np.zeros((41, 51, 3), np.uint8)
    img[20, 25] = 255
    yy, xx = np.mgrid[:41, :51]
    for sigma in (0.1, 0.7, 1.3, 2.0):
        out = sa.gaussian_blur(img, sigma)[..., 0].astype(np.float64)
        assert out.sum() > 0
        assert (out * yy).sum() / out.sum() == pytest.approx(20.0, abs=1e-9)
        assert (out * xx).sum() / out.sum() == pytest.approx(25.0, abs=1e-9)


def test_erasing_changes_only_its_rectangles():
    cfg = dataclasses.replace(OFF, erasings=tuple(dataclasses.replace(s, p=1.0) for s in SPECS))
    image = textured(120, 90, 13)
    for seed in range(10):
        out, p = sa.strong_view(image, np.random.default_rng(seed), cfg, return_params=True)
        inside = np.zeros(image.shape[:2], bool)
        for e in p.erasings:
            assert e is not None
            inside[e.top : e.top + e.height, e.left : e.left + e.width] = True
        np.testing.assert_array_equal(out[~inside], image[~inside])
        last = p.erasings[-1]
        np.testing.assert_array_equal(
            out[last.top : last.top + last.height, last.left : last.left + last.width],
            sa.float_to_uint8(last.noise),
        )


def test_module_does_not_import_torch():
    code = (
        "import sys; import hassod_jax.data.strong_augment as m; "
        "import numpy as np; rng = np.random.default_rng(0); "
        "m.strong_view(np.zeros((8, 8, 3), np.uint8), rng); "
        "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
