"""Fully connected CRF (Krähenbühl and Koltun 2011) with mean-field inference, in JAX.

Reproduces pydensecrf (``DenseCRF2D`` + ``unary_from_softmax`` + ``addPairwiseGaussian`` +
``addPairwiseBilateral`` + ``inference``) as stage 1's refinement uses it (docs/recipe.md,
Stage 1, step 3; the same call as HASSOD/CutLER's ``densecrf``):

* unary U = -log(clip(P, 1e-5, 1)) (``pydensecrf.utils.unary_from_softmax``; it does not
  renormalise P);
* Gaussian kernel on features (x/sxy, y/sxy), bilateral kernel on
  (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb), both ``DIAG_KERNEL`` with
  ``NORMALIZE_SYMMETRIC``: K~ Q = n * K(n * Q) with n = 1/sqrt(K 1 + 1e-20), where K is the
  permutohedral-lattice Gaussian filter (which includes the point itself);
* Potts compatibility: the message of a term is -w * K~ Q;
* mean field as ``DenseCRF::inference``: Q = softmax(-U); each iteration
  tmp = -U, tmp -= (-w_g K~_g Q), tmp -= (-w_b K~_b Q), Q = softmax(tmp); Q is returned.

The lattices depend only on the image, so they are built once per image and reused for all
iterations and all labels (the filter runs on (N, R) at once). Everything has static shapes;
a batch of images with different contents is handled by ``vmap``. The position kernel's
lattice does not depend on the image: its exact vertex count is computed once per (H, W, sxy)
and used as its capacity (and under ``vmap`` it is built once for the whole batch). The
bilateral lattice gets a capacity that covers photos (``default_bilateral_capacity``), with
an exact-bound re-run of any image that overflows it. Labels are padded (masked) to a
multiple of 4 so that few label counts compile.

Padded labels (``valid`` False) get -inf logits, hence Q = 0, in every iteration; since the
Potts messages of one label only involve that label's Q, the valid labels' result equals a run
on the unpadded labels alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hassod_jax.discovery.lattice import Lattice, build_lattice, lattice_filter

_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax default clip


def _gaussian_features(h: int, w: int, sxy: float):
    """(N, 2) float32 features x/sxy, y/sxy in row-major pixel order, and their bounds."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    s = np.float32(sxy)
    feats = np.stack([xx.ravel().astype(np.float32) / s, yy.ravel().astype(np.float32) / s], 1)
    bounds = ((0.0, float((w - 1) / s)), (0.0, float((h - 1) / s)))
    return feats.astype(np.float32), bounds


def _bilateral_features(image: jax.Array, sxy: float, srgb: float):
    """(N, 5) float32 features x/sxy, y/sxy, r/srgb, g/srgb, b/srgb, and their bounds."""
    h, w, _ = image.shape
    pos, pos_bounds = _gaussian_features(h, w, sxy)
    col = image.reshape(h * w, 3).astype(jnp.float32) / np.float32(srgb)
    cmax = float(np.float32(255) / np.float32(srgb))
    return jnp.concatenate([jnp.asarray(pos), col], axis=1), pos_bounds + ((0.0, cmax),) * 3


def _symmetric_norm(lattice: Lattice) -> jax.Array:
    """(N,) float32 n = 1 / sqrt(K 1 + 1e-20), computed in double as ``initLattice`` does."""
    k1 = lattice_filter(lattice, jnp.ones((lattice.offsets.shape[0], 1), jnp.float32))[:, 0]
    with jax.enable_x64(True):
        norm = 1.0 / jnp.sqrt(k1.astype(jnp.float64) + 1e-20)
        return norm.astype(jnp.float32)


_LABEL_BUCKET = 4  # labels are padded to a multiple of this, so few label counts compile


