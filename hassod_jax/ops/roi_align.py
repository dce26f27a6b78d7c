"""ROIAlign on NHWC features, single-level and over FPN levels (detectron2's ROIPooler).

Semantics follow ``torchvision.ops.roi_align`` (the CPU/CUDA kernels in
pytorch/vision ``torchvision/csrc/ops/cpu/roi_align_kernel.cpp``), re-derived here:

* a box is scaled by ``spatial_scale`` and, with ``aligned=True``, shifted by -0.5 so that
  pixel centres sit at integer coordinates; with ``aligned=False`` its size is at least 1;
* each of the S x S bins averages ``gh x gw`` bilinear samples placed at
  ``start + p * bin + (i + 0.5) * bin / g``; ``g = sampling_ratio`` when > 0, otherwise
  the adaptive ``ceil(roi_size / S)`` (per box and per axis);
* a sample with ``y < -1``, ``y > H``, ``x < -1`` or ``x > W`` contributes 0; otherwise the
  coordinate is clamped to 0 from below and to the last row/column when at or beyond it;
* the bin value is the sum of its samples divided by ``max(gh * gw, 1)``.

Adaptive sampling (``sampling_ratio=0``) has a per-box, data-dependent sample count
``gh x gw``. With static shapes, each box's own samples are walked in torchvision's order (row
``iy`` outer, column ``ix`` inner) by one flat slot counter ``t``: step ``t`` takes, for every
box at once, its sample ``(t // gw, t % gw)`` when ``t < gh * gw``. The walk has at most
``max_sampling`` steps (a static cap on the samples PER BIN, ``gh * gw``), and steps beyond the
batch's largest ``gh * gw`` are skipped. Only the product is capped, so long thin boxes, whose
ONE axis needs many samples (a 1333 x 9 px box on P2: 48 x 1), stay exact. With detectron2's
level assignment (224 px at P4) the product stays below 64 for every box of an image up to
1333 px on a side (square boxes need at most 4 x 4 on P2-P4 and 6 x 6 on P5; thin boxes trade
one axis for the other), so the default cap 64 is exact there. A box beyond the cap is
sampled with both counts scaled down to fit (an approximation of the same average). These
counts are for S = 7 (box head); for S = 14 (mask head) they are about 4x smaller.

Cost: one gather of 4 taps per bin for all boxes per step, so time grows with the largest
``gh * gw`` of the batch (``sampling_ratio**2`` when fixed) while memory stays
O(K * S * S * C).

All levels of an FPN are flattened into one (sum of H*W, C) table per image and each box
gathers from its own level through a per-box row offset, height, width and scale: one gather
pass in total, not one per level, and each image reads only its own table (so a batch sharded
over devices pools without moving features between them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["roi_align", "multilevel_roi_align", "assign_boxes_to_levels"]


def _axis_samples(start, size, n_bins, grid, slots, length, valid_len):
    """Per-axis bilinear taps of some sample slots for a batch of boxes.

    Args:
      start, size: (K,) roi start/size in feature pixels along this axis.
      n_bins: static S.
      grid: (K,) int32 sample count per bin along this axis for each box.
      slots: (K, P) int32 sample indices within a bin to evaluate, per box.
      length: (K,) float32 feature length (H or W) of the box's level.
      valid_len: (K,) int32 same length as int.

    Returns:
      idx (K, S, P, 2) int32 low/high tap positions, w (K, S, P, 2) float32 weights
      (0 for slots >= grid and for out-of-range samples).
    """
    p = jnp.arange(n_bins, dtype=jnp.float32)[None, :, None]
    i = slots.astype(jnp.float32)[:, None, :]
    bin_size = (size / n_bins)[:, None, None]
    g = grid.astype(jnp.float32)[:, None, None]
    # Same operation order as torchvision: start + p * bin + ((i + .5) * bin) / g.
    coord = start[:, None, None] + p * bin_size + (i + 0.5) * bin_size / jnp.maximum(g, 1.0)
    in_slot = slots[:, None, :] < grid[:, None, None]
    length = length[:, None, None]
    outside = (coord < -1.0) | (coord > length)
    c = jnp.maximum(coord, 0.0)
    low = jnp.floor(c).astype(jnp.int32)
    last = valid_len[:, None, None] - 1
    at_edge = low >= last
    low = jnp.where(at_edge, last, low)
    high = jnp.where(at_edge, last, low + 1)
    c = jnp.where(at_edge, low.astype(jnp.float32), c)
    frac = c - low.astype(jnp.float32)
    keep = (in_slot & ~outside).astype(jnp.float32)
    w = jnp.stack([(1.0 - frac) * keep, frac * keep], axis=-1)
    idx = jnp.stack([low, high], axis=-1)
    return idx, w


def _fit_to_cap(gh, gw, cap: int):
    """Sample counts whose product is at most `cap` (unchanged when already within it)."""
    over = gh * gw > cap
    shrink = jnp.sqrt(cap / jnp.maximum(gh * gw, 1).astype(jnp.float32))
    sh = jnp.clip(jnp.floor(gh * shrink), 1, cap).astype(jnp.int32)
    sw = jnp.clip(cap // jnp.maximum(sh, 1), 1, cap).astype(jnp.int32)
    sw = jnp.minimum(sw, gw)
    return jnp.where(over, sh, gh), jnp.where(over, sw, gw)


def _sample_counts(roi_h, roi_w, output_size, sampling_ratio, max_sampling):
    """Per-box samples per bin along each axis, (gh, gw) int32, and the static walk length."""
    if sampling_ratio > 0:
        gh = jnp.full(roi_h.shape, int(sampling_ratio), jnp.int32)
        return gh, gh, int(sampling_ratio) ** 2
    # ceil(roi / S) as torchvision; a non-positive size gives 0 samples (output 0).
    gh = jnp.clip(jnp.ceil(roi_h / output_size), 0, 2**20).astype(jnp.int32)
    gw = jnp.clip(jnp.ceil(roi_w / output_size), 0, 2**20).astype(jnp.int32)
    gh, gw = _fit_to_cap(gh, gw, int(max_sampling))
    return gh, gw, int(max_sampling)


def _pool(tables, boxes, base, height, width, scale, *, output_size, sampling_ratio, aligned,
          max_sampling):
    """ROIAlign of each image's K boxes against rows of its own table.

    tables (B, N, C); box k of image b reads the (height[b, k], width[b, k]) map stored
    row-major at rows ``base[b, k] : base[b, k] + height * width`` of ``tables[b]``. boxes
    (B, K, 4) xyxy in input pixels, scaled by scale[b, k]. Returns (B, K, S, S, C) in the
    tables' dtype (accumulated in float32).

    Every image gathers from its own table (a batched gather): with the batch sharded over
    devices each device reads only its own images' features (one table for the whole batch
    made XLA gather the global batch onto every device). A ``scan`` walks the sample slots
    (module docstring), gathering the 4 bilinear taps of one sample per bin for all boxes at
    once: memory stays O(K * S * S * C) whatever the count, and its gradient is a scatter-add
    per step. The walk's body is rematerialised: the backward pass recomputes each step's tap
    indices and weights from the boxes instead of keeping them (K * S * S * 4 of each per
    step, tiny trailing dimensions that accelerators pad). Steps beyond the largest per-box
    sample count of the whole batch are skipped.
    """
    s = int(output_size)
    b, k = boxes.shape[:2]
    x1, y1, roi_w, roi_h = _roi_geometry(boxes.astype(jnp.float32), scale, aligned)
    gh, gw, steps = _sample_counts(roi_h, roi_w, s, sampling_ratio, max_sampling)
    max_t = jnp.max(gh * gw, initial=0)  # over the batch: one walk length for every image

    def one_image(table, x1, y1, roi_w, roi_h, gh, gw, base, height, width):
        h_f = height.astype(jnp.float32)
        w_f = width.astype(jnp.float32)
        per_box = gh * gw
        count = jnp.maximum(per_box, 1).astype(jnp.float32)
        gw_div = jnp.maximum(gw, 1)

        @jax.checkpoint
        def add_slot(acc, t):
            # torchvision's loop order per box: iy outer, ix inner.
            iy = jnp.where(t < per_box, t // gw_div, gh)  # gh: out of the slot range, weight 0
            ix = t % gw_div
            yi, wy = _axis_samples(y1, roi_h, s, gh, iy[:, None], h_f, height)  # (K, S, 1, 2)
            xi, wx = _axis_samples(x1, roi_w, s, gw, ix[:, None], w_f, width)
            yi, wy, xi, wx = yi[:, :, 0], wy[:, :, 0], xi[:, :, 0], wx[:, :, 0]  # (K, S, 2)
            rows = base[:, None, None] + yi * width[:, None, None]  # (K, S, 2)
            flat_idx = rows[:, :, :, None, None] + xi[:, None, None, :, :]  # (K, S, 2, S, 2)
            vals = jnp.take(table, flat_idx, axis=0, mode="clip").astype(jnp.float32)
            wgt = wy[:, :, :, None, None] * wx[:, None, None, :, :]
            return acc + jnp.sum(vals * wgt[..., None], axis=(2, 4))

        def step(acc, t):
            acc = jax.lax.cond(t < max_t, lambda a: add_slot(a, t), lambda a: a, acc)
            return acc, None

        acc0 = jnp.zeros((k, s, s, table.shape[1]), jnp.float32)
        acc, _ = jax.lax.scan(step, acc0, jnp.arange(steps, dtype=jnp.int32))
        return (acc / count[:, None, None, None]).astype(table.dtype)

    return jax.vmap(one_image)(tables, x1, y1, roi_w, roi_h, gh, gw, base, height, width)


def _roi_geometry(boxes, scale, aligned):
    """Box start and size in feature pixels, torchvision's convention."""
    off = 0.5 if aligned else 0.0
    x1 = boxes[..., 0] * scale - off
    y1 = boxes[..., 1] * scale - off
    x2 = boxes[..., 2] * scale - off
    y2 = boxes[..., 3] * scale - off
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    return x1, y1, roi_w, roi_h


