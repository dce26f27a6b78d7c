"""Class-agnostic COCO evaluation by the original HASSOD's protocol, against pycocotools'
own COCOeval (run independently here) and by hand."""

import contextlib
import copy
import io
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hassod_jax import defaults, utils
from hassod_jax.evaluate import coco_eval
from hassod_jax.modes import evaluate as evaluate_mode

H, W = 64, 80
ORIGINAL_KEYS = [
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR@10",
    "AR@100",
    "AR@1000",
    "ARs",
    "ARm",
    "ARl",
]


def box_mask(x, y, w, h, size=(H, W)):
    m = np.zeros(size, np.uint8)
    m[y : y + h, x : x + w] = 1
    return m


def rle(m):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def make_gt(boxes_per_image, category=7, size=(H, W)):
    images, anns = [], []
    for img_id, boxes in boxes_per_image.items():
        images.append(
            {"id": img_id, "file_name": f"{img_id}.png", "height": size[0], "width": size[1]}
        )
        for b in boxes:
            m = box_mask(*b, size=size)
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


def pred(img_id, b, score=None, level=None, with_bbox=True, with_segm=True, size=(H, W), box=None):
    """A prediction whose mask is the box `b`; its `bbox` is `box` if given, else `b`."""
    p = {"image_id": img_id, "category_id": 1}
    if with_segm:
        p["segmentation"] = rle(box_mask(*b, size=size))
    if with_bbox:
        p["bbox"] = [float(v) for v in (b if box is None else box)]
    if score is not None:
        p["score"] = score
    if level is not None:
        p["hier_level"] = level
    return p


def mean_valid(x):
    """pycocotools' summary of a precision/recall slice: the mean of the entries > -1."""
    x = x[x > -1]
    return float(np.mean(x)) if x.size else -1.0


def reference_cocoeval(gt, preds, iou_type, max_dets, keep_bbox=False):
    """pycocotools alone: class-agnostic copies, the original's field removal, summarize()."""
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
            if iou_type == "bbox":
                p.pop("segmentation", None)
            elif not keep_bbox:
                p.pop("bbox", None)
            dts.append(p)
        e = COCOeval(api, api.loadRes(dts), iou_type)
        e.params.maxDets = list(max_dets)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


GT_BOXES = {1: [(2, 3, 20, 15), (40, 30, 30, 25)], 2: [(10, 10, 12, 12)], 3: [(0, 0, 50, 40)]}


def test_default_output_is_the_original_set_and_extras_are_labelled():
    gt = make_gt(GT_BOXES, category=7)  # gt category 7, predictions category 1
    preds = [pred(i, b, level=0) for i, bs in GT_BOXES.items() for b in bs]
    res = coco_eval.evaluate_coco(gt, preds)
    for t in ("bbox", "segm"):
        assert list(res[t]) == ORIGINAL_KEYS  # no AR@1, nothing per level
        assert res[t]["AP"] == 1.0 and res[t]["AP50"] == 1.0
        assert res[t]["AR@10"] == res[t]["AR@1000"] == 1.0
    assert not [k for k in res if k.startswith("extra/")]
    assert res["protocol"]["name"] == "hassod_original"
    assert res["protocol"]["maxDets"] == [10, 100, 1000]
    assert res["protocol"]["metrics"] == ORIGINAL_KEYS and res["protocol"]["extras"] == []
    assert res["num_predictions"] == 4
    assert res["images"]["count"] == 3 and res["images"]["ids"] == [1, 2, 3]
    assert "left_out" not in res
    # AR@1 only when asked for, under an extra/ key; image 1 has two objects, so one
    # detection per image recalls 3 of 4.
    for kwargs in ({"max_dets": (1, 10, 100, 1000)}, {"extras": "AR@1"}, {"extras": ["AR@1"]}):
        res1 = coco_eval.evaluate_coco(gt, preds, **kwargs)
        for t in ("bbox", "segm"):
            assert list(res1[t]) == ORIGINAL_KEYS + ["extra/AR@1"]
            assert res1[t]["extra/AR@1"] == 0.75
        assert res1["protocol"]["extras"] == ["extra/AR@1"]
        assert res1["protocol"]["cocoeval_maxDets"] == [1, 10, 100, 1000]
        assert "not the original's" in res1["protocol"]["extras_note"]


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
    assert m["AP"] == pytest.approx(51 / 101, abs=1e-15)
    assert m["AP50"] == pytest.approx(51 / 101, abs=1e-15)
    assert m["AR@10"] == m["AR@100"] == m["AR@1000"] == 0.5
    # 300 and 750 px: both objects are small (< 32 ** 2).
    assert m["APs"] == m["AP"] and m["APm"] == m["APl"] == -1.0
    assert "bbox" not in res


