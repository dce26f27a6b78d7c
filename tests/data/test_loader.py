"""Training input pipeline: records, bucketing, padding, determinism, resume, host shards."""

import gc
import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from hassod_jax.data import augment, loader
from hassod_jax.data.synthetic import write_synthetic_dataset

BUCKETS = ((96, 160), (128, 192), (160, 224), (160, 96), (192, 128), (224, 160))


def small_config(**kw):
    base = dict(
        global_batch_size=4,
        short_edges=(64, 96, 128),
        max_size=200,
        buckets=BUCKETS,
        max_instances=24,
        seed=0,
    )
    base.update(kw)
    return loader.LoaderConfig(**base)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("syn")
    image_dir, json_path = write_synthetic_dataset(str(folder), 10, seed=0, size=(96, 128))
    # Two portrait images so that both orientations occur.
    data = json.load(open(json_path))
    for img in data["images"][:2]:
        path = os.path.join(image_dir, img["file_name"])
        Image.fromarray(np.asarray(Image.open(path)).transpose(1, 0, 2).copy()).save(path)
        img["height"], img["width"] = img["width"], img["height"]
    for ann in data["annotations"]:
        if ann["image_id"] in (data["images"][0]["id"], data["images"][1]["id"]):
            m = mask_utils.decode(ann["segmentation"]).T
            rle = mask_utils.encode(np.asfortranarray(m))
            ann["segmentation"] = {"size": list(m.shape), "counts": rle["counts"].decode()}
            x, y, w, h = ann["bbox"]
            ann["bbox"] = [y, x, h, w]
    json.dump(data, open(json_path, "w"))
    return image_dir, json_path


@pytest.fixture(scope="module")
def records(synthetic):
    return loader.CocoRecords(synthetic[1], synthetic[0])


def test_coco_records_crowd_polygons_levels(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "b.png")
    poly = [[2, 2, 12, 2, 12, 8, 2, 8]]
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 20, "width": 30},
            {"id": 2, "file_name": "b.png", "height": 20, "width": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "segmentation": poly, "bbox": [2, 2, 10, 6]},
            {"id": 2, "image_id": 1, "segmentation": poly, "bbox": [2, 2, 10, 6], "iscrowd": 1},
            {"id": 3, "image_id": 1, "segmentation": poly, "bbox": [2, 2, 10, 6], "hier_level": 2},
            {"id": 4, "image_id": 2, "segmentation": poly, "bbox": [2, 2, 10, 6], "iscrowd": 1},
        ],
    }
    rec = loader.CocoRecords(coco, str(tmp_path))
    assert len(rec) == 1  # image 2 only has a crowd annotation
    ex = rec.load(0)
    assert ex["levels"].tolist() == [0, 2]  # hier_level optional -> 0; crowd ignored
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 20, 30))).astype(bool)
    np.testing.assert_array_equal(ex["masks"][0], ref)
    np.testing.assert_allclose(ex["boxes"][0], [2, 2, 12, 8])
    coco["annotations"][0]["hier_level"] = 5
    with pytest.raises(ValueError, match="hier_level"):
        loader.CocoRecords(coco, str(tmp_path))
    coco["annotations"][0]["hier_level"] = 0
    coco["images"][0]["height"] = 21
    with pytest.raises(ValueError, match="JSON says 21x30"):
        loader.CocoRecords(coco, str(tmp_path)).load(0)


def test_choose_bucket():
    b = [(320, 576), (512, 896), (576, 320), (1024, 1344)]
    assert loader.choose_bucket(240, 320, b) == 0
    assert loader.choose_bucket(321, 500, b) == 1  # 321 rounds up to 352
    assert loader.choose_bucket(500, 300, b) == 2
    assert loader.choose_bucket(1024, 1333, b) == 3
    with pytest.raises(ValueError, match="no bucket holds a 1100x600"):
        loader.choose_bucket(1100, 600, b)
    # Every output of stage 2's training resize fits the default buckets.
    for h, w in [(480, 640), (640, 480), (100, 3000), (3000, 100), (500, 500)]:
        for s in augment.SHORT_EDGES:
            nh, nw = augment.resize_output_shape(h, w, s, 1333)
            loader.choose_bucket(nh, nw, loader.DEFAULT_BUCKETS)