def _check_boxes(name, boxes, batch):
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != batch:
        raise ValueError(
            f"hassod_jax/ops/roi_align.py: `{name}` must be (B={batch}, K, 4) xyxy, "
            f"got {tuple(boxes.shape)}"
        )


def _check_sampling(sampling_ratio, max_sampling):
    if not isinstance(sampling_ratio, (int, np.integer)) or sampling_ratio < 0:
        raise ValueError(
            "hassod_jax/ops/roi_align.py: `sampling_ratio` must be a static int >= 0 "
            f"(0 = adaptive), got {sampling_ratio!r}"
        )
    if sampling_ratio == 0 and (
        not isinstance(max_sampling, (int, np.integer)) or max_sampling < 1
    ):
        raise ValueError(
            "hassod_jax/ops/roi_align.py: `max_sampling` must be a static int >= 1, "
            f"got {max_sampling!r}"
        )


def roi_align(
    features,
    boxes,
    *,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
    max_sampling: int = 64,
):
    """ROIAlign as ``torchvision.ops.roi_align``, NHWC.

    Args:
      features: (B, H, W, C) float.
      boxes: (B, K, 4) float32, xyxy in input-image pixels (box k of image b reads image b).
      output_size: static S (square output).
      spatial_scale: feature pixels per input pixel (1 / stride).
      sampling_ratio: samples per bin and axis; 0 = adaptive ``ceil(roi / S)``.
      aligned: half-pixel shift (detectron2 uses True).
      max_sampling: static cap on the adaptive samples per bin, gh * gw (module docstring).

    Returns:
      (B, K, S, S, C) in ``features``' dtype.
    """
    features = jnp.asarray(features)
    boxes = jnp.asarray(boxes, jnp.float32)
    if features.ndim != 4:
        raise ValueError(
            "hassod_jax/ops/roi_align.py: `features` must be (B, H, W, C), "
            f"got {tuple(features.shape)}"
        )
    b, h, w, c = features.shape
    _check_boxes("boxes", boxes, b)
    _check_sampling(sampling_ratio, max_sampling)
    k = boxes.shape[1]
    # Like torchvision, no gradient flows into the boxes.
    return _pool(
        features.reshape(b, h * w, c),
        jax.lax.stop_gradient(boxes),
        jnp.zeros((b, k), jnp.int32),
        jnp.full((b, k), h, jnp.int32),
        jnp.full((b, k), w, jnp.int32),
        jnp.full((b, k), spatial_scale, jnp.float32),
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling=max_sampling,
    )


