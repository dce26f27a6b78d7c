"""The embedded default runs end to end (a reduced version: 2 scenes, 1 photo, 160 px)."""

import json
import os

from hassod_jax.modes import demo
from tests.xla_env import cpu_env


def _config():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "demo_cfg", os.path.join(root, "configs", "demo.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.num_synthetic = 2
    c.photos = ("coffee",)
    c.image_size = 160
    c.num_workers = 0
    c.train_steps = 0
    return c


def test_demo_writes_labels_metrics_and_pictures(tmp_path):
    metrics = demo.run(_config(), str(tmp_path))
    out = tmp_path / "pseudo_labels"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["backbone"] == "standin" and saved["images"] == 3
    for key in ("0.4", "0.2", "0.1", "ensemble"):
        assert 0.0 <= saved["segm"][key]["AR@100"] <= 1.0
    assert saved["segm"]["ensemble"]["AR@100"] > 0.0  # the stand-in finds generated objects
    assert saved["levels"]["gt_masks"] > 0
    assert metrics["segm"] == saved["segm"]
    assert sorted(os.listdir(tmp_path / "pictures")) == [
        "000001.png",
        "000002.png",
        "skimage_coffee.png",
    ]
    for f in ("thresh_0.4.json", "pseudo_labels_hier.json", "skipped.json"):
        assert (out / f).exists()


def test_demo_command_runs_twice_on_one_workdir(tmp_path):
    """The README's demo command, reduced, twice on the same workdir: the rerun resumes (data,
    discovery chunks and the detector's finished checkpoint are kept), scores the restored
    detector again and writes the same metrics (it crashed with KeyError 'val/bbox/AP')."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = cpu_env()  # one CPU device, as the README's command runs
    cmd = [
        sys.executable,
        "-m",
        "hassod_jax.main",
        "--config",
        "configs/demo.py",
        "--workdir",
        str(tmp_path),
        "--config.num_synthetic=3",
        "--config.photos=('coffee',)",
        "--config.image_size=160",
        "--config.num_workers=0",
        "--config.train_steps=2",
        "--config.mt_steps=2",
        "--config.precise_bn_iters=2",
        "--config.max_pictures=2",
        "--config.picture_score_threshold=0.0",
    ]
    runs = []
    for _ in range(2):
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900, env=env)
        assert r.returncode == 0, r.stderr[-4000:]
        runs.append((r, json.loads((tmp_path / "pseudo_labels" / "metrics.json").read_text())))
    (_, first), (second_run, second) = runs
    assert "Resuming at step 2" in second_run.stderr
    assert second["segm"] == first["segm"] and second["levels"] == first["levels"]
    for t in ("bbox", "segm"):
        for k, v in first["detector"][t].items():
            assert abs(second["detector"][t][k] - v) < 1e-6, (t, k)
    preds = json.loads((tmp_path / "detector" / "predictions.json").read_text())
    assert {p["image_id"] for p in preds} <= {1, 2, 3, 4} and preds
    assert sorted(os.listdir(tmp_path / "pictures")) == ["000001.png", "000002.png"]
    assert (tmp_path / "config.json").exists() and (tmp_path / "log.txt").exists()
