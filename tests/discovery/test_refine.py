"""Stage 1's refinement steps (docs/recipe.md, Stage 1, step 3) against torch interpolate,
scipy and pycocotools."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from scipy import ndimage

from hassod_jax.discovery import refine


def torch_bilinear(x, size):
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[
        0
    ].numpy()


@pytest.mark.parametrize(
    "shape,size",
    [
        ((3, 60, 60), (480, 480)),  # step 1: patch grid -> 480
        ((2, 30, 30), (480, 480)),  # ViT/16 grid
        ((3, 7, 5), (13, 481)),
        ((2, 60, 60), (427, 640)),
        ((2, 480, 480), (375, 500)),  # step 4: 480 -> original size (down in H, up in W)
        ((1, 480, 480), (1000, 333)),
        ((2, 5, 4), (1, 1)),
        ((1, 1, 1), (4, 3)),
    ],
)
def test_bilinear_resize_matches_torch(shape, size):
    rng = np.random.default_rng(0)
    x = rng.random(shape).astype(np.float32)
    out = refine.bilinear_resize(x, size)
    assert out.dtype == np.float32 and out.shape == (shape[0], *size)
    np.testing.assert_allclose(out, torch_bilinear(x, size), rtol=0, atol=1e-6)


def test_upsample_bool_masks_matches_torch():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(60, 60))
    masks = labels[None] == np.arange(4)[:, None, None]
    p = refine.upsample_masks(masks, (480, 480))
    ref = torch_bilinear(masks.astype(np.float32), (480, 480))
    np.testing.assert_allclose(p, ref, rtol=0, atol=1e-6)
    # A partition stays a partition: bilinear weights sum to 1.
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    q = refine.resize_probs_to_original(p, (300, 451))
    np.testing.assert_allclose(q, torch_bilinear(p, (300, 451)), rtol=0, atol=1e-6)


def test_resize_threshold_matches_dense_resize():
    """Step 4 computed sparsely equals thresholding the full torch resize."""
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(5, 12, 12)).astype(np.float32) * 4
    small = torch.from_numpy(logits)[None]
    logits = torch.nn.functional.interpolate(small, size=(96, 96), mode="bilinear")[0].numpy()
    q = np.exp(logits) / np.exp(logits).sum(0)  # CRF-like marginals: dense, sum to 1
    q[3] = 0.0
    q[4] = 0.5  # exactly at the threshold everywhere
    out = refine.resize_threshold(q, (75, 130), 0.5)
    assert out.dtype == bool and out.shape == (5, 75, 130)
    np.testing.assert_array_equal(out, refine.bilinear_resize(q, (75, 130)) >= 0.5)
    ref = torch_bilinear(q, (75, 130))
    differ = out != (ref >= 0.5)
    assert np.all(np.abs(ref[differ] - 0.5) < 1e-6)  # only float32 ties may differ
    assert not out[3].any() and out[4].all()


def test_resize_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\(R, h, w\)"):
        refine.bilinear_resize(np.zeros((4, 4)), (8, 8))


def iou_reference(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    inter = (a * b).sum()
    union = a.sum() + b.sum() - inter
    return np.nan if union == 0 else inter / union


def test_iou_filter_crafted():
    h = w = 10
    b1 = np.zeros((5, h, w), bool)
    b2 = np.zeros((5, h, w), bool)
    b1[0, :5], b2[0, :5] = True, True  # identical: IoU 1
    b1[1, :5], b2[1, 5:] = True, True  # disjoint: IoU 0
    b1[2, :4], b2[2, :2] = True, True  # IoU exactly 0.5 -> kept (>=)
    b1[3, :5], b2[3, :2] = True, True  # IoU 0.4 -> dropped
    # b1[4], b2[4] both empty: empty union -> not kept
    keep = refine.iou_filter(b1, b2, 0.5)
    np.testing.assert_array_equal(keep, [True, False, True, False, False])
    rng = np.random.default_rng(2)
    r1, r2 = rng.random((20, 8, 8)) > 0.5, rng.random((20, 8, 8)) > 0.4
    ref = np.array([iou_reference(x, y) >= 0.5 for x, y in zip(r1, r2)])
    np.testing.assert_array_equal(refine.iou_filter(r1, r2), ref)
    with pytest.raises(ValueError, match="equal shape"):
        refine.iou_filter(r1, r2[:3])


def test_filter_masks_area_and_corners():
    m = np.zeros((6, 40, 40), bool)
    m[0, 10:20, 10:20] = True  # 100 px, no corner -> kept
    m[1, 10:20, 10:20] = True
    m[1, 10, 10] = False  # 99 px -> dropped
    m[2] = True
    m[2, -1, -1] = False  # 3 corners -> dropped (background)
    m[3, :, :20] = True  # 2 corners -> kept
    m[4] = True  # 4 corners -> dropped
    m[5, 0, 0] = m[5, 0, -1] = m[5, -1, 0] = True
    m[5, 15:30, 15:30] = True  # 3 corner pixels + blob -> dropped
    np.testing.assert_array_equal(
        refine.filter_masks(m, min_area=100), [True, False, False, True, False, False]
    )


def test_fill_holes_matches_scipy():
    rng = np.random.default_rng(3)
    masks = [rng.random((50, 70)) > p for p in (0.2, 0.4, 0.5, 0.6, 0.8)]
    ring = np.zeros((20, 20), bool)
    ring[3:12, 3:12] = True
    ring[5:10, 5:10] = False  # a hole
    ring[6, 3] = False  # notch that does not open the hole
    masks.append(ring)
    diag = np.zeros((9, 9), bool)  # background connected to outside only diagonally: a hole
    diag[2:7, 2:7] = True
    diag[3:6, 3:6] = False
    diag[2, 2] = False
    masks.append(diag)
    edge = np.zeros((10, 10), bool)  # a "hole" touching the image border is not a hole
    edge[0:6, 0:6] = True
    edge[0:3, 0:3] = False
    masks.append(edge)
    masks.append(np.zeros((5, 5), bool))
    masks.append(np.ones((5, 5), bool))
    for m in masks:
        np.testing.assert_array_equal(refine.fill_holes_one(m), ndimage.binary_fill_holes(m))
    stacked = np.stack([rng.random((30, 30)) > 0.5 for _ in range(4)])
    ref = np.stack([ndimage.binary_fill_holes(m) for m in stacked])
    np.testing.assert_array_equal(refine.fill_holes(stacked), ref)


def test_encode_masks_matches_pycocotools():
    rng = np.random.default_rng(4)
    masks = np.zeros((3, 37, 53), bool)
    masks[0, 5:20, 7:30] = True
    masks[1] = rng.random((37, 53)) > 0.7
    masks[2, 36, 52] = True
    anns = refine.encode_masks(masks)
    assert len(anns) == 3
    for m, a in zip(masks, anns):
        assert isinstance(a["segmentation"]["counts"], str)
        assert a["segmentation"]["size"] == [37, 53]
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        np.testing.assert_array_equal(mask_utils.decode(a["segmentation"]), m)
        assert a["area"] == int(mask_utils.area(rle)) == int(m.sum())
        np.testing.assert_allclose(a["bbox"], mask_utils.toBbox(rle))
    assert refine.encode_masks(np.zeros((0, 4, 4), bool)) == []


def hassod_reference(image480, regions, orig, crf_fn, min_area=100):
    """Float transcription of HASSOD's hac/hac.py loop: torch interpolate, scipy, pycocotools."""
    regions = regions.astype(np.float32)
    pre = torch_bilinear(regions, image480.shape[:2])
    post = crf_fn(image480, pre)
    m1, m2 = pre >= 0.5, post >= 0.5
    with np.errstate(invalid="ignore"):
        keep = (m1 & m2).sum((1, 2)) / (m1 | m2).sum((1, 2)) >= 0.5
    if keep.sum() == 0:
        return []
    q = torch_bilinear(post[keep], orig)
    out = []
    for qi in q:
        b = (qi >= 0.5).astype(np.uint8)
        if b.sum() < min_area:
            continue
        if b[0, 0] + b[0, -1] + b[-1, 0] + b[-1, -1] >= 3:
            continue
        out.append(ndimage.binary_fill_holes(b))
    return out


