"""COCO JSON helpers against pycocotools."""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO

from hassod_jax.data import coco


def test_load_coco_json_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        coco.load_coco_json(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        coco.load_coco_json(bad)
    no_anns = tmp_path / "no_anns.json"
    no_anns.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="no_anns.json.*'annotations'"):
        coco.load_coco_json(no_anns)
    lst = tmp_path / "list.json"
    lst.write_text("[]")
    with pytest.raises(ValueError, match="list.json.*JSON object"):
        coco.load_coco_json(lst)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"images": [{"id": 1}, {"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match="duplicate image ids"):
        coco.load_coco_json(dup)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1}]}))
    assert coco.load_coco_json(ok)["images"] == [{"id": 1}]


def test_annotation_to_mask_all_segmentation_forms_match_pycocotools():
    h, w = 23, 31
    rng = np.random.default_rng(0)
    m = rng.random((h, w)) > 0.6
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    # Uncompressed RLE: column-major run lengths starting with zeros.
    flat = m.T.reshape(-1).astype(np.uint8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    uncompressed = {"size": [h, w], "counts": counts}
    poly = [[2.0, 3.0, 20.5, 3.0, 20.5, 15.0, 2.0, 15.0], [22, 16, 29, 16, 25, 21]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": coco.rle_to_json(rle)},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": dict(rle)},  # bytes counts
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": uncompressed, "iscrowd": 1},
        {"id": 4, "image_id": 1, "category_id": 1, "segmentation": poly},
    ]
    api = COCO()
    api.dataset = {
        "images": [{"id": 1, "height": h, "width": w}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "fg"}],
    }
    api.createIndex()
    for a in anns:
        out = coco.annotation_to_mask(a, h, w)
        assert out.dtype == bool and out.shape == (h, w)
        np.testing.assert_array_equal(out, api.annToMask(a).astype(bool))
    np.testing.assert_array_equal(coco.annotation_to_mask(anns[2], h, w), m)
    with pytest.raises(ValueError, match="does not match the image size"):
        coco.annotation_to_mask(anns[0], h + 1, w)
    with pytest.raises(ValueError, match="no 'segmentation'"):
        coco.annotation_to_mask({"id": 9}, h, w)
    with pytest.raises(ValueError, match="polygon list or an RLE"):
        coco.annotation_to_mask({"segmentation": 5}, h, w)


def test_encode_mask_and_make_coco_dict_load_with_pycocotools(tmp_path):
    m = np.zeros((20, 30), bool)
    m[4:9, 6:25] = True
    enc = coco.encode_mask(m)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert enc["segmentation"]["counts"] == rle["counts"].decode("ascii")
    assert enc["area"] == int(mask_utils.area(rle)) == 95
    np.testing.assert_allclose(enc["bbox"], mask_utils.toBbox(rle))
    images = [{"id": 5, "file_name": "5.png", "height": 20, "width": 30}]
    d = coco.make_coco_dict(
        images,
        [dict(image_id=5, hier_level=0, **enc), dict(image_id=5, id=10, hier_level=1, **enc)],
    )
    assert d["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]
    assert [a["id"] for a in d["annotations"]] == [11, 10]
    assert all(a["category_id"] == 1 and a["iscrowd"] == 0 for a in d["annotations"])
    path = tmp_path / "out.json"
    path.write_text(json.dumps(d))
    api = COCO(str(path))
    np.testing.assert_array_equal(api.annToMask(api.anns[10]).astype(bool), m)


def test_to_class_agnostic_keeps_iscrowd():
    d = {
        "images": [{"id": 1}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 1},
            {"id": 2, "image_id": 1, "category_id": 3},
        ],
        "categories": [{"id": 7, "name": "a"}, {"id": 3, "name": "b"}],
    }
    out = coco.to_class_agnostic(d)
    assert [a["category_id"] for a in out["annotations"]] == [1, 1]
    assert out["annotations"][0]["iscrowd"] == 1
    assert out["categories"] == [coco.FG_CATEGORY]
    assert d["annotations"][0]["category_id"] == 7  # input untouched
