"""Refinement of one threshold's HAC regions into COCO masks (docs/recipe.md, Stage 1, step 3).

Order of operations, as in HASSOD's `hac/hac.py` and `hac/crf.py`:
  1. P = bilinear upsample of the (R, h, w) one-hot region masks to the 480x480 image
     (torch `F.interpolate(mode='bilinear')`, align_corners False); B1 = P >= 0.5.
  2. Q = dense CRF of the 480x480 uint8 image with probabilities P (not renormalised: the
     regions partition the grid, so the bilinear weights already make P sum to 1 over R).
     B2 = Q >= 0.5.
  3. Keep region i iff IoU(B1_i, B2_i) >= 0.5 (empty union: not kept; HASSOD's 0/0 = NaN
     fails the comparison the same way).
  4. Kept Q_i bilinearly resized to the original (H, W), thresholded at 0.5 (>=).
  5. Drop masks with < 100 pixels or covering >= 3 of the 4 image corner pixels.
  6. Fill holes (scipy `binary_fill_holes` semantics, 4-connected background).
  7. COCO RLE (pycocotools), area and bbox from the RLE.
Everything here is NumPy on the host: it runs in the CPU worker processes beside the CRF.
"""

import numpy as np
from scipy import ndimage

from hassod_jax.data.coco import rle_to_json


