"""Hierarchy-level accuracy of a detector's foreground detections against leveled ground truth."""

from __future__ import annotations

import os

import numpy as np

def level_accuracy(gt, predictions, iou_threshold=0.5, iou_type="bbox"):
    """Hierarchy-level accuracy of foreground detections.

    A prediction is foreground when its best-overlapping non-crowd ground-truth instance of
    the same image has IoU >= `iou_threshold` (boxes, or masks with iou_type='segm'); its
    level is correct when it equals that instance's `hier_level` (0 when absent).
    Returns (accuracy in [0, 1] or -1.0 when there is no foreground prediction, count).
    """
    from pycocotools import mask as mask_utils

    from hassod_jax.data.coco import image_sizes, load_coco_json, segmentation_to_rle

    data = load_coco_json(gt) if isinstance(gt, (str, os.PathLike)) else gt
    sizes = image_sizes(data)
    by_image = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            by_image.setdefault(a["image_id"], []).append(a)
    preds_by_image = {}
    for p in predictions:
        preds_by_image.setdefault(p["image_id"], []).append(p)
    correct = total = 0
    for image_id, preds in preds_by_image.items():
        anns = by_image.get(image_id, [])
        if not anns:
            continue
        h, w = sizes[image_id]
        if iou_type == "segm":
            g = [segmentation_to_rle(a["segmentation"], h, w) for a in anns]
            d = [segmentation_to_rle(p["segmentation"], h, w) for p in preds]
        else:
            g = [list(a["bbox"]) for a in anns]
            d = [list(p["bbox"]) for p in preds]
        ious = np.asarray(mask_utils.iou(d, g, [0] * len(g)), np.float64).reshape(len(d), len(g))
        best = ious.argmax(axis=1)
        fg = ious[np.arange(len(d)), best] >= iou_threshold
        gt_levels = np.asarray([int(a.get("hier_level", 0)) for a in anns])
        pred_levels = np.asarray([int(p.get("hier_level", 0)) for p in preds])
        total += int(fg.sum())
        correct += int((pred_levels[fg] == gt_levels[best[fg]]).sum())
    return (correct / total if total else -1.0), total
