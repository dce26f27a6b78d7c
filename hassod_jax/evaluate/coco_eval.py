"""Class-agnostic COCO evaluation (HASSOD_SPEC.md §2.4) with pycocotools COCOeval.

- Every ground-truth category is mapped to one class; `iscrowd` is kept (crowd regions are
  ignored the COCO way).
- Predictions: dicts with `image_id`, `segmentation` (RLE with str/bytes counts, uncompressed
  RLE, or polygons) and/or `bbox` [x, y, w, h]; optional `score` (default 1.0) and
  `hier_level`. Their `category_id` is ignored.
- As detectron2's COCOEvaluator does, box evaluation uses the predicted boxes (box area for
  the area ranges; a box missing from a mask prediction is taken from the mask) and mask
  evaluation uses the masks only (mask area).
- maxDets default (1, 10, 100, 1000). COCOeval.summarize hard-codes maxDets[2] for AP, so
  metrics are read from `eval['precision']` / `eval['recall']` here: AP, AP50, AP75 and
  APs/APm/APl at the LARGEST maxDet (as HASSOD's evaluator, whose AP uses 1000 detections),
  AR@m for every maxDet m, and ARs/ARm/ARl at the largest. Values are fractions in [0, 1];
  -1 where undefined (no ground truth in that range), as pycocotools reports.
- With `hier_level` on predictions, the metrics are also computed for each level's
  predictions alone (`by_level`).
"""

import contextlib
import io
import os

import numpy as np

from hassod_jax import utils

DEFAULT_MAX_DETS = (1, 10, 100, 1000)
IOU_TYPES = ("bbox", "segm")


def _prepare_gt(gt):
    """COCO dict or path -> class-agnostic COCO dict (a copy)."""
    from hassod_jax.data.coco import (
        image_sizes,
        load_coco_json,
        to_class_agnostic,
        validate_coco_dict,
    )

    if isinstance(gt, (str, os.PathLike)):
        data = load_coco_json(gt)
    else:
        data = validate_coco_dict(gt, source="ground-truth COCO dict")
    data = to_class_agnostic(data)
    sizes = image_sizes(data)
    anns = []
    for i, a in enumerate(data["annotations"]):
        a = dict(a)
        a.setdefault("iscrowd", 0)
        a.setdefault("id", i + 1)
        if "area" not in a:  # COCOeval needs it for the area ranges
            a["area"] = _area_of(a, sizes.get(a["image_id"]))
        anns.append(a)
    ids = [a["id"] for a in anns]
    if len(set(ids)) != len(ids):  # COCO indexes by id: duplicate ids would drop annotations
        for i, a in enumerate(anns):
            a["id"] = i + 1
    data["annotations"] = anns
    return data


def _area_of(ann, size):
    """Area of a ground-truth annotation that lacks 'area': mask area, else box area."""
    from hassod_jax.data.coco import segmentation_to_rle

    if "segmentation" in ann and size is not None:
        from pycocotools import mask as mask_utils

        return float(mask_utils.area(segmentation_to_rle(ann["segmentation"], *size)))
    if "bbox" in ann:
        return float(ann["bbox"][2] * ann["bbox"][3])
    raise ValueError(
        f"ground-truth annotation {ann.get('id', '?')} has no area, bbox or "
        "segmentation with a known image size"
    )


def _coco_api(data):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = data
        api.createIndex()
    return api


