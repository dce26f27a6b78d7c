"""Anchors as detectron2's ``DefaultAnchorGenerator``.

Learned from facebookresearch/detectron2 ``modeling/anchor_generator.py``:
cell anchors are built per size then per aspect ratio with ``w = sqrt(size**2 / ar)``,
``h = ar * w``, centred on 0 (``(-w/2, -h/2, w/2, h/2)``), NOT rounded. Grid shifts are
``arange(offset * stride, W * stride, stride)`` along x (fastest) and y, and the anchors of
one feature map are ordered (y, x, anchor): for each location, its A cell anchors.

Difference from torchvision's ``AnchorGenerator``: torchvision rounds its cell anchors
(``base_anchors.round()``) and uses ``h_ratios = sqrt(ar)``, ``ws = w_ratios * size``;
for sizes 32..512 and ratios (0.5, 1, 2) the two agree up to that rounding (< 0.5 px).

Shapes are static: anchors depend only on feature-map sizes, which are static under jit,
so they are computed with NumPy in float64 and returned as float32 ``jnp`` constants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["cell_anchors", "generate_anchors"]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """The (len(sizes) * len(aspect_ratios), 4) xyxy anchors centred on (0, 0), size-major."""
    out = []
    for size in sizes:
        area = float(size) ** 2.0
        for ar in aspect_ratios:
            if ar <= 0:
                raise ValueError(
                    f"hassod_jax/ops/anchors.py: aspect ratios must be > 0, got {aspect_ratios}"
                )
            w = math.sqrt(area / ar)
            h = ar * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return np.asarray(out, np.float64).reshape(-1, 4)


def generate_anchors(
    feature_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int] = (4, 8, 16, 32, 64),
    sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0),
    offset: float = 0.0,
) -> list:
    """Anchors for every feature level.

    Args:
      feature_shapes: [(h, w), ...] static feature-map sizes, one per level.
      strides: stride in input pixels of each level.
      sizes: anchor sizes per level (a tuple per level, as detectron2's ANCHOR_GENERATOR.SIZES);
        a flat tuple or a single tuple is shared by all levels (detectron2's broadcast rule).
      aspect_ratios: h/w ratios, either one tuple shared by all levels or one per level.
      offset: relative offset of the first anchor centre within a cell, in [0, 1).

    Returns:
      list of (h * w * A, 4) float32 arrays, xyxy in input-image pixels, ordered
      (y, x, anchor) with x varying faster than y.
    """
    n = len(feature_shapes)
    if len(sizes) > 0 and not isinstance(sizes[0], (tuple, list)):
        sizes = [tuple(sizes)] * n  # one list of sizes shared by all levels, as detectron2
    elif len(sizes) == 1:
        sizes = list(sizes) * n
    if len(strides) != n or len(sizes) != n:
        raise ValueError(
            "hassod_jax/ops/anchors.py: feature_shapes, strides and sizes must have one entry per "
            f"level, got {n}, {len(strides)} and {len(sizes)}"
        )
    if not 0.0 <= offset < 1.0:
        raise ValueError(f"hassod_jax/ops/anchors.py: offset must be in [0, 1), got {offset}")
    if len(aspect_ratios) > 0 and isinstance(aspect_ratios[0], (tuple, list)):
        ratios_per_level = list(aspect_ratios)
        if len(ratios_per_level) != n:
            raise ValueError(
                "hassod_jax/ops/anchors.py: per-level aspect_ratios must have one entry per level"
            )
    else:
        ratios_per_level = [aspect_ratios] * n
    out = []
    for (h, w), stride, lvl_sizes, ratios in zip(feature_shapes, strides, sizes, ratios_per_level):
        base = cell_anchors(lvl_sizes, ratios).astype(np.float32)
        # float32 cell anchors and float32 arange, summed in float32, like detectron2's
        # buffers and _create_grid_offsets.
        shift_x = np.arange(offset * stride, w * stride, step=stride, dtype=np.float32)[:w]
        shift_y = np.arange(offset * stride, h * stride, step=stride, dtype=np.float32)[:h]
        sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
        sx = sx.reshape(-1)
        sy = sy.reshape(-1)
        shifts = np.stack([sx, sy, sx, sy], axis=1)
        anchors = (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)
        out.append(jnp.asarray(anchors, jnp.float32))
    return out
