"""Stage 2's augmentations (docs/recipe.md, Stage 2) on crafted inputs, against detectron2's
rules and torch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hassod_jax.data import augment


def d2_get_output_shape(oldh, oldw, short_edge_length, max_size):
    """float64 transcription of detectron2's ResizeShortestEdge.get_output_shape."""
    h, w = oldh, oldw
    size = short_edge_length * 1.0
    scale = size / min(h, w)
    if h < w:
        newh, neww = size, scale * w
    else:
        newh, neww = scale * h, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def make_example(masks, levels, h=40, w=40, colour=(10, 20, 30), boxes=None):
    masks = np.asarray(masks, dtype=bool).reshape(-1, h, w)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = colour
    if boxes is None:
        boxes = augment.masks_to_boxes(masks)
    return {
        "image": img,
        "masks": masks,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "levels": np.asarray(levels, np.int32),
    }


def rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_resize_output_shape_matches_detectron2():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        s = int(rng.choice(augment.SHORT_EDGES))
        assert augment.resize_output_shape(h, w, s, 1333) == d2_get_output_shape(h, w, s, 1333)
    # Hand-checked: COCO 480x640 at 800 -> 800x1067; a panorama hits the 1333 cap.
    assert augment.resize_output_shape(480, 640, 800, 1333) == (800, 1067)
    assert augment.resize_output_shape(100, 1000, 800, 1333) == (133, 1333)
    assert augment.resize_output_shape(640, 480, 240, 1333) == (320, 240)
    with pytest.raises(ValueError, match="positive"):
        augment.resize_output_shape(0, 5, 240)


def test_resize_example_pixels_masks_boxes():
    h, w = 100, 200
    m = rect(h, w, 20, 40, 10, 30)
    ex = make_example([m], [1], h, w, boxes=[[10, 20, 30, 40]])
    ex["image"] = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = augment.resize_flip(ex, short_edge=50, flip=False, max_size=1333)
    assert out["image"].shape == (50, 100, 3)
    ref = np.asarray(Image.fromarray(ex["image"]).resize((100, 50), Image.BILINEAR))
    np.testing.assert_array_equal(out["image"], ref)
    # Nearest at scale 1/2 samples source pixel 2j+1: rows 20..39 -> 10..19, cols 10..29 -> 5..14.
    np.testing.assert_array_equal(out["masks"][0], rect(50, 100, 10, 20, 5, 15))
    np.testing.assert_allclose(out["boxes"], [[5, 10, 15, 20]])
    np.testing.assert_array_equal(out["levels"], [1])


def test_hflip_exact():
    h, w = 30, 100
    m = rect(h, w, 5, 10, 10, 30)
    ex = make_example([m], [2], h, w, boxes=[[10, 5, 30, 10]])
    ex["image"][:, :50] = 200
    out = augment.hflip_example(ex)
    np.testing.assert_array_equal(out["masks"][0], rect(h, w, 5, 10, 70, 90))
    np.testing.assert_allclose(out["boxes"], [[70, 5, 90, 10]])
    assert (out["image"][:, 50:] == 200).all() and (out["image"][:, :50] == 10)[..., 0].all()
    np.testing.assert_allclose(out["boxes"], augment.masks_to_boxes(out["masks"]))


def test_random_resize_flip_is_deterministic_and_uses_the_choice_list():
    h, w = 60, 80
    ex = make_example([rect(h, w, 0, 30, 0, 40)], [0], h, w)
    shorts = set()
    for seed in range(40):
        a = augment.random_resize_flip(ex, np.random.default_rng(seed), (16, 24, 32), 1333)
        b = augment.random_resize_flip(ex, np.random.default_rng(seed), (16, 24, 32), 1333)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        shorts.add(a["image"].shape[0])
    assert shorts == {16, 24, 32}


def test_masks_to_boxes_exact():
    m = np.zeros((3, 10, 12), bool)
    m[0, 2:5, 3:7] = True
    m[1, 9, 11] = True
    np.testing.assert_array_equal(
        augment.masks_to_boxes(m), [[3, 2, 7, 5], [11, 9, 12, 10], [0, 0, 0, 0]]
    )


def test_bilinear_matches_torch_interpolate():
    rng = np.random.default_rng(1)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(2, 60, 2))
        nh, nw = (int(v) for v in rng.integers(1, 90, 2))
        m = rng.random((3, h, w)) < 0.1
        ref = (
            F.interpolate(
                torch.from_numpy(m[None].astype(np.float32)),
                size=(nh, nw),
                mode="bilinear",
                align_corners=False,
            )
            .bool()
            .numpy()[0]
        )
        np.testing.assert_array_equal(augment.bilinear_resize_float(m, nh, nw) != 0, ref)
        np.testing.assert_array_equal(augment.bilinear_resize_nonzero(m, nh, nw), ref)
        img = rng.integers(0, 256, (3, h, w)).astype(np.float32)
        refi = F.interpolate(
            torch.from_numpy(img[None]), size=(nh, nw), mode="bilinear", align_corners=False
        ).numpy()[0]
        np.testing.assert_allclose(augment.bilinear_resize_float(img, nh, nw), refi, atol=1e-3)


def test_copy_paste_occlusion_update_and_box_recomputation():
    h = w = 40
    tgt = make_example([rect(h, w, 0, 30, 0, 40)], [0], colour=(10, 10, 10))
    src = make_example([rect(h, w, 20, 40, 0, 40)], [2], colour=(200, 100, 50))
    out = augment.copy_paste(tgt, src, np.random.default_rng(0), min_ratio=1.0, max_ratio=1.0)
    # The pasted instance covers 400 / 1200 px of the existing one (< 50 %): kept.
    np.testing.assert_array_equal(out["masks"][0], rect(h, w, 0, 20, 0, 40))
    np.testing.assert_array_equal(out["masks"][1], rect(h, w, 20, 40, 0, 40))
    np.testing.assert_allclose(out["boxes"], [[0, 0, 40, 20], [0, 20, 40, 40]])
    np.testing.assert_array_equal(out["levels"], [0, 2])  # pasted keeps its hier_level
    assert (out["image"][20:] == (200, 100, 50)).all() and (out["image"][:20] == 10).all()


