"""Axis-aligned box utilities: area, pairwise IoU, clipping and detectron2's box coder.

All boxes are ``xyxy`` float32 in input-image pixels, i.e. ``(x1, y1, x2, y2)`` with
``x2 >= x1`` for a non-empty box. Widths are ``x2 - x1`` (no ``+ 1``), as detectron2.
Every function is pure ``jnp``, shape-static and safe under ``jit``/``vmap``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

__all__ = ["box_area", "box_iou", "clip_boxes", "BoxCoder"]


def _check_last_dim(name: str, arr) -> None:
    if arr.ndim < 1 or arr.shape[-1] != 4:
        raise ValueError(
            f"hassod_jax/ops/boxes.py: `{name}` must have a trailing dimension of 4 (xyxy), "
            f"got shape {tuple(arr.shape)}"
        )


def box_area(boxes):
    """Area of ``boxes`` (..., 4) xyxy -> (...,) float32. Inverted boxes give a negative
    area, exactly like detectron2's ``Boxes.area`` (callers clip or filter first)."""
    boxes = jnp.asarray(boxes, jnp.float32)
    _check_last_dim("boxes", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a, b):
    """Pairwise IoU of ``a`` (N, 4) and ``b`` (M, 4), xyxy -> (N, M) float32.

    Same arithmetic as ``torchvision.ops.box_iou`` / detectron2 ``pairwise_iou``:
    ``inter / (area_a + area_b - inter)``; where the union is not positive the IoU is 0
    (detectron2 returns 0 there; torchvision would return NaN for 0/0).
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    _check_last_dim("a", a)
    _check_last_dim("b", b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(
            "hassod_jax/ops/boxes.py: box_iou expects `a` (N, 4) and `b` (M, 4), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    area_a = box_area(a)
    area_b = box_area(b)
    # Coordinate by coordinate: no (N, M, 2) intermediates (accelerators pad a trailing
    # dimension of 2 to a whole tile; 1000 boxes x 268k anchors took 2 GB that way).
    x1 = jnp.maximum(a[:, None, 0], b[None, :, 0])
    y1 = jnp.maximum(a[:, None, 1], b[None, :, 1])
    x2 = jnp.minimum(a[:, None, 2], b[None, :, 2])
    y2 = jnp.minimum(a[:, None, 3], b[None, :, 3])
    w = jnp.maximum(x2 - x1, 0.0)
    h = jnp.maximum(y2 - y1, 0.0)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def clip_boxes(boxes, height, width):
    """Clip ``boxes`` (..., 4) xyxy to ``[0, width] x [0, height]``.

    ``height``/``width`` may be Python numbers or traced scalars (per-image sizes of a
    padded batch), as detectron2's ``Boxes.clip((h, w))``.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    _check_last_dim("boxes", boxes)
    h = jnp.asarray(height, jnp.float32)
    w = jnp.asarray(width, jnp.float32)
    x1 = jnp.clip(boxes[..., 0], 0.0, w)
    y1 = jnp.clip(boxes[..., 1], 0.0, h)
    x2 = jnp.clip(boxes[..., 2], 0.0, w)
    y2 = jnp.clip(boxes[..., 3], 0.0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


@dataclasses.dataclass(frozen=True)
class BoxCoder:
    """detectron2's ``Box2BoxTransform`` (learned from
    facebookresearch/detectron2 ``modeling/box_regression.py``).

    ``weights`` = (wx, wy, ww, wh) scale the deltas; ``scale_clamp`` caps ``dw``/``dh``
    before ``exp`` so a large predicted delta cannot overflow. Frozen (hashable) so it can
    be a static field of a Flax module or a static jit argument.
    """

    weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    scale_clamp: float = math.log(1000.0 / 16)

    def __post_init__(self):
        if len(self.weights) != 4:
            raise ValueError(
                f"hassod_jax/ops/boxes.py: BoxCoder.weights must have 4 entries, got {self.weights}"
            )
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    def encode(self, proposals, targets):
        """Deltas (..., 4) float32 that turn ``proposals`` (..., 4) into ``targets`` (..., 4).

        Both xyxy; shapes must broadcast. detectron2 asserts positive proposal widths;
        here a pair where either box has a non-positive width or height (typically
        padding) gets deltas 0, so that a masked loss over padded entries stays free of
        NaN values and NaN gradients.
        """
        proposals = jnp.asarray(proposals, jnp.float32)
        targets = jnp.asarray(targets, jnp.float32)
        _check_last_dim("proposals", proposals)
        _check_last_dim("targets", targets)
        wx, wy, ww, wh = self.weights
        src_w = proposals[..., 2] - proposals[..., 0]
        src_h = proposals[..., 3] - proposals[..., 1]
        src_cx = proposals[..., 0] + 0.5 * src_w
        src_cy = proposals[..., 1] + 0.5 * src_h
        tgt_w = targets[..., 2] - targets[..., 0]
        tgt_h = targets[..., 3] - targets[..., 1]
        tgt_cx = targets[..., 0] + 0.5 * tgt_w
        tgt_cy = targets[..., 1] + 0.5 * tgt_h
        ok = (src_w > 0) & (src_h > 0) & (tgt_w > 0) & (tgt_h > 0)
        src_w = jnp.where(ok, src_w, 1.0)
        src_h = jnp.where(ok, src_h, 1.0)
        dx = wx * (tgt_cx - src_cx) / src_w
        dy = wy * (tgt_cy - src_cy) / src_h
        dw = ww * jnp.log(jnp.where(ok, tgt_w, 1.0) / src_w)
        dh = wh * jnp.log(jnp.where(ok, tgt_h, 1.0) / src_h)
        deltas = jnp.stack([dx, dy, dw, dh], axis=-1)
        return jnp.where(ok[..., None], deltas, 0.0)

    def decode(self, deltas, boxes):
        """Apply ``deltas`` (..., 4) to reference ``boxes`` (..., 4) xyxy -> (..., 4) xyxy."""
        deltas = jnp.asarray(deltas, jnp.float32)
        boxes = jnp.asarray(boxes, jnp.float32)
        _check_last_dim("deltas", deltas)
        _check_last_dim("boxes", boxes)
        wx, wy, ww, wh = self.weights
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        ctr_x = boxes[..., 0] + 0.5 * widths
        ctr_y = boxes[..., 1] + 0.5 * heights
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = jnp.minimum(deltas[..., 2] / ww, self.scale_clamp)
        dh = jnp.minimum(deltas[..., 3] / wh, self.scale_clamp)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        pred_w = jnp.exp(dw) * widths
        pred_h = jnp.exp(dh) * heights
        # detectron2 computes x1 = cx - 0.5 w, x2 = cx + 0.5 w (same order of operations).
        half_w = 0.5 * pred_w
        half_h = 0.5 * pred_h
        return jnp.stack(
            [pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h],
            axis=-1,
        )
