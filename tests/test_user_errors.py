"""Bad input to each mode is a user error: `main` shows it as one line naming the file or the
flag and exits 2 (no traceback). Each case runs the mode's own code on a small bad input and
asks `errors.is_user_error` how the command line would show what it raises; one case runs the
command line itself."""

import json
import os

import pytest

from hassod_jax import defaults
from hassod_jax.cli import errors
from hassod_jax.modes import discovery as discovery_modes
from tests.test_main import _one_line_error, _run


def _write(path, obj):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def _user_error(fn, *args):
    """The exception `fn(*args)` raises, which must be a user error with a one-line message."""
    with pytest.raises(Exception) as e:
        fn(*args)
    assert errors.is_user_error(e.value), f"{type(e.value).__name__}: {e.value}"
    assert "\n" not in str(e.value)
    return str(e.value)


def _gt(image_ids=(1,)):
    square = [[5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]]
    return {
        "images": [
            {"id": i, "file_name": f"{i}.jpg", "height": 32, "width": 32} for i in image_ids
        ],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100,
             "iscrowd": 0, "segmentation": square}
            for i in image_ids
        ],
        "categories": [{"id": 1, "name": "fg"}],
    }


def _pred(image_id, **kw):
    p = {"image_id": image_id, "category_id": 1, "score": 1.0, "bbox": [5, 5, 10, 10]}
    p["segmentation"] = [[5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]]
    p.update(kw)
    return p


# ----------------------------------------------------------------------------------------------
# mode=evaluate


def _evaluate(tmp_path, preds, gt=None, **fields):
    from hassod_jax.modes import evaluate as evaluate_mode

    c = defaults.evaluation()
    c.gt_json = _write(tmp_path / "ground_truth.json", _gt() if gt is None else gt)
    c.predictions_json = _write(tmp_path / "pseudo_labels_hier.json", preds)
    for k, v in fields.items():
        c[k] = v
    return _user_error(evaluate_mode.run, c, str(tmp_path / "w")), c


def test_evaluate_predictions_on_images_the_ground_truth_lacks(tmp_path):
    msg, c = _evaluate(tmp_path, [_pred(1), _pred(2), _pred(3)])
    assert c.gt_json in msg and c.predictions_json in msg
    assert "--config.restrict_to_gt=True" in msg and "2 prediction image id(s)" in msg


def test_evaluate_the_command_line_says_it_in_one_line(tmp_path):
    """The demo's own files, as a new user ran them: its pseudo-labels hold images its
    ground truth lacks."""
    gt = _write(tmp_path / "demo" / "ground_truth.json", _gt((1, 2)))
    preds = _write(
        tmp_path / "demo" / "pseudo_labels_hier.json",
        {"images": [], "annotations": [_pred(i) for i in range(1, 9)], "categories": []},
    )
    r = _run(
        "--config",
        "configs/evaluate.py",
        "--workdir",
        str(tmp_path / "w"),
        f"--config.gt_json={gt}",
        f"--config.predictions_json={preds}",
    )
    line = _one_line_error(r)
    assert gt in line and preds in line and "--config.restrict_to_gt=True" in line
    assert "6 prediction image id(s)" in line


@pytest.mark.parametrize(
    "case,preds,gt,fields,named",
    [
        ("a dict without annotations", {"images": []}, None, {}, "pseudo_labels_hier.json"),
        ("an image without id", [], {"images": [{"file_name": "a"}], "annotations": []}, {},
         "ground_truth.json"),
        ("'images' not a list", [], {"images": {}, "annotations": []}, {}, "ground_truth.json"),
        ("an RLE of another size", [_pred(1, segmentation={"size": [3, 3], "counts": "abc"})],
         None, {}, "pseudo_labels_hier.json"),
        ("a bbox of 2 numbers", [_pred(1, bbox=[1, 2])], None, {"iou_types": ("bbox",)},
         "pseudo_labels_hier.json"),
        ("an unknown IoU type", [], None, {"iou_types": ("box",)}, "--config.iou_types"),
    ],
)
def test_evaluate_bad_files_and_fields(tmp_path, case, preds, gt, fields, named):
    msg, _ = _evaluate(tmp_path, preds, gt, **fields)
    assert named in msg, (case, msg)


# ----------------------------------------------------------------------------------------------
# mode=discover, sweep, merge_pseudo_labels


