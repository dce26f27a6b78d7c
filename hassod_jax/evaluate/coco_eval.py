"""Class-agnostic COCO evaluation with pycocotools COCOeval, by the original HASSOD's protocol.

The original protocol (docs/recipe.md, Evaluation; in the original HASSOD code, detectron2's
COCOEvaluator as HASSOD modifies it, `top1000=True`) is the default, and by default nothing
else is reported:
- pycocotools COCOeval with `params.maxDets = [10, 100, 1000]`;
- AP, AP50, AP75, APs, APm, APl, all at maxDets = 1000 (the original's `COCOevalMaxDets`
  reads every AP at maxDets[2]; pycocotools' own `summarize()` would read AP, and only AP, at
  100 detections);
- AR@10, AR@100, AR@1000, and ARs, ARm, ARl at 1000;
- bbox: the predicted boxes (box areas for the area ranges; a box missing from a mask
  prediction is taken from the mask); segm: the masks only, the predicted box removed, so
  the areas are mask areas;
- class-agnostic: every ground-truth category is mapped to one class, `iscrowd` is kept
  (crowd regions are ignored the COCO way); the predictions' `category_id` is ignored.
  COCOeval scores every image of the ground truth (one without predictions counts as missed).

Presentation, not numbers, differs from the original: values are fractions in [0, 1] (the
original prints them x100); -1 where pycocotools finds a metric undefined (no ground truth
in that range; the original prints NaN); with no prediction at all every metric is 0 (the
original skips COCOeval and prints NaN); recall keys are spelled `AR@m` (the original's
`ARm`, e.g. AR100).

Ours, not the original's, and only when asked for; every such key starts with `extra/`:
- `max_dets` values besides 10, 100 and 1000 (e.g. 1) add `extra/AR@m` to each IoU type.
  They leave the original numbers unchanged: COCOeval matches detections greedily in score
  order, so its results for the top m detections do not depend on the other maxDets.
- `extras` entries: `AR@<m>` (the same as adding m to `max_dets`) and `levels` (the metrics
  of each `hier_level`'s predictions alone, as `extra/level_<k>`).

Predictions: dicts with `image_id`, `segmentation` (RLE with str/bytes counts, uncompressed
RLE, or polygons) and/or `bbox` [x, y, w, h]; optional `score` (default 1.0) and
`hier_level`. A prediction on an image the ground truth lacks is refused unless
`restrict_to_gt` is set; then it is left out and counted.
"""

import contextlib
import io
import os

import numpy as np

from hassod_jax import utils
from hassod_jax.data.coco import (
    image_sizes,
    load_coco_json,
    segmentation_to_rle,
    to_class_agnostic,
    validate_coco_dict,
)

ORIGINAL_MAX_DETS = (10, 100, 1000)
DEFAULT_MAX_DETS = ORIGINAL_MAX_DETS
AP_MAX_DETS = 1000  # the original reads every AP, and ARs/ARm/ARl, at 1000 detections per image
AREA_KEYS = {"s": "small", "m": "medium", "l": "large"}
ORIGINAL_KEYS = (
    ("AP", "AP50", "AP75", "APs", "APm", "APl")
    + tuple(f"AR@{m}" for m in ORIGINAL_MAX_DETS)
    + ("ARs", "ARm", "ARl")
)
EXTRA_PREFIX = "extra/"
IOU_TYPES = ("bbox", "segm")
LIST_IDS_UP_TO = 100  # the output lists the scored image ids when there are at most this many


