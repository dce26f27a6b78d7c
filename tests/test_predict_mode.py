"""mode=predict end to end, from the command line, on a checkpoint this test trains for a few
steps (the small detector, CPU): an input folder with unreadable files in it, predictions
against `hassod_jax.detect` on the same checkpoint, the skipped list, pictures, progress with
an ETA, the log and config files, permissions from the umask, and the user errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_EDGE, MAX_SIZE = 96, 128


def _cli(*args, timeout=900, umask=None):
    # The umask is set here and inherited (a preexec_fn would make subprocess fork a process
    # that runs JAX's threads).
    old = os.umask(umask) if umask is not None else None
    try:
        return subprocess.run(
            [sys.executable, "-m", "hassod_jax.main", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
    finally:
        if old is not None:
            os.umask(old)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A training workdir of the small detector after 2 steps on generated scenes."""
    import jax

    from hassod_jax import defaults
    from hassod_jax.data import synthetic
    from hassod_jax.modes import train as train_mode

    root = tmp_path_factory.mktemp("predict_mode")
    image_dir, gt_json = synthetic.write_synthetic_dataset(str(root / "data"), 8, 0, (72, 100))
    c = defaults.training()
    c.train_json, c.images = gt_json, image_dir
    c.model.size = "small"
    # Not the default 0.5, and no tensor shape shows it: the checkpoint's stored config carries
    # it to prediction.
    c.model.test_nms_thresh = 0.6
    c.dtype = "float32"
    c.batch_size = jax.device_count()
    c.max_iter = 2
    c.warmup_iters = 1
    c.log_every = 1
    c.checkpoint_every = 2
    c.keep_checkpoints = 1
    c.data.short_edges, c.data.max_size = (SHORT_EDGE,), MAX_SIZE
    c.data.buckets = ((96, 128), (128, 96))
    c.data.max_instances = 16
    c.data.workers = 0
    if "precise_bn" in c:
        c.precise_bn = False
    workdir = str(root / "train")
    train_mode.train(c, workdir)
    return workdir, image_dir, gt_json


def _input_folder(tmp_path, image_dir):
    """Three of the scenes, a corrupt 'JPEG', an empty PNG and a text file (not an image)."""
    import shutil

    folder = tmp_path / "inputs"
    folder.mkdir()
    names = sorted(n for n in os.listdir(image_dir) if n.endswith(".png"))[:3]
    for n in names:
        shutil.copy(os.path.join(image_dir, n), folder / n)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder, names