def _discovery_config(tmp_path, **fields):
    c = defaults.discovery()
    c.images = str(tmp_path / "images")
    os.makedirs(c.images, exist_ok=True)
    c.backbone = "standin"
    c.num_workers = 0
    for k, v in fields.items():
        c[k] = v
    return c


def test_discover_bad_coco_json_and_fields(tmp_path):
    from hassod_jax.discovery import pipeline

    bad = _write(tmp_path / "list.json", {"images": [{"id": 1}], "annotations": []})
    msg = _user_error(
        discovery_modes.run_discover, _discovery_config(tmp_path, coco_json=bad), str(tmp_path)
    )
    assert bad in msg and "file_name" in msg
    bad = _write(tmp_path / "list2.json", [1, 2])
    msg = _user_error(
        discovery_modes.run_discover, _discovery_config(tmp_path, coco_json=bad), str(tmp_path)
    )
    assert bad in msg
    msg = _user_error(
        discovery_modes.run_discover, _discovery_config(tmp_path, coverage=2.0), str(tmp_path)
    )
    assert "--config.coverage" in msg
    c = _discovery_config(tmp_path, num_jobs=2, job_index=5)
    msg = _user_error(discovery_modes.run_discover, c, str(tmp_path / "w"))
    assert "--config.job_index" in msg and "--config.num_jobs" in msg


def test_merge_of_mixed_or_unfinished_shards(tmp_path):
    from hassod_jax.discovery import pipeline

    work = tmp_path / "pseudo_labels" / "work"
    os.makedirs(work / "shard_0000_of_0002")
    msg = _user_error(discovery_modes.run_merge, _discovery_config(tmp_path), str(tmp_path))
    assert "not finished" in msg and "--config.job_index" in msg
    os.makedirs(work / "shard_0000_of_0003")
    msg = _user_error(discovery_modes.run_merge, _discovery_config(tmp_path), str(tmp_path))
    assert "--config.num_jobs" in msg


def test_sweep_ground_truth_that_is_no_coco_file(tmp_path):
    from hassod_jax.discovery import sweep

    bad = _write(tmp_path / "gt.json", {"images": []})
    msg = _user_error(sweep.evaluate_thresholds, [], [0.1], bad)
    assert bad in msg and "annotations" in msg


# ----------------------------------------------------------------------------------------------
# mode=train / mean_teacher: the training file and the loader's fields


@pytest.mark.parametrize(
    "data,what",
    [
        ({"images": [{"id": 1, "height": 8, "width": 8}],
          "annotations": [{"id": 1, "image_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]}]},
         "file_name"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}, "no image with"),
        ({"images": []}, "annotations"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}],
          "annotations": [{"id": 1, "image_id": 1, "hier_level": 7, "segmentation": []}]},
         "hier_level"),
    ],
)
def test_training_file_problems(tmp_path, data, what):
    from hassod_jax.data import loader

    path = _write(tmp_path / "train.json", data)
    msg = _user_error(loader.open_records, path, str(tmp_path))
    assert path in msg and what in msg


def test_loader_fields(tmp_path):
    from hassod_jax.data import loader

    bad = loader.LoaderConfig(global_batch_size=2, buckets=((100, 100),))
    msg = _user_error(bad.validate)
    assert "--config.data.buckets" in msg and "(100, 100)" in msg
    msg = _user_error(loader.LoaderConfig(global_batch_size=2, max_instances=0).validate)
    assert "--config.data.max_instances" in msg


@pytest.mark.parametrize("build", ["train", "mean_teacher", "discover"])
def test_an_unknown_compute_dtype_names_the_field(tmp_path, build):
    # Each mode turns config.dtype into the model's dtype with one shared function; a dtype it
    # does not know is a user error naming the field, before any weights are read.
    c = {"train": defaults.training, "mean_teacher": defaults.mean_teacher,
         "discover": defaults.discovery}[build]()
    c.dtype = "float16"
    if build == "train":
        from hassod_jax.modes import train as train_mode

        msg = _user_error(train_mode.build_model, c)
    elif build == "mean_teacher":
        from hassod_jax.modes import mean_teacher as mt_mode

        c.init_checkpoint = str(tmp_path / "missing")
        msg = _user_error(mt_mode.build_model, c)
    else:
        from hassod_jax.discovery import pipeline

        (tmp_path / "dino.pth").write_bytes(b"")
        c.images, c.dino_checkpoint = str(tmp_path), str(tmp_path / "dino.pth")
        msg = _user_error(pipeline.FeatureExtractor, c)
    assert "--config.dtype" in msg and "float16" in msg and "bfloat16" in msg