def crafted_regions():
    """(4, 60, 60) partition: background, a ring object with a 1-patch hole, a block, a dot."""
    lab = np.zeros((60, 60), int)
    lab[10:30, 10:30] = 1
    lab[18:22, 18:22] = 0  # a hole inside object 1 (background label)
    lab[35:55, 30:58] = 2
    lab[5, 50] = 3  # one patch: 8x8 px at 480, small in the original
    return lab[None] == np.arange(4)[:, None, None]


def test_refine_regions_identity_crf_matches_reference():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(480, 480, 3), dtype=np.uint8)
    regions = crafted_regions()
    orig = (300, 400)

    def identity(img, probs):
        return probs

    anns, stats = refine.refine_regions(image, regions, orig, identity, return_stats=True)
    ref = hassod_reference(image, regions, orig, identity)
    assert stats == {"regions": 4, "after_iou": 4, "after_filters": len(ref)}
    # Background (4 corners) and the one-patch dot (~ 5x6 px < 100) are dropped.
    assert len(ref) == 2 and len(anns) == 2
    for a, r in zip(anns, ref):
        m = mask_utils.decode(a["segmentation"]).astype(bool)
        assert m.shape == orig
        np.testing.assert_array_equal(m, r)
        assert a["area"] == int(r.sum())
    # The object's hole (patches 18..21, centre row 100, col 133 in the original) is filled.
    before = refine.resize_probs_to_original(refine.upsample_masks(regions[1:2]), orig)[0]
    assert before[100, 133] < 0.5
    assert mask_utils.decode(anns[0]["segmentation"])[100, 133] == 1