def _prepare_predictions(predictions, gt_data):
    """Validates predictions; returns a list of dicts with compressed-RLE masks (bytes counts)."""
    from hassod_jax.data.coco import image_sizes, segmentation_to_rle

    if not isinstance(predictions, (list, tuple)):
        raise ValueError(f"predictions must be a list of dicts, got {type(predictions).__name__}")
    sizes = image_sizes(gt_data)
    gt_ids = {im["id"] for im in gt_data["images"]}
    unknown = sorted(
        {p.get("image_id") for p in predictions if p.get("image_id") not in gt_ids}, key=str
    )
    if unknown:
        raise ValueError(
            f"{len(unknown)} prediction image id(s) are not in the ground truth, e.g. "
            f"{unknown[:5]}; predictions must use the ground-truth file's image ids"
        )
    out = []
    for i, p in enumerate(predictions):
        if "segmentation" not in p and "bbox" not in p:
            raise ValueError(
                f"prediction {i} (image {p['image_id']}) has neither 'segmentation' nor 'bbox'"
            )
        q = {"image_id": p["image_id"], "category_id": 1, "score": float(p.get("score", 1.0))}
        if "hier_level" in p:
            q["hier_level"] = int(p["hier_level"])
        if "segmentation" in p:
            if p["image_id"] not in sizes:
                raise ValueError(
                    f"ground-truth image {p['image_id']} has no height/width, "
                    "needed to read mask predictions"
                )
            h, w = sizes[p["image_id"]]
            try:
                q["segmentation"] = segmentation_to_rle(p["segmentation"], h, w)
            except ValueError as e:
                raise ValueError(f"prediction {i} (image {p['image_id']}): {e}") from None
        if "bbox" in p:
            q["bbox"] = [float(v) for v in p["bbox"]]
            if len(q["bbox"]) != 4:
                raise ValueError(f"prediction {i}: bbox must be [x, y, w, h], got {p['bbox']}")
        out.append(q)
    return out


def _summary(e, max_dets):
    """Metrics from a COCOeval after accumulate(), at the right maxDet indices."""
    p = e.params
    prec = e.eval["precision"]  # (T, R, K, A, M)
    rec = e.eval["recall"]  # (T, K, A, M)
    m_last = len(p.maxDets) - 1
    area = {lbl: i for i, lbl in enumerate(p.areaRngLbl)}

    def mean_valid(x):
        x = x[x > -1]
        return float(np.mean(x)) if x.size else -1.0

    def ap(t=None, a="all"):
        s = prec if t is None else prec[np.where(np.isclose(p.iouThrs, t))[0]]
        return mean_valid(s[:, :, :, area[a], m_last])

    def ar(m, a="all"):
        return mean_valid(rec[:, :, area[a], m])

    out = {
        "AP": ap(),
        "AP50": ap(0.5),
        "AP75": ap(0.75),
        "APs": ap(a="small"),
        "APm": ap(a="medium"),
        "APl": ap(a="large"),
    }
    for m, md in enumerate(p.maxDets):
        out[f"AR@{md}"] = ar(m)
    out["ARs"] = ar(m_last, "small")
    out["ARm"] = ar(m_last, "medium")
    out["ARl"] = ar(m_last, "large")
    return out


