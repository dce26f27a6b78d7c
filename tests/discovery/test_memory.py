"""Stage 1's host memory is bounded by what one image needs, not by the batch or the number of
masks: the ViT on CPU sees one device group of images per call and no padding, refinement
holds one mask at the original size at a time, the levels decode an image's pool once, and
the final files are assembled streaming through the chunk files.
Peaks are read with tracemalloc (NumPy reports its buffers to it) against the byte size of
the masks involved (experiments/bench_discovery_memory.py measures whole runs)."""

import glob
import json
import os
import tracemalloc

import numpy as np

from hassod_jax import utils
from hassod_jax.discovery import pipeline, refine
from tests.discovery.test_pipeline import _config, _write_images


def _peak(fn, *args):
    tracemalloc.start()
    try:
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _tiny_vit(folder):
    import jax

    from hassod_jax.models import vit
    from hassod_jax.weights import formats

    arch = dict(patch_size=8, embed_dim=48, depth=1, num_heads=2, mlp_dim=96, pos_grid=4)
    module = vit.VisionTransformer(**arch)
    params = module.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    formats.save_converted(folder, params, arch, family="vit", source="test")
    return folder


def test_vit_on_cpu_sees_a_device_group_per_call_and_no_padding(tmp_path, monkeypatch):
    import jax

    assert jax.default_backend() == "cpu"
    _write_images(tmp_path / "imgs", 3)
    cfg = _config(
        tmp_path / "imgs", backbone="dino", dino_checkpoint=_tiny_vit(str(tmp_path / "vit")),
        batch_size=8,
    )  # fmt: skip
    calls = []
    make = pipeline.FeatureExtractor.__init__

    def init(self, config):
        make(self, config)
        inner = self._features
        self._features = lambda x: calls.append(len(x)) or inner(x)

    monkeypatch.setattr(pipeline.FeatureExtractor, "__init__", init)
    result = pipeline.discover(cfg, str(tmp_path / "w"))
    assert result["images"] == 3
    # 3 images in a batch of 8: the ViT computes those 3, a device group at a time
    assert sum(calls) == 3 and max(calls) <= jax.local_device_count(), calls
    # more images than devices: a group at a time, the features those of a whole-batch call
    extractor = pipeline.FeatureExtractor(cfg)
    n = jax.local_device_count() + 2
    x = np.random.default_rng(0).normal(size=(n, 160, 160, 3)).astype(np.float32)
    calls.clear()
    grouped = extractor(x, None)
    assert calls == [jax.local_device_count(), 2]
    extractor.group = 0
    np.testing.assert_allclose(grouped, extractor(x, None), rtol=1e-5, atol=1e-5)


