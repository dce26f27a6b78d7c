"""Generated scenes: masks, nesting, levels coherent with stage 1's coverage tree, COCO JSON."""

import numpy as np
from pycocotools.coco import COCO

from hassod_jax.data import images, synthetic


def coverage_levels(masks, theta=0.9):
    """Float64 NumPy transcription of the coverage tree (docs/recipe.md, Stage 1, step 4): the
    parent of a is the smallest b != a with cov(a in b) >= θ and cov(b in a) < θ."""
    n = len(masks)
    flat = masks.reshape(n, -1).astype(np.float64)
    area = flat.sum(1)
    inter = flat @ flat.T
    cov = inter / area[:, None]  # cov[a, b] = |a ∩ b| / |a|
    parent = np.full(n, -1)
    for a in range(n):
        best = None
        for b in range(n):
            if b != a and cov[a, b] >= theta and cov[b, a] < theta:
                if best is None or area[b] < area[best]:
                    best = b
        parent[a] = -1 if best is None else best
    depth = np.zeros(n, int)
    for a in range(n):
        p, d = parent[a], 0
        while p >= 0:
            p, d = parent[p], d + 1
        depth[a] = min(d, 2)
    return depth, parent


def test_make_scene_masks_nest_and_levels_match_coverage_tree():
    rng = np.random.default_rng(0)
    counts = np.zeros(3, int)
    for _ in range(3):
        img, anns = synthetic.make_scene(rng, size=(96, 128))
        assert img.dtype == np.uint8 and img.shape == (96, 128, 3)
        masks = np.stack([a["mask"] for a in anns])
        assert masks.shape[1:] == (96, 128) and masks.dtype == bool
        assert (masks.sum((1, 2)) > 0).all()
        for i, a in enumerate(anns):
            counts[a["hier_level"]] += 1
            if a["parent"] >= 0:
                assert a["parent"] < i
                parent = anns[a["parent"]]
                assert parent["hier_level"] == a["hier_level"] - 1
                assert not (a["mask"] & ~parent["mask"]).any()  # child inside parent
            else:
                assert a["hier_level"] == 0
        objects = masks[[a["hier_level"] == 0 for a in anns]]
        assert objects.sum(0).max() <= 1  # visible objects do not overlap
        levels, parents = coverage_levels(masks)
        np.testing.assert_array_equal(levels, [a["hier_level"] for a in anns])
        np.testing.assert_array_equal(parents, [a["parent"] for a in anns])
    assert counts[0] > 0 and counts[1] > 0 and counts[2] > 0


def test_make_scene_is_deterministic():
    a_img, a_anns = synthetic.make_scene(np.random.default_rng(3), size=(64, 80))
    b_img, b_anns = synthetic.make_scene(np.random.default_rng(3), size=(64, 80))
    np.testing.assert_array_equal(a_img, b_img)
    assert len(a_anns) == len(b_anns)
    for a, b in zip(a_anns, b_anns):
        np.testing.assert_array_equal(a["mask"], b["mask"])


def test_write_synthetic_dataset_loads_with_pycocotools(tmp_path):
    image_dir, js = synthetic.write_synthetic_dataset(tmp_path / "syn", 3, seed=1, size=(72, 96))
    api = COCO(js)
    assert sorted(api.getImgIds()) == [1, 2, 3]
    assert api.loadCats(api.getCatIds()) == [{"id": 1, "name": "fg", "supercategory": "fg"}]
    listed = images.list_images(image_dir)
    assert listed == [(i, f"{i:06d}.png") for i in (1, 2, 3)]
    assert len(api.anns) > 0
    for img_id, name in listed:
        img = images.load_image_rgb(f"{image_dir}/{name}")
        info = api.imgs[img_id]
        assert img.shape == (info["height"], info["width"], 3) == (72, 96, 3)
        anns = api.loadAnns(api.getAnnIds(imgIds=[img_id]))
        masks = np.stack([api.annToMask(a).astype(bool) for a in anns])
        for a, m in zip(anns, masks):
            assert a["iscrowd"] == 0 and a["category_id"] == 1
            assert isinstance(a["segmentation"]["counts"], str)
            assert a["area"] == int(m.sum()) > 0
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
        levels, _ = coverage_levels(masks)
        np.testing.assert_array_equal(levels, [a["hier_level"] for a in anns])
    # Same seed -> identical files.
    _, js2 = synthetic.write_synthetic_dataset(tmp_path / "syn2", 3, seed=1, size=(72, 96))
    assert open(js).read() == open(js2).read()