@functools.lru_cache(maxsize=64)
def _gaussian_vertex_count(h: int, w: int, sxy: float) -> int:
    """Exact number of lattice vertices of the (image-independent) position kernel."""
    feats, bounds = _gaussian_features(h, w, sxy)
    build = jax.jit(lambda f: build_lattice(f, bounds).num_vertices)
    with jax.ensure_compile_time_eval():
        return int(build(jnp.asarray(feats)))


def default_bilateral_capacity(h: int, w: int) -> int:
    """Default lattice capacity of the bilateral kernel for an (h, w) image.

    The exact bound is 6 h w vertices (noise images come close to it); natural photos
    resized to 480x480 use 4-9 % of it, smaller images a larger share (18 % at 160x160).
    The default, max(6 h w / 8, 65536) capped at 6 h w, covers photos; ``dense_crf``
    re-runs an image whose lattice overflowed at the exact bound.
    """
    full = h * w * 6
    return min(full, max(full // 8, 65536))


def _masked_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax over the last axis as ``expAndNormalize``; invalid labels get exactly 0."""
    z = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(z, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(valid, jnp.exp(z - m), 0.0)
    s = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(s > 0, s, 1.0)


def _crf_one(
    image,
    probs,
    valid,
    *,
    sxy_gaussian,
    compat_gaussian,
    sxy_bilateral,
    srgb,
    compat_bilateral,
    iterations,
    capacity_gaussian,
    capacity_bilateral,
):
    """One image: image (H, W, 3) uint8, probs (R, H, W), valid (R,) bool -> Q (R, H, W)."""
    h, w, _ = image.shape
    r = probs.shape[0]
    n = h * w
    fg, bg = _gaussian_features(h, w, sxy_gaussian)
    fb, bb = _bilateral_features(image, sxy_bilateral, srgb)
    kernels = []
    for feats, bounds, cap, compat in (
        (jnp.asarray(fg), bg, capacity_gaussian, compat_gaussian),
        (fb, bb, capacity_bilateral, compat_bilateral),
    ):
        lat = build_lattice(feats, bounds, capacity=cap)
        kernels.append((lat, _symmetric_norm(lat), np.float32(-compat)))

    p = probs.reshape(r, n).T.astype(jnp.float32)  # (N, R)
    unary = -jnp.log(jnp.clip(p, np.float32(_CLIP), np.float32(1.0)))
    neg_unary = -unary
    valid = valid[None, :]

    def step(_, q):
        tmp = neg_unary
        for lat, norm, neg_w in kernels:
            filt = lattice_filter(lat, q * norm[:, None]) * norm[:, None]
            tmp = tmp - neg_w * filt
        return _masked_softmax(tmp, valid)

    q = _masked_softmax(neg_unary, valid)
    q = jax.lax.fori_loop(0, iterations, step, q)
    overflow = kernels[0][0].overflow | kernels[1][0].overflow
    return q.T.reshape(r, h, w), overflow


@functools.partial(
    jax.jit,
    static_argnames=(
        "sxy_gaussian",
        "compat_gaussian",
        "sxy_bilateral",
        "srgb",
        "compat_bilateral",
        "iterations",
        "capacity_gaussian",
        "capacity_bilateral",
    ),
)
def _crf_batch(images, probs, valid, **params):
    """`_crf_one` vmapped over a batch; `params` are its keyword parameters (all static)."""
    return jax.vmap(functools.partial(_crf_one, **params))(images, probs, valid)


def dense_crf(
    image,
    probs,
    valid=None,
    *,
    sxy_gaussian: float = 3,
    compat_gaussian: float = 7,
    sxy_bilateral: float = 50,
    srgb: float = 5,
    compat_bilateral: float = 10,
    iterations: int = 10,
    capacity_bilateral: int | None = None,
    return_overflow: bool = False,
):
    """Dense CRF refinement of soft masks, as pydensecrf computes it (stage 1, step 3).

    Args:
      image: uint8 (H, W, 3) or (B, H, W, 3), RGB.
      probs: float (R, H, W) or (B, R, H, W), per-label probabilities (not renormalised;
        clipped to [1e-5, 1] for the unary -log p, as ``unary_from_softmax``).
      valid: optional bool (R,) or (B, R); False marks padded labels, which get Q = 0 and do
        not influence the others. Default: all valid.
      sxy_gaussian, compat_gaussian: width (pixels) and Potts weight of the position kernel.
      sxy_bilateral, srgb, compat_bilateral: widths (pixels, intensity) and Potts weight of
        the bilateral kernel.
      iterations: mean-field iterations.
      capacity_bilateral: static lattice capacity of the bilateral kernel (vertices); default
        ``default_bilateral_capacity(H, W)``. The position kernel's lattice does not depend
        on the image and gets its exact size.
      return_overflow: also return a bool () or (B,) array, True where the bilateral lattice
        exceeded its capacity. Called eagerly, such images are recomputed at the exact bound
        (6 H W), so the flag reports the first attempt; under an outer ``jit`` no recompute
        is possible and a True flag means that image's Q is not pydensecrf's.

    Returns:
      Q float32 with the shape of ``probs`` (and the overflow flags if asked).
    """
    image = jnp.asarray(image)
    probs = jnp.asarray(probs)
    if image.dtype != jnp.uint8:
        raise ValueError(f"dense_crf: image must be uint8, got {image.dtype}")
    single = image.ndim == 3
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"dense_crf: image must be (H, W, 3) or (B, H, W, 3), got {image.shape}")
    if probs.ndim != image.ndim:
        raise ValueError(
            f"dense_crf: probs must be {'(R, H, W)' if single else '(B, R, H, W)'} for image "
            f"{image.shape}, got {probs.shape}"
        )
    if not jnp.issubdtype(probs.dtype, jnp.floating):
        raise ValueError(f"dense_crf: probs must be floating point, got {probs.dtype}")
    if single:
        image, probs = image[None], probs[None]
    b, h, w, _ = image.shape
    if probs.shape[0] != b or probs.shape[2:] != (h, w):
        raise ValueError(
            f"dense_crf: probs shape {probs.shape} does not match image shape {image.shape}"
        )
    r = probs.shape[1]
    if r < 1:
        raise ValueError("dense_crf: probs needs at least one label")
    if valid is None:
        valid = jnp.ones((b, r), bool)
    else:
        valid = jnp.asarray(valid)
        if single:
            valid = valid[None]
        if valid.shape != (b, r):
            want = (r,) if single else (b, r)
            got = valid.shape[1:] if single else valid.shape
            raise ValueError(f"dense_crf: valid must have shape {want}, got {got}")
        valid = valid.astype(bool)
    for name, val in (
        ("sxy_gaussian", sxy_gaussian),
        ("sxy_bilateral", sxy_bilateral),
        ("srgb", srgb),
    ):
        if not val > 0:
            raise ValueError(f"dense_crf: {name} must be > 0, got {val}")
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"dense_crf: iterations must be a non-negative int, got {iterations}")
    full = h * w * 6
    cap_b = default_bilateral_capacity(h, w) if capacity_bilateral is None else capacity_bilateral
    cap_b = int(cap_b)
    if not 1 <= cap_b <= full:
        raise ValueError(f"dense_crf: capacity_bilateral must be in [1, {full}], got {cap_b}")

    # Pad labels to a multiple of _LABEL_BUCKET (masked out), so that few shapes compile.
    rp = -(-r // _LABEL_BUCKET) * _LABEL_BUCKET
    probs = probs.astype(jnp.float32)
    if rp != r:
        probs = jnp.pad(probs, ((0, 0), (0, rp - r), (0, 0), (0, 0)))
        valid = jnp.pad(valid, ((0, 0), (0, rp - r)))
    kw = dict(
        sxy_gaussian=float(sxy_gaussian),
        compat_gaussian=float(compat_gaussian),
        sxy_bilateral=float(sxy_bilateral),
        srgb=float(srgb),
        compat_bilateral=float(compat_bilateral),
        iterations=int(iterations),
        capacity_gaussian=_gaussian_vertex_count(h, w, float(sxy_gaussian)),
    )
    q, overflow = _crf_batch(image, probs, valid, capacity_bilateral=cap_b, **kw)
    if cap_b < full and not isinstance(overflow, jax.core.Tracer):
        redo = np.flatnonzero(np.asarray(overflow))
        if redo.size:
            q_full, _ = _crf_batch(
                image[redo], probs[redo], valid[redo], capacity_bilateral=full, **kw
            )
            q = q.at[redo].set(q_full)
    q = q[:, :r]
    if single:
        q, overflow = q[0], overflow[0]
    return (q, overflow) if return_overflow else q


def dense_crf_pydensecrf(
    image,
    probs,
    *,
    sxy_gaussian: float = 3,
    compat_gaussian: float = 7,
    sxy_bilateral: float = 50,
    srgb: float = 5,
    compat_bilateral: float = 10,
    iterations: int = 10,
) -> np.ndarray:
    """The reference: pydensecrf called as HASSOD/CutLER call it, one image.

    Args:
      image: uint8 (H, W, 3) RGB.
      probs: float (R, H, W) probabilities.

    Returns:
      Q float32 (R, H, W).
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("dense_crf_pydensecrf needs pydensecrf (pip install pydensecrf2)") from e
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"dense_crf_pydensecrf: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}"
        )
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"dense_crf_pydensecrf: probs must be (R, H, W) with (H, W) = {image.shape[:2]}, "
            f"got {probs.shape}"
        )
    r, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, r)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=sxy_gaussian, compat=compat_gaussian)
    d.addPairwiseBilateral(
        sxy=sxy_bilateral,
        srgb=srgb,
        # pydensecrf takes a writable buffer (a read-only one, e.g. np.asarray of a PIL image,
        # raises "buffer source array is read-only"); it does not write to it.
        rgbim=np.ascontiguousarray(image) if image.flags.writeable else np.array(image, order="C"),
        compat=compat_bilateral,
    )
    q = d.inference(iterations)
    return np.array(q, dtype=np.float32).reshape(r, h, w)