BIG = (160, 200)


def big_case(seed=0):
    """Ground truth and predictions with more than 100 detections per image.

    Image 1: 130 small objects in a grid, so at most 100 of them can be recalled with 100
    detections. Image 2: objects of all three sizes and a crowd region. Image 3: no ground
    truth (only false positives). Image 4: ground truth without predictions. Every predicted
    `bbox` is jittered apart from its mask, so box and mask areas differ.
    """
    rng = np.random.default_rng(seed)
    grid = [(2 + 15 * c, 2 + 16 * r, 10, 11) for r in range(10) for c in range(13)]
    mixed = [(5, 5, 100, 110), (120, 10, 60, 50), (110, 100, 40, 35), (20, 130, 25, 20)]
    mixed += [(int(x), int(y), 6, 7) for x, y in rng.integers(0, 150, (10, 2))]
    gt = make_gt({1: grid, 2: mixed, 3: [], 4: [(50, 50, 40, 40)]}, size=BIG)
    crowd = box_mask(150, 120, 40, 30, size=BIG)
    gt["annotations"].append(
        {
            "id": 999,
            "image_id": 2,
            "category_id": 7,
            "iscrowd": 1,
            "segmentation": rle(crowd),
            "area": int(crowd.sum()),
            "bbox": [150.0, 120.0, 40.0, 30.0],
        }
    )

    def jitter(b, k):
        x, y, w, h = (int(v + rng.integers(-k, k + 1)) for v in b)
        x, y = min(max(x, 0), BIG[1] - 3), min(max(y, 0), BIG[0] - 3)
        return x, y, max(min(w, BIG[1] - x), 2), max(min(h, BIG[0] - y), 2)

    preds = []
    for img_id, boxes in ((1, grid), (2, mixed + [(150, 120, 40, 30)]), (3, [])):
        for b in boxes:
            for _ in range(2):
                m = jitter(b, 2)
                preds.append(
                    pred(
                        img_id,
                        m,
                        float(rng.random()),
                        int(rng.integers(0, 3)),
                        size=BIG,
                        box=jitter(m, 3),
                    )
                )
        for _ in range(120):
            w, h = (int(v) for v in rng.integers(3, 40, 2))
            x, y = int(rng.integers(0, BIG[1] - w)), int(rng.integers(0, BIG[0] - h))
            b = (x, y, w, h)
            preds.append(
                pred(
                    img_id,
                    b,
                    float(rng.random()),
                    int(rng.integers(0, 3)),
                    size=BIG,
                    box=jitter(b, 3),
                )
            )
    return gt, preds


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_matches_pycocotools_with_the_original_maxdets(iou_type):
    gt, preds = big_case()
    per_image = {}
    for p in preds:
        per_image[p["image_id"]] = per_image.get(p["image_id"], 0) + 1
    assert min(per_image.values()) > 100  # so that 100 and 1000 detections per image differ
    ours = coco_eval.evaluate_coco(gt, preds, iou_types=(iou_type,))[iou_type]
    assert list(ours) == ORIGINAL_KEYS
    e = reference_cocoeval(gt, preds, iou_type, [10, 100, 1000])
    # summarize() reads AP50 ... ARl at the right maxDets (index 2 = 1000 for APs and ARs),
    # AR@10 / AR@100 at indices 0 / 1: every one of ours must be the same number.
    names = ORIGINAL_KEYS[1:]
    assert [ours[k] for k in names] == [float(v) for v in e.stats[1:]], (ours, e.stats)
    # Its AP (stats[0]) is at 100 detections (summarize's hard-coded default) -- reading the
    # precision array that way gives exactly stats[0] -- while the original (detectron2's
    # COCOevalMaxDets) reads AP at maxDets[2] = 1000, as every other AP.
    prec = e.eval["precision"]
    assert mean_valid(prec[:, :, :, 0, 1]) == e.stats[0]
    assert ours["AP"] == mean_valid(prec[:, :, :, 0, 2])
    assert ours["AP"] > e.stats[0]
    assert ours["AR@1000"] > ours["AR@100"] > ours["AR@10"]
    for k in ("APs", "APm", "APl", "ARs", "ARm", "ARl"):
        assert ours[k] > 0.0  # every area range has ground truth and hits
    if iou_type == "segm":
        # The original removes the predicted box, so mask areas are used; keeping the
        # (jittered) boxes would change the small/medium/large numbers.
        kept = reference_cocoeval(gt, preds, "segm", [10, 100, 1000], keep_bbox=True)
        assert [ours[k] for k in names] != [float(v) for v in kept.stats[1:]]