def _prepare_gt(gt):
    """COCO dict or path -> class-agnostic COCO dict (a copy)."""
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
    if "segmentation" in ann and size is not None:
        from pycocotools import mask as mask_utils

        return float(mask_utils.area(segmentation_to_rle(ann["segmentation"], *size)))
    if "bbox" in ann:
        return float(ann["bbox"][2] * ann["bbox"][3])
    raise utils.InputError(
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


def _sorted_ids(ids):
    """Image ids in order: numerically when they compare, else by their text."""
    ids = list(ids)
    try:
        return sorted(ids)
    except TypeError:
        return sorted(ids, key=str)


def _split_by_gt(predictions, gt_ids, restrict_to_gt, gt_source):
    """(kept predictions, left-out summary or None); refuses unknown images unless restricted."""
    if not isinstance(predictions, (list, tuple)):
        raise utils.InputError(
            f"predictions must be a list of dicts, got {type(predictions).__name__}"
        )
    for i, p in enumerate(predictions):
        if not isinstance(p, dict):
            raise utils.InputError(f"prediction {i} must be a dict, got {type(p).__name__}")
        if not isinstance(p.get("image_id"), (int, np.integer, str)):
            raise utils.InputError(
                f"prediction {i} needs an 'image_id' (an int or str), got {p.get('image_id')!r}"
            )
    kept = [p for p in predictions if p["image_id"] in gt_ids]
    unknown = _sorted_ids({p["image_id"] for p in predictions if p["image_id"] not in gt_ids})
    if unknown and not restrict_to_gt:
        raise utils.InputError(
            f"{len(unknown)} prediction image id(s) are not in the ground truth ({gt_source}), "
            f"e.g. {unknown[:5]}; use the ground truth's image ids, or set restrict_to_gt=True "
            "(--config.restrict_to_gt=True) to score only the ground truth's images and leave "
            "the other predictions out"
        )
    if not restrict_to_gt:
        return kept, None
    return kept, {
        "predictions": len(predictions) - len(kept),
        "images": len(unknown),
        "image_ids_sample": unknown[:10],
    }


def _prepare_predictions(predictions, gt_data):
    """Validates predictions; returns a list of dicts with compressed-RLE masks (bytes counts).
    A malformed prediction raises InputError naming it."""
    sizes = image_sizes(gt_data)
    out = []
    for i, p in enumerate(predictions):
        try:
            out.append(_prepare_prediction(p, sizes))
        except (TypeError, ValueError) as e:
            raise utils.InputError(f"prediction {i} (image {p['image_id']}): {e}") from None
    return out


def _prepare_prediction(p, sizes):
    if "segmentation" not in p and "bbox" not in p:
        raise ValueError("it has neither 'segmentation' nor 'bbox'")
    q = {"image_id": p["image_id"], "category_id": 1, "score": float(p.get("score", 1.0))}
    if "hier_level" in p:
        q["hier_level"] = int(p["hier_level"])
    if "segmentation" in p:
        if p["image_id"] not in sizes:
            raise ValueError(
                "its ground-truth image has no height/width, needed to read mask predictions"
            )
        q["segmentation"] = segmentation_to_rle(p["segmentation"], *sizes[p["image_id"]])
    if "bbox" in p:
        q["bbox"] = [float(v) for v in p["bbox"]]
        if len(q["bbox"]) != 4:
            raise ValueError(f"bbox must be [x, y, w, h], got {p['bbox']}")
    return q


def parse_extras(max_dets=DEFAULT_MAX_DETS, extras=()):
    """(extra maxDets not in the original's, sorted; whether per-level metrics are asked for).

    `extras`: a comma-separated string or a sequence of 'AR@<m>' and 'levels'.
    """
    if isinstance(extras, str):
        extras = [e for e in (s.strip() for s in extras.split(",")) if e]
    dets, levels = [], False
    for m in max_dets:
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"max_dets must be positive integers, got {tuple(max_dets)}")
        dets.append(int(m))
    for e in extras:
        name = str(e)
        if name == "levels":
            levels = True
        elif name.startswith("AR@") and name[3:].isdigit() and int(name[3:]) >= 1:
            dets.append(int(name[3:]))
        else:
            raise ValueError(
                f"extras: unknown entry {name!r}; known: 'AR@<m>' (recall at m detections "
                "per image) and 'levels' (each hier_level's predictions alone)"
            )
    extra_dets = tuple(sorted(set(dets) - set(ORIGINAL_MAX_DETS)))
    return extra_dets, levels


