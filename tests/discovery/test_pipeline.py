"""Stage 1 end to end: outputs, schema, bad input, kill-and-resume, sharding + merge.

The runs use the weight-free stand-in backbone and 160x160 inputs (20x20 patches) to stay
fast; the per-step numerics are tested against their references in the other test files.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from hassod_jax import defaults, utils
from hassod_jax.discovery import pipeline
from hassod_jax.modes import discovery as discovery_modes
from tests.xla_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = dict(backbone="standin", image_size=160, num_workers=0, crf_backend="pydensecrf")


def _scene(seed, h=96, w=128):
    """A small picture with a few flat coloured shapes on a textured background."""
    rng = np.random.default_rng(seed)
    img = (rng.normal(120, 12, (h, w, 3))).clip(0, 255)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(3):
        cy, cx = rng.integers(10, h - 10), rng.integers(10, w - 10)
        r = rng.integers(8, 25)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        img[m] = rng.integers(0, 255, 3)
    return img.astype(np.uint8)


def _write_images(folder, n, start_id=1):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(_scene(i)).save(os.path.join(folder, f"{start_id + i:012d}.png"))


def _config(images, **overrides):
    c = defaults.discovery()
    c.images = str(images)
    for k, v in {**FAST, **overrides}.items():
        c[k] = v
    return c


def _cli(images, workdir, *extra):
    args = [f"--config.{k}={v}" for k, v in FAST.items()]
    return [
        sys.executable,
        "-m",
        "hassod_jax.main",
        "--config",
        os.path.join(ROOT, "configs", "discover_coco.py"),
        "--workdir",
        str(workdir),
        f"--config.images={images}",
        *args,
        *extra,
    ]


def _env():
    return cpu_env()


def _load(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted in-process run on 5 images, 2 per chunk."""
    root = tmp_path_factory.mktemp("baseline")
    _write_images(root / "imgs", 5)
    pipeline.discover(_config(root / "imgs", chunk_size=2), str(root / "w"))
    return root


