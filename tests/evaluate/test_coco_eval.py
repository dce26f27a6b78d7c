"""Class-agnostic COCO evaluation against pycocotools' own COCOeval.summarize and by hand."""

import contextlib
import copy
import io
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hassod_jax.evaluate import coco_eval

H, W = 64, 80


def box_mask(x, y, w, h):
    m = np.zeros((H, W), np.uint8)
    m[y : y + h, x : x + w] = 1
    return m


def rle(m):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def make_gt(boxes_per_image, category=7):
    images, anns = [], []
    for img_id, boxes in boxes_per_image.items():
        images.append({"id": img_id, "file_name": f"{img_id}.png", "height": H, "width": W})
        for b in boxes:
            m = box_mask(*b)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": category,
                    "iscrowd": 0,
                    "segmentation": rle(m),
                    "area": int(m.sum()),
                    "bbox": [float(v) for v in b],
                }
            )
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": category, "name": "thing"}],
    }


def pred(img_id, b, score=None, level=None, with_bbox=True, with_segm=True):
    p = {"image_id": img_id, "category_id": 1}
    if with_segm:
        p["segmentation"] = rle(box_mask(*b))
    if with_bbox:
        p["bbox"] = [float(v) for v in b]
    if score is not None:
        p["score"] = score
    if level is not None:
        p["hier_level"] = level
    return p


GT_BOXES = {1: [(2, 3, 20, 15), (40, 30, 30, 25)], 2: [(10, 10, 12, 12)], 3: [(0, 0, 50, 40)]}


def test_perfect_predictions_without_scores_class_agnostic():
    gt = make_gt(GT_BOXES, category=7)  # gt category 7, predictions category 1
    preds = [pred(i, b) for i, bs in GT_BOXES.items() for b in bs]
    res = coco_eval.evaluate_coco(gt, preds)
    for t in ("bbox", "segm"):
        assert res[t]["AP"] == pytest.approx(1.0)
        assert res[t]["AP50"] == pytest.approx(1.0)
        assert res[t]["AR@10"] == pytest.approx(1.0)
        assert res[t]["AR@1000"] == pytest.approx(1.0)
        # Image 1 has two objects: one detection per image recalls 3 of 4.
        assert res[t]["AR@1"] == pytest.approx(0.75)
    assert res["num_predictions"] == 4


def test_crafted_case_by_hand():
    gt = make_gt({1: [(2, 3, 20, 15), (40, 30, 30, 25)]})
    preds = [
        pred(1, (2, 3, 20, 15), score=0.9),  # true positive at every IoU threshold
        pred(1, (0, 50, 10, 10), score=0.8),  # false positive (IoU 0)
    ]
    res = coco_eval.evaluate_coco(gt, preds, iou_types=("segm",))
    # Ranked: TP (precision 1, recall 0.5), FP. Interpolated precision is 1 for the 51
    # recall points 0.00..0.50 and 0 above: AP = 51 / 101 at every IoU threshold.
    m = res["segm"]
    assert m["AP"] == pytest.approx(51 / 101)
    assert m["AP50"] == pytest.approx(51 / 101)
    assert m["AR@1"] == m["AR@100"] == pytest.approx(0.5)
    assert "bbox" not in res