def protocol(max_dets=DEFAULT_MAX_DETS, extras=(), iou_types=IOU_TYPES):
    """What `evaluate_coco` computes with these arguments, for the output's `protocol` field."""
    extra_dets, levels = parse_extras(max_dets, extras)
    extra_keys = [f"{EXTRA_PREFIX}AR@{m}" for m in extra_dets]
    if levels:
        extra_keys.append(f"{EXTRA_PREFIX}level_<k>")
    out = {
        "name": "hassod_original",
        "description": (
            "the original HASSOD's evaluation (detectron2 COCOEvaluator, top1000=True): "
            "class-agnostic pycocotools COCOeval, maxDets [10, 100, 1000]; AP, AP50, AP75, "
            "APs, APm, APl at 1000 detections per image; AR@10, AR@100, AR@1000; ARs, ARm, "
            "ARl at 1000; segm with mask areas (predicted boxes removed), bbox with box areas"
        ),
        "iou_types": list(iou_types),
        "maxDets": list(ORIGINAL_MAX_DETS),
        "metrics": list(ORIGINAL_KEYS),
        "values": (
            "fractions in [0, 1] (the original prints x100); -1 where undefined (the "
            "original: NaN); 0 for every metric when there is no prediction (the original: NaN)"
        ),
        "extras": extra_keys,
    }
    if extra_keys:
        out["extras_note"] = (
            f"keys starting with '{EXTRA_PREFIX}' are this reimplementation's, not the "
            "original's; they leave the original's numbers unchanged"
        )
        out["cocoeval_maxDets"] = sorted(set(ORIGINAL_MAX_DETS) | set(extra_dets))
    return out


def _summary(e, extra_dets):
    """The original's metrics (and ours, prefixed) from a COCOeval after accumulate()."""
    p = e.params
    prec = e.eval["precision"]  # (T, R, K, A, M)
    rec = e.eval["recall"]  # (T, K, A, M)
    md = list(p.maxDets)
    m_ap = md.index(AP_MAX_DETS)
    area = {lbl: i for i, lbl in enumerate(p.areaRngLbl)}

    def mean_valid(x):
        x = x[x > -1]
        return float(np.mean(x)) if x.size else -1.0

    def ap(t=None, a="all"):
        s = prec if t is None else prec[np.where(np.isclose(p.iouThrs, t))[0]]
        return mean_valid(s[:, :, :, area[a], m_ap])

    def ar(m, a="all"):
        return mean_valid(rec[:, :, area[a], md.index(m)])

    out = {"AP": ap(), "AP50": ap(0.5), "AP75": ap(0.75)}
    out.update({f"AP{k}": ap(a=a) for k, a in AREA_KEYS.items()})
    out.update({f"AR@{m}": ar(m) for m in ORIGINAL_MAX_DETS})
    out.update({f"AR{k}": ar(AP_MAX_DETS, a) for k, a in AREA_KEYS.items()})
    out.update({f"{EXTRA_PREFIX}AR@{m}": ar(m) for m in extra_dets})
    return out


def _zero_summary(has_gt, extra_dets):
    v = 0.0 if has_gt else -1.0
    out = {k: v for k in ORIGINAL_KEYS}
    out.update({f"{EXTRA_PREFIX}AR@{m}": v for m in extra_dets})
    return out


def _evaluate_one(gt_api, gt_data, preds, iou_type, extra_dets):
    from pycocotools.cocoeval import COCOeval

    has_gt = any(not a.get("iscrowd", 0) for a in gt_data["annotations"])
    if iou_type == "segm":
        if any("segmentation" not in a for a in gt_data["annotations"]):
            return {"skipped": "ground truth without 'segmentation'"}
        if any("segmentation" not in q for q in preds):
            return {"skipped": "predictions without 'segmentation'"}
        # As the original: the predicted box is removed, so loadRes takes areas from the masks.
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
        return _zero_summary(has_gt, extra_dets)
    with contextlib.redirect_stdout(io.StringIO()):
        # `dts` are fresh dicts (loadRes adds keys to them); the RLEs inside are not modified.
        dt_api = gt_api.loadRes(dts)
        e = COCOeval(gt_api, dt_api, iou_type)
        e.params.maxDets = sorted(set(ORIGINAL_MAX_DETS) | set(extra_dets))
        e.evaluate()
        e.accumulate()
    return _summary(e, extra_dets)


