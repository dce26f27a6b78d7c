"""Static-shape detection ops in pure ``jnp`` (no Flax): boxes, anchors, NMS, ROIAlign,
matching/sampling and mask resampling. Boxes are xyxy float32 in input-image pixels."""

from hassod_jax.ops.anchors import generate_anchors
from hassod_jax.ops.boxes import BoxCoder, box_area, box_iou, clip_boxes
from hassod_jax.ops.masks import crop_and_resize_gt_masks, paste_masks_in_image
from hassod_jax.ops.nms import batched_nms, nms
from hassod_jax.ops.roi_align import assign_boxes_to_levels, multilevel_roi_align, roi_align
from hassod_jax.ops.sampling import match, sample_fg_bg

__all__ = [
    "BoxCoder",
    "assign_boxes_to_levels",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "crop_and_resize_gt_masks",
    "generate_anchors",
    "match",
    "multilevel_roi_align",
    "nms",
    "paste_masks_in_image",
    "roi_align",
    "sample_fg_bg",
]