def test_extras_leave_the_original_numbers_unchanged():
    gt, preds = big_case(seed=1)
    base = coco_eval.evaluate_coco(gt, preds)
    more = coco_eval.evaluate_coco(gt, preds, max_dets=(1, 10, 100, 1000), extras="AR@5,levels")
    ref = {t: reference_cocoeval(gt, preds, t, [1, 10, 100]) for t in ("bbox", "segm")}
    for t in ("bbox", "segm"):
        assert {k: more[t][k] for k in ORIGINAL_KEYS} == base[t]
        assert list(more[t]) == ORIGINAL_KEYS + ["extra/AR@1", "extra/AR@5"]
        assert more[t]["extra/AR@1"] == float(ref[t].stats[6])  # summarize's AR@1
        assert 0.0 < more[t]["extra/AR@1"] < more[t]["extra/AR@5"] < more[t]["AR@10"]
    assert more["protocol"]["extras"] == ["extra/AR@1", "extra/AR@5", "extra/level_<k>"]
    levels = sorted(k for k in more if k.startswith("extra/level_"))
    assert levels == ["extra/level_0", "extra/level_1", "extra/level_2"]
    sub = [p for p in preds if p["hier_level"] == 1]
    lv = more["extra/level_1"]
    assert lv["num_predictions"] == len(sub)
    e = reference_cocoeval(gt, sub, "segm", [10, 100, 1000])
    assert [lv["segm"][k] for k in ORIGINAL_KEYS[1:]] == [float(v) for v in e.stats[1:]]
    with pytest.raises(ValueError, match="extras: unknown entry 'AR1'"):
        coco_eval.evaluate_coco(gt, preds, extras="AR1")
    with pytest.raises(ValueError, match="max_dets must be positive integers"):
        coco_eval.evaluate_coco(gt, preds, max_dets=(0, 100))


def test_ap_at_1000_by_hand():
    # 130 objects, each detected exactly, in one image: with 100 detections at most 100 of
    # 130 are found; the original's AP uses 1000.
    grid = [(2 + 15 * c, 2 + 16 * r, 10, 11) for r in range(10) for c in range(13)]
    gt = make_gt({1: grid}, size=BIG)
    preds = [pred(1, b, 1.0 - i / 1000, size=BIG) for i, b in enumerate(grid)]
    m = coco_eval.evaluate_coco(gt, preds, iou_types=("bbox",), max_dets=(1, 10, 100))["bbox"]
    assert m["AP"] == m["AP50"] == m["AP75"] == m["APs"] == 1.0
    assert m["APm"] == m["APl"] == -1.0  # no medium or large ground truth
    # (Means of ten equal per-threshold recalls: equal to within rounding.)
    assert m["AR@10"] == pytest.approx(10 / 130, abs=1e-15)
    assert m["AR@100"] == pytest.approx(100 / 130, abs=1e-15)
    assert m["AR@1000"] == 1.0
    assert m["extra/AR@1"] == pytest.approx(1 / 130, abs=1e-15)
    # With 100 detections precision stays 1 up to recall 100/130: 77 of 101 recall points.
    e = reference_cocoeval(gt, preds, "bbox", [1, 10, 100])
    assert e.stats[0] == pytest.approx(77 / 101, abs=1e-15)


