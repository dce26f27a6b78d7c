"""Stage 1's host memory is bounded by what one image needs, not by the batch or the number of
masks: the ViT on CPU sees one device group of images per call and no padding, refinement
holds one mask at the original size at a time, and the levels decode an image's pool once.
Peaks are read with tracemalloc (NumPy reports its buffers to it) against the byte size of
the masks involved (experiments/bench_discovery_memory.py measures whole runs)."""

import tracemalloc

import numpy as np

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

