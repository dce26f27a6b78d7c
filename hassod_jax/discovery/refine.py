"""Refinement of one threshold's HAC regions into COCO masks (HASSOD_SPEC.md §1.3).

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


def bilinear_matrix(in_size, out_size):
    """(out_size, in_size) float64 interpolation matrix of torch's bilinear, align_corners=False.

    Follows PyTorch's `area_pixel_compute_source_index` (aten UpSample.h): with
    scale = in/out, src = scale * (dst + 0.5) - 0.5 clamped below at 0; i0 = floor(src),
    i1 = min(i0 + 1, in - 1), weights (1 - l, l) with l = src - i0.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in={in_size} out={out_size}")
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum(scale * (dst + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def bilinear_resize(x, size):
    """(R, h, w) array -> (R, H, W) float32, = torch F.interpolate(bilinear, align_corners=False).

    Separable: out = A_h @ x @ A_w.T with the matrices of `bilinear_matrix`.
    """
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"expected a (R, h, w) array, got shape {x.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    r, h, w = x.shape
    if r == 0:
        return np.zeros((0, out_h, out_w), dtype=np.float32)
    a_h = bilinear_matrix(h, out_h).astype(np.float32)
    a_w = bilinear_matrix(w, out_w).astype(np.float32)
    x = x.astype(np.float32)
    tmp = np.matmul(x, a_w.T)  # (R, h, W)
    return np.matmul(a_h, tmp).astype(np.float32, copy=False)  # (R, H, W)


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
    corners = (
        masks[:, 0, 0].astype(np.int64)
        + masks[:, 0, -1]
        + masks[:, -1, 0]
        + masks[:, -1, -1]
    )
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
        raise ValueError(f"image_uint8 must be (S, S, 3) uint8, got {image_uint8.dtype} "
                         f"{image_uint8.shape}")
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
        if keep.any():
            b = resize_probs_to_original(q[keep], (out_h, out_w)) >= mask_thresh
            b = b[filter_masks(b, min_area=min_area)]
            stats["after_filters"] = int(len(b))
            anns = encode_masks(fill_holes(b))
    return (anns, stats) if return_stats else anns