def _linear_taps(in_size, out_size):
    """Source taps of torch's bilinear, align_corners=False, along one axis.

    Follows PyTorch's `area_pixel_compute_source_index` and `guard_index_and_lambda` (aten
    UpSample.h): with scale = in/out, src = scale * (dst + 0.5) - 0.5 clamped below at 0;
    i0 = floor(src), i1 = min(i0 + 1, in - 1), lambda1 = src - i0, lambda0 = 1 - lambda1.
    Returns (i0, i1) int64 and (lambda0, lambda1) float32, each of shape (out_size,).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in={in_size} out={out_size}")
    # float32 index arithmetic, as PyTorch's CPU kernel does for float32 inputs (opmath_t):
    # float64 positions would differ from torch by up to ~1e-5 in the weights at 480 px.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    dst = np.arange(out_size, dtype=f32)
    # scale * x - 0.5 with one rounding: the compiled kernel contracts it into an FMA. The
    # float64 product of two float32 values is exact, so this reproduces the FMA bit for bit.
    src = (scale.astype(np.float64) * (dst + f32(0.5)).astype(np.float64) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    return i0, i1, f32(1.0) - lam1, lam1


def bilinear_matrix(in_size, out_size):
    """(out_size, in_size) float64 matrix A with resize(x) = A @ x along one axis."""
    i0, i1, lam0, lam1 = _linear_taps(in_size, out_size)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), lam0)
    np.add.at(m, (rows, i1), lam1)
    return m


def _resize_one(x, taps_h, taps_w, out, support):
    """Bilinear resize of one (h, w) float32 map into `out` (H, W), only where it can matter.

    `support` (h, w) bool: the source pixels outside it are treated as not contributing; the
    output is computed on the rows/columns whose taps reach the support's bounding box (the
    same arithmetic as a full resize there) and `out` is left untouched elsewhere.
    """
    h0, h1, lh0, lh1 = taps_h
    w0, w1, lw0, lw1 = taps_w
    rows = np.flatnonzero(support.any(axis=1))
    if rows.size == 0:
        return
    cols = np.flatnonzero(support.any(axis=0))
    # Taps are nondecreasing with h1 <= h0 + 1, so the outputs touching source rows
    # [r0, r1] form the contiguous range h1 >= r0 and h0 <= r1.
    y_lo, y_hi = np.searchsorted(h1, rows[0], "left"), np.searchsorted(h0, rows[-1], "right")
    x_lo, x_hi = np.searchsorted(w1, cols[0], "left"), np.searchsorted(w0, cols[-1], "right")
    hh0, hh1 = h0[y_lo:y_hi], h1[y_lo:y_hi]
    ww0, ww1 = w0[x_lo:x_hi], w1[x_lo:x_hi]
    base = hh0[0]
    src = x[base : hh1[-1] + 1]
    tmp = src[:, ww0] * lw0[x_lo:x_hi] + src[:, ww1] * lw1[x_lo:x_hi]  # width first, as torch
    block = tmp[hh0 - base] * lh0[y_lo:y_hi, None]
    block += tmp[hh1 - base] * lh1[y_lo:y_hi, None]
    out[y_lo:y_hi, x_lo:x_hi] = block


def bilinear_resize(x, size):
    """(R, h, w) array -> (R, H, W) float32, = torch F.interpolate(bilinear, align_corners=False).

    Separable two-tap gathers, width first then height as torch's CPU kernel nests them.
    Each map is resized only over the outputs its nonzero pixels reach (exactly zero
    elsewhere), so sparse region masks cost in proportion to their size.
    """
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"expected a (R, h, w) array, got shape {x.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    r, h, w = x.shape
    out = np.zeros((r, out_h, out_w), dtype=np.float32)
    if r == 0:
        return out
    x = x.astype(np.float32, copy=False)
    taps_h, taps_w = _linear_taps(h, out_h), _linear_taps(w, out_w)
    for i in range(r):
        _resize_one(x[i], taps_h, taps_w, out[i], x[i] != 0)
    return out


def resize_threshold(q, size, thresh=0.5):
    """(R, h, w) float -> (R, H, W) bool: bilinear_resize(q, size) >= thresh, computed sparsely.

    A bilinear output is a convex combination of its source taps, so it can only reach
    `thresh` where some tap does; taps below `thresh - 1e-6` (a margin for float32
    rounding) cannot, and outputs away from the others are known to be False.
    """
    q = np.asarray(q)
    if q.ndim != 3:
        raise ValueError(f"expected a (R, h, w) array, got shape {q.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    r, h, w = q.shape
    out = np.zeros((r, out_h, out_w), dtype=bool)
    if r == 0:
        return out
    q = q.astype(np.float32, copy=False)
    taps_h, taps_w = _linear_taps(h, out_h), _linear_taps(w, out_w)
    buf = np.zeros((out_h, out_w), dtype=np.float32)
    for i in range(r):
        buf[...] = 0.0
        _resize_one(q[i], taps_h, taps_w, buf, q[i] >= np.float32(thresh - 1e-6))
        np.greater_equal(buf, np.float32(thresh), out=out[i])
    return out


def upsample_masks(masks, size=(480, 480)):
    """Step 1: (R, h, w) bool/float region masks -> (R, size) float32 soft masks P."""
    return bilinear_resize(masks, size)


def resize_probs_to_original(q, orig_size):
    """Step 4 (resize part): (R, 480, 480) float CRF marginals -> (R, H, W) float32, bilinear."""
    return bilinear_resize(q, orig_size)


def iou_filter(b1, b2, thresh=0.5):
    """Step 3: (R, H, W) bool, (R, H, W) bool -> keep (R,) bool, IoU(b1_i, b2_i) >= thresh.

    An empty union is not kept.
    """
    b1 = np.asarray(b1, dtype=bool)
    b2 = np.asarray(b2, dtype=bool)
    if b1.shape != b2.shape or b1.ndim != 3:
        raise ValueError(f"b1 and b2 must be (R, H, W) of equal shape, got {b1.shape}, {b2.shape}")
    inter = np.logical_and(b1, b2).sum(axis=(1, 2), dtype=np.int64)
    union = np.logical_or(b1, b2).sum(axis=(1, 2), dtype=np.int64)
    return (union > 0) & (inter >= thresh * union)


def filter_masks(masks, min_area=100, max_corners=2):
    """Step 5: (K, H, W) bool -> keep (K,) bool.

    Dropped: area < min_area, or more than `max_corners` of the 4 corner pixels covered
    (3 or 4 corners: the mask is background).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got {masks.shape}")
    area = masks.sum(axis=(1, 2), dtype=np.int64)
    corners = masks[:, 0, 0].astype(np.int64) + masks[:, 0, -1] + masks[:, -1, 0] + masks[:, -1, -1]
    return (area >= min_area) & (corners <= max_corners)


_CROSS = ndimage.generate_binary_structure(2, 1)


