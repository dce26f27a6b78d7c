"""Inference to COCO results: box rescale + mask paste against the jnp op at the original size,
RLE round trip through pycocotools, and a random small detector's predictions accepted by
evaluate_coco."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from hassod_jax import ops
from hassod_jax.evaluate import level_accuracy
from hassod_jax.inference import predictor
from hassod_jax.inference import processing


def _smooth_masks(rng, k, m):
    from scipy import ndimage

    raw = rng.normal(size=(k, m, m))
    raw = ndimage.gaussian_filter(raw, sigma=(0, 3, 3))
    return (1.0 / (1.0 + np.exp(-8.0 * raw / raw.std()))).astype(np.float32)


def _soft_paste_f64(mask, box, h, w):
    """float64 transcription of detectron2's _do_paste_mask (grid_sample, align_corners=False,
    zero padding) for one box: the soft value at every image pixel, to locate threshold ties."""
    m = mask.shape[0]
    x0, y0, x1, y1 = (float(v) for v in box)

    def axis(lo, hi, n):
        p = np.arange(n, dtype=np.float64) + 0.5
        coord = ((p - lo) / (hi - lo) * 2.0) * m / 2.0 - 0.5
        low = np.floor(coord).astype(int)
        frac = coord - low
        a = np.zeros((n, m))
        for j in range(n):
            for t, wt in ((low[j], 1.0 - frac[j]), (low[j] + 1, frac[j])):
                if 0 <= t < m:
                    a[j, t] += wt
        return a

    return axis(y0, y1, h) @ mask.astype(np.float64) @ axis(x0, x1, w).T


def test_rescale_boxes_is_detector_postprocess():
    boxes = np.array(
        [[10.0, 5.0, 60.0, 40.0], [-3.0, 2.0, 200.0, 90.5], [50.0, 50.0, 50.0, 70.0]], np.float32
    )
    out, nonempty = processing.rescale_boxes(boxes, (96, 128), (150, 203))
    # detectron2: scale x by W_orig / w_resized, y by H_orig / h_resized, clip, nonempty.
    ref = boxes.astype(np.float64) * np.array([203 / 128, 150 / 96, 203 / 128, 150 / 96])
    ref[:, 0::2] = ref[:, 0::2].clip(0, 203)
    ref[:, 1::2] = ref[:, 1::2].clip(0, 150)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    np.testing.assert_array_equal(nonempty, [True, True, False])


def test_host_paste_matches_ops_paste_at_the_original_size():
    rng = np.random.default_rng(0)
    k, m, h, w = 10, 28, 75, 101  # original size; the detector saw (96, 128)
    masks = _smooth_masks(rng, k, m)
    xy = rng.uniform(-10, [128, 96], (k, 2))
    wh = rng.uniform(4, [100, 80], (k, 2))
    resized_boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes, nonempty = processing.rescale_boxes(resized_boxes, (96, 128), (h, w))
    assert nonempty.all()
    got = processing.paste_masks_numpy(masks, boxes, h, w)
    ref = np.asarray(jax.jit(lambda a, b: ops.paste_masks_in_image(a, b, h, w))(masks, boxes))
    assert got.shape == ref.shape == (k, h, w) and got.dtype == bool
    diff = got != ref
    if diff.any():  # only at threshold ties, to float32 precision
        for i, y, x in zip(*np.nonzero(diff)):
            soft = _soft_paste_f64(masks[i], boxes[i], h, w)[y, x]
            assert abs(soft - 0.5) < 1e-5, (i, y, x, soft)
    assert diff.sum() <= 2
    assert ref.sum() > 500  # not vacuous
    # And against the float64 transcription directly.
    for i in range(k):
        soft = _soft_paste_f64(masks[i], boxes[i], h, w)
        clear = np.abs(soft - 0.5) > 1e-5
        np.testing.assert_array_equal(got[i][clear], (soft >= 0.5)[clear])


def test_detections_to_coco_fields_and_rle_round_trip():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(1)
    d, m = 6, 28
    boxes = np.array(
        [
            [5, 5, 60, 50],
            [20, 10, 120, 90],
            [0, 0, 10, 10],
            [30, 30, 30, 60],  # empty: dropped
            [40, 40, 90, 95],
            [1, 2, 3, 4],
        ],
        np.float32,
    )
    det = {
        "boxes": boxes,
        "scores": np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], np.float32),
        "level_probs": rng.uniform(size=(d, 3)).astype(np.float32),
        "masks": _smooth_masks(rng, d, m),
        "valid": np.array([1, 1, 1, 1, 1, 0], bool),  # last: padding
    }
    res = processing.detections_to_coco(det, 7, (96, 128), (120, 160))
    assert len(res) == 4
    keep = [0, 1, 2, 4]
    exp_boxes, _ = processing.rescale_boxes(boxes[keep], (96, 128), (120, 160))
    exp_masks = processing.paste_masks_numpy(det["masks"][keep], exp_boxes, 120, 160)
    for r, j, eb, em in zip(res, keep, exp_boxes, exp_masks):
        assert r["image_id"] == 7 and r["category_id"] == 1
        assert r["score"] == pytest.approx(float(det["scores"][j]))
        assert r["hier_level"] == int(np.argmax(det["level_probs"][j]))
        np.testing.assert_allclose(r["bbox"], [eb[0], eb[1], eb[2] - eb[0], eb[3] - eb[1]])
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [120, 160]
        seg = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(mask_utils.decode(seg).astype(bool), em)


def test_the_mask_threshold_binarises_the_pasted_probabilities():
    """detections_to_coco's mask_threshold: each mask is the float64 transcription of
    detectron2's paste compared with that threshold (0.7 and 0.3: masks shrink and grow)."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(2)
    boxes = np.array([[10, 8, 90, 70], [40, 20, 120, 95]], np.float32)
    det = {"boxes": boxes, "scores": np.array([0.9, 0.8], np.float32),
           "level_probs": rng.uniform(size=(2, 3)).astype(np.float32),
           "masks": _smooth_masks(rng, 2, 28), "valid": np.ones(2, bool)}
    exp_boxes, _ = processing.rescale_boxes(boxes, (96, 128), (120, 160))
    areas = {}
    for t in (0.3, 0.5, 0.7):
        res = processing.detections_to_coco(det, 1, (96, 128), (120, 160), mask_threshold=t)
        for r, mask, box in zip(res, det["masks"], exp_boxes):
            seg = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())
            got = mask_utils.decode(seg).astype(bool)
            soft = _soft_paste_f64(mask, box, 120, 160)
            clear = np.abs(soft - t) > 1e-5
            np.testing.assert_array_equal(got[clear], (soft >= t)[clear])
            areas.setdefault(t, []).append(int(got.sum()))
    assert all(a > b > c > 0 for a, b, c in zip(areas[0.3], areas[0.5], areas[0.7]))