def test_outputs_follow_the_spec_schema(baseline):
    from pycocotools.coco import COCO

    out = baseline / "w" / "pseudo_labels"
    names = sorted(os.listdir(out))
    for f in (
        "thresh_0.4.json",
        "thresh_0.2.json",
        "thresh_0.1.json",
        "pseudo_labels_hier.json",
        "skipped.json",
    ):
        assert f in names
    data = _load(out / "pseudo_labels_hier.json")
    assert data["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]
    assert [im["id"] for im in data["images"]] == [1, 2, 3, 4, 5]
    assert len(data["annotations"]) > 0
    ids = [a["id"] for a in data["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    per_threshold = sum(
        len(_load(out / f"thresh_{t}.json")["annotations"]) for t in ("0.4", "0.2", "0.1")
    )
    assert per_threshold == len(ids)  # the ensemble pools every threshold, no de-duplication
    for a in data["annotations"]:
        assert set(a) == {
            "id",
            "image_id",
            "category_id",
            "iscrowd",
            "segmentation",
            "area",
            "bbox",
            "hier_level",
        }
        assert a["category_id"] == 1 and a["iscrowd"] == 0 and a["hier_level"] in (0, 1, 2)
        assert isinstance(a["segmentation"]["counts"], str) and a["area"] >= 100
    coco = COCO(str(out / "pseudo_labels_hier.json"))  # loads with pycocotools
    m = coco.annToMask(data["annotations"][0])
    assert m.shape == (96, 128) and m.sum() == data["annotations"][0]["area"]
    assert _load(out / "skipped.json") == []


def test_levels_are_the_coverage_tree_of_the_pooled_masks(baseline):
    from pycocotools import mask as mask_utils

    from tests.discovery import hac_reference

    data = _load(baseline / "w" / "pseudo_labels" / "pseudo_labels_hier.json")
    for image_id in (1, 2):
        anns = [a for a in data["annotations"] if a["image_id"] == image_id]
        masks = mask_utils.decode([a["segmentation"] for a in anns]).transpose(2, 0, 1).astype(bool)
        levels, _ = hac_reference.reference_hierarchy(masks, 0.9)
        assert [a["hier_level"] for a in anns] == list(levels)


def test_resume_after_sigkill_equals_uninterrupted_run(baseline, tmp_path):
    _write_images(tmp_path / "imgs", 5)
    work = tmp_path / "w"
    cmd = _cli(tmp_path / "imgs", work, "--config.chunk_size=1")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    chunk_dir = work / "pseudo_labels" / "work" / "shard_0000_of_0001"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [f for f in os.listdir(chunk_dir)] if chunk_dir.exists() else []
        if len([f for f in done if f.startswith("chunk_")]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the run finished before it could be killed: " + proc.stderr.read().decode()
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "pseudo_labels" / "pseudo_labels_hier.json").exists()
    # The rerun must refuse other settings, then finish with the same ones.
    bad = subprocess.run(
        cmd + ["--config.thresholds=(0.3,)"], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert bad.returncode != 0 and "fresh --workdir" in bad.stderr
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming" in r.stderr
    for f in ("pseudo_labels_hier.json", "thresh_0.4.json", "thresh_0.1.json"):
        assert _load(work / "pseudo_labels" / f) == _load(baseline / "w" / "pseudo_labels" / f), f


def test_independent_jobs_merge_to_the_single_run(baseline, tmp_path):
    _write_images(tmp_path / "imgs", 5)
    for j in range(2):
        pipeline.discover(
            _config(tmp_path / "imgs", chunk_size=2, job_index=j, num_jobs=2), str(tmp_path / "w")
        )
    out = tmp_path / "w" / "pseudo_labels"
    assert not (out / "pseudo_labels_hier.json").exists()  # each job only writes its shard
    discovery_modes.run_merge(_config(tmp_path / "imgs"), str(tmp_path / "w"))
    for f in ("pseudo_labels_hier.json", "thresh_0.2.json"):
        assert _load(out / f) == _load(baseline / "w" / "pseudo_labels" / f)


def test_merge_refuses_unfinished_shards(tmp_path):
    _write_images(tmp_path / "imgs", 3)
    pipeline.discover(_config(tmp_path / "imgs", job_index=1, num_jobs=2), str(tmp_path / "w"))
    with pytest.raises(utils.InputError, match=r"Shards \[0\] of 2"):
        discovery_modes.run_merge(_config(tmp_path / "imgs"), str(tmp_path / "w"))


def _bad_and_odd_images(folder):
    os.makedirs(folder, exist_ok=True)
    rgb = _scene(7)
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(folder / "sixteen.png")
    Image.fromarray(rgb[:5, :5]).save(folder / "tiny.png")  # smaller than one 8x8 patch
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_bad_input_is_skipped_with_reasons_and_odd_modes_are_processed(tmp_path):
    _bad_and_odd_images(tmp_path / "imgs")
    result = pipeline.discover(_config(tmp_path / "imgs", chunk_size=4), str(tmp_path / "w"))
    out = tmp_path / "w" / "pseudo_labels"
    skipped = {s["file_name"]: s["reason"] for s in _load(out / "skipped.json")}
    assert set(skipped) == {"tiny.png", "empty.jpg", "notes.jpg", "truncated.jpg"}
    for name, reason in skipped.items():
        assert name in reason, reason
    assert "patch" in skipped["tiny.png"]
    done = {im["file_name"] for im in _load(out / "pseudo_labels_hier.json")["images"]}
    assert done == {"gray.png", "rgba.png", "cmyk.jpg", "palette.png", "sixteen.png"}
    assert result["skipped"] == 4


def test_missing_folder_stops_with_a_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.images"):
        pipeline.discover(_config(tmp_path / "nowhere"), str(tmp_path / "w"))


def test_dino_backbone_path_runs_and_matches_the_torch_keys(tmp_path):
    """The pipeline with a real (random, depth-1) DINO ViT-S/8 checkpoint written by torch.save,
    through the torch-free reader: the features fed to HAC equal the PyTorch model's keys."""
    torch = pytest.importorskip("torch")
    from hassod_jax.data import images as image_io
    from tests.models.torch_dino_reference import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(patch_size=8, embed_dim=384, depth=1, num_heads=6).eval()
    ckpt = tmp_path / "dino_vits8_tiny.pth"
    torch.save(model.state_dict(), ckpt)
    _write_images(tmp_path / "imgs", 2)
    cfg = _config(tmp_path / "imgs", backbone="dino", dino_checkpoint=str(ckpt), batch_size=2)
    extractor = pipeline.FeatureExtractor(cfg)
    img = image_io.resize_uint8(
        image_io.load_image_rgb(str(tmp_path / "imgs" / "000000000001.png")), 160
    )
    norm = image_io.normalize_imagenet(img)[None]
    ours = extractor(norm, img[None])
    assert ours.shape == (1, 20, 20, 384)
    with torch.no_grad():
        tokens = model.prepare_tokens(torch.from_numpy(norm).permute(0, 3, 1, 2))
        last = model.blocks[-1]  # depth 1: the last block's input is the embedded tokens
        k = last.attn.qkv(last.norm1(tokens))[..., 384:768][0, 1:].reshape(20, 20, 384).numpy()
    assert np.abs(ours[0] - k).max() <= 1e-4 * np.abs(k).max()
    result = pipeline.discover(cfg, str(tmp_path / "w"))
    assert result["images"] == 2 and result["skipped"] == 0


def test_jax_crf_backend_batches_pairs_and_agrees_with_pydensecrf(baseline, tmp_path):
    """The device CRF path (pairs batched by label bucket) keeps the same masks as pydensecrf."""
    from pycocotools import mask as mask_utils

    from hassod_jax.discovery import crf, refine

    rng = np.random.default_rng(0)
    parts = [[rng.integers(0, k, (20, 20)) for k in (3, 9, 2)] for _ in range(2)]
    parts = [[np.stack([lab == v for v in np.unique(lab)]) for lab in p] for p in parts]
    images = [
        _scene(0)[:80, :80].repeat(2, 0).repeat(2, 1),
        _scene(1)[:80, :80].repeat(2, 0).repeat(2, 1),
    ]
    kw = dict(defaults.discovery().crf)
    batched = pipeline.jax_crf_all(images, parts, kw, 160, batch_size=4)
    for i in range(2):
        for t in range(3):
            probs = refine.upsample_masks(parts[i][t], (160, 160))
            single = crf.dense_crf(images[i], probs, **kw)
            # Padding to 8 labels changes float32 summation order over 10 iterations.
            np.testing.assert_allclose(batched[i][t], np.asarray(single), atol=5e-5)
            # Parity with pydensecrf at the pipeline's settings, tight enough to tell the
            # iteration count: one iteration fewer moves Q by far more than the tolerance.
            ref = crf.dense_crf_pydensecrf(images[i], probs, **kw)
            np.testing.assert_allclose(batched[i][t], ref, atol=1e-3)
            fewer = crf.dense_crf_pydensecrf(images[i], probs, **{**kw, "iterations": 9})
            assert kw["iterations"] == 10 and np.abs(fewer - ref).max() > 1e-2

    _write_images(tmp_path / "imgs", 5)
    pipeline.discover(
        _config(tmp_path / "imgs", chunk_size=2, crf_backend="jax"), str(tmp_path / "w")
    )
    ours = _load(tmp_path / "w" / "pseudo_labels" / "pseudo_labels_hier.json")["annotations"]
    ref = _load(baseline / "w" / "pseudo_labels" / "pseudo_labels_hier.json")["annotations"]
    assert [a["image_id"] for a in ours] == [a["image_id"] for a in ref]
    ious = mask_utils.iou(
        [a["segmentation"] for a in ours], [a["segmentation"] for a in ref], [0] * len(ref)
    )
    assert np.all(np.diag(np.asarray(ious)) >= 0.98)


def test_jax_crf_pairs_are_split_over_the_hosts_devices(monkeypatch):
    """Each CRF batch is sharded along its pairs over every local device (8 in the test
    session), the batch rounded up to a multiple of them, and each device holds its share."""
    import jax

    from hassod_jax.discovery import crf

    seen = []
    real = crf.dense_crf

    def recording(image, probs, valid, **kw):
        seen.append((image.shape, {d.id for d in image.sharding.device_set},
                     image.addressable_shards[0].data.shape))
        return real(image, probs, valid, **kw)

    monkeypatch.setattr(crf, "dense_crf", recording)
    rng = np.random.default_rng(1)
    parts = [[np.stack([lab == v for v in range(3)]) for lab in [rng.integers(0, 3, (8, 8))]]]
    kw = dict(defaults.discovery().crf)
    pipeline.jax_crf_all([_scene(0)[:32, :32]], parts, kw, 32, batch_size=3)
    n = jax.local_device_count()
    assert n == 8
    (shape, devices, local), = seen
    assert shape[0] == 8 and len(devices) == 8 and local[0] == 1


def _cocoeval_segm(gt_json, preds):
    """Independent class-agnostic mask AP and AR@100: pycocotools COCOeval, useCats=0."""
    import contextlib

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        e = COCOeval(gt, gt.loadRes(preds), "segm")
        e.params.useCats = 0
        e.evaluate()
        e.accumulate()
        e.summarize()
    return {"AP": float(e.stats[0]), "AR@100": float(e.stats[8])}


def _as_results(anns):
    return [
        {"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"]}
        | {"score": 1.0}
        for a in anns
    ]


def test_sweep_reports_statistics_and_ar_per_threshold(tmp_path):
    """Per-threshold statistics and AR/AP of the sweep equal what each threshold's own output
    file gives: region and mask counts recounted, AR/AP by pycocotools COCOeval directly."""
    from hassod_jax.data import synthetic

    image_dir, gt_json = synthetic.write_synthetic_dataset(str(tmp_path / "data"), 3, 0, (96, 128))
    c = defaults.sweep()
    c.images, c.gt_json = image_dir, gt_json
    c.thresholds = (0.1, 0.2, 0.3, 0.4)
    for k, v in FAST.items():
        c[k] = v
    report = discovery_modes.run_sweep(c, str(tmp_path / "w"))
    saved = _load(tmp_path / "w" / "sweep" / "sweep.json")
    assert saved == json.loads(json.dumps(report))
    assert saved["thresholds"] == [0.1, 0.2, 0.3, 0.4] and saved["images"] == 3
    stats = saved["statistics"]
    names = ["0.1", "0.2", "0.3", "0.4"]
    assert list(stats) == names + ["ensemble"]
    # One merge sequence: a higher threshold stops earlier, so it never has fewer regions.
    regions = [stats[t]["regions_per_image"] for t in names]
    assert regions == sorted(regions) and regions[0] >= 1
    segm = saved["segm"]
    assert set(segm) == set(names) | {"ensemble", "ensemble_0.1_0.2_0.4"}

    out = tmp_path / "w" / "sweep"
    files = {t: _load(out / f"thresh_{t}.json")["annotations"] for t in names}
    files["ensemble"] = _load(out / "pseudo_labels_hier.json")["annotations"]
    # The published ensemble: per image, the masks of 0.1, then 0.2, then 0.4.
    image_ids = [im["id"] for im in _load(gt_json)["images"]]
    files["ensemble_0.1_0.2_0.4"] = [
        a for i in image_ids for t in ("0.1", "0.2", "0.4") for a in files[t] if a["image_id"] == i
    ]
    for key in names + ["ensemble"]:
        assert stats[key]["masks_per_image"] == pytest.approx(len(files[key]) / 3), key
    for key, anns in files.items():
        # Fewer than 100 masks per image: COCOeval's AP at 100 detections is the sweep's AP
        # at 1000.
        assert max(sum(a["image_id"] == i for a in anns) for i in image_ids) < 100
        want = _cocoeval_segm(gt_json, _as_results(anns))
        for metric, value in want.items():
            assert segm[key][metric] == pytest.approx(value, abs=1e-12), (key, metric)
    # The check has teeth: the thresholds' own files score differently, so scoring one
    # threshold's masks for another would show.
    assert len({(segm[t]["AP"], segm[t]["AR@100"]) for t in names}) >= 3, segm
