"""Greedy non-maximum suppression with static shapes (tiled, padded).

Same keep set as ``torchvision.ops.nms`` (greedy in descending score order; a box is
suppressed when its IoU with an already kept box is ``> iou_threshold``), computed
without a serial per-box loop and without a K x K IoU matrix:

* boxes are sorted by score and cut into tiles of ``tile_size`` boxes;
* a ``while_loop`` walks the tiles in order and stops as soon as ``max_output`` boxes are
  kept (or the tiles run out);
* a tile is first suppressed by the boxes kept so far, held in a compact
  ``(max_output, 4)`` buffer (one ``(tile, max_output)`` IoU block), then by itself with a
  fixed-point iteration on the ``(tile, tile)`` upper-triangular IoU block: after ``n``
  rounds the first ``n`` boxes of the tile are final, so it converges to the greedy result
  (idea from TF's ``non_max_suppression_padded`` and scenic, which iterate the same
  within-tile suppression until it stops changing);
* the survivors are appended to the buffer.

Work is O(K * max_output + K * tile) IoUs and memory O(tile * (tile + max_output)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hassod_jax.ops.boxes import box_iou

__all__ = ["nms", "batched_nms"]


def _check(boxes, scores, max_output, valid_in, idxs=None):
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(
            f"hassod_jax/ops/nms.py: `boxes` must be (K, 4) xyxy, got {tuple(boxes.shape)}"
        )
    k = boxes.shape[0]
    if scores.shape != (k,):
        raise ValueError(
            f"hassod_jax/ops/nms.py: `scores` must be ({k},) to match boxes, "
            f"got {tuple(scores.shape)}"
        )
    if valid_in is not None and valid_in.shape != (k,):
        raise ValueError(
            f"hassod_jax/ops/nms.py: `valid_in` must be ({k},), got {tuple(valid_in.shape)}"
        )
    if idxs is not None and idxs.shape != (k,):
        raise ValueError(f"hassod_jax/ops/nms.py: `idxs` must be ({k},), got {tuple(idxs.shape)}")
    if (
        isinstance(max_output, bool)
        or not isinstance(max_output, (int, np.integer))
        or (max_output < 1)
    ):
        raise ValueError(
            f"hassod_jax/ops/nms.py: `max_output` must be a static int >= 1, got {max_output!r}"
        )


def _nms_impl(boxes, scores, idxs, iou_threshold, max_output, valid_in, tile_size):
    boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
    scores = jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))
    valid_in = None if valid_in is None else jnp.asarray(valid_in, bool)
    idxs = None if idxs is None else jnp.asarray(idxs, jnp.int32)
    _check(boxes, scores, max_output, valid_in, idxs)
    k = boxes.shape[0]
    iou_threshold = jnp.asarray(iou_threshold, jnp.float32)

    valid = ~jnp.isnan(scores)
    if valid_in is not None:
        valid = valid & valid_in
    key = jnp.where(valid, scores, -jnp.inf)
    order = jnp.argsort(-key, stable=True).astype(jnp.int32)

    tile = max(1, min(int(tile_size), k))
    n_tiles = -(-k // tile)
    kp = n_tiles * tile
    pad = kp - k
    s_boxes = jnp.pad(boxes[order], ((0, pad), (0, 0)))
    s_valid = jnp.pad(valid[order], (0, pad))
    s_order = jnp.pad(order, (0, pad))
    s_cls = None if idxs is None else jnp.pad(idxs[order], (0, pad))

    m = int(max_output)
    # Strict upper triangle: row j (higher score) may suppress column l > j.
    earlier = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]

    def cond(state):
        i, count = state[0], state[1]
        return (i < n_tiles) & (count < m)

    def body(state):
        i, count, kb, kc, ki = state
        start = i * tile
        cur_b = jax.lax.dynamic_slice_in_dim(s_boxes, start, tile)
        cur_v = jax.lax.dynamic_slice_in_dim(s_valid, start, tile)
        cur_o = jax.lax.dynamic_slice_in_dim(s_order, start, tile)

        # Suppression by the boxes kept in earlier tiles.
        iou_prev = box_iou(cur_b, kb)  # (tile, m)
        hit_prev = (iou_prev > iou_threshold) & (jnp.arange(m) < count)[None, :]
        if s_cls is not None:
            cur_c = jax.lax.dynamic_slice_in_dim(s_cls, start, tile)
            hit_prev = hit_prev & (cur_c[:, None] == kc[None, :])
        init = cur_v & ~jnp.any(hit_prev, axis=1)

        # Suppression inside the tile, iterated to the greedy fixed point.
        iou_self = box_iou(cur_b, cur_b)
        hit_self = (iou_self > iou_threshold) & earlier
        if s_cls is not None:
            hit_self = hit_self & (cur_c[:, None] == cur_c[None, :])

        def fp_cond(c):
            return c[1]

        def fp_body(c):
            keep, _ = c
            new = init & ~jnp.any(hit_self & keep[:, None], axis=0)
            return new, jnp.any(new != keep)

        keep, _ = jax.lax.while_loop(fp_cond, fp_body, (init, jnp.array(True)))

        # Append survivors, in score order, to the compact buffers.
        pos = count + jnp.cumsum(keep.astype(jnp.int32)) - 1
        dest = jnp.where(keep & (pos < m), pos, m)  # m = out of range -> dropped
        kb = kb.at[dest].set(cur_b, mode="drop")
        ki = ki.at[dest].set(cur_o, mode="drop")
        if s_cls is not None:
            kc = kc.at[dest].set(cur_c, mode="drop")
        count = jnp.minimum(count + jnp.sum(keep.astype(jnp.int32)), m)
        return i + 1, count, kb, kc, ki

    state = (
        jnp.array(0, jnp.int32),
        jnp.array(0, jnp.int32),
        jnp.zeros((m, 4), jnp.float32),
        jnp.zeros((m,), jnp.int32),
        jnp.zeros((m,), jnp.int32),
    )
    _, count, _, _, kept_idx = jax.lax.while_loop(cond, body, state)
    out_valid = jnp.arange(m) < count
    return jnp.where(out_valid, kept_idx, 0), out_valid


def nms(boxes, scores, iou_threshold, max_output, valid_in=None, *, tile_size=512):
    """Greedy NMS with a fixed-size result.

    Args:
      boxes: (K, 4) float32, xyxy.
      scores: (K,) float32. NaN scores count as invalid.
      iou_threshold: float (may be traced); a box is dropped when IoU > threshold with a
        kept, higher-scored box (torchvision semantics).
      max_output: static int, number of returned slots.
      valid_in: optional (K,) bool; False entries (padding) are never kept and suppress
        nothing.
      tile_size: static int, boxes processed per tile.

    Returns:
      indices: (max_output,) int32 into ``boxes``, kept boxes in descending score order,
        then zeros.
      valid: (max_output,) bool, True for the first ``min(#kept, max_output)`` slots.
    """
    return _nms_impl(boxes, scores, None, iou_threshold, max_output, valid_in, tile_size)


def batched_nms(boxes, scores, idxs, iou_threshold, max_output, valid_in=None, *, tile_size=512):
    """Class-aware NMS: boxes only suppress boxes with the same ``idxs`` (K,) int.

    Same keep set as ``torchvision.ops.batched_nms``. torchvision gets there by offsetting
    each class's boxes by ``idx * (max_coord + 1)`` (which costs float32 precision at large
    offsets); here the IoU of boxes of different classes is masked instead, which is the
    exact per-class NMS that the offset trick stands for. Returns as :func:`nms`, merged
    across classes in descending score order.
    """
    if idxs is None:
        raise ValueError("hassod_jax/ops/nms.py: batched_nms needs `idxs` (K,) int")
    return _nms_impl(boxes, scores, idxs, iou_threshold, max_output, valid_in, tile_size)