def crf_backends() -> tuple[str, ...]:
    """The CRF backends usable here: 'jax' always, 'pydensecrf' when it imports."""
    names = ["jax"]
    try:
        import pydensecrf.densecrf  # noqa: F401

        names.append("pydensecrf")
    except ImportError:
        pass
    return tuple(names)


def default_crf_backend() -> str:
    """'jax' on an accelerator; on CPU 'pydensecrf' when installed (faster there), else 'jax'."""
    if jax.default_backend() != "cpu":
        return "jax"
    return "pydensecrf" if "pydensecrf" in crf_backends() else "jax"


def _pydensecrf_any(image, probs, valid=None, **kw):
    """pydensecrf backend with ``dense_crf``'s signature (batched input looped on the host)."""
    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.ndim == 3:
        image, probs = image[None], probs[None]
        valid = None if valid is None else np.asarray(valid)[None]
        single = True
    else:
        single = False
    out = np.zeros(probs.shape, np.float32)
    for i in range(image.shape[0]):
        keep = np.ones(probs.shape[1], bool) if valid is None else np.asarray(valid[i], bool)
        if keep.any():
            out[i, keep] = dense_crf_pydensecrf(image[i], probs[i, keep], **kw)
    return out[0] if single else out


def get_crf_fn(name: str):
    """Returns a CRF function with ``dense_crf``'s signature for backend 'jax' or 'pydensecrf'."""
    if name == "jax":
        return dense_crf
    if name == "pydensecrf":
        if "pydensecrf" not in crf_backends():
            raise ImportError("get_crf_fn('pydensecrf'): pydensecrf is not installed")
        return _pydensecrf_any
    raise ValueError(f"get_crf_fn: unknown CRF backend {name!r}; expected 'jax' or 'pydensecrf'")
