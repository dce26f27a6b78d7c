"""The Mean Teacher's strong view (docs/recipe.md, Mean Teacher), host-side in NumPy + PIL.

The strong view is the weak image (uint8 RGB, already resized and flipped) followed, in this
order, by what the original builds with torchvision (re-implemented here, not copied):

1. `RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)`: brightness, contrast and
   saturation factors ~ U(0.6, 1.4), hue ~ U(-0.1, 0.1), the four ops applied in a random order
   (torchvision's `torch.randperm(4)`: 0 brightness, 1 contrast, 2 saturation, 3 hue). The image
   is a PIL image there, so the ops are torchvision's PIL-path ones: PIL `ImageEnhance`
   Brightness / Contrast / Color, and the hue shift of the uint8 H channel of PIL's HSV
   conversion by `uint8(int32(hue * 255))` (truncation toward zero, wrapping).
2. `RandomGrayscale(p=0.2)`: PIL `convert('L')` repeated over 3 channels.
3. `RandomApply([GaussianBlur], p=0.5)`: the original's own class,
   `PIL.ImageFilter.GaussianBlur(radius=sigma)` with sigma ~ U(0.1, 2.0).
4. `ToTensor` (uint8 / 255 in float32), then three independent `RandomErasing(value="random")`
   with (p, scale, ratio) = (0.7, (0.05, 0.2), (0.3, 3.3)), (0.5, (0.02, 0.2), (0.1, 6)),
   (0.3, (0.02, 0.2), (0.05, 8)). Each erased rectangle holds float32 N(0, 1) noise in the
   [0, 1] units of the tensor; see `random_erasing_params` for the rectangle.
5. `ToPILImage`: `x * 255` in float32 then a uint8 cast that truncates toward zero and wraps
   modulo 256 (torch's `.byte()` and NumPy's `astype(uint8)` on x86 CPUs both do this for
   values within the int32 range, which is all N(0, 1) * 255 can reach), so noise wraps
   rather than saturating: -0.01 -> -2.55 -> 254; 1.2 -> 306 -> 50.

`uint8 / 255 * 255` in float32 gives back every uint8 exactly, so steps 4-5 leave the pixels
outside the erased rectangles untouched; `apply_strong` therefore writes the wrapped noise
straight into the uint8 image (the float path `to_float` / `erase` / `float_to_uint8` is kept
for tests and gives the same bytes).

No op moves a pixel: the output has the input's shape and geometry (the boxes and masks of
the weak view hold for the strong view).

Randomness: every choice is drawn from one `np.random.Generator`, in this order:
  u = rng.random(): jitter applied iff u <= p (torchvision's RandomApply skips iff p < u);
    if applied: order = rng.permutation(4), then brightness, contrast, saturation, hue factors
    (each rng.uniform over its range; a strength of 0 draws nothing and skips the op);
  u = rng.random(): grayscale iff u < p;
  u = rng.random(): blur applied iff u <= p; if applied sigma = rng.uniform(0.1, 2.0);
  for each erasing: u = rng.random(): applied iff u < p; if applied `random_erasing_params`.
The draws depend on the image only through its (H, W), so a batch is deterministic given a
Generator per (seed, step, index).
"""

import dataclasses
import math
from typing import Optional

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from hassod_jax.data.images import check_rgb_uint8

# ColorJitter op ids, as torchvision's ColorJitter.forward numbers them.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class ErasingSpec:
    """One torchvision `RandomErasing(p, scale, ratio, value="random")`."""

    p: float
    scale: tuple
    ratio: tuple


@dataclasses.dataclass(frozen=True)
class StrongAugmentConfig:
    """The strong view's probabilities and ranges; the defaults are the original's."""

    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    erasings: tuple = (
        ErasingSpec(0.7, (0.05, 0.2), (0.3, 3.3)),
        ErasingSpec(0.5, (0.02, 0.2), (0.1, 6.0)),
        ErasingSpec(0.3, (0.02, 0.2), (0.05, 8.0)),
    )


DEFAULT_CONFIG = StrongAugmentConfig()


@dataclasses.dataclass(frozen=True)
class JitterParams:
    """ColorJitter's draw: `order` a permutation of 0..3, a factor None is a skipped op."""

    order: tuple
    brightness: Optional[float]
    contrast: Optional[float]
    saturation: Optional[float]
    hue: Optional[float]


@dataclasses.dataclass(frozen=True)
class EraseParams:
    """An erased rectangle [top, top + height) x [left, left + width) and its noise.

    noise: (height, width, C) float32 N(0, 1), in the [0, 1] units of `to_float`.
    """

    top: int
    left: int
    height: int
    width: int
    noise: np.ndarray

    @property
    def rect(self):
        return (self.top, self.left, self.height, self.width)