def test_predict_mode_end_to_end(trained, tmp_path):
    from PIL import Image

    from hassod_jax import detect, load_detector

    checkpoint, image_dir, gt_json = trained
    folder, names = _input_folder(tmp_path, image_dir)
    out = tmp_path / "out"
    r = _cli(
        "--config",
        "configs/predict.py",
        "--workdir",
        str(out),
        f"--config.checkpoint={checkpoint}",
        f"--config.images={folder}",
        "--config.score_threshold=0.0",
        "--config.detections=30",
        f"--config.short_edge={SHORT_EDGE}",
        f"--config.max_size={MAX_SIZE}",
        "--config.max_pictures=2",
        "--config.log_every_s=0",
        umask=0o022,
    )
    assert r.returncode == 0, r.stderr[-4000:]

    # The unreadable files are listed with the reason and skipped; the text file is ignored.
    skipped = json.loads((out / "skipped.json").read_text())
    assert sorted(s["file_name"] for s in skipped) == ["broken.jpg", "empty.png"]
    reasons = {s["file_name"]: s["reason"] for s in skipped}
    assert "empty" in reasons["empty.png"] and "corrupt" in reasons["broken.jpg"]
    assert "Skipping broken.jpg" in r.stderr and "Skipping empty.png" in r.stderr
    listed = json.loads((out / "images.json").read_text())["images"]
    assert [im["file_name"] for im in listed] == names
    ids = {im["file_name"]: im["id"] for im in listed}

    # Predictions are detect()'s on the same checkpoint, in the original images' pixels.
    preds = json.loads((out / "predictions.json").read_text())
    assert preds, "score threshold 0 keeps every detection"
    module, variables = load_detector(checkpoint, detections_per_image=30)
    assert module.config.test_nms_thresh == 0.6  # the training run's, from its checkpoint
    from pycocotools import mask as mask_utils

    for n in names:
        img = np.asarray(Image.open(folder / n).convert("RGB"))
        mine = [p for p in preds if p["image_id"] == ids[n]]
        ref = detect(module, variables, img, short_edge=SHORT_EDGE, max_size=MAX_SIZE)
        assert len(mine) == len(ref["scores"]) > 0, n
        np.testing.assert_allclose([p["score"] for p in mine], ref["scores"], rtol=1e-4, atol=1e-5)
        boxes = np.array([p["bbox"] for p in mine])
        np.testing.assert_allclose(boxes[:, :2], ref["boxes"][:, :2], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(
            boxes[:, :2] + boxes[:, 2:], ref["boxes"][:, 2:], rtol=1e-4, atol=1e-3
        )
        for p, lv, probs in zip(mine, ref["levels"], ref["level_probs"]):
            assert p["hier_level"] == lv == int(np.argmax(p["level_probs"]))
            np.testing.assert_allclose(p["level_probs"], probs, rtol=1e-4, atol=1e-5)
            assert p["segmentation"]["size"] == list(img.shape[:2])
            assert p["category_id"] == 1
        masks = mask_utils.decode([p["segmentation"] for p in mine]).transpose(2, 0, 1)
        assert (masks.astype(bool) != ref["masks"]).mean() < 1e-3

    # predictions.json is a result list that evaluate_coco scores (the scenes' ids are the
    # ground truth's: 000001.png is image 1, and so on).
    from hassod_jax.evaluate.coco_eval import evaluate_coco

    assert all(ids[n] == int(n[:6]) for n in names)
    metrics = evaluate_coco(gt_json, preds, restrict_to_gt=True)
    assert 0.0 <= metrics["segm"]["AR@100"] <= 1.0 and metrics["num_predictions"] == len(preds)

    # Pictures of the first two images; progress with an ETA; the log and config files.
    pictures = sorted(os.listdir(out / "pictures"))
    assert pictures == [os.path.splitext(n)[0] + ".png" for n in names[:2]]
    assert re.search(r"\d+/5 images, .* ETA \d+ s", r.stderr)
    log = (out / "log.txt").read_text()
    assert "ETA" in log and "Skipping broken.jpg" in log
    assert json.loads((out / "config.json").read_text())["checkpoint"] == checkpoint
    # Outputs get the umask's permissions, not a temporary file's 0600.
    for path in [out / "predictions.json", out / "skipped.json", out / "pictures" / pictures[0]]:
        assert os.stat(path).st_mode & 0o777 == 0o644, path
    # Libraries' INFO messages (orbax's checkpoint internals) are left out.
    ours = {
        os.path.basename(f)
        for d, _, fs in os.walk(os.path.join(ROOT, "hassod_jax"))
        for f in fs
        if f.endswith(".py")
    }
    info_from = set(re.findall(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]", r.stderr, re.M))
    assert info_from and info_from <= ours, info_from - ours


def test_predict_mode_user_errors_are_one_line(tmp_path):
    def error(*extra):
        r = _cli("--config", "configs/predict.py", "--workdir", str(tmp_path / "w"), *extra)
        assert r.returncode == 2, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        lines = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
        assert len(lines) == 1, r.stderr
        return lines[0]

    assert "--config.checkpoint" in error(f"--config.images={tmp_path}")
    (tmp_path / "a.png").write_bytes(b"")
    line = error(f"--config.checkpoint={tmp_path / 'nope'}", f"--config.images={tmp_path}")
    assert "nope" in line
    line = error(
        f"--config.checkpoint={tmp_path}",
        f"--config.images={tmp_path}",
        "--config.levels=whole,bits",
    )
    assert "bits" in line and "whole,part,subpart" in line
    line = error(f"--config.checkpoint={tmp_path}", f"--config.images={tmp_path / 'none*.jpg'}")
    assert "none*.jpg" in line
