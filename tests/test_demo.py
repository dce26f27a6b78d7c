"""The embedded default runs end to end (a reduced version: 2 scenes, 1 photo, 160 px)."""

import json
import os

from hassod_jax import demo


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