@dataclasses.dataclass(frozen=True)
class StrongParams:
    """Every random choice of one strong view.

    jitter: None when RandomApply skipped ColorJitter.
    grayscale: whether RandomGrayscale fired.
    blur_sigma: None when the blur was skipped.
    erase_applied: per RandomErasing, whether its coin fired.
    erasings: per RandomErasing, its rectangle, or None (not applied, or no attempt fitted).
    """

    jitter: Optional[JitterParams]
    grayscale: bool
    blur_sigma: Optional[float]
    erase_applied: tuple
    erasings: tuple


NO_OP = StrongParams(None, False, None, (), ())


# ----------------------------------------------------------------------------------------------
# The ops with explicit parameters. Internal `_pil_*` versions chain PIL images; the public ones
# take and return (H, W, 3) uint8 arrays.


def _pil_brightness(pil, factor):
    return ImageEnhance.Brightness(pil).enhance(factor)


def _pil_contrast(pil, factor):
    return ImageEnhance.Contrast(pil).enhance(factor)


def _pil_saturation(pil, factor):
    return ImageEnhance.Color(pil).enhance(factor)


def hue_shift(hue_factor):
    """The uint8 shift of the H channel: int32(hue * 255) (truncated toward 0) modulo 256."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor must be in [-0.5, 0.5], got {hue_factor}")
    return int(hue_factor * 255) % 256


def _pil_hue(pil, hue_factor):
    shift = hue_shift(hue_factor)
    h, s, v = pil.convert("HSV").split()
    h = np.asarray(h, dtype=np.uint8) + np.uint8(shift)  # uint8 arithmetic: wraps
    h = Image.fromarray(h, "L")
    return Image.merge("HSV", (h, s, v)).convert(pil.mode)


def _pil_grayscale(pil):
    gray = np.asarray(pil.convert("L"), dtype=np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.stack([gray] * 3, axis=-1)), "RGB")


def _pil_blur(pil, sigma):
    return pil.filter(ImageFilter.GaussianBlur(radius=sigma))


def _on_array(fn, img, *args):
    pil = Image.fromarray(check_rgb_uint8(img, "image"), "RGB")
    return np.asarray(fn(pil, *args), dtype=np.uint8).copy()


def adjust_brightness(img, factor):
    """torchvision's PIL-path adjust_brightness: PIL ImageEnhance.Brightness(factor)."""
    return _on_array(_pil_brightness, img, factor)


def adjust_contrast(img, factor):
    """torchvision's PIL-path adjust_contrast: PIL ImageEnhance.Contrast(factor).

    Blends with a grey image at the rounded mean of the image's PIL 'L' conversion.
    """
    return _on_array(_pil_contrast, img, factor)


def adjust_saturation(img, factor):
    """torchvision's PIL-path adjust_saturation: PIL ImageEnhance.Color(factor)."""
    return _on_array(_pil_saturation, img, factor)


def adjust_hue(img, hue_factor):
    """torchvision's PIL-path adjust_hue: PIL HSV, H += `hue_shift(hue_factor)` (uint8), RGB."""
    return _on_array(_pil_hue, img, hue_factor)


def to_grayscale(img):
    """torchvision's PIL-path rgb_to_grayscale(num_output_channels=3): PIL 'L' on 3 channels."""
    return _on_array(_pil_grayscale, img)


def gaussian_blur(img, sigma):
    """The original's GaussianBlur with a fixed sigma: PIL ImageFilter.GaussianBlur(sigma)."""
    return _on_array(_pil_blur, img, sigma)


def _pil_jitter(pil, jitter):
    for op in jitter.order:
        if op == BRIGHTNESS and jitter.brightness is not None:
            pil = _pil_brightness(pil, jitter.brightness)
        elif op == CONTRAST and jitter.contrast is not None:
            pil = _pil_contrast(pil, jitter.contrast)
        elif op == SATURATION and jitter.saturation is not None:
            pil = _pil_saturation(pil, jitter.saturation)
        elif op == HUE and jitter.hue is not None:
            pil = _pil_hue(pil, jitter.hue)
    return pil


def color_jitter(img, jitter):
    """ColorJitter with the draw `jitter` (a JitterParams): the ops in `jitter.order`."""
    return _on_array(_pil_jitter, img, jitter)


# ----------------------------------------------------------------------------------------------
# ToTensor, RandomErasing, ToPILImage.


def to_float(img):
    """ToTensor in HWC layout: uint8 / 255 in float32."""
    return np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)


def torch_uint8_cast(x):
    """torch's float -> uint8 cast on CPU: truncation toward zero, then wrap modulo 256.

    Exact for |x| < 2**31 (what torch and NumPy do on x86 there); N(0, 1) noise * 255 is far
    inside that range.
    """
    x = np.asarray(x)
    if not np.all(np.isfinite(x)) or np.any(np.abs(x) >= 2.0**31):
        raise ValueError("torch_uint8_cast is defined here for finite values below 2**31 only")
    return (np.trunc(x).astype(np.int64) & 0xFF).astype(np.uint8)


def float_to_uint8(x):
    """ToPILImage of a float image: `x * 255` in float32, then torch's wrapping uint8 cast."""
    return torch_uint8_cast(np.asarray(x, dtype=np.float32) * np.float32(255))


