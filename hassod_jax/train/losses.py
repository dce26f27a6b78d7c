"""Detector losses (docs/recipe.md, Stage 2: the detector), normalised as detectron2 does.

All functions take padded, static-shape arrays with explicit masks:
- RPN (detectron2 `RPN.losses`): objectness BCE summed over the sampled anchors and box L1
  (smooth-L1 with beta 0) summed over the positive anchors, both divided by
  `batch_size_per_image * num_images`.
- Fast R-CNN per cascade stage (detectron2 `FastRCNNOutputLayers.losses`): softmax
  cross-entropy averaged over the sampled proposals (with CutLER's DropLoss weights when
  given: the mean of w * CE over all sampled proposals), class-agnostic box L1 summed over
  the foreground proposals and divided by the number of sampled proposals.
- Level head (HASSOD): sigmoid focal loss (alpha 0.25, gamma 2) with one-hot targets,
  mean over the elements (num_fg x 3) of the foreground proposals.
- Mask (detectron2 `mask_rcnn_loss`): per-pixel BCE averaged over foreground x 28 x 28.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hassod_jax.ops import box_iou


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def bce_with_logits(logits, targets):
    """Elementwise binary cross-entropy with logits (torch's stable form). Any shape."""
    x, z = _f32(logits), _f32(targets)
    return jnp.maximum(x, 0.0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x)))