def _zero_summary(max_dets, has_gt):
    v = 0.0 if has_gt else -1.0
    out = {k: v for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    out.update({f"AR@{m}": v for m in max_dets})
    out.update({k: v for k in ("ARs", "ARm", "ARl")})
    return out


def _evaluate_one(gt_api, gt_data, preds, iou_type, max_dets):
    from pycocotools.cocoeval import COCOeval

    has_gt = any(not a.get("iscrowd", 0) for a in gt_data["annotations"])
    if iou_type == "segm":
        if any("segmentation" not in a for a in gt_data["annotations"]):
            return {"skipped": "ground truth without 'segmentation'"}
        if any("segmentation" not in q for q in preds):
            return {"skipped": "predictions without 'segmentation'"}
        dts = [{k: v for k, v in q.items() if k != "bbox"} for q in preds]
    else:
        if any("bbox" not in a for a in gt_data["annotations"]):
            return {"skipped": "ground truth without 'bbox'"}
        dts = []
        for q in preds:
            d = {k: v for k, v in q.items() if k != "segmentation"}
            if "bbox" not in d:
                from pycocotools import mask as mask_utils

                d["bbox"] = [float(v) for v in mask_utils.toBbox(q["segmentation"])]
            dts.append(d)
    if not dts:
        return _zero_summary(max_dets, has_gt)
    with contextlib.redirect_stdout(io.StringIO()):
        # `dts` are fresh dicts (loadRes adds keys to them); the RLEs inside are not modified.
        dt_api = gt_api.loadRes(dts)
        e = COCOeval(gt_api, dt_api, iou_type)
        e.params.maxDets = list(max_dets)
        e.evaluate()
        e.accumulate()
    return _summary(e, max_dets)


def evaluate_coco(gt_json_or_dict, predictions, iou_types=IOU_TYPES, max_dets=DEFAULT_MAX_DETS):
    """Class-agnostic COCO metrics of `predictions` against a ground-truth COCO file or dict.

    Returns {iou_type: {AP, AP50, AP75, APs, APm, APl, AR@m..., ARs, ARm, ARl}} plus, when
    predictions carry `hier_level`, {'by_level': {level: {iou_type: metrics}}}, and
    'num_predictions'. An iou_type that cannot be evaluated (e.g. masks missing) maps to
    {'skipped': reason}.
    """
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    for t in iou_types:
        if t not in IOU_TYPES:
            raise ValueError(f"iou_types must be among {IOU_TYPES}, got {t!r}")
    max_dets = tuple(int(m) for m in max_dets)
    if len(max_dets) < 1 or list(max_dets) != sorted(max_dets):
        raise ValueError(f"max_dets must be an increasing sequence, got {max_dets}")
    gt_data = _prepare_gt(gt_json_or_dict)
    preds = _prepare_predictions(predictions, gt_data)
    gt_api = _coco_api(gt_data)
    result = {t: _evaluate_one(gt_api, gt_data, preds, t, max_dets) for t in iou_types}
    result["num_predictions"] = len(preds)
    levels = sorted({q["hier_level"] for q in preds if "hier_level" in q})
    if levels:
        result["by_level"] = {}
        for lv in levels:
            sub = [q for q in preds if q.get("hier_level") == lv]
            result["by_level"][str(lv)] = {
                t: _evaluate_one(gt_api, gt_data, sub, t, max_dets) for t in iou_types
            }
            result["by_level"][str(lv)]["num_predictions"] = len(sub)
    return result


def _load_predictions(path):
    """A predictions file: a list of result dicts, or a COCO dict whose annotations are used."""
    data = utils.read_json(path, what="predictions JSON file")
    if isinstance(data, dict):
        if "annotations" not in data:
            raise ValueError(
                f"predictions JSON file {path}: expected a list of results or a COCO "
                "dict with 'annotations'"
            )
        data = data["annotations"]
    if not isinstance(data, list):
        raise ValueError(
            f"predictions JSON file {path}: expected a list, got {type(data).__name__}"
        )
    return data


def run(config, workdir):
    """mode=evaluate: config.gt_json, config.predictions_json, optional config.output
    (default workdir/eval.json), optional config.iou_types and config.max_dets."""
    from absl import logging

    utils.require(config, "gt_json", "predictions_json", mode="evaluate")
    output = config.get("output") or os.path.join(workdir, "eval.json")
    iou_types = tuple(config.get("iou_types") or IOU_TYPES)
    max_dets = tuple(config.get("max_dets") or DEFAULT_MAX_DETS)
    preds = _load_predictions(config.predictions_json)
    metrics = evaluate_coco(config.gt_json, preds, iou_types=iou_types, max_dets=max_dets)
    metrics["gt_json"] = str(config.gt_json)
    metrics["predictions_json"] = str(config.predictions_json)
    utils.atomic_write_json(output, metrics, indent=1)
    for t in iou_types:
        m = metrics[t]
        if "skipped" in m:
            logging.info("%s: skipped (%s)", t, m["skipped"])
        else:
            logging.info("%s: %s", t, ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    logging.info("Wrote %s", output)
    return metrics
