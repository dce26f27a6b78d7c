"""The stage-1 and evaluation config files run through their modes from the command line on
toy input: `configs/discover_coco.py` as two sharded jobs, `configs/merge_pseudo_labels.py`
joining them, `configs/sweep_thresholds.py` on the same images, and `configs/evaluate.py` on
the merged pseudo-labels, its numbers checked against pycocotools' COCOeval run here.

(`configs/train_coco.py` and `configs/mean_teacher_coco.py` run through their modes in
tests/train/test_supervised.py and test_mean_teacher_run.py; demo, predict and prepare_gt in
their own tests.)
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.xla_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THRESHOLDS = "(0.1, 0.2, 0.4)"
# The weight-free stand-in backbone, small inputs and the CPU CRF: a toy run.
TOY = ["--config.backbone=standin", "--config.image_size=96", "--config.num_workers=0",
       "--config.crf_backend=pydensecrf", f"--config.thresholds={THRESHOLDS}"]


def _run(config, workdir, *flags):
    env = cpu_env()
    r = subprocess.run(
        [sys.executable, "-m", "hassod_jax.main", "--config", os.path.join("configs", config),
         "--workdir", str(workdir), *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, f"{config}: {r.stderr[-3000:]}"
    return r


def _load(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from hassod_jax.data import synthetic

    root = tmp_path_factory.mktemp("configs_run")
    image_dir, gt_json = synthetic.write_synthetic_dataset(str(root / "data"), 3, 0, (96, 128))
    return root, image_dir, gt_json


def _cocoeval(gt_json, results, iou_type):
    """pycocotools' COCOeval at maxDets (10, 100, 1000), categories ignored: (AP, AR@100)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(gt_json)
    dt = gt.loadRes([{**r, "category_id": 1} for r in results])
    ev = COCOeval(gt, dt, iou_type)
    ev.params.useCats = 0
    ev.params.maxDets = [10, 100, 1000]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[0], ev.stats[7]


def test_discover_shards_merge_sweep_and_evaluate_from_their_config_files(scenes):
    root, image_dir, gt_json = scenes
    work = root / "discover"
    for job in (0, 1):
        _run("discover_coco.py", work, f"--config.images={image_dir}", *TOY,
             "--config.num_jobs=2", f"--config.job_index={job}")
    assert not (work / "pseudo_labels" / "pseudo_labels_hier.json").exists()
    _run("merge_pseudo_labels.py", work, f"--config.thresholds={THRESHOLDS}")
    merged = _load(work / "pseudo_labels" / "pseudo_labels_hier.json")
    names = sorted(n for n in os.listdir(image_dir) if n.endswith(".png"))
    assert sorted(im["file_name"] for im in merged["images"]) == names
    ids = [a["id"] for a in merged["annotations"]]
    assert len(ids) == len(set(ids)) and ids
    assert {a["image_id"] for a in merged["annotations"]} <= {im["id"] for im in merged["images"]}

    # The sweep over the same thresholds from one merge sequence per image gives each
    # threshold the masks discovery gave it.
    sweep_work = root / "sweep"
    _run("sweep_thresholds.py", sweep_work, f"--config.images={image_dir}", *TOY,
         f"--config.gt_json={gt_json}")
    report = _load(sweep_work / "sweep" / "sweep.json")
    assert report["thresholds"] == [0.1, 0.2, 0.4] and report["images"] == 3

    def masks(path):
        data = _load(path)
        by_name = {im["id"]: im["file_name"] for im in data["images"]}
        return sorted(
            (by_name[a["image_id"]], a["segmentation"]["counts"]) for a in data["annotations"]
        )

    for t in ("0.1", "0.2", "0.4"):
        assert masks(sweep_work / "sweep" / f"thresh_{t}.json") == masks(
            work / "pseudo_labels" / f"thresh_{t}.json"
        ), t

    # mode=evaluate on the merged pseudo-labels against the generated ground truth.
    eval_work = root / "evaluate"
    _run("evaluate.py", eval_work, f"--config.gt_json={gt_json}",
         f"--config.predictions_json={work / 'pseudo_labels' / 'pseudo_labels_hier.json'}",
         "--config.iou_types=('segm',)")
    metrics = _load(eval_work / "eval.json")
    # Discovery numbers the images as the ground truth does (sorted file names), so the
    # pseudo-labels score against it as they are (no scores: 1.0 each, as evaluate reads them).
    gt = _load(gt_json)
    assert {im["id"]: im["file_name"] for im in gt["images"]} == {
        im["id"]: im["file_name"] for im in merged["images"]
    }
    results = [
        {"image_id": a["image_id"], "segmentation": a["segmentation"], "score": 1.0}
        for a in merged["annotations"]
    ]
    ap, ar100 = _cocoeval(gt_json, results, "segm")
    assert metrics["segm"]["AP"] == pytest.approx(ap, abs=1e-12)
    assert metrics["segm"]["AR@100"] == pytest.approx(ar100, abs=1e-12)
    assert np.isfinite(ar100) and ar100 > 0
    # The sweep scored the same ensemble file the same way.
    assert report["segm"]["ensemble"]["AR@100"] == pytest.approx(ar100, abs=1e-12)