def assign_boxes_to_levels(
    boxes, min_level: int, max_level: int, canonical_box_size: float, canonical_level: int
):
    """detectron2's ``assign_boxes_to_levels`` (modeling/poolers.py): level index
    ``clip(floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)),
    min_level, max_level) - min_level`` for boxes (..., 4) -> (...,) int32.
    Degenerate boxes (area <= 0) go to the finest level."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    size = jnp.sqrt(jnp.maximum(area, 0.0))
    lvl = jnp.floor(canonical_level + jnp.log2(size / canonical_box_size + 1e-8))
    lvl = jnp.clip(lvl, min_level, max_level)
    return lvl.astype(jnp.int32) - min_level


def multilevel_roi_align(
    features: Sequence,
    boxes,
    *,
    output_size: int,
    strides: Sequence[int] = (4, 8, 16, 32),
    sampling_ratio: int = 0,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
    aligned: bool = True,
    max_sampling: int = 64,
):
    """detectron2 ``ROIPooler`` with ROIAlignV2: each box pooled from its assigned level.

    Args:
      features: list of (B, H_l, W_l, C) float, finest first, one per entry of ``strides``.
      boxes: (B, K, 4) float32 xyxy in input-image pixels.
      output_size, sampling_ratio, aligned, max_sampling: as :func:`roi_align`.
      strides: power-of-two stride of each level (level = log2(stride)).
      canonical_box_size, canonical_level: detectron2's level mapping (224 at P4).

    Returns:
      (B, K, S, S, C) in the features' dtype.
    """
    features = [jnp.asarray(f) for f in features]
    boxes = jnp.asarray(boxes, jnp.float32)
    if len(features) != len(strides) or not features:
        raise ValueError(
            "hassod_jax/ops/roi_align.py: `features` and `strides` must have one entry per "
            f"level, got {len(features)} and {len(strides)}"
        )
    levels = [math.log2(st) for st in strides]
    if any(abs(lv - round(lv)) > 1e-6 for lv in levels) or any(
        round(levels[i + 1]) != round(levels[i]) + 1 for i in range(len(levels) - 1)
    ):
        raise ValueError(
            "hassod_jax/ops/roi_align.py: `strides` must be consecutive powers of two, "
            f"got {tuple(strides)}"
        )
    b, _, _, c = features[0].shape
    for i, f in enumerate(features):
        if f.ndim != 4 or f.shape[0] != b or f.shape[3] != c:
            raise ValueError(
                f"hassod_jax/ops/roi_align.py: features[{i}] must be (B={b}, H, W, C={c}), "
                f"got {tuple(f.shape)}"
            )
    _check_boxes("boxes", boxes, b)
    _check_sampling(sampling_ratio, max_sampling)
    k = boxes.shape[1]
    dtype = jnp.result_type(*[f.dtype for f in features])
    min_level, max_level = round(levels[0]), round(levels[-1])

    sizes = [f.shape[1] * f.shape[2] for f in features]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    # (B, sum HW, C): all levels of one image contiguous, one table per image.
    tables = jnp.concatenate([f.astype(dtype).reshape(b, -1, c) for f in features], axis=1)

    lvl = assign_boxes_to_levels(boxes, min_level, max_level, canonical_box_size, canonical_level)
    return _pool(
        tables,
        jax.lax.stop_gradient(boxes),
        jnp.asarray(offsets, jnp.int32)[lvl],
        jnp.asarray([f.shape[1] for f in features], jnp.int32)[lvl],
        jnp.asarray([f.shape[2] for f in features], jnp.int32)[lvl],
        jnp.asarray([1.0 / st for st in strides], jnp.float32)[lvl],
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling=max_sampling,
    )