def test_restrict_to_gt_scores_only_the_ground_truth_images():
    gt = make_gt(GT_BOXES)
    on_gt = [pred(i, b, score=0.5 + 0.1 * i) for i, bs in GT_BOXES.items() for b in bs]
    on_gt.append(pred(2, (50, 40, 10, 10), score=0.9))  # a false positive
    others = [pred(42, (0, 0, 4, 4)), pred(42, (5, 5, 4, 4)), pred("x", (1, 1, 3, 3))]
    mixed = on_gt[:2] + others[:1] + on_gt[2:] + others[1:]
    with pytest.raises(ValueError) as err:
        coco_eval.evaluate_coco(gt, mixed)
    msg = str(err.value)
    assert "\n" not in msg and "--config.restrict_to_gt=True" in msg
    assert msg.startswith("2 prediction image id(s) are not in the ground truth (the ground-")
    assert "e.g. [42, 'x']" in msg
    res = coco_eval.evaluate_coco(gt, mixed, restrict_to_gt=True)
    alone = coco_eval.evaluate_coco(gt, on_gt)
    for t in ("bbox", "segm"):
        assert res[t] == alone[t]
        assert 0.0 < res[t]["AP"] < 1.0
    assert res["num_predictions"] == len(on_gt)
    assert res["left_out"] == {"predictions": 3, "images": 2, "image_ids_sample": [42, "x"]}
    assert res["images"]["count"] == 3 and res["images"]["ids"] == [1, 2, 3]
    # Nothing to leave out: still reported, as zeros.
    assert coco_eval.evaluate_coco(gt, on_gt, restrict_to_gt=True)["left_out"] == {
        "predictions": 0,
        "images": 0,
        "image_ids_sample": [],
    }
    # Every prediction elsewhere: the ground truth's objects are all missed.
    none = coco_eval.evaluate_coco(gt, others, restrict_to_gt=True)
    assert none["bbox"]["AP"] == 0.0 and none["num_predictions"] == 0
    # Many images: the output summarises the ids.
    many = {"images": [{"id": i, "height": 8, "width": 8} for i in range(150)], "annotations": []}
    out = coco_eval.evaluate_coco(many, [], iou_types=("bbox",))
    assert out["images"]["count"] == 150 and "ids" not in out["images"]
    assert out["images"]["ids_first"] == list(range(10))
    assert out["images"]["ids_last"] == list(range(140, 150))
    assert out["bbox"]["AP"] == -1.0  # no ground truth at all: undefined