def summarize_stats(gt, preds, iou_type):
    """pycocotools' own summary with its default maxDets [1, 10, 100]."""
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = copy.deepcopy(gt)
        for a in api.dataset["annotations"]:
            a["category_id"] = 1
        api.dataset["categories"] = [{"id": 1, "name": "fg"}]
        api.createIndex()
        dts = []
        for p in copy.deepcopy(preds):
            p.setdefault("score", 1.0)
            p.pop("hier_level", None)
            p.pop("bbox" if iou_type == "segm" else "segmentation")
            dts.append(p)
        e = COCOeval(api, api.loadRes(dts), iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def noisy_predictions(seed):
    rng = np.random.default_rng(seed)
    preds = []
    for img_id, boxes in GT_BOXES.items():
        for b in boxes:
            for _ in range(3):
                x, y, w, h = (int(v + rng.integers(-4, 5)) for v in b)
                x, y = max(x, 0), max(y, 0)
                w, h = max(min(w, W - x), 2), max(min(h, H - y), 2)
                preds.append(pred(img_id, (x, y, w, h), score=float(rng.random())))
        for _ in range(2):
            x, y = int(rng.integers(0, W - 10)), int(rng.integers(0, H - 10))
            preds.append(pred(img_id, (x, y, 8, 8), score=float(rng.random())))
    return preds


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_matches_cocoeval_summarize_with_default_maxdets(iou_type):
    gt = make_gt(GT_BOXES)
    gt["annotations"].append(
        {
            "id": 99,
            "image_id": 2,
            "category_id": 7,
            "iscrowd": 1,
            "segmentation": rle(box_mask(50, 40, 20, 20)),
            "area": 400,
            "bbox": [50.0, 40.0, 20.0, 20.0],
        }
    )
    preds = noisy_predictions(0)
    ours = coco_eval.evaluate_coco(gt, preds, iou_types=(iou_type,), max_dets=(1, 10, 100))
    stats = summarize_stats(gt, preds, iou_type)
    keys = [
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AR@1",
        "AR@10",
        "AR@100",
        "ARs",
        "ARm",
        "ARl",
    ]
    np.testing.assert_allclose([ours[iou_type][k] for k in keys], stats, rtol=0, atol=1e-12)


def test_maxdets_1000_uses_largest_for_ap():
    gt = make_gt({1: [(x, 2, 3, 3) for x in range(0, 80, 4)] * 1})  # 20 small objects
    preds = [pred(1, (x, 2, 3, 3), score=1.0 - x / 100) for x in range(0, 80, 4)]
    res = coco_eval.evaluate_coco(gt, preds, iou_types=("bbox",), max_dets=(1, 10, 100, 1000))
    m = res["bbox"]
    assert m["AR@1"] == pytest.approx(1 / 20)
    assert m["AR@10"] == pytest.approx(10 / 20)
    assert m["AR@100"] == m["AR@1000"] == pytest.approx(1.0)
    assert m["AP"] == pytest.approx(1.0)
    res10 = coco_eval.evaluate_coco(gt, preds, iou_types=("bbox",), max_dets=(1, 5, 10))
    assert res10["bbox"]["AP"] < 0.6  # AP is read at the last maxDet (10 of 20 found)


def test_levels_empty_predictions_and_errors():
    gt = make_gt(GT_BOXES)
    preds = [pred(i, b, level=0) for i, bs in GT_BOXES.items() for b in bs]
    preds += [pred(1, (60, 0, 5, 5), level=1, score=0.5)]
    res = coco_eval.evaluate_coco(gt, preds)
    assert res["by_level"]["0"]["segm"]["AP"] == pytest.approx(1.0)
    assert res["by_level"]["1"]["segm"]["AP"] == 0.0
    assert res["by_level"]["1"]["num_predictions"] == 1
    empty = coco_eval.evaluate_coco(gt, [])
    assert empty["bbox"]["AP"] == 0.0 and empty["segm"]["AR@1000"] == 0.0
    with pytest.raises(ValueError, match=r"not in the ground truth, e.g. \[42\]"):
        coco_eval.evaluate_coco(gt, [pred(42, (0, 0, 4, 4))])
    with pytest.raises(ValueError, match="neither 'segmentation' nor 'bbox'"):
        coco_eval.evaluate_coco(gt, [{"image_id": 1}])
    # Box-only predictions: masks cannot be evaluated, boxes can.
    box_only = [pred(i, b, with_segm=False) for i, bs in GT_BOXES.items() for b in bs]
    res = coco_eval.evaluate_coco(gt, box_only)
    assert "skipped" in res["segm"] and res["bbox"]["AP"] == pytest.approx(1.0)
    # Mask-only predictions: boxes are taken from the masks.
    mask_only = [pred(i, b, with_bbox=False) for i, bs in GT_BOXES.items() for b in bs]
    res = coco_eval.evaluate_coco(gt, mask_only)
    assert res["bbox"]["AP"] == pytest.approx(1.0) and res["segm"]["AP"] == pytest.approx(1.0)


def test_polygon_predictions_and_run_writes_json(tmp_path):
    from ml_collections import ConfigDict

    gt = make_gt({1: [(10, 10, 20, 20)]})
    poly = {"image_id": 1, "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]], "score": 0.7}
    res = coco_eval.evaluate_coco(gt, [poly], iou_types=("segm",))
    assert res["segm"]["AP50"] == pytest.approx(1.0)
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps([pred(1, (10, 10, 20, 20))]))
    cfg = ConfigDict(
        {
            "mode": "evaluate",
            "gt_json": str(gt_path),
            "predictions_json": str(pred_path),
            "output": "",
        }
    )
    metrics = coco_eval.run(cfg, str(tmp_path / "work"))
    written = json.loads((tmp_path / "work" / "eval.json").read_text())
    assert written["segm"]["AP"] == pytest.approx(1.0) == metrics["bbox"]["AP"]
    cfg.gt_json = ""
    with pytest.raises(ValueError, match="gt_json"):
        coco_eval.run(cfg, str(tmp_path / "work"))