def test_bucketing_padding_and_valid(records):
    cfg = small_config()
    src = loader.DetectionBatchSource(records, cfg, num_steps=12, process_index=0, process_count=1)
    shapes = set()
    for k in range(12):
        b = src[k]
        hb, wb = b["images"].shape[1:3]
        assert (hb, wb) == src.bucket_of(k)
        shapes.add((hb, wb))
        for i, (h, w) in enumerate(b["image_sizes"]):
            # The bucket is the smallest one holding the padded size.
            assert loader.choose_bucket(h, w, BUCKETS) == BUCKETS.index((hb, wb))
            assert (b["images"][i, h:] == 0).all() and (b["images"][i, :, w:] == 0).all()
            assert not b["masks"][i, :, h:].any() and not b["masks"][i, :, :, w:].any()
            n = int(b["valid"][i].sum())
            assert b["valid"][i, :n].all() and not b["valid"][i, n:].any()
            assert b["masks"][i, :n].any(axis=(1, 2)).all()
            assert not b["masks"][i, n:].any() and (b["boxes"][i, n:] == 0).all()
            assert (b["levels"][i, n:] == 0).all()
            assert set(b["levels"][i, :n].tolist()) <= {0, 1, 2}
            assert (b["boxes"][i, :n, 2] <= w + 1e-4).all() and (b["boxes"][i, :n, 3] <= h).all()
        assert b["images"].dtype == np.float32 and b["masks"].dtype == bool
        assert b["boxes"].dtype == np.float32 and b["levels"].dtype == np.int32
        assert b["image_sizes"].dtype == np.int32
    assert 2 <= len(shapes) <= len(BUCKETS)


def test_normalization_uint8_and_packed_masks(records):
    f32 = loader.DetectionBatchSource(records, small_config(), 3, 0, 1)[2]
    u8 = loader.DetectionBatchSource(
        records, small_config(image_dtype="uint8", pack_masks=True), 3, 0, 1
    )[2]
    assert u8["images"].dtype == np.uint8
    mean, std = np.array(loader.PIXEL_MEAN), np.array(loader.PIXEL_STD)
    for i, (h, w) in enumerate(f32["image_sizes"]):
        ref = (u8["images"][i, :h, :w].astype(np.float64) - mean) / std
        np.testing.assert_allclose(f32["images"][i, :h, :w], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        loader.normalize_padded(u8["images"], u8["image_sizes"]),
        f32["images"],
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_array_equal(loader.unpack_masks(u8["masks"]), f32["masks"])
    import jax.numpy as jnp

    np.testing.assert_allclose(
        np.asarray(
            loader.normalize_padded(jnp.asarray(u8["images"]), jnp.asarray(u8["image_sizes"]))
        ),
        f32["images"],
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        np.asarray(loader.unpack_masks(jnp.asarray(u8["masks"]))), f32["masks"]
    )


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_determinism_and_seed(records):
    a = loader.NumpyBatchIterator(loader.DetectionBatchSource(records, small_config(), 4, 0, 1))
    b = loader.NumpyBatchIterator(loader.DetectionBatchSource(records, small_config(), 4, 0, 1))
    c = loader.NumpyBatchIterator(
        loader.DetectionBatchSource(records, small_config(seed=1), 4, 0, 1)
    )
    la, lb, lc = list(a), list(b), list(c)
    assert len(la) == 4
    assert all(_same(x, y) for x, y in zip(la, lb))
    assert not all(_same(x, y) for x, y in zip(la, lc) if x["images"].shape == y["images"].shape)


def test_state_save_restore_numpy(records):
    src = loader.DetectionBatchSource(records, small_config(), 8, 0, 1)
    it = loader.NumpyBatchIterator(src)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = list(it)
    # A fresh process: a new source (its plan rebuilt from scratch) restored from the state.
    it2 = loader.NumpyBatchIterator(loader.DetectionBatchSource(records, small_config(), 8, 0, 1))
    it2.set_state(state)
    rest2 = list(it2)
    assert len(rest) == 5 and all(_same(x, y) for x, y in zip(rest, rest2))


def test_grain_workers_match_numpy_and_resume(records):
    src = loader.DetectionBatchSource(records, small_config(), 4, 0, 1)
    it = loader.make_train_iterator(
        records, small_config(), num_steps=4, worker_count=2, process_index=0, process_count=1
    )
    assert isinstance(it, loader.GrainBatchIterator)
    first = [next(it), next(it)]
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"next_step": 2}
    it.set_state(state)  # restarts the grain DataLoader (and its workers) at step 2
    rest = list(it)
    it.close()
    del it
    gc.collect()
    got = first + rest
    assert len(got) == 4
    for k, batch in enumerate(got):
        assert _same(batch, src[k]), k  # the same batches as the in-process path