def test_levels_empty_predictions_and_errors():
    gt = make_gt(GT_BOXES)
    preds = [pred(i, b, level=0) for i, bs in GT_BOXES.items() for b in bs]
    preds += [pred(1, (60, 0, 5, 5), level=1, score=0.5)]
    assert not [k for k in coco_eval.evaluate_coco(gt, preds) if k.startswith("extra/")]
    res = coco_eval.evaluate_coco(gt, preds, extras=("levels",))
    assert res["extra/level_0"]["segm"]["AP"] == 1.0
    assert res["extra/level_1"]["segm"]["AP"] == 0.0
    assert res["extra/level_1"]["num_predictions"] == 1
    assert list(res["extra/level_1"]["bbox"]) == ORIGINAL_KEYS
    empty = coco_eval.evaluate_coco(gt, [])
    assert list(empty["segm"]) == ORIGINAL_KEYS
    assert empty["bbox"]["AP"] == 0.0 and empty["segm"]["AR@1000"] == 0.0
    with pytest.raises(ValueError, match="neither 'segmentation' nor 'bbox'"):
        coco_eval.evaluate_coco(gt, [{"image_id": 1}])
    with pytest.raises(ValueError, match="prediction 0 must be a dict"):
        coco_eval.evaluate_coco(gt, [[1, 2]])
    with pytest.raises(ValueError, match=r"prediction 1 needs an 'image_id' \(an int or str\)"):
        coco_eval.evaluate_coco(gt, [pred(1, (0, 0, 4, 4)), {"bbox": [0, 0, 4, 4]}])
    # Box-only predictions: masks cannot be evaluated, boxes can.
    box_only = [pred(i, b, with_segm=False) for i, bs in GT_BOXES.items() for b in bs]
    res = coco_eval.evaluate_coco(gt, box_only)
    assert "skipped" in res["segm"] and res["bbox"]["AP"] == 1.0
    # Mask-only predictions: boxes are taken from the masks.
    mask_only = [pred(i, b, with_bbox=False) for i, bs in GT_BOXES.items() for b in bs]
    res = coco_eval.evaluate_coco(gt, mask_only)
    assert res["bbox"]["AP"] == 1.0 and res["segm"]["AP"] == 1.0


def test_polygon_predictions_and_run_writes_json(tmp_path):
    gt = make_gt({1: [(10, 10, 20, 20)]})
    poly = {"image_id": 1, "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]], "score": 0.7}
    res = coco_eval.evaluate_coco(gt, [poly], iou_types=("segm",))
    # One detection: pycocotools' precision 1 / (1 + eps) is a rounding below 1.
    assert res["segm"]["AP50"] == pytest.approx(1.0, abs=1e-15)
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps([pred(1, (10, 10, 20, 20)), pred(7, (0, 0, 5, 5))]))
    cfg = defaults.evaluation()
    assert tuple(cfg.max_dets) == (10, 100, 1000) and cfg.restrict_to_gt is False
    cfg.gt_json, cfg.predictions_json = str(gt_path), str(pred_path)
    work = tmp_path / "work"
    with pytest.raises(ValueError) as err:
        evaluate_mode.run(cfg, str(work))
    msg = str(err.value)
    assert "\n" not in msg and str(pred_path) in msg and str(gt_path) in msg
    assert "--config.restrict_to_gt=True" in msg and "e.g. [7]" in msg
    assert not (work / "eval.json").exists()
    cfg.restrict_to_gt = True
    metrics = evaluate_mode.run(cfg, str(work))
    written = json.loads((work / "eval.json").read_text())
    assert written["segm"]["AP"] == pytest.approx(1.0, abs=1e-15)
    assert written["bbox"] == metrics["bbox"]
    assert list(written["bbox"]) == ORIGINAL_KEYS
    assert written["protocol"] == coco_eval.protocol()
    assert written["protocol"]["maxDets"] == [10, 100, 1000]
    assert written["left_out"] == {"predictions": 1, "images": 1, "image_ids_sample": [7]}
    assert written["images"]["ids"] == [1] and written["num_predictions"] == 1
    assert written["gt_json"] == str(gt_path)
    cfg.extras = "AR@1,levls"
    with pytest.raises(utils.ConfigError, match=r"--config.extras: extras: unknown entry 'levls'"):
        evaluate_mode.run(cfg, str(work))
    cfg.extras = "AR@1"
    cfg.output = str(tmp_path / "e.json")
    evaluate_mode.run(cfg, str(work))
    assert json.loads((tmp_path / "e.json").read_text())["segm"]["extra/AR@1"] == 1.0
    cfg.gt_json = ""
    with pytest.raises(ValueError, match="gt_json"):
        evaluate_mode.run(cfg, str(work))