def softmax_cross_entropy(logits, labels):
    """logits (..., C), labels (...) int in [0, C) -> (...) float32 per-element CE."""
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise sigmoid focal loss, torchvision.ops.sigmoid_focal_loss(reduction='none')."""
    x, t = _f32(logits), _f32(targets)
    p = jax.nn.sigmoid(x)
    ce = bce_with_logits(x, t)
    p_t = p * t + (1.0 - p) * (1.0 - t)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return loss


def rpn_losses(objectness, pred_deltas, gt_deltas, labels, batch_size_per_image: int):
    """RPN losses over a batch.

    Args:
      objectness: (B, N) logits for all anchors.
      pred_deltas, gt_deltas: (B, N, 4) box deltas (gt deltas of each anchor's matched box).
      labels: (B, N) int, 1 = sampled positive, 0 = sampled negative, -1 = ignored.
      batch_size_per_image: the sampler's size (256); normaliser = it x B.
    Returns:
      (loss_cls, loss_box) float32 scalars.
    """
    norm = float(batch_size_per_image * objectness.shape[0])
    sampled = (labels >= 0).astype(jnp.float32)
    pos = (labels == 1).astype(jnp.float32)
    cls = jnp.sum(bce_with_logits(objectness, pos) * sampled) / norm
    # where, not multiply: gt deltas of unused anchors may be inf/NaN (degenerate boxes).
    l1 = jnp.sum(jnp.abs(_f32(pred_deltas) - _f32(gt_deltas)), axis=-1)
    box = jnp.sum(jnp.where(labels == 1, l1, 0.0)) / norm
    return cls, box


def droploss_weights(pred_boxes, gt_boxes, gt_valid, iou_threshold: float = 0.01):
    """CutLER DropLoss weights: 0 for a proposal whose predicted box overlaps no valid
    ground-truth box by more than `iou_threshold` (max IoU <= threshold), else 1.

    Args:
      pred_boxes: (R, 4) xyxy decoded predicted boxes.
      gt_boxes: (G, 4) xyxy; gt_valid: (G,) bool.
    Returns:
      (R,) float32 in {0, 1}.
    """
    iou = box_iou(_f32(pred_boxes), _f32(gt_boxes))  # (R, G)
    iou = jnp.where(gt_valid[None, :], iou, -1.0)
    return (jnp.max(iou, axis=1, initial=-1.0) > iou_threshold).astype(jnp.float32)


def droploss_weights_original(
    pred_boxes, matched_gt_boxes, valid, iou_threshold: float = 0.01, first: int = 100
):
    """DropLoss weights of ONE image's rows as HASSOD's code computes them
    (`custom_cascade_rcnn.py`, `_forward_box`): K = the number of distinct boxes among the
    matched-gt boxes of the first `first` rows; the reference set is the matched gt of the
    first K rows (it may repeat one gt and miss others); weight 0 where the row's predicted
    box has max IoU <= `iou_threshold` with the reference set, else 1.

    Args:
      pred_boxes: (R, 4) xyxy decoded (unclipped) boxes of the rows.
      matched_gt_boxes: (R, 4) each row's matched gt box (also for background rows).
      valid: (R,) bool; the rows' order is the sampler's (positives, then negatives), and
        invalid slots are skipped when counting the first rows.
    Returns:
      (R,) float32 in {0, 1} (1 on invalid rows; they carry no loss anyway).
    """
    r = valid.shape[0]
    rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
    n = min(int(first), r)
    # The first n valid rows, in order.
    key = jnp.where(valid, rank, r + jnp.arange(r))
    head = jnp.argsort(key)[:n]
    head_ok = valid[head] & (rank[head] < n)
    head_boxes = _f32(matched_gt_boxes)[head]
    same = jnp.all(head_boxes[:, None, :] == head_boxes[None, :, :], axis=-1)
    earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)
    seen = jnp.any(same & earlier & head_ok[None, :], axis=1)
    k = jnp.sum(head_ok & ~seen)
    ref_ok = head_ok & (jnp.arange(n) < k)
    iou = box_iou(_f32(pred_boxes), head_boxes)  # (R, n)
    iou_max = jnp.max(jnp.where(ref_ok[None, :], iou, -1.0), axis=1, initial=-1.0)
    w = (iou_max > iou_threshold).astype(jnp.float32)
    return jnp.where(valid, w, 1.0)


def fast_rcnn_losses(cls_logits, pred_deltas, gt_deltas, is_fg, valid, cls_weights=None):
    """One cascade stage's classification and box losses over a batch.

    Args:
      cls_logits: (B, R, 2) logits, column 0 = foreground, 1 = background (detectron2).
      pred_deltas, gt_deltas: (B, R, 4) class-agnostic deltas (gt: of the matched box).
      is_fg: (B, R) bool; valid: (B, R) bool (padding slots are False).
      cls_weights: optional (B, R) DropLoss weights; the CE becomes
        sum(w * ce) / num_valid_proposals (CutLER's `(weights * ce).mean()`).
    Returns:
      (loss_cls, loss_box) float32 scalars.
    """
    valid_f = valid.astype(jnp.float32)
    fg = is_fg & valid
    n = jnp.maximum(jnp.sum(valid_f), 1.0)
    labels = jnp.where(is_fg, 0, 1)
    ce = softmax_cross_entropy(cls_logits, labels)
    w = valid_f if cls_weights is None else valid_f * _f32(cls_weights)
    # CutLER (cutler/modeling/roi_heads/fast_rcnn.py) computes (weights * ce).mean(): the
    # divisor is the number of proposals, not the sum of the weights.
    loss_cls = jnp.sum(ce * w) / n
    l1 = jnp.sum(jnp.abs(_f32(pred_deltas) - _f32(gt_deltas)), axis=-1)
    loss_box = jnp.sum(jnp.where(fg, l1, 0.0)) / n
    return loss_cls, loss_box


def level_loss(level_logits, levels, is_fg, alpha: float = 0.25, gamma: float = 2.0):
    """Hierarchy-level focal loss: level_logits (B, R, L), levels (B, R) int in [0, L),
    is_fg (B, R) bool (foreground and valid). Mean over the fg x L elements (0 if no fg)."""
    num_levels = level_logits.shape[-1]
    onehot = jax.nn.one_hot(levels, num_levels, dtype=jnp.float32)
    fl = sigmoid_focal_loss(level_logits, onehot, alpha, gamma)
    fg = is_fg.astype(jnp.float32)
    return jnp.sum(fl * fg[..., None]) / jnp.maximum(jnp.sum(fg) * num_levels, 1.0)


def mask_loss(mask_logits, gt_masks, is_fg):
    """mask_logits (B, R, M, M), gt_masks (B, R, M, M) in {0, 1}, is_fg (B, R) bool.
    Per-pixel BCE, mean over the fg x M x M elements (0 when there is no fg)."""
    m = mask_logits.shape[-1] * mask_logits.shape[-2]
    fg = is_fg.astype(jnp.float32)
    bce = bce_with_logits(mask_logits, gt_masks)
    return jnp.sum(bce * fg[..., None, None]) / jnp.maximum(jnp.sum(fg) * m, 1.0)