def test_host_shards_disjoint_and_cover(records):
    # One short side and every image in the first bucket: the plan is each epoch's
    # permutation cut into batches.
    cfg = small_config(
        short_edges=(64,), buckets=((96, 160), (160, 96)), global_batch_size=2, copy_paste=False
    )
    n = len(records)
    hosts = [loader.DetectionBatchSource(records, cfg, 100, p, 2) for p in range(2)]
    seen = []
    assert n % 2 == 0
    for k in range(n // 2):  # the first epoch
        r0, r1 = hosts[0].local_rows(k), hosts[1].local_rows(k)
        assert hosts[0].bucket_of(k) == hosts[1].bucket_of(k)
        full, _ = hosts[0].plan.batch(k)
        np.testing.assert_array_equal(np.concatenate([r0, r1]), full)
        seen += r0[:, 0].tolist() + r1[:, 0].tolist()
    assert sorted(seen) == list(range(n))  # the hosts' shards cover the epoch, no overlap
    b0, b1 = hosts[0][0], hosts[1][0]
    assert b0["images"].shape[0] == 1 and b0["images"].shape == b1["images"].shape
    assert b0["image_ids"][0] != b1["image_ids"][0]
    with pytest.raises(ValueError, match="not divisible"):
        loader.DetectionBatchSource(records, small_config(global_batch_size=3), 5, 0, 2)


def test_max_instances_truncation(records):
    cfg = small_config(max_instances=3)
    b = loader.DetectionBatchSource(records, cfg, 2, 0, 1)[0]
    assert b["valid"].shape == (4, 3) and b["masks"].shape[1] == 3
    assert b["valid"].any(axis=1).all()


def _write_images(folder, names, h, w):
    for name in names:
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(folder / name)


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode()}


def test_images_without_pseudo_labels_are_dropped_and_logged(tmp_path, caplog):
    import logging

    _write_images(tmp_path, ["a.png", "b.png", "c.png", "d.png"], 20, 30)
    poly = [[2, 2, 12, 2, 12, 8, 2, 8]]
    ann = {"segmentation": poly, "bbox": [2, 2, 10, 6]}
    coco = {
        "images": [
            {"id": i, "file_name": f"{n}.png", "height": 20, "width": 30}
            for i, n in enumerate("abcd", start=1)
        ],
        "annotations": [
            {"id": 1, "image_id": 1, **ann},
            {"id": 2, "image_id": 3, **ann, "iscrowd": 1},  # only a crowd region: dropped
            {"id": 3, "image_id": 4, **ann},
            {"id": 4, "image_id": 4, **ann, "iscrowd": 1},
        ],  # image 2 has no annotation at all: dropped
    }
    path = tmp_path / "pl.json"
    path.write_text(json.dumps(coco))
    with caplog.at_level(logging.INFO):
        rec = loader.open_records(train_json=str(path), images=str(tmp_path))
    assert rec.image_ids.tolist() == [1, 4] and rec.num_dropped == 2
    assert "2 of 4" in caplog.text and "left out" in caplog.text
    every = loader.open_records(train_json=str(path), images=str(tmp_path), filter_empty=False)
    assert len(every) == 4 and every.num_dropped == 0


def test_instances_empty_after_the_transforms_are_dropped(tmp_path):
    """detectron2's mapper: filter_empty_instances (box width/height > 1e-5, mask non-empty)
    on the transformed annotations; the reference for the mask is PIL's NEAREST resize, which
    detectron2's ResizeTransform.apply_segmentation uses."""
    h, w = 64, 96
    _write_images(tmp_path, ["a.png"], h, w)
    big = np.zeros((h, w), bool)
    big[10:40, 10:50] = True
    thin = np.zeros((h, w), bool)
    thin[0, 60:90] = True  # one row, lost when the image is halved
    other = np.zeros((h, w), bool)
    other[20:30, 60:80] = True
    anns = [
        {"segmentation": _rle(big), "bbox": [10, 10, 40, 30]},
        {"segmentation": _rle(thin), "bbox": [60, 0, 30, 1]},
        {"segmentation": _rle(other), "bbox": [60, 20, 0, 10]},  # a zero-width box
        {"segmentation": _rle(other), "bbox": [60, 20, 20, 10], "hier_level": 1},
    ]
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "height": h, "width": w}],
        "annotations": [{"id": i, "image_id": 7, **a} for i, a in enumerate(anns)],
    }
    # The reference: which transformed masks and boxes are empty at half size.
    pil = Image.fromarray(thin.astype(np.uint8)).resize((48, 32), Image.NEAREST)
    assert not np.asarray(pil).any()
    rec = loader.CocoRecords(coco, str(tmp_path))
    for flip_prob in (0.0, 1.0):
        cfg = small_config(
            global_batch_size=1,
            short_edges=(32,),
            buckets=((32, 64),),
            copy_paste=False,
            flip_prob=flip_prob,
        )
        b = loader.DetectionBatchSource(rec, cfg, 1, 0, 1)[0]
        assert b["image_sizes"].tolist() == [[32, 48]]
        assert b["valid"][0].tolist() == [True, True] + [False] * (cfg.max_instances - 2)
        want = np.array([[5, 5, 25, 20], [30, 10, 40, 15]], np.float32)
        if flip_prob:
            want = np.stack([48 - want[:, 2], want[:, 1], 48 - want[:, 0], want[:, 3]], 1)
        np.testing.assert_allclose(b["boxes"][0, :2], want)
        assert b["levels"][0, :2].tolist() == [0, 1]