def random_erasing_params(rng, h, w, scale, ratio, channels=3):
    """torchvision's RandomErasing.get_params for value="random", drawn from `rng`.

    Up to 10 attempts: area = h * w * U(scale), aspect = exp(U(log ratio)),
    eh = round(sqrt(area * aspect)), ew = round(sqrt(area / aspect)) (Python's round, halves to
    even); an attempt fits iff eh < h and ew < w, and then draws the noise
    ((eh, ew, channels) float32 N(0, 1)), the top row in [0, h - eh] and the left column in
    [0, w - ew]. Returns an EraseParams, or None when no attempt fitted (nothing is erased).
    """
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = h * w
    for _ in range(10):
        erase_area = area * float(rng.uniform(scale[0], scale[1]))
        aspect = math.exp(float(rng.uniform(log_lo, log_hi)))
        eh = int(round(math.sqrt(erase_area * aspect)))
        ew = int(round(math.sqrt(erase_area / aspect)))
        if not (eh < h and ew < w):
            continue
        noise = rng.standard_normal((eh, ew, channels), dtype=np.float32)
        top = int(rng.integers(0, h - eh + 1))
        left = int(rng.integers(0, w - ew + 1))
        return EraseParams(top, left, eh, ew, noise)
    return None


def erase(img_float, rect, noise):
    """torchvision's erase in HWC layout: a copy of `img_float` with `rect` set to `noise`.

    rect: (top, left, height, width); noise: (height, width, C) float32.
    """
    top, left, height, width = rect
    out = np.array(img_float, dtype=np.float32, copy=True)
    out[top : top + height, left : left + width] = noise
    return out


# ----------------------------------------------------------------------------------------------
# The whole strong view.


def _factor_range(strength, center=1.0, clip_at_zero=True):
    """torchvision's ColorJitter._check_input for a number: None when the op is off."""
    if strength < 0:
        raise ValueError(f"jitter strength must be non-negative, got {strength}")
    if strength == 0:
        return None
    lo = center - float(strength)
    return (max(lo, 0.0) if clip_at_zero else lo, center + float(strength))


def sample_strong_params(rng, h, w, config=DEFAULT_CONFIG):
    """Every random choice of a strong view of an (h, w) image, drawn from `rng` (module doc)."""
    jitter = None
    if rng.random() <= config.jitter_prob:
        order = tuple(int(i) for i in rng.permutation(4))
        factors = []
        for strength, center, clip in (
            (config.brightness, 1.0, True),
            (config.contrast, 1.0, True),
            (config.saturation, 1.0, True),
            (config.hue, 0.0, False),
        ):
            bounds = _factor_range(strength, center, clip)
            factors.append(None if bounds is None else float(rng.uniform(*bounds)))
        jitter = JitterParams(order, *factors)
    grayscale = bool(rng.random() < config.grayscale_prob)
    blur_sigma = None
    if rng.random() <= config.blur_prob:
        blur_sigma = float(rng.uniform(config.blur_sigma[0], config.blur_sigma[1]))
    applied, erasings = [], []
    for spec in config.erasings:
        on = bool(rng.random() < spec.p)
        applied.append(on)
        erasings.append(random_erasing_params(rng, h, w, spec.scale, spec.ratio) if on else None)
    return StrongParams(jitter, grayscale, blur_sigma, tuple(applied), tuple(erasings))


def apply_strong(image, params):
    """The strong view of `image` ((H, W, 3) uint8) with the choices `params`."""
    image = check_rgb_uint8(image, "image")
    if params.jitter is None and not params.grayscale and params.blur_sigma is None:
        out = image.copy()
    else:
        pil = Image.fromarray(image, "RGB")
        if params.jitter is not None:
            pil = _pil_jitter(pil, params.jitter)
        if params.grayscale:
            pil = _pil_grayscale(pil)
        if params.blur_sigma is not None:
            pil = _pil_blur(pil, params.blur_sigma)
        out = np.asarray(pil, dtype=np.uint8).copy()
    # ToTensor -> erasings -> ToPILImage; uint8 -> float -> uint8 is exact, so only the
    # rectangles change (a later rectangle overwrites an earlier one, as in the tensor).
    for e in params.erasings:
        if e is not None:
            out[e.top : e.top + e.height, e.left : e.left + e.width] = float_to_uint8(e.noise)
    return out


def strong_view(image, rng, config=DEFAULT_CONFIG, return_params=False):
    """The Mean Teacher's strong view of the weak image `image` ((H, W, 3) uint8 RGB).

    Every random choice comes from `rng` (np.random.Generator). Same shape, dtype and geometry
    as `image`. With return_params=True returns (view, StrongParams).
    """
    image = check_rgb_uint8(image, "image")
    params = sample_strong_params(rng, image.shape[0], image.shape[1], config)
    out = apply_strong(image, params)
    return (out, params) if return_params else out