def _images_scored(gt_data):
    ids = _sorted_ids(im["id"] for im in gt_data["images"])
    out = {
        "count": len(ids),
        "which": "every image of the ground truth (one without predictions counts as missed)",
    }
    if len(ids) <= LIST_IDS_UP_TO:
        out["ids"] = ids
    else:
        out["ids_first"] = ids[:10]
        out["ids_last"] = ids[-10:]
    return out


def evaluate_coco(
    gt_json_or_dict,
    predictions,
    iou_types=IOU_TYPES,
    max_dets=DEFAULT_MAX_DETS,
    extras=(),
    restrict_to_gt=False,
):
    """Class-agnostic COCO metrics of `predictions` against a ground-truth COCO file or dict.

    By default exactly the original HASSOD's numbers (module docstring): returns
    {iou_type: {AP, AP50, AP75, APs, APm, APl, AR@10, AR@100, AR@1000, ARs, ARm, ARl}},
    'protocol' (what was computed), 'images' (which images the metrics cover) and
    'num_predictions' (those scored). An iou_type that cannot be evaluated (e.g. masks
    missing) maps to {'skipped': reason}.

    Ours, on request: `max_dets` values besides 10/100/1000 and `extras` 'AR@<m>' add
    'extra/AR@m' to each iou_type; `extras` 'levels' adds {'extra/level_<k>': {iou_type:
    metrics, 'num_predictions': n}} for each `hier_level` k the predictions carry.

    `restrict_to_gt`: leave out predictions on images the ground truth lacks (counted under
    'left_out') instead of refusing them.
    """
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    for t in iou_types:
        if t not in IOU_TYPES:
            raise utils.ConfigError(
                f"--config.iou_types must be among {IOU_TYPES}, got {t!r}"
            )
    extra_dets, levels = parse_extras(max_dets, extras)
    gt_data = _prepare_gt(gt_json_or_dict)
    gt_source = (
        str(gt_json_or_dict)
        if isinstance(gt_json_or_dict, (str, os.PathLike))
        else "the ground-truth dict"
    )
    gt_ids = {im["id"] for im in gt_data["images"]}
    kept, left_out = _split_by_gt(predictions, gt_ids, restrict_to_gt, gt_source)
    preds = _prepare_predictions(kept, gt_data)
    gt_api = _coco_api(gt_data)
    result = {"protocol": protocol(max_dets, extras, iou_types)}
    result.update({t: _evaluate_one(gt_api, gt_data, preds, t, extra_dets) for t in iou_types})
    result["num_predictions"] = len(preds)
    result["images"] = _images_scored(gt_data)
    if left_out is not None:
        result["left_out"] = left_out
    if levels:
        for lv in sorted({q["hier_level"] for q in preds if "hier_level" in q}):
            sub = [q for q in preds if q.get("hier_level") == lv]
            per = {t: _evaluate_one(gt_api, gt_data, sub, t, extra_dets) for t in iou_types}
            per["num_predictions"] = len(sub)
            result[f"{EXTRA_PREFIX}level_{lv}"] = per
    return result


def load_predictions(path):
    """A predictions file: a list of result dicts, or a COCO dict whose annotations are used."""
    data = utils.read_json(path, what="predictions JSON file")
    if isinstance(data, dict):
        if "annotations" not in data:
            raise utils.InputError(
                f"predictions JSON file {path}: expected a list of results or a COCO "
                "dict with 'annotations'"
            )
        data = data["annotations"]
    if not isinstance(data, list):
        raise utils.InputError(
            f"predictions JSON file {path}: expected a list, got {type(data).__name__}"
        )
    return data


def format_metrics(metrics):
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