def test_level_accuracy_on_crafted_predictions():
    gt = {
        "images": [{"id": 1, "height": 50, "width": 50, "file_name": "a.png"}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [0, 0, 20, 20], "hier_level": 0, "category_id": 1},
            {"id": 2, "image_id": 1, "bbox": [30, 30, 10, 10], "hier_level": 2, "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "fg"}],
    }
    preds = [
        {"image_id": 1, "bbox": [0, 0, 20, 19], "hier_level": 0},  # fg, right
        {"image_id": 1, "bbox": [30, 30, 10, 10], "hier_level": 1},  # fg, wrong
        {"image_id": 1, "bbox": [30, 30, 9, 9], "hier_level": 2},  # fg (IoU 0.81), right
        {"image_id": 1, "bbox": [0, 30, 5, 5], "hier_level": 2},  # background: not counted
    ]
    acc, n = level_accuracy.level_accuracy(gt, preds)
    assert n == 3 and acc == pytest.approx(2 / 3)
    assert level_accuracy.level_accuracy(gt, preds[3:]) == (-1.0, 0)


def test_padded_shape_buckets():
    assert processing.padded_shape(96, 130) == (96, 160)
    assert processing.padded_shape(96, 130, ((128, 128), (96, 160), (128, 192))) == (96, 160)
    with pytest.raises(ValueError, match="no bucket holds"):
        processing.padded_shape(300, 300, ((128, 128),))


@pytest.fixture(scope="module")
def random_model():
    from hassod_jax.models import detector

    model = detector.CascadeMaskRCNN(detector.SMALL_CONFIG)
    variables = jax.jit(lambda r: model.init(r, np.zeros((1, 64, 64, 3), np.float32)))(
        jax.random.PRNGKey(0)
    )
    return model, jax.device_get(variables)


def test_predict_random_model_gives_valid_coco_results(random_model, tmp_path):
    from hassod_jax.data import synthetic
    from hassod_jax.data.coco import load_coco_json
    from hassod_jax.evaluate.coco_eval import evaluate_coco

    model, variables = random_model
    image_dir, gt_json = synthetic.write_synthetic_dataset(str(tmp_path), 3, 0, (72, 100))
    images = predictor.images_from_coco(gt_json, image_dir)
    # Resized to short side 96: 96 x 133 -> padded 96 x 160 (one shape, batch of 2 + 1).
    preds = predictor.predict(
        model, variables, images, short_edge=96, max_size=160, batch_size=2, detections=10
    )
    assert preds, "a random model still emits detections (score threshold 0)"
    per_image = {}
    for p in preds:
        per_image.setdefault(p["image_id"], []).append(p)
        x, y, w, h = p["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 100 + 1e-3
        assert y + h <= 72 + 1e-3
        assert 0.0 <= p["score"] <= 1.0 and p["hier_level"] in (0, 1, 2)
        assert p["segmentation"]["size"] == [72, 100]
        assert p["category_id"] == 1
    assert sorted(per_image) == [1, 2, 3]
    assert all(len(v) <= 10 for v in per_image.values())
    for v in per_image.values():
        scores = [p["score"] for p in v]
        assert scores == sorted(scores, reverse=True)
    metrics = evaluate_coco(gt_json, preds, max_dets=(1, 10, 100))
    for t in ("bbox", "segm"):
        assert 0.0 <= metrics[t]["AP50"] <= 1.0 and 0.0 <= metrics[t]["AR@100"] <= 1.0

    # The same image alone (as an array, batch 1) gives the same detections, so blank
    # batch-filling images do not leak into results; and they are the model's own boxes
    # rescaled to the original size (an independent resize/normalise/pad/apply here).
    from PIL import Image

    from hassod_jax.models.detector import PIXEL_MEAN, PIXEL_STD

    img = np.asarray(Image.open(images[1][0]).convert("RGB"))
    alone = predictor.predict(
        model, variables, [(img, 2)], short_edge=96, max_size=160, batch_size=1, detections=10
    )
    assert len(alone) == len(per_image[2])
    for a, b in zip(alone, per_image[2]):
        np.testing.assert_allclose(a["bbox"], b["bbox"], rtol=1e-4, atol=1e-3)
        assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-5)
    resized = np.asarray(Image.fromarray(img).resize((133, 96), Image.BILINEAR), np.float64)
    x = np.zeros((1, 96, 160, 3), np.float32)
    x[0, :, :133] = (resized - np.asarray(PIXEL_MEAN)) / np.asarray(PIXEL_STD)
    m10 = model.clone(config=dataclasses.replace(model.config, detections_per_image=10))
    out = jax.device_get(
        jax.jit(lambda v, a: m10.apply(v, a, image_sizes=np.array([[96, 133]])))(variables, x)
    )
    ok = out["valid"][0]
    b = out["boxes"][0][ok].astype(np.float64) * np.array([100 / 133, 72 / 96] * 2)
    b[:, 0::2] = b[:, 0::2].clip(0, 100)
    b[:, 1::2] = b[:, 1::2].clip(0, 72)
    b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
    got = np.array([a["bbox"] for a in alone])
    np.testing.assert_allclose(got[:, :2], b[:, :2], rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(got[:, 2:], b[:, 2:] - b[:, :2], rtol=1e-4, atol=2e-3)
    assert {im["id"] for im in load_coco_json(gt_json)["images"]} == {1, 2, 3}


def test_predict_mixed_shapes_keep_input_order(random_model):
    """Images of two padded shapes, interleaved, batch 2: results come back grouped by image
    in input order, each image's the same as when it runs alone."""
    model, variables = random_model
    rng = np.random.default_rng(3)
    hw = [(72, 100), (100, 72), (72, 100), (100, 72), (72, 100)]
    images = [
        (rng.integers(0, 255, (h, w, 3), dtype=np.uint8), 10 + i) for i, (h, w) in enumerate(hw)
    ]
    fn = predictor.make_predict_fn(predictor._with_detections(model, 5))
    kw = dict(short_edge=96, max_size=160, detections=5, predict_fn=fn)
    preds = predictor.predict(model, variables, images, batch_size=2, **kw)
    ids = [p["image_id"] for p in preds]
    assert ids == sorted(ids) and set(ids) == {10, 11, 12, 13, 14}
    for item in images:
        alone = predictor.predict(model, variables, [item], batch_size=1, **kw)
        mine = [p for p in preds if p["image_id"] == item[1]]
        assert len(alone) == len(mine)
        for a, b in zip(alone, mine):
            np.testing.assert_allclose(a["bbox"], b["bbox"], rtol=1e-4, atol=1e-3)


def test_predict_rejects_bad_input(random_model):
    model, variables = random_model
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(model, variables, [(np.zeros((10, 10, 3), np.float32), 1)])
    with pytest.raises(ValueError, match="batch_size"):
        predictor.predict(model, variables, [], batch_size=0)


# ----------------------------------------------------------------------------------------------
# detect(): one image in, NumPy arrays in the original image's pixels out.


def _scene(h=72, w=100, seed=5):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    img[10:50, 20:70] = rng.integers(150, 255, 3, dtype=np.uint8)  # a bright rectangle
    return img


def test_detect_shapes_and_frame(random_model):
    model, variables = random_model
    img = _scene()
    out = predictor.detect(model, variables, img, short_edge=96, max_size=160)
    n = len(out["scores"])
    assert n > 0
    assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == np.float32
    assert out["scores"].dtype == np.float32 and out["levels"].shape == (n,)
    assert out["level_probs"].shape == (n, 3) and out["masks"].shape == (n, 72, 100)
    assert out["masks"].dtype == bool
    assert np.all(np.diff(out["scores"]) <= 0)  # descending
    np.testing.assert_array_equal(out["levels"], out["level_probs"].argmax(-1))
    b = out["boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 100).all() and (b[:, 1] >= 0).all()
    assert (b[:, 3] <= 72).all() and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    # The original frame: the same detections as predict() (tested above against the model's
    # own boxes rescaled by original / resized), each mask inside its box (+1 px).
    ref = predictor.predict(model, variables, [(img, 7)], short_edge=96, max_size=160)
    assert len(ref) == n
    np.testing.assert_allclose(
        [r["bbox"] for r in ref], np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1), atol=1e-4
    )
    for m, box in zip(out["masks"], b):
        ys, xs = np.nonzero(m)
        if len(ys):
            assert xs.min() >= np.floor(box[0]) - 1 and xs.max() <= np.ceil(box[2]) + 1
            assert ys.min() >= np.floor(box[1]) - 1 and ys.max() <= np.ceil(box[3]) + 1
    # A larger copy of the image: boxes scale with it (the frame is the input's, not the
    # detector's 96-pixel one).
    from PIL import Image

    big = np.asarray(Image.fromarray(img).resize((200, 144), Image.NEAREST))
    out2 = predictor.detect(model, variables, big, short_edge=96, max_size=160)
    assert out2["masks"].shape[1:] == (144, 200)
    assert (out2["boxes"][:, 2] <= 200).all() and (out2["boxes"][:, 2] > 100).any()


def test_detect_score_threshold(random_model):
    model, variables = random_model
    img = _scene()
    full = predictor.detect(model, variables, img, short_edge=96, max_size=160)
    t = float(np.median(full["scores"]))
    part = predictor.detect(model, variables, img, short_edge=96, max_size=160, score_threshold=t)
    keep = full["scores"] >= t
    assert 0 < keep.sum() < len(keep)
    for k in full:
        np.testing.assert_array_equal(part[k], full[k][keep])
    same = processing.filter_detections(full, score_threshold=t)
    for k in full:
        np.testing.assert_array_equal(same[k], part[k])


def test_filter_detections_by_level(random_model):
    model, variables = random_model
    full = predictor.detect(model, variables, _scene(), short_edge=96, max_size=160)
    levels = full["levels"]
    for spec, want in (
        ("whole", {0}),
        ("part,subpart", {1, 2}),
        (("subpart", "whole"), {0, 2}),
        ((1,), {1}),
        ("", {0, 1, 2}),
        ("all", {0, 1, 2}),
    ):
        out = processing.filter_detections(full, levels=spec)
        keep = np.isin(levels, sorted(want))
        assert len(out["scores"]) == keep.sum()
        assert set(out["levels"].tolist()) <= want
        for k in full:
            np.testing.assert_array_equal(out[k], full[k][keep])
    # Synthetic levels so that every level occurs.
    fake = {k: v[:3] for k, v in full.items()}
    fake["levels"] = np.array([2, 0, 1])
    assert processing.filter_detections(fake, levels="part")["levels"].tolist() == [1]
    assert processing.parse_levels("Part, whole") == (0, 1)
    with pytest.raises(ValueError, match="whole,part,subpart"):
        processing.parse_levels("whole,parts")
    with pytest.raises(ValueError, match="levels"):
        processing.parse_levels((3,))


def test_detections_to_results_round_trip(random_model):
    from pycocotools import mask as mask_utils

    model, variables = random_model
    dets = predictor.detect(model, variables, _scene(), short_edge=96, max_size=160)
    res = processing.detections_to_results(dets, 42)
    assert len(res) == len(dets["scores"])
    decoded = mask_utils.decode([r["segmentation"] for r in res]).transpose(2, 0, 1)
    np.testing.assert_array_equal(decoded.astype(bool), dets["masks"])
    for r, lp, lv in zip(res, dets["level_probs"], dets["levels"]):
        assert r["image_id"] == 42 and r["hier_level"] == lv
        np.testing.assert_allclose(r["level_probs"], lp, rtol=1e-6)
    empty = processing.filter_detections(dets, score_threshold=2.0)
    assert processing.detections_to_results(empty, 1) == []


def test_list_inputs_folder_glob_file_and_coco_json(tmp_path):
    import json

    from PIL import Image

    for name in ("b.png", "a.jpg", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "z.png")
    folder = predictor.list_inputs(str(tmp_path))
    assert [(i, f) for _, i, f in folder] == [(1, "a.jpg"), (2, "b.png")]
    assert folder[0][0] == str(tmp_path / "a.jpg")
    globbed = predictor.list_inputs(str(tmp_path / "**" / "*.png"))
    assert [f for _, _, f in globbed] == ["b.png", os.path.join("sub", "z.png")]
    assert predictor.list_inputs(str(tmp_path / "sub" / "z.png")) == [
        (str(tmp_path / "sub" / "z.png"), 1, "z.png")
    ]
    coco = {"images": [{"id": 9, "file_name": "z.png"}], "annotations": []}
    (tmp_path / "sub" / "list.json").write_text(json.dumps(coco))
    listed = predictor.list_inputs(str(tmp_path / "sub" / "list.json"))
    assert listed == [(str(tmp_path / "sub" / "z.png"), 9, "z.png")]
    other = predictor.list_inputs(str(tmp_path / "sub" / "list.json"), image_dir="/data")
    assert other[0][0] == os.path.join("/data", "z.png")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        predictor.list_inputs(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        predictor.list_inputs(str(tmp_path / "*.gif"))