def test_no_empty_instance_reaches_a_batch_with_copy_paste(records):
    cfg = small_config(copy_paste=True)
    src = loader.DetectionBatchSource(records, cfg, 12, 0, 1)
    n_instances = 0
    for k in range(12):
        b = src[k]
        for i in range(len(b["valid"])):
            n = int(b["valid"][i].sum())
            n_instances += n
            boxes = b["boxes"][i, :n]
            assert b["masks"][i, :n].any(axis=(1, 2)).all(), (k, i)
            assert ((boxes[:, 2] - boxes[:, 0]) > 1e-5).all(), (k, i)
            assert ((boxes[:, 3] - boxes[:, 1]) > 1e-5).all(), (k, i)
    assert n_instances > 0


# ----------------------------------------------------------------------------------------------
# Mean Teacher's strong views (`strong_views=True`).

STRONG_SEED = 3


def _strong_rng(step, index):
    # The loader's documented stream: [seed, 2 (the strong-view tag), step, global index].
    return np.random.default_rng([STRONG_SEED, 2, step, index])


def test_strong_views_shapes_padding_instances_and_determinism(records):
    from hassod_jax.data import strong_augment

    kw = dict(seed=STRONG_SEED, image_dtype="uint8")  # copy-paste on: the view of the pasted image
    plain = loader.DetectionBatchSource(records, small_config(**kw), 6, 0, 1)
    strong = loader.DetectionBatchSource(records, small_config(strong_views=True, **kw), 6, 0, 1)
    again = loader.DetectionBatchSource(records, small_config(strong_views=True, **kw), 6, 0, 1)
    f32 = loader.DetectionBatchSource(
        records, small_config(strong_views=True, seed=STRONG_SEED), 6, 0, 1
    )
    n_changed = 0
    for k in range(6):
        a, b = strong[k], plain[k]
        # Turning strong views on adds one key and changes nothing else: the same weak images,
        # sizes, ids and the same instances (boxes, masks, levels, valid) serve both views.
        assert set(a) == set(b) | {"images_strong"}
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        s, w = a["images_strong"], a["images"]
        assert s.shape == w.shape and s.dtype == w.dtype == np.uint8
        for i, (h, wd) in enumerate(a["image_sizes"]):
            assert not s[i, h:].any() and not s[i, :, wd:].any(), (k, i)  # zero padding
            want = strong_augment.strong_view(w[i, :h, :wd], _strong_rng(k, i))
            np.testing.assert_array_equal(s[i, :h, :wd], want, err_msg=f"step {k} image {i}")
            n_changed += not np.array_equal(want, w[i, :h, :wd])
        assert _same(a, again[k])  # deterministic per step (a fresh source, same batch)
        # The float32 batch: both views normalised the same way, padding 0.
        c = f32[k]
        assert c["images_strong"].shape == c["images"].shape
        assert c["images_strong"].dtype == c["images"].dtype == np.float32
        np.testing.assert_allclose(
            c["images_strong"], loader.normalize_padded(s, a["image_sizes"]), rtol=1e-6, atol=1e-6
        )
    assert n_changed > 0  # the views are not all the identity