def test_refine_regions_iou_filter_and_empty():
    image = np.zeros((480, 480, 3), np.uint8)
    regions = crafted_regions()

    def kill_region_2(img, probs):
        q = probs.copy()
        q[2] = 0.0
        return q

    anns = refine.refine_regions(image, regions, (240, 240), kill_region_2)
    ref = hassod_reference(image, regions, (240, 240), kill_region_2)
    assert len(anns) == len(ref) == 1
    assert (
        refine.refine_regions(image, np.zeros((0, 60, 60), bool), (240, 240), kill_region_2) == []
    )
    with pytest.raises(ValueError, match="crf_fn returned shape"):
        refine.refine_regions(image, regions, (240, 240), lambda i, p: p[:2])
    with pytest.raises(ValueError, match="uint8"):
        refine.refine_regions(image.astype(np.float32), regions, (240, 240), kill_region_2)


def test_refine_regions_with_pydensecrf_matches_reference():
    """The real CRF (HASSOD's hac/crf.py settings, via pydensecrf) plugged in the same way."""
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    from pydensecrf.utils import unary_from_softmax

    def crf(img, probs):
        c, h, w = probs.shape
        d = dcrf.DenseCRF2D(w, h, c)
        d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
        d.addPairwiseGaussian(sxy=3, compat=7)
        d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(img), compat=10)
        return np.array(d.inference(10)).reshape(c, h, w)

    yy, xx = np.mgrid[0:480, 0:480]
    image = np.zeros((480, 480, 3), np.uint8)
    image[...] = (40, 60, 80)
    image[(yy - 160) ** 2 + (xx - 170) ** 2 < 90**2] = (200, 60, 50)
    image[300:440, 250:420] = (50, 190, 70)
    lab = np.zeros((60, 60), int)
    lab[(np.mgrid[0:60, 0:60][0] - 20) ** 2 + (np.mgrid[0:60, 0:60][1] - 21) ** 2 < 11**2] = 1
    lab[38:55, 31:52] = 2
    regions = lab[None] == np.arange(3)[:, None, None]
    anns = refine.refine_regions(image, regions, (240, 320), crf)
    ref = hassod_reference(image, regions, (240, 320), crf)
    assert len(anns) == len(ref) == 2
    for a, r in zip(anns, ref):
        np.testing.assert_array_equal(mask_utils.decode(a["segmentation"]).astype(bool), r)