def _regions(k, grid=60):
    """k disjoint vertical stripes of the patch grid (and the rest), one-hot (R, grid, grid)."""
    labels = np.minimum(np.arange(grid) * k // grid, k - 1)
    return np.stack([np.broadcast_to(labels == i, (grid, grid)) for i in range(k)])


def test_refinement_holds_one_full_size_mask_at_a_time():
    """20 regions refined (identity CRF) to 1500 x 2000: each kept mask is 3 MB as bool; all
    20 at once in several copies were 240 MB and more."""
    image = np.full((160, 160, 3), 128, np.uint8)
    size = (1500, 2000)
    anns, peak = _peak(refine.refine_regions, image, _regions(20), size, lambda im, p: p)
    assert len(anns) == 20
    one_mask = size[0] * size[1]  # bytes of one bool mask
    assert peak < 12 * one_mask, peak / one_mask


def test_levels_decode_the_pool_once():
    """Three thresholds' masks at 1500 x 2000 (60 masks, 180 MB as bool): the pool is decoded
    once, into the array the trees read; the old path held it about three times over."""
    from hassod_jax.discovery import hierarchy

    image = np.full((160, 160, 3), 128, np.uint8)
    size = (1500, 2000)
    per_threshold = [
        pipeline.refine_job(
            {"uint8": image, "height": size[0], "width": size[1], "regions": _regions(k),
             "q": refine.upsample_masks(_regions(k), (160, 160)), "refine": True,
             "min_area": 100, "crf_kwargs": {}}
        )
        for k in (10, 20, 30)
    ]  # fmt: skip
    job = {"height": size[0], "width": size[1], "coverage": 0.9, "per_threshold": per_threshold}
    out, peak = _peak(pipeline.levels_job, job)
    pool = sum(len(a) for a in out["per_threshold"]) * size[0] * size[1]
    assert len(out["ensemble"]) == 60
    assert peak < 1.75 * pool, peak / pool
    # the levels are those of the trees built on freshly decoded masks
    from pycocotools import mask as mask_utils

    def levels(anns):
        m = mask_utils.decode([a["segmentation"] for a in anns]).transpose(2, 0, 1)
        return hierarchy.hierarchy_levels(np.ascontiguousarray(m, bool), 0.9)[0].tolist()

    assert [a["hier_level"] for a in out["ensemble"]] == levels(out["ensemble"])
    for anns in out["per_threshold"]:
        assert [a["hier_level"] for a in anns] == levels(anns)



def _fake_run(out_dir, n_images, chunk=10, n_anns=40, shards=2):
    """Chunk files as `n_images` images discovered over `shards` jobs would leave them (image
    i in shard i % shards), every 7th image skipped; each image's results hold `n_anns`
    annotations of ~1 kB per list."""
    rng = np.random.default_rng(n_images)
    for s in range(shards):
        indices = list(range(s, n_images, shards))
        chunks = [indices[i : i + chunk] for i in range(0, len(indices), chunk)]
        d = os.path.join(out_dir, "work", f"shard_{s:04d}_of_{shards:04d}")
        for k, idx in enumerate(chunks):
            rec = {"images": [], "results": [], "skipped": []}
            for i in idx:
                if i % 7 == 3:
                    rec["skipped"].append({"index": i, "reason": "bad", "file_name": f"{i}.jpg",
                                           "image_id": i + 1})  # fmt: skip
                    continue
                rec["images"].append({"index": i, "id": i + 1, "file_name": f"{i}.jpg",
                                      "height": 30, "width": 40})  # fmt: skip

                def anns(k, i=i):
                    return [{"segmentation": {"size": [30, 40], "counts": "x" * 1000 + str(i)},
                             "area": int(rng.integers(1, 99)), "bbox": [1.0, 2.0, 3.0, 4.0],
                             "hier_level": j % 3} for j in range(k)]  # fmt: skip

                rec["results"].append({"ensemble": anns(n_anns), "regions": [5, 3],
                                       "per_threshold": [anns(n_anns // 2), anns(n_anns // 2)]})
            utils.atomic_write_json(os.path.join(d, f"chunk_{k:06d}.json"), rec)
        utils.atomic_write_json(os.path.join(d, "done.json"),
                                {"num_chunks": len(chunks), "num_images": len(indices)})


def _expected(out_dir, pick):
    """The file the whole result held in memory gives: json.dumps of one dict."""
    rows, skipped = [], []
    for path in sorted(glob.glob(os.path.join(out_dir, "work", "shard_*", "chunk_*.json"))):
        rec = json.load(open(path))
        rows += list(zip(rec["images"], rec["results"]))
        skipped += rec["skipped"]
    rows.sort(key=lambda r: r[0]["index"])
    anns = [
        {"id": 0, "image_id": im["id"], "category_id": 1, "iscrowd": 0, **{
            k: a[k] for k in ("segmentation", "area", "bbox", "hier_level")}}
        for im, res in rows for a in pick(res)
    ]  # fmt: skip
    for i, a in enumerate(anns):
        a["id"] = i + 1
    images = [{k: v for k, v in im.items() if k != "index"} for im, _ in rows]
    data = {"images": images, "annotations": anns, "categories": pipeline.CATEGORIES}
    return json.dumps(data).encode(), rows, sorted(skipped, key=lambda s: s["index"])


def test_assembly_streams_the_chunk_files(tmp_path):
    """The final files are exactly json.dumps of the whole result, and assembling 10x the
    images does not take 10x the memory: one chunk per shard is held, not every chunk."""
    peaks = {}
    for n in (40, 400):
        out = str(tmp_path / f"run{n}")
        _fake_run(out, n)
        result, peaks[n] = _peak(pipeline.assemble, out, (0.2, 0.4))
        want, rows, skipped = _expected(out, lambda res: res["ensemble"])
        assert open(os.path.join(out, pipeline.ENSEMBLE_FILE), "rb").read() == want
        want, _, _ = _expected(out, lambda res: res["per_threshold"][1])
        assert open(os.path.join(out, "thresh_0.4.json"), "rb").read() == want
        got_skipped = json.load(open(os.path.join(out, pipeline.SKIPPED_FILE)))
        assert got_skipped == [{k: v for k, v in s.items() if k != "index"} for s in skipped]
        assert len(result["rows"]) == len(rows) == result["images"]
        assert list(result["rows"]) == rows and list(result["rows"]) == rows  # passes repeat
        assert result["rows"][:3] == rows[:3]
    chunk_bytes = os.path.getsize(
        os.path.join(tmp_path, "run400", "work", "shard_0000_of_0002", "chunk_000000.json")
    )
    assert peaks[400] < 2 * peaks[40], peaks
    assert peaks[400] < 30 * chunk_bytes, (peaks, chunk_bytes)