def test_strong_views_of_host_shards_match_one_host_and_grain(records):
    # Each image's strong-view stream is indexed by its GLOBAL index in the batch, so two
    # hosts together produce exactly one host's batch (copy-paste off: it pairs examples within
    # a host's local batch by design).
    cfg = small_config(
        short_edges=(64,), buckets=((96, 160), (160, 96)), copy_paste=False, strong_views=True,
        seed=STRONG_SEED, image_dtype="uint8",
    )
    one = loader.DetectionBatchSource(records, cfg, 4, 0, 1)
    hosts = [loader.DetectionBatchSource(records, cfg, 4, p, 2) for p in range(2)]
    for k in range(2):
        full, halves = one[k], [h[k] for h in hosts]
        for key in full:
            np.testing.assert_array_equal(
                np.concatenate([x[key] for x in halves]), full[key], err_msg=key
            )
    # Grain worker processes compute the same strong views as the in-process path.
    it = loader.make_train_iterator(records, cfg, num_steps=2, worker_count=1,
                                    process_index=0, process_count=1)
    got = list(it)
    it.close()
    del it
    gc.collect()
    assert len(got) == 2 and all(_same(x, one[k]) for k, x in enumerate(got))


def test_strong_view_is_pixel_aligned_with_the_resized_flipped_weak_view(records):
    """Two loaders that differ only in flip_prob (0 vs 1) draw the same records, sizes and
    strong-view choices (the flip coins are drawn whatever their probability), so the flipped
    weak view is the mirror of the unflipped one. Every strong-view op except the random
    erasing is flip-equivariant (colour ops per pixel or through image-wide statistics, PIL's
    Gaussian blur symmetric), and the erased rectangles are drawn in the frame of the view
    they are applied to. Hence, for the flipped example, with E the erased rectangles:
      outside E and its mirror, strong(flipped) == mirror(strong(unflipped)), and
      inside E, strong(flipped) == strong(unflipped) (same noise at the same coordinates).
    A strong view computed on the un-flipped image and then flipped with the weak one would
    put the noise at the MIRRORED rectangles, failing the second line; one computed before the
    resize would have other rectangles (drawn for another (H, W)) and another shape. Both
    wrong constructions are built here and shown to differ from what the loader gives."""
    from hassod_jax.data import strong_augment

    # Short sides 64 and 128 only: the 96 x 128 originals are always resized.
    kw = dict(short_edges=(64, 128), copy_paste=False, strong_views=True, seed=STRONG_SEED,
              image_dtype="uint8")
    flipped = loader.DetectionBatchSource(records, small_config(flip_prob=1.0, **kw), 6, 0, 1)
    unflipped = loader.DetectionBatchSource(records, small_config(flip_prob=0.0, **kw), 6, 0, 1)
    n_erased = 0
    for k in range(6):
        rows_f, rows_n = flipped.local_rows(k), unflipped.local_rows(k)
        np.testing.assert_array_equal(rows_f[:, :2], rows_n[:, :2])
        assert rows_f[:, 2].all() and not rows_n[:, 2].any()
        f, n = flipped[k], unflipped[k]
        for i, (h, w) in enumerate(f["image_sizes"]):
            wf, sf = f["images"][i, :h, :w], f["images_strong"][i, :h, :w]
            wn, sn = n["images"][i, :h, :w], n["images_strong"][i, :h, :w]
            np.testing.assert_array_equal(wf, wn[:, ::-1])
            # Replaying with no op gives the weak view back: the strong view starts from it.
            np.testing.assert_array_equal(strong_augment.apply_strong(wf, strong_augment.NO_OP),
                                          wf)
            params = strong_augment.sample_strong_params(_strong_rng(k, i), h, w)
            erased = np.zeros((h, w), bool)
            for e in params.erasings:
                if e is not None:
                    erased[e.top : e.top + e.height, e.left : e.left + e.width] = True
            outside = ~(erased | erased[:, ::-1])
            np.testing.assert_array_equal(sf[outside], sn[:, ::-1][outside], err_msg=(k, i))
            np.testing.assert_array_equal(sf[erased], sn[erased], err_msg=(k, i))
            # The wrong constructions differ from the loader's view.
            on_unflipped = strong_augment.strong_view(wn, _strong_rng(k, i))[:, ::-1]
            rec = records.load(int(rows_f[i, 0]))
            on_original = strong_augment.strong_view(rec["image"][:, ::-1].copy(),
                                                     _strong_rng(k, i))
            assert on_original.shape[:2] == rec["image"].shape[:2] != (h, w)
            resized_after = augment.resize_image(on_original, int(h), int(w))
            assert not np.array_equal(resized_after, sf), (k, i)
            if erased.any():
                n_erased += 1
                assert not np.array_equal(on_unflipped, sf), (k, i)
    assert n_erased >= 10  # most of the 24 views have an erasing (p = 0.7 for the first)