def fill_holes_one(mask):
    """(H, W) bool -> (H, W) bool with holes filled, = scipy.ndimage.binary_fill_holes(mask).

    Faster than scipy's iterated dilation: label the 4-connected background components of the
    mask's bounding box padded by one background pixel (the padding ring stands for the
    outside, which scipy's border_value=1 seeds) and fill every component but the outer one.
    """
    mask = np.asarray(mask, dtype=bool)
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return mask.copy()
    xs = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    crop = np.zeros((y1 - y0 + 2, x1 - x0 + 2), dtype=bool)
    crop[1:-1, 1:-1] = mask[y0:y1, x0:x1]
    labels, n = ndimage.label(~crop, structure=_CROSS)
    out = mask.copy()
    if n > 1:
        inner = labels[1:-1, 1:-1]
        # Label of the padding ring (the outside) is labels[0, 0]; other labels are holes.
        out[y0:y1, x0:x1] |= (inner != labels[0, 0]) & (inner > 0)
    return out


def fill_holes(masks):
    """Step 6: (K, H, W) bool -> (K, H, W) bool, binary_fill_holes applied per mask."""
    masks = np.asarray(masks, dtype=bool)
    return np.stack([fill_holes_one(m) for m in masks]) if len(masks) else masks.copy()


def encode_masks(masks):
    """Step 7: (K, H, W) bool -> [dict(segmentation RLE (counts str), area int, bbox [x,y,w,h])].

    RLE, area and bbox come from pycocotools `mask.encode` / `area` / `toBbox`.
    """
    import pycocotools.mask as mask_utils

    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got {masks.shape}")
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    areas = mask_utils.area(rles)
    boxes = mask_utils.toBbox(rles)
    return [
        {
            "segmentation": rle_to_json(r),
            "area": int(a),
            "bbox": [float(v) for v in b],
        }
        for r, a, b in zip(rles, areas, boxes)
    ]


def refine_regions(
    image_uint8,
    region_masks,
    orig_size,
    crf_fn,
    iou_thresh=0.5,
    mask_thresh=0.5,
    min_area=100,
    return_stats=False,
):
    """Steps 1-7 for one image and one threshold.

    Args:
      image_uint8: (S, S', 3) uint8, the resized image the CRF sees (480x480 in HASSOD).
      region_masks: (R, h, w) bool/float HAC region masks on the patch grid.
      orig_size: (H, W) of the original image; the output masks have this size.
      crf_fn: callable(image (S, S', 3) uint8, probs (R, S, S') float32) -> Q (R, S, S').
    Returns:
      list of dicts {segmentation (RLE, counts str), area, bbox [x, y, w, h]}, in region
      order; with `return_stats`, also a dict of counts per step.
    """
    image_uint8 = np.asarray(image_uint8)
    if image_uint8.dtype != np.uint8 or image_uint8.ndim != 3 or image_uint8.shape[2] != 3:
        raise ValueError(
            f"image_uint8 must be (S, S, 3) uint8, got {image_uint8.dtype} {image_uint8.shape}"
        )
    region_masks = np.asarray(region_masks)
    if region_masks.ndim != 3:
        raise ValueError(f"region_masks must be (R, h, w), got {region_masks.shape}")
    out_h, out_w = int(orig_size[0]), int(orig_size[1])
    stats = {"regions": int(region_masks.shape[0]), "after_iou": 0, "after_filters": 0}
    anns = []
    if region_masks.shape[0] > 0:
        p = upsample_masks(region_masks, image_uint8.shape[:2])
        q = np.asarray(crf_fn(image_uint8, p), dtype=np.float32)
        if q.shape != p.shape:
            raise ValueError(f"crf_fn returned shape {q.shape}, expected {p.shape}")
        keep = iou_filter(p >= mask_thresh, q >= mask_thresh, iou_thresh)
        stats["after_iou"] = int(keep.sum())
        # Steps 4-7 one mask at a time: at the original size only one mask is held (a
        # 12-megapixel photo's 50 kept masks would be 600 MB per copy).
        for i in np.flatnonzero(keep):
            b = resize_threshold(q[i : i + 1], (out_h, out_w), mask_thresh)
            if filter_masks(b, min_area=min_area)[0]:
                anns.extend(encode_masks(fill_holes(b)))
        stats["after_filters"] = len(anns)
    return (anns, stats) if return_stats else anns