def test_copy_paste_removes_fully_occluded_instances():
    h = w = 40
    hidden = rect(h, w, 10, 14, 10, 16)  # 24 px, each paste below covers a third of it
    kept = rect(h, w, 30, 40, 0, 40)
    tgt = make_example([hidden, kept], [1, 0])
    pastes = [rect(h, w, 8, 16, 0, 12), rect(h, w, 8, 16, 12, 14), rect(h, w, 8, 16, 14, 40)]
    src = make_example(pastes, [2, 1, 0], colour=(255, 255, 255))
    out = augment.copy_paste(
        tgt, src, np.random.default_rng(3), min_ratio=1.0, max_ratio=1.0, random_num=False
    )
    assert len(out["masks"]) == 4  # `hidden` is gone, `kept` stays, 3 pasted
    np.testing.assert_array_equal(out["masks"][0], kept)
    pasted_boxes = sorted(map(tuple, out["boxes"][1:].tolist()))
    assert pasted_boxes == [(0, 8, 12, 16), (12, 8, 14, 16), (14, 8, 40, 16)]
    np.testing.assert_allclose(out["boxes"], augment.masks_to_boxes(out["masks"]))
    assert sorted(out["levels"][1:].tolist()) == [0, 1, 2]
    assert (out["image"][8:16] == 255).all()


def test_copy_paste_discards_paste_hiding_half_an_instance_and_rate_zero():
    h = w = 40
    tgt = make_example([rect(h, w, 0, 10, 0, 10)], [0])
    src = make_example([rect(h, w, 0, 5, 0, 40)], [1], colour=(99, 99, 99))  # covers 50 %
    out = augment.copy_paste(tgt, src, np.random.default_rng(0), min_ratio=1.0, max_ratio=1.0)
    assert out is tgt
    out = augment.copy_paste(
        tgt, make_example([rect(h, w, 30, 40, 0, 40)], [1]), np.random.default_rng(0), rate=0.0
    )
    assert out is tgt


def test_copy_paste_into_empty_target_and_scaling_against_torch():
    h = w = 40
    tgt = make_example(np.zeros((0, h, w)), [], colour=(0, 0, 0))
    src_mask = rect(h, w, 0, 40, 0, 20)  # left half
    src = make_example([src_mask], [1], colour=(200, 200, 200))
    out = augment.copy_paste(tgt, src, np.random.default_rng(5), min_ratio=0.5, max_ratio=0.5)
    ((x0, y0, x1, y1),) = out["boxes"].tolist()
    assert (x1 - x0, y1 - y0) == (10, 20)  # the 40x40 source is resized to 20x20
    small = (
        F.interpolate(
            torch.from_numpy(src_mask[None, None].astype(np.float32)),
            size=(20, 20),
            mode="bilinear",
            align_corners=False,
        )
        .bool()
        .numpy()[0, 0]
    )
    expect = np.zeros((h, w), bool)
    expect[int(y0) : int(y0) + 20, int(x0) : int(x0) + 20] = small
    np.testing.assert_array_equal(out["masks"][0], expect)
    assert (out["image"][expect] == 200).all() and (out["image"][~expect] == 0).all()


def test_copy_paste_determinism_and_random_count():
    h = w = 48
    masks = [rect(h, w, 8 * i, 8 * i + 8, 6 * i, 6 * i + 10) for i in range(5)]
    src = make_example(masks, [0, 1, 2, 0, 1], h, w, colour=(1, 2, 3))
    tgt = make_example([rect(h, w, 44, 48, 0, 48)], [0], h, w)
    added = set()
    for seed in range(30):
        a = augment.copy_paste(tgt, src, np.random.default_rng(seed))
        b = augment.copy_paste(tgt, src, np.random.default_rng(seed))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        added.add(len(a["masks"]) - 1)
    # CutLER draws 1..n-1 instances (never all n = 5) for n > 1.
    assert max(added) <= 4 and len(added) >= 3


def test_copy_paste_batch_reverses_sources():
    h = w = 20
    exs = [make_example([rect(h, w, 5 * i, 5 * i + 3, 0, 20)], [i], h, w) for i in range(3)]
    rngs = [np.random.default_rng(i) for i in range(3)]
    out = augment.copy_paste_batch(exs, rngs, min_ratio=1.0, max_ratio=1.0)
    assert out[0]["levels"].tolist() == [0, 2]  # example 0 receives example 2's instance
    assert out[2]["levels"].tolist() == [2, 0]
    assert out[1] is exs[1]  # the middle one pastes onto itself: 100 % hidden -> discarded
    with pytest.raises(ValueError, match="rngs"):
        augment.copy_paste_batch(exs, rngs[:2])


def test_instances_lost_in_resize_are_dropped():
    h, w = 100, 100
    line = rect(h, w, 0, 1, 10, 60)  # nearest at scale 1/2 samples odd rows only
    big = rect(h, w, 20, 60, 20, 60)
    ex = make_example([line, big], [2, 0], h, w)
    out = augment.resize_flip(ex, short_edge=50, flip=True, max_size=1333)
    assert len(out["masks"]) == 1 and out["levels"].tolist() == [0]
    np.testing.assert_allclose(out["boxes"], [[20, 10, 40, 30]])  # flipped: x -> 50 - x
