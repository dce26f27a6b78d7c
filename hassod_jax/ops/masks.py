"""Instance-mask resampling: paste M x M predictions into the image, crop gt bitmasks.

Both are separable bilinear resamplings, so each is written as two small matrix products
per box, ``A_y @ mask @ A_x^T``, with the 1-D interpolation matrices built from the exact
sample positions of the reference:

* :func:`paste_masks_in_image` follows detectron2's ``_do_paste_mask``
  (``layers/mask_ops.py``): image pixel centres ``(p + 0.5)`` normalised to the box,
  ``grid_sample(align_corners=False)`` with zero padding, then ``>= threshold``;
* :func:`crop_and_resize_gt_masks` follows detectron2's ``BitMasks.crop_and_resize``
  (``structures/masks.py``): ``ROIAlign((M, M), 1.0, sampling_ratio=0, aligned=True)`` on
  the float bitmask, then ``>= 0.5``, returned as float32 0/1 targets.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hassod_jax.ops.roi_align import _axis_samples

__all__ = ["paste_masks_in_image", "crop_and_resize_gt_masks"]

_HI = jax.lax.Precision.HIGHEST


def _grid_sample_matrix(lo, hi, n_out, m):
    """(K, n_out, m) bilinear weights of grid_sample(align_corners=False, zeros padding)
    along one axis, for output pixels p = 0..n_out-1 and a box spanning [lo, hi]."""
    p = jnp.arange(n_out, dtype=jnp.float32)[None, :] + 0.5
    # Same arithmetic as _do_paste_mask then grid_sample's unnormalisation.
    g = (p - lo[:, None]) / (hi - lo)[:, None] * 2.0 - 1.0
    coord = ((g + 1.0) * m - 1.0) / 2.0
    low = jnp.floor(coord)
    frac = coord - low
    low = low.astype(jnp.int32)
    cols = jnp.arange(m)[None, None, :]
    # Taps outside [0, m-1] match no column: zero padding.
    a = (cols == low[..., None]) * (1.0 - frac)[..., None] + (cols == low[..., None] + 1) * frac[
        ..., None
    ]
    return a.astype(jnp.float32)


def paste_masks_in_image(
    masks, boxes, height: int, width: int, threshold: float = 0.5, *, chunk_size: int = 64
):
    """Paste per-box soft masks into an image-sized canvas.

    Args:
      masks: (K, M, M) float mask probabilities in box coordinates.
      boxes: (K, 4) float32 xyxy in image pixels.
      height, width: static output size.
      threshold: binarisation threshold (``>=``), as detectron2.
      chunk_size: static number of boxes pasted at once (bounds memory).

    Returns:
      (K, height, width) bool. Degenerate boxes (zero width or height) give empty masks.
    """
    masks = jnp.asarray(masks, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(
            f"hassod_jax/ops/masks.py: `masks` must be (K, M, M), got {tuple(masks.shape)}"
        )
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError(
            f"hassod_jax/ops/masks.py: `boxes` must be ({masks.shape[0]}, 4) xyxy, "
            f"got {tuple(boxes.shape)}"
        )
    k, m = masks.shape[0], masks.shape[1]
    if k == 0:
        return jnp.zeros((0, int(height), int(width)), bool)

    def paste(args):
        mask, box = args
        ok = (box[2] > box[0]) & (box[3] > box[1])
        safe = jnp.where(ok, box, jnp.asarray([0.0, 0.0, 1.0, 1.0]))
        ay = _grid_sample_matrix(safe[None, 1], safe[None, 3], int(height), m)[0]  # (H, M)
        ax = _grid_sample_matrix(safe[None, 0], safe[None, 2], int(width), m)[0]  # (W, M)
        img = jnp.matmul(jnp.matmul(ay, mask, precision=_HI), ax.T, precision=_HI)
        return (img >= threshold) & ok

    # Chunks of boxes bound the float32 (chunk, H, W) intermediate (1000 detections at
    # 800 x 1333 would otherwise need 4 GB before thresholding).
    return jax.lax.map(paste, (masks, boxes), batch_size=min(k, chunk_size))


def crop_and_resize_gt_masks(gt_masks, boxes, mask_size: int = 28, gt_indices=None):
    """Mask-head targets: each box's gt bitmask ROIAligned to ``mask_size`` and binarised.

    Args:
      gt_masks: (G, H, W) bool (or 0/1) full-image gt masks.
      boxes: (K, 4) float32 xyxy in image pixels (the proposals).
      mask_size: static M.
      gt_indices: optional (K,) int index of each box's gt; when None, G must equal K.

    Returns:
      (K, M, M) float32 in {0, 1}.

    Adaptive sampling (ceil(roi / M) per bin) is exact for boxes no larger than the mask
    image plus one pixel on each axis (the static cap is ceil((H + 1) / M)); larger boxes
    are sampled at the cap.
    """
    gt_masks = jnp.asarray(gt_masks)
    boxes = jnp.asarray(boxes, jnp.float32)
    if gt_masks.ndim != 3:
        raise ValueError(
            f"hassod_jax/ops/masks.py: `gt_masks` must be (G, H, W), got {tuple(gt_masks.shape)}"
        )
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"hassod_jax/ops/masks.py: `boxes` must be (K, 4) xyxy, got {tuple(boxes.shape)}"
        )
    g, h, w = gt_masks.shape
    k = boxes.shape[0]
    if gt_indices is None:
        if g != k:
            raise ValueError(
                "hassod_jax/ops/masks.py: without `gt_indices`, gt_masks must have one mask per "
                f"box, got {g} masks for {k} boxes"
            )
        gt_indices = jnp.arange(k, dtype=jnp.int32)
    gt_indices = jnp.asarray(gt_indices, jnp.int32)
    if gt_indices.shape != (k,):
        raise ValueError(
            f"hassod_jax/ops/masks.py: `gt_indices` must be ({k},), got {tuple(gt_indices.shape)}"
        )
    s = int(mask_size)
    boxes = jax.lax.stop_gradient(boxes)
    x1, y1 = boxes[:, 0] - 0.5, boxes[:, 1] - 0.5
    roi_w, roi_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]

    def axis_matrix(start, size, length):
        cap = max(1, math.ceil((length + 1) / s))
        grid = jnp.clip(jnp.ceil(size / s), 0, cap).astype(jnp.int32)
        n = jnp.full((k,), length, jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32), (k, cap))
        idx, wt = _axis_samples(start, size, s, grid, slots, n.astype(jnp.float32), n)
        wt = wt / jnp.maximum(grid, 1).astype(jnp.float32)[:, None, None, None]
        kk = jnp.broadcast_to(jnp.arange(k)[:, None, None, None], idx.shape)
        ss = jnp.broadcast_to(jnp.arange(s)[None, :, None, None], idx.shape)
        return jnp.zeros((k, s, length), jnp.float32).at[kk, ss, idx].add(wt)

    ay = axis_matrix(y1, roi_h, h)  # (K, S, H)
    ax = axis_matrix(x1, roi_w, w)  # (K, S, W)

    def one(args):
        a_y, a_x, gi = args
        mask = jnp.take(gt_masks, gi, axis=0, mode="clip").astype(jnp.float32)
        t = jnp.matmul(a_y, mask, precision=_HI)  # (S, W)
        return jnp.matmul(t, a_x.T, precision=_HI)  # (S, S)

    # Map in small batches so K full-image masks are never gathered at once.
    out = jax.lax.map(one, (ay, ax, gt_indices), batch_size=min(k, 16) if k else None)
    return (out >= 0.5).astype(jnp.float32)
