"""mode=prepare_gt: each converter on tiny files written here in the official structure (field
names, nesting, polygon and RLE forms), the output loaded and scored by pycocotools, and the
malformed inputs (a missing field, no usable polygon, an RLE of the wrong size): a counted
skip, or with strict=True one line naming the file and the record. Polygon parts follow
detectron2's rule (written out in the test); the two coco_lvis duplicate rules are checked
against IoUs computed by hand."""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hassod_jax import utils
from hassod_jax.data import prepare_gt as P
from hassod_jax.modes import prepare_gt as prepare_gt_mode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "prepare_gt.py")
mask_utils = pytest.importorskip("pycocotools.mask")


def _config(**fields):
    spec = importlib.util.spec_from_file_location("prepare_gt_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for k, v in fields.items():
        c[k] = v
    return c


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def _square(x0, y0, x1, y1):
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


def _mask_of_polys(polys, h, w):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)


def _uncompressed_rle(mask):
    """COCO's crowd form: column-major run lengths starting with a run of zeros."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": [int(c) for c in counts], "size": list(mask.shape)}


def _compressed_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _score(gt_path, iou_type):
    """pycocotools loads the output and scores the ground truth's own instances (score 1) as
    predictions: every AP and AR is 1 when the file is a consistent COCO ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        preds = []
        for a in gt.dataset["annotations"]:
            if a["iscrowd"]:
                continue
            p = {"image_id": a["image_id"], "category_id": 1, "score": 1.0, "bbox": a["bbox"]}
            if iou_type == "segm":
                p["segmentation"] = a["segmentation"]
            preds.append(p)
        dt = gt.loadRes(preds)
        e = COCOeval(gt, dt, iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def _run(tmp_path, **fields):
    out = str(tmp_path / "out" / f"{fields['format']}.json")
    summary = prepare_gt_mode.run(_config(output=out, **fields), str(tmp_path / "w"))
    with open(out) as f:
        data = json.load(f)
    assert data["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]
    assert {a["category_id"] for a in data["annotations"]} <= {1}
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    with open(P.summary_path(out)) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    return out, data, summary


# ----------------------------------------------------------------------------------------------
# Official structures, tiny.


def coco_instances(h=40, w=60):
    crowd = np.zeros((h, w), bool)
    crowd[5:15, 30:50] = True
    return {
        "info": {
            "description": "COCO 2017 Dataset",
            "url": "http://cocodataset.org",
            "version": "1.0",
            "year": 2017,
            "contributor": "COCO Consortium",
            "date_created": "2017/09/01",
        },
        "licenses": [
            {
                "url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
                "id": 1,
                "name": "Attribution-NonCommercial-ShareAlike License",
            }
        ],
        "images": [
            {
                "license": 4,
                "file_name": "000000000139.jpg",
                "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg",
                "height": h,
                "width": w,
                "date_captured": "2013-11-21 01:34:01",
                "flickr_url": "http://farm9.staticflickr.com/8035/8024364858_9c41dc1666_z.jpg",
                "id": 139,
            },
            {
                "license": 1,
                "file_name": "000000000285.jpg",
                "coco_url": "http://images.cocodataset.org/val2017/000000000285.jpg",
                "height": h,
                "width": w,
                "date_captured": "2013-11-18 22:31:59",
                "flickr_url": "http://farm8.staticflickr.com/7434/9138147604_c6225224b8_z.jpg",
                "id": 285,
            },
        ],
        "annotations": [
            {
                "segmentation": [_square(2, 2, 20, 18)],
                "area": 288.0,
                "iscrowd": 0,
                "image_id": 139,
                "bbox": [2.0, 2.0, 18.0, 16.0],
                "category_id": 62,
                "id": 1001,
            },
            {
                "segmentation": [_square(25, 20, 40, 35), _square(45, 20, 55, 30)],
                "area": 325.0,
                "iscrowd": 0,
                "image_id": 139,
                "bbox": [25.0, 20.0, 30.0, 15.0],
                "category_id": 1,
                "id": 1002,
            },
            {
                "segmentation": _uncompressed_rle(crowd),
                "area": 200,
                "iscrowd": 1,
                "image_id": 139,
                "bbox": [30.0, 5.0, 20.0, 10.0],
                "category_id": 1,
                "id": 1003,
            },
            {
                "segmentation": [_square(10, 10, 30, 30)],
                "area": 400.0,
                "iscrowd": 0,
                "image_id": 285,
                "bbox": [10.0, 10.0, 20.0, 20.0],
                "category_id": 23,
                "id": 1004,
            },
        ],
        "categories": [
            {"supercategory": "person", "id": 1, "name": "person"},
            {"supercategory": "animal", "id": 23, "name": "bear"},
            {"supercategory": "furniture", "id": 62, "name": "chair"},
        ],
    }


def lvis_val(h=40, w=60):
    return {
        "info": {"description": "LVIS v1.0", "version": "1.0", "year": 2020},
        "licenses": [
            {
                "id": 1,
                "name": "Attribution-NonCommercial-ShareAlike License",
                "url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
            }
        ],
        "images": [
            {
                "date_captured": "2013-11-21 01:34:01",
                "neg_category_ids": [12, 300],
                "id": 139,
                "license": 4,
                "height": h,
                "width": w,
                "flickr_url": "http://farm9.staticflickr.com/8035/8024364858_9c41dc1666_z.jpg",
                "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg",
                "not_exhaustive_category_ids": [45],
            },
            {
                "date_captured": "2013-11-14 16:28:13",
                "neg_category_ids": [],
                "id": 397,
                "license": 1,
                "height": h,
                "width": w,
                "flickr_url": "http://farm1.staticflickr.com/1/100_a_z.jpg",
                "coco_url": "http://images.cocodataset.org/train2017/000000000397.jpg",
                "not_exhaustive_category_ids": [],
            },
        ],
        "annotations": [
            # a duplicate of COCO's 1001 (IoU 0.9 with it: one row of 18 px less)
            {
                "area": 270.0,
                "id": 1,
                "segmentation": [_square(2, 2, 20, 17)],
                "image_id": 139,
                "bbox": [2.0, 2.0, 18.0, 15.0],
                "category_id": 232,
            },
            # an object COCO does not have
            {
                "area": 100.0,
                "id": 2,
                "segmentation": [_square(45, 2, 55, 12)],
                "image_id": 139,
                "bbox": [45.0, 2.0, 10.0, 10.0],
                "category_id": 45,
            },
            # overlaps COCO's 1002 only partly (IoU 0.46)
            {
                "area": 150.0,
                "id": 3,
                "segmentation": [_square(25, 20, 40, 30)],
                "image_id": 139,
                "bbox": [25.0, 20.0, 15.0, 10.0],
                "category_id": 12,
            },
            {
                "area": 64.0,
                "id": 4,
                "segmentation": [_square(0, 0, 8, 8)],
                "image_id": 397,
                "bbox": [0.0, 0.0, 8.0, 8.0],
                "category_id": 300,
            },
        ],
        "categories": [
            {
                "frequency": "f",
                "id": 12,
                "synset": "apple.n.01",
                "image_count": 1207,
                "instance_count": 7254,
                "synonyms": ["apple"],
                "def": "fruit with red or yellow or green skin",
                "name": "apple",
            },
            {
                "frequency": "c",
                "id": 45,
                "synset": "bag.n.04",
                "image_count": 10,
                "instance_count": 12,
                "synonyms": ["bag"],
                "def": "a container",
                "name": "bag",
            },
            {
                "frequency": "f",
                "id": 232,
                "synset": "chair.n.01",
                "image_count": 2000,
                "instance_count": 9000,
                "synonyms": ["chair"],
                "def": "a seat",
                "name": "chair",
            },
            {
                "frequency": "r",
                "id": 300,
                "synset": "dog.n.01",
                "image_count": 3,
                "instance_count": 3,
                "synonyms": ["dog"],
                "def": "a dog",
                "name": "dog",
            },
        ],
    }


def objects365_val():
    return {
        "images": [
            {
                "height": 30,
                "id": 1,
                "license": 5,
                "width": 50,
                "file_name": "images/v1/patch0/objects365_v1_00000001.jpg",
                "url": "http://dorc.ks3-cn-beijing.ksyun.com/.../objects365_v1_00000001.jpg",
            },
            {
                "height": 30,
                "id": 908726,
                "license": 5,
                "width": 50,
                "file_name": "images/v2/patch16/objects365_v2_00908726.jpg",
                "url": "http://dorc.ks3-cn-beijing.ksyun.com/.../objects365_v2_00908726.jpg",
            },
        ],
        "annotations": [
            {
                "id": 51,
                "iscrowd": 0,
                "isfake": 0,
                "area": 200.0,
                "isreflected": 0,
                "bbox": [1.0, 2.0, 20.0, 10.0],
                "image_id": 1,
                "category_id": 3,
            },
            {
                "id": 52,
                "iscrowd": 1,
                "isfake": 0,
                "area": 100.0,
                "isreflected": 0,
                "bbox": [30.0, 5.0, 10.0, 10.0],
                "image_id": 1,
                "category_id": 7,
            },
            {
                "id": 53,
                "iscrowd": 0,
                "isfake": 1,
                "area": 60.0,
                "isreflected": 1,
                "bbox": [5.5, 5.5, 12.0, 5.0],
                "image_id": 908726,
                "category_id": 3,
            },
        ],
        "categories": [{"name": "Person", "id": 3}, {"name": "Sneakers", "id": 7}],
        "licenses": [{"name": "", "id": 5, "url": ""}],
    }


def sa1b_file(image_id, h=24, w=32, seed=0):
    rng = np.random.default_rng(seed + image_id)
    anns = []
    for k in range(2):
        m = np.zeros((h, w), bool)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        m[y : y + 8 + k, x : x + 10] = True
        rle = _compressed_rle(m)
        anns.append(
            {
                "id": image_id * 100 + k,
                "segmentation": rle,
                "bbox": [
                    float(v)
                    for v in mask_utils.toBbox(
                        mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                    )
                ],
                "area": int(m.sum()),
                "predicted_iou": 0.95,
                "point_coords": [[float(x + 2), float(y + 2)]],
                "crop_box": [0.0, 0.0, float(w), float(h)],
                "stability_score": 0.97,
            }
        )
    return {
        "image": {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"},
        "annotations": anns,
    }


def uvo_video(h=20, w=30):
    def m(y0, x0):
        a = np.zeros((h, w), bool)
        a[y0 : y0 + 6, x0 : x0 + 8] = True
        return a

    return {
        "info": {"description": "UVO v1.0"},
        "videos": [
            {
                "id": 7,
                "width": w,
                "height": h,
                "length": 3,
                "file_names": ["vidA/00000.jpg", "vidA/00001.jpg", "vidA/00002.jpg"],
                "ytid": "vidA",
            },
        ],
        "annotations": [
            {
                "id": 1,
                "video_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "height": h,
                "width": w,
                "length": 1,
                "segmentations": [_compressed_rle(m(1, 1)), None, _uncompressed_rle(m(2, 3))],
                "bboxes": [[1.0, 1.0, 8.0, 6.0], None, [3.0, 2.0, 8.0, 6.0]],
                "areas": [48.0, None, 48.0],
            },
            {
                "id": 2,
                "video_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "height": h,
                "width": w,
                "length": 1,
                "segmentations": [None, None, _compressed_rle(m(10, 15))],
                "bboxes": [None, None, [15.0, 10.0, 8.0, 6.0]],
                "areas": [None, None, 48.0],
            },
        ],
        "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
    }


def kitti_training(root, n=2):
    os.makedirs(root / "label_2")
    os.makedirs(root / "image_2")
    lines = {
        0: [
            "Pedestrian 0.00 0 -0.20 712.40 143.00 810.73 307.92 1.89 0.48 1.20 1.84 1.47 "
            "8.41 0.01",
            "Car 0.00 0 1.85 387.63 181.54 423.81 203.12 1.67 1.87 3.69 -16.53 2.39 58.49 1.57",
            "DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10",
        ],
        1: [
            "Cyclist 0.00 0 -1.65 676.60 163.95 688.98 193.93 1.86 0.60 2.02 4.59 1.32 45.84 -1.55"
        ],
    }
    for i in range(n):
        (root / "label_2" / f"{i:06d}.txt").write_text("\n".join(lines[i]) + "\n")
        Image.fromarray(np.zeros((375, 1242, 3), np.uint8)).save(root / "image_2" / f"{i:06d}.png")
    return str(root)


# ----------------------------------------------------------------------------------------------
# Converters.


def test_coco(tmp_path):
    src = coco_instances()
    path = _write(tmp_path / "annotations" / "instances_val2017.json", src)
    out, data, s = _run(tmp_path, format="coco", input=path)
    assert s["images"] == 2 and s["instances"] == 4 and s["crowd"] == 1 and s["dropped"] == {}
    assert [im["file_name"] for im in data["images"]] == ["000000000139.jpg", "000000000285.jpg"]
    assert set(data["images"][0]) == {"id", "file_name", "height", "width"}
    anns = data["annotations"]
    assert [a["iscrowd"] for a in anns] == [0, 0, 1, 0]
    assert [a["area"] for a in anns] == [a["area"] for a in src["annotations"]]  # official kept
    assert [a["bbox"] for a in anns] == [a["bbox"] for a in src["annotations"]]
    for a, b in zip(anns, src["annotations"]):
        assert isinstance(a["segmentation"]["counts"], str)
        got = mask_utils.decode(a["segmentation"]).astype(bool)
        if isinstance(b["segmentation"], list):
            want = _mask_of_polys(b["segmentation"], 40, 60)
        else:
            want = mask_utils.decode(mask_utils.frPyObjects(b["segmentation"], 40, 60)).astype(bool)
        np.testing.assert_array_equal(got, want)
    for t in ("segm", "bbox"):
        stats = _score(out, t)
        assert stats[0] == pytest.approx(1.0) and stats[8] == pytest.approx(1.0), (t, stats)
    # and our own evaluation takes it as it is
    from hassod_jax.evaluate.coco_eval import evaluate_coco

    preds = [dict(a, score=1.0) for a in anns if not a["iscrowd"]]
    m = evaluate_coco(out, preds)
    assert m["segm"]["AP"] == pytest.approx(1.0) and m["bbox"]["AR@100"] == pytest.approx(1.0)


def test_coco_max_images_keeps_the_first_images_without_counting_problems(tmp_path):
    path = _write(tmp_path / "instances_val2017.json", coco_instances())
    _, data, s = _run(tmp_path, format="coco", input=path, max_images=1)
    assert [im["id"] for im in data["images"]] == [139]
    assert s["instances"] == 3 and s["dropped"] == {}


@pytest.mark.parametrize(
    "rule,names",
    [
        ("last", ["000000000139.jpg", "000000000397.jpg"]),
        ("split", ["val2017/000000000139.jpg", "train2017/000000000397.jpg"]),
    ],
)
def test_lvis_cocofied(tmp_path, rule, names):
    path = _write(tmp_path / "lvis_v1_val.json", lvis_val())
    out, data, s = _run(tmp_path, format="lvis", input=path, lvis_file_name=rule)
    assert [im["file_name"] for im in data["images"]] == names
    assert all(set(im) == {"id", "file_name", "height", "width"} for im in data["images"])
    assert s["images_with_not_exhaustive_category_ids"] == 1
    assert s["images_with_neg_category_ids"] == 1 and s["source_categories"] == 4
    assert [a["iscrowd"] for a in data["annotations"]] == [0, 0, 0, 0]
    assert s["instances"] == 4 and s["dropped"] == {}
    for t in ("segm", "bbox"):
        assert _score(out, t)[0] == pytest.approx(1.0)


def test_lvis_default_file_names_resolve_in_the_documented_layout(tmp_path):
    """docs/reproduce.md's layout: COCO/{train2017,val2017}/*.jpg with the COCO folder as the
    one image root (as detectron2's LVIS loader and CutLER's class-agnostic LVIS set use it);
    LVIS v1 val draws images from both splits. The default config's file names must open."""
    coco_root = tmp_path / "COCO"
    for split, name in (("val2017", "000000000139.jpg"), ("train2017", "000000000397.jpg")):
        os.makedirs(coco_root / split)
        Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(coco_root / split / name)
    path = _write(tmp_path / "lvis_v1_val.json", lvis_val())
    out = str(tmp_path / "out" / "lvis.json")
    s = prepare_gt_mode.run(_config(format="lvis", input=path, output=out), str(tmp_path / "w"))
    with open(out) as f:
        data = json.load(f)
    for im in data["images"]:
        assert os.path.isfile(coco_root / im["file_name"]), im["file_name"]
    assert s["lvis_file_name"] == "split"


def _two_rules_input(tmp_path):
    """COCO + LVIS where the two duplicate rules differ; IoUs by hand (pycocotools rasterises
    these axis-aligned squares to exactly their w x h pixels)."""
    lvis = lvis_val()
    lvis["annotations"] += [
        # IoU 180 / 288 = 0.625 with COCO's 1001 (square 2,2-20,18): kept below 0.9, not below 0.5
        {"id": 5, "image_id": 139, "category_id": 12, "segmentation": [_square(2, 2, 20, 12)]},
        # IoU 80 / 100 = 0.8 with LVIS's own 2 (square 45,2-55,12), 25 / 255 with COCO's crowd
        {"id": 6, "image_id": 139, "category_id": 12, "segmentation": [_square(45, 2, 55, 10)]},
    ]
    coco = _write(tmp_path / "instances_val2017.json", coco_instances())
    return coco, _write(tmp_path / "lvis_v1_val.json", lvis)


def test_coco_lvis_cutler_merge_rule_and_both_counts_in_the_summary(tmp_path):
    """CutLER's published merge (a mask joins only when its IoU with every mask kept so far is
    below 0.5, COCO's first) against ours (an LVIS mask goes when its IoU with a COCO mask is
    >= 0.9); both rules' counts are in the summary whichever one writes the file."""
    coco, lvis = _two_rules_input(tmp_path)
    # LVIS 1 (0.9375 with 1001) goes by both rules; 2 and 3 (0.46 with 1002) stay by both;
    # 5 (0.625) stays by ours only; 6 (0.8 with LVIS 2) stays by ours only.
    _, data, s = _run(tmp_path, format="coco_lvis", input=coco, lvis_json=lvis)
    assert s["dedup_rule"] == "vs_coco" and s["instances"] == 3 + 4
    assert s["dedup_rules"]["vs_coco"] == {
        "instances": 7,
        "instances_per_image": 7.0,
        "duplicates_removed": 1,
    }
    assert s["dedup_rules"]["cutler"] == {
        "instances": 5,
        "instances_per_image": 5.0,
        "duplicates_removed": 3,
    }
    out, data, s2 = _run(
        tmp_path, format="coco_lvis", input=coco, lvis_json=lvis, dedup_rule="cutler"
    )
    assert s2["dedup_rule"] == "cutler" and s2["instances"] == 5
    assert s2["dedup_rules"] == s["dedup_rules"] and s2["duplicates_removed"] == 3
    lvis_kept = [a for a in data["annotations"] if a["source"] == "lvis"]
    masks = [a["segmentation"] for a in data["annotations"]]
    assert len(lvis_kept) == 2
    # the rule, checked on the output: every pair of non-crowd kept masks below IoU 0.5
    iou = np.asarray(mask_utils.iou(masks, masks, [0] * len(masks)))
    crowd = [a["iscrowd"] for a in data["annotations"]]
    for i in range(len(masks)):
        for j in range(i):
            if not (crowd[i] or crowd[j]):
                assert iou[i, j] < 0.5, (i, j, iou[i, j])
    for t in ("segm", "bbox"):
        assert _score(out, t)[0] == pytest.approx(1.0)
    with pytest.raises(utils.ConfigError, match="dedup_rule"):
        prepare_gt_mode.run(
            _config(format="coco_lvis", input=coco, lvis_json=lvis, dedup_rule="nms"),
            str(tmp_path / "w"),
        )


def test_coco_lvis_removes_duplicates_by_mask_iou(tmp_path):
    coco = _write(tmp_path / "instances_val2017.json", coco_instances())
    lvis = _write(tmp_path / "lvis_v1_val.json", lvis_val())
    out, data, s = _run(tmp_path, format="coco_lvis", input=coco, lvis_json=lvis)
    # shared images: 139 only (285 is COCO's alone, 397 LVIS's alone)
    assert [im["id"] for im in data["images"]] == [139]
    assert s["shared_images"] == 1 and s["coco_instances"] == 3 and s["lvis_instances"] == 3
    assert s["duplicates_removed"] == 1 and s["instances"] == 5
    assert [a["source"] for a in data["annotations"]] == ["coco"] * 3 + ["lvis"] * 2
    iou = mask_utils.iou(
        [data["annotations"][0]["segmentation"]],
        [_compressed_rle(_mask_of_polys([_square(2, 2, 20, 17)], 40, 60))],
        [0],
    )
    assert float(iou[0][0]) == pytest.approx(270 / 288)  # the removed one: 0.9375 >= 0.9
    for t in ("segm", "bbox"):
        assert _score(out, t)[0] == pytest.approx(1.0)
    # the threshold is a field: above 0.9375 nothing is a duplicate; at 0.4 the partial
    # overlap (150 / 325 = 0.46) goes too
    _, _, s2 = _run(tmp_path, format="coco_lvis", input=coco, lvis_json=lvis, dedup_iou=0.95)
    assert s2["duplicates_removed"] == 0 and s2["instances"] == 6
    _, _, s3 = _run(tmp_path, format="coco_lvis", input=coco, lvis_json=lvis, dedup_iou=0.4)
    assert s3["duplicates_removed"] == 2 and s3["instances"] == 4


def test_coco_lvis_needs_the_lvis_file(tmp_path):
    coco = _write(tmp_path / "instances_val2017.json", coco_instances())
    with pytest.raises(utils.ConfigError, match="lvis_json"):
        prepare_gt_mode.run(_config(format="coco_lvis", input=coco), str(tmp_path / "w"))


def test_objects365_boxes_only(tmp_path):
    path = _write(tmp_path / "zhiyuan_objv2_val.json", objects365_val())
    out, data, s = _run(tmp_path, format="objects365", input=path)
    assert s["images"] == 2 and s["instances"] == 3 and s["crowd"] == 1 and not s["masks"]
    assert all("segmentation" not in a for a in data["annotations"])
    assert data["images"][1]["file_name"] == "images/v2/patch16/objects365_v2_00908726.jpg"
    assert [a["bbox"] for a in data["annotations"]][2] == [5.5, 5.5, 12.0, 5.0]
    assert set(data["annotations"][0]) == {
        "id",
        "image_id",
        "category_id",
        "iscrowd",
        "bbox",
        "area",
    }
    assert _score(out, "bbox")[0] == pytest.approx(1.0)


def test_sa1b_folder_natural_order_and_max_images(tmp_path):
    folder = tmp_path / "sa_000000"
    for i in (1, 2, 10):
        _write(folder / f"sa_{i}.json", sa1b_file(i))
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(folder / f"sa_{i}.jpg")
    out, data, s = _run(tmp_path, format="sa1b", input=str(folder))
    assert [im["id"] for im in data["images"]] == [1, 2, 10]
    assert s["instances"] == 6 and s["files"] == 3
    want = [a for i in (1, 2, 10) for a in sa1b_file(i)["annotations"]]
    assert [a["segmentation"] for a in data["annotations"]] == [a["segmentation"] for a in want]
    for t in ("segm", "bbox"):
        assert _score(out, t)[0] == pytest.approx(1.0)
    _, data, s = _run(tmp_path, format="sa1b", input=str(folder), max_images=2)
    assert [im["file_name"] for im in data["images"]] == ["sa_1.jpg", "sa_2.jpg"]


def test_uvo_video_and_frame_files(tmp_path):
    path = _write(tmp_path / "UVO_video_val_dense.json", uvo_video())
    out, data, s = _run(tmp_path, format="uvo", input=path)
    # frames 0 and 2 hold annotations; frame 1 holds none and is no image
    assert [(im["id"], im["file_name"], im["frame_index"]) for im in data["images"]] == [
        (1, "vidA/00000.jpg", 0),
        (2, "vidA/00002.jpg", 2),
    ]
    assert [a["image_id"] for a in data["annotations"]] == [1, 2, 2]
    assert s["instances"] == 3 and s["dropped"] == {}
    for t in ("segm", "bbox"):
        assert _score(out, t)[0] == pytest.approx(1.0)
    # the frame set is COCO-form
    frames = coco_instances()
    path2 = _write(tmp_path / "UVO_frame_val.json", frames)
    out2, data2, s2 = _run(tmp_path, format="uvo", input=path2)
    assert s2["uvo_form"] == "frames (COCO)" and s2["instances"] == 4


def test_kitti_labels(tmp_path):
    root = kitti_training(tmp_path / "training")
    out, data, s = _run(tmp_path, format="kitti", input=root)
    assert [(im["id"], im["file_name"], im["height"], im["width"]) for im in data["images"]] == [
        (0, "image_2/000000.png", 375, 1242),
        (1, "image_2/000001.png", 375, 1242),
    ]
    anns = data["annotations"]
    assert [a["iscrowd"] for a in anns] == [0, 0, 1, 0]
    np.testing.assert_allclose(anns[0]["bbox"], [712.40, 143.00, 98.33, 164.92], atol=1e-9)
    assert "kitti_type" not in anns[0]
    assert _score(out, "bbox")[0] == pytest.approx(1.0)
    _, data, s = _run(tmp_path, format="kitti", input=root, kitti_dontcare="drop")
    assert s["instances"] == 3 and s["dontcare_dropped"] == 1


# ----------------------------------------------------------------------------------------------
# Malformed inputs.


def test_missing_field_is_a_counted_skip_or_one_line_error(tmp_path):
    src = coco_instances()
    del src["images"][1]["height"]
    path = _write(tmp_path / "instances_val2017.json", src)
    out, data, s = _run(tmp_path, format="coco", input=path)
    assert s["images"] == 1 and s["instances"] == 3
    assert s["dropped"] == {
        "image without 'height'": 1,
        "annotation of an unknown or skipped image": 1,
    }
    assert s["examples"]["image without 'height'"] == [f"{path}: images[1] (id 285)"]
    with pytest.raises(utils.InputError) as e:
        prepare_gt_mode.run(_config(format="coco", input=path, strict=True), str(tmp_path / "w"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: images[1] (id 285): image without")

    src = coco_instances()
    del src["annotations"][0]["segmentation"]
    path = _write(tmp_path / "b.json", src)
    _, _, s = _run(tmp_path, format="coco", input=path)
    assert s["dropped"] == {"annotation without 'segmentation'": 1} and s["instances"] == 3
    with pytest.raises(
        utils.InputError,
        match=r"annotations\[0\] \(id 1001\): annotation "
        "without 'segmentation'",
    ):
        prepare_gt_mode.run(_config(format="coco", input=path, strict=True), str(tmp_path / "w"))


def test_polygon_with_fewer_than_3_points(tmp_path):
    src = coco_instances()
    src["annotations"][1]["segmentation"].append([30.0, 30.0, 31.0, 31.0])  # 2 points: dropped
    src["annotations"][3]["segmentation"] = [[10.0, 10.0, 30.0, 30.0]]  # nothing left
    path = _write(tmp_path / "instances_val2017.json", src)
    out, data, s = _run(tmp_path, format="coco", input=path)
    assert s["dropped"] == {P.POLYGON_PARTS_DROPPED: 1, P.NO_VALID_POLYGON: 1}
    assert s["instances"] == 3
    # the annotation that kept its other polygons has exactly their mask
    got = mask_utils.decode(data["annotations"][1]["segmentation"]).astype(bool)
    want = _mask_of_polys(coco_instances()["annotations"][1]["segmentation"], 40, 60)
    np.testing.assert_array_equal(got, want)
    assert _score(out, "segm")[0] == pytest.approx(1.0)
    # strict stops at what normal mode skips whole (annotation 3, no polygon left), not at the
    # dropped part of annotation 1
    with pytest.raises(utils.InputError) as e:
        prepare_gt_mode.run(_config(format="coco", input=path, strict=True), str(tmp_path / "w"))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{path}: annotations[3] (id 1004): {P.NO_VALID_POLYGON}")


def test_strict_keeps_an_object_whose_short_part_normal_mode_drops(tmp_path):
    """--config.strict=True gives the same file as normal mode when nothing is skipped whole;
    the dropped parts are still counted."""
    src = coco_instances()
    src["annotations"][1]["segmentation"].append([30.0, 30.0, 31.0, 31.0])  # 2 points
    path = _write(tmp_path / "instances_val2017.json", src)
    _, normal, s = _run(tmp_path, format="coco", input=path)
    _, strict, s_strict = _run(tmp_path, format="coco", input=path, strict=True)
    assert strict["annotations"] == normal["annotations"] and s_strict["instances"] == 4
    assert s_strict["dropped"] == {P.POLYGON_PARTS_DROPPED: 1}


def test_polygon_part_with_an_odd_number_of_coordinates_is_dropped_alone(tmp_path):
    """detectron2's and CutLER's `load_coco_json` keep, per object, the parts with
    `len(poly) % 2 == 0 and len(poly) >= 6` and skip the object only when none is left."""
    src = coco_instances()
    src["annotations"][1]["segmentation"].append([30.0, 30.0, 31.0, 31.0, 32.0])  # odd
    src["annotations"][3]["segmentation"] = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0]]
    path = _write(tmp_path / "instances_val2017.json", src)
    out, data, s = _run(tmp_path, format="coco", input=path)
    # the reference rule, written out: which objects survive, with which parts
    kept = []
    for a in src["annotations"]:
        seg = a["segmentation"]
        if isinstance(seg, list):
            seg = [p for p in seg if len(p) % 2 == 0 and len(p) >= 6]
            if not seg:
                continue
        kept.append((a, seg))
    assert [a["id"] for a, _ in kept] == [1001, 1002, 1003]
    assert s["instances"] == len(kept) == 3
    assert s["dropped"] == {P.POLYGON_PARTS_ODD: 1, P.NO_VALID_POLYGON: 1}
    assert s["examples"][P.POLYGON_PARTS_ODD] == [f"{path}: annotations[1] (id 1002) (1)"]
    for got, (a, seg) in zip(data["annotations"], kept):
        if isinstance(seg, list):
            np.testing.assert_array_equal(
                mask_utils.decode(got["segmentation"]).astype(bool), _mask_of_polys(seg, 40, 60)
            )
    assert _score(out, "segm")[0] == pytest.approx(1.0)
    with pytest.raises(utils.InputError, match=r"annotations\[3\] \(id 1004\)"):
        prepare_gt_mode.run(_config(format="coco", input=path, strict=True), str(tmp_path / "w"))


def test_rle_of_the_wrong_size(tmp_path):
    folder = tmp_path / "sa_000000"
    good = sa1b_file(1)
    bad = sa1b_file(2)
    bad["annotations"][0]["segmentation"]["size"] = [25, 32]  # not the image's
    m = np.zeros((24, 33), bool)
    m[3:9, 4:12] = True
    bad["annotations"][1]["segmentation"] = dict(_compressed_rle(m), size=[24, 32])  # runs
    _write(folder / "sa_1.json", good)
    _write(folder / "sa_2.json", bad)
    _, data, s = _run(tmp_path, format="sa1b", input=str(folder))
    assert s["dropped"] == {
        "RLE size differs from the image size": 1,
        "RLE runs do not sum to height x width": 1,
    }
    assert s["instances"] == 2 and s["images"] == 2
    bad_path = str(folder / "sa_2.json")
    assert s["examples"]["RLE size differs from the image size"] == [
        f"{bad_path}: annotations[0] (id 200) (RLE [25, 32], image [24, 32])"
    ]
    with pytest.raises(utils.InputError) as e:
        prepare_gt_mode.run(
            _config(format="sa1b", input=str(folder), strict=True), str(tmp_path / "w")
        )
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{bad_path}: annotations[0] (id 200): RLE size differs")
    # the crowd (uncompressed) form is checked too
    src = coco_instances()
    src["annotations"][2]["segmentation"]["counts"][-1] += 1
    path = _write(tmp_path / "c.json", src)
    _, _, s = _run(tmp_path, format="coco", input=path)
    assert s["dropped"] == {"RLE runs do not sum to height x width": 1}


def test_box_without_area_and_bad_fields_are_skipped(tmp_path):
    src = objects365_val()
    src["annotations"][0]["bbox"] = [1.0, 2.0, 0.0, 10.0]
    src["annotations"][1]["bbox"] = [1.0, 2.0, "x", 10.0]
    src["annotations"][2]["image_id"] = 5  # no such image
    path = _write(tmp_path / "zhiyuan_objv2_val.json", src)
    _, _, s = _run(tmp_path, format="objects365", input=path)
    assert s["dropped"] == {
        "box with no area": 1,
        "bbox that is not 4 numbers": 1,
        "annotation of an unknown or skipped image": 1,
    }
    assert s["instances"] == 0 and s["images_without_instances"] == 2


def test_kitti_malformed_line(tmp_path):
    root = kitti_training(tmp_path / "training")
    with open(os.path.join(root, "label_2", "000001.txt"), "a") as f:
        f.write("Car 0.00 0 1.0 10 20 30\n")
    os.remove(os.path.join(root, "image_2", "000000.png"))
    _, _, s = _run(tmp_path, format="kitti", input=root)
    assert s["dropped"] == {"label line without 15 fields": 1, "image file missing": 1}
    assert s["images"] == 1 and s["instances"] == 1


def test_wrong_file_and_format_errors(tmp_path):
    path = _write(tmp_path / "x.json", {"videos": []})
    with pytest.raises(utils.InputError, match="no 'images' list"):
        prepare_gt_mode.run(_config(format="coco", input=path), str(tmp_path / "w"))
    with pytest.raises(utils.ConfigError, match="format must be one of"):
        prepare_gt_mode.run(_config(format="voc", input=path), str(tmp_path / "w"))
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare_gt_mode.run(
            _config(format="coco", input=str(tmp_path / "none.json")), str(tmp_path / "w")
        )


def test_rle_string_counts_matches_the_runs(tmp_path):
    rng = np.random.default_rng(0)
    for trial in range(30):
        h, w = rng.integers(1, 50, size=2)
        m = rng.random((h, w)) < rng.random()
        if trial % 3 == 0:
            m[:] = trial % 2 == 0
        rle = _compressed_rle(m)
        got = P.rle_string_counts(rle["counts"])
        want = _uncompressed_rle(m)["counts"]
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError):
        P.rle_string_counts("0Q" + chr(0x30 + 0x20))  # ends inside a number
    with pytest.raises(ValueError):
        P.rle_string_counts("0 Q")


def test_command_line(tmp_path):
    """python -m hassod_jax.main --config configs/prepare_gt.py:lvis: the mode's command line,
    its output files and the one-line error of a strict run."""
    path = _write(tmp_path / "lvis_v1_val.json", lvis_val())
    w = tmp_path / "w"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "hassod_jax.main",
        "--config",
        f"{CONFIG}:lvis",
        "--workdir",
        str(w),
        f"--config.input={path}",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(w / "lvis_cls_agnostic.json") as f:
        assert len(json.load(f)["annotations"]) == 4
    assert (w / "lvis_cls_agnostic.summary.json").exists() and (w / "config.json").exists()
    src = lvis_val()
    del src["images"][0]["coco_url"]
    bad = _write(tmp_path / "bad.json", src)
    r = subprocess.run(
        cmd[:-1] + [f"--config.input={bad}", "--config.strict=True"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and f"{bad}: images[0] (id 139): image without 'coco_url'" in err[0]
