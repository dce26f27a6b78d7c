"""Region proposal network (docs/recipe.md, Stage 2; detectron2 `modeling/proposal_generator/
rpn.py` and `proposal_utils.py`, re-implemented with static shapes).

Anchors of one level are ordered (y, x, anchor) like detectron2, which is also the order
of the NHWC head outputs reshaped to (B, H*W*A) / (B, H*W*A, 4).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hassod_jax import ops


def rpn_box_coder():
    # detectron2's RPN uses Box2BoxTransform weights (1, 1, 1, 1).
    return ops.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


_normal_001 = nn.initializers.normal(0.01)


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, 1x1 objectness (A) and 1x1 deltas (4A), std-0.01 init.

    `__call__(feats)`: list of (B, H_l, W_l, C) -> (list of (B, H_l*W_l*A) logits,
    list of (B, H_l*W_l*A, 4) deltas), in float32.
    """

    num_anchors: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jnp.ndarray]):
        c = feats[0].shape[-1]
        kw = dict(kernel_init=_normal_001, dtype=self.dtype, param_dtype=jnp.float32)
        conv = nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), name="conv", **kw)
        obj = nn.Conv(self.num_anchors, (1, 1), name="objectness_logits", **kw)
        dl = nn.Conv(4 * self.num_anchors, (1, 1), name="anchor_deltas", **kw)
        logits, deltas = [], []
        for f in feats:
            t = nn.relu(conv(f))
            b = f.shape[0]
            logits.append(obj(t).reshape(b, -1).astype(jnp.float32))
            deltas.append(dl(t).reshape(b, -1, 4).astype(jnp.float32))
        return logits, deltas


def rpn_targets(
    anchors,
    gt_boxes,
    gt_valid,
    key,
    *,
    iou_thresholds=(0.3, 0.7),
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
):
    """Labels and regression targets of all anchors of ONE image.

    Args:
      anchors: (N, 4) xyxy, all levels concatenated.
      gt_boxes: (G, 4) xyxy; gt_valid: (G,) bool.
      key: PRNG key of the sampler.
    Returns:
      labels (N,) int32: 1 sampled positive, 0 sampled negative, -1 not sampled;
      gt_deltas (N, 4) float32 (meaningful where labels == 1).
    """
    n = anchors.shape[0]
    iou = ops.box_iou(gt_boxes, anchors)  # (G, N)
    matched_idx, match_labels = ops.match(
        iou, gt_valid, list(iou_thresholds), [0, -1, 1], allow_low_quality_matches=True
    )
    idx, is_fg, valid = ops.sample_fg_bg(key, match_labels, batch_size_per_image, positive_fraction)
    labels = jnp.full((n,), -1, jnp.int32)
    labels = labels.at[jnp.where(valid, idx, n)].set(is_fg.astype(jnp.int32), mode="drop")
    matched = gt_boxes[jnp.clip(matched_idx, 0, gt_boxes.shape[0] - 1)]
    gt_deltas = rpn_box_coder().encode(anchors, matched)
    return labels, gt_deltas


def find_top_proposals(
    logits: Sequence[jnp.ndarray],
    deltas: Sequence[jnp.ndarray],
    anchors: Sequence[jnp.ndarray],
    image_size,
    *,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
):
    """Proposals of ONE image (detectron2 `find_top_rpn_proposals`, static shapes).

    Per level the `pre_nms_topk` highest-scoring anchors are decoded; all levels are
    concatenated, clipped to `image_size` (h, w), empty or non-finite boxes are invalid,
    and a per-level NMS keeps the best `post_nms_topk` over all levels.

    Args:
      logits: per level (N_l,) objectness logits; deltas: per level (N_l, 4);
      anchors: per level (N_l, 4) xyxy; image_size: (2,) (height, width) of the content.
    Returns:
      boxes (P, 4) xyxy, scores (P,) logits, valid (P,) bool; P = post_nms_topk,
      sorted by descending score; gradients are stopped (proposals are constants).
    """
    boxes_l, scores_l, lvl_l = [], [], []
    for lvl, (lg, dl, an) in enumerate(zip(logits, deltas, anchors)):
        k = min(pre_nms_topk, lg.shape[0])
        s, i = jax.lax.top_k(lg, k)
        boxes_l.append(rpn_box_coder().decode(dl[i], an[i]))
        scores_l.append(s)
        lvl_l.append(jnp.full((k,), lvl, jnp.int32))
    boxes = jax.lax.stop_gradient(jnp.concatenate(boxes_l))
    scores = jax.lax.stop_gradient(jnp.concatenate(scores_l))
    levels = jnp.concatenate(lvl_l)
    boxes = ops.clip_boxes(boxes, image_size[0], image_size[1])
    valid = (
        jnp.all(jnp.isfinite(boxes), axis=-1)
        & jnp.isfinite(scores)
        & (boxes[:, 2] > boxes[:, 0])
        & (boxes[:, 3] > boxes[:, 1])
    )
    boxes = jnp.where(valid[:, None], boxes, 0.0)
    scores = jnp.where(valid, scores, -jnp.inf)
    keep, kvalid = ops.batched_nms(boxes, scores, levels, nms_thresh, post_nms_topk, valid_in=valid)
    return boxes[keep], scores[keep], kvalid
