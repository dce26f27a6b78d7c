"""The modes: config.mode -> the function that runs it, and the config file that sets it."""

import importlib

# mode -> "module:function". The module is imported only when its mode runs.
MODES = {
    "discover": "hassod_jax.discovery.pipeline:run",
    "sweep": "hassod_jax.discovery.pipeline:run_sweep",
    "merge_pseudo_labels": "hassod_jax.discovery.pipeline:run_merge",
    "demo": "hassod_jax.demo:run",
    "train": "hassod_jax.train.supervised:run",
    "mean_teacher": "hassod_jax.train.mean_teacher:run",
    "prepare_gt": "hassod_jax.data.prepare_gt:run",
    "evaluate": "hassod_jax.evaluate.coco_eval:run",
    "predict": "hassod_jax.evaluate.predict:run",
}

# mode -> (the config file that sets it, what it does), for --help.
MODE_HELP = {
    "demo": (
        "configs/demo.py",
        "the embedded default: stage 1 on generated scenes and photos, "
        "a short detector run, metrics and pictures; no downloads",
    ),
    "discover": (
        "configs/discover_coco.py",
        "stage 1: a folder of images -> hierarchical pseudo-labels (resumable, shardable)",
    ),
    "sweep": (
        "configs/sweep_thresholds.py",
        "many HAC thresholds from one merge sequence per "
        "image; statistics, AR/AP with ground truth, a plot",
    ),
    "merge_pseudo_labels": (
        "configs/merge_pseudo_labels.py",
        "joins the shards of independent discovery jobs",
    ),
    "train": ("configs/train_coco.py", "stage 2: Cascade Mask R-CNN on the pseudo-labels"),
    "mean_teacher": (
        "configs/mean_teacher_coco.py",
        "stage 2, second part: Mean Teacher self-training from a trained detector",
    ),
    "evaluate": ("configs/evaluate.py", "class-agnostic COCO AP/AR of a prediction file"),
    "prepare_gt": (
        "configs/prepare_gt.py",
        "class-agnostic ground truth from COCO, LVIS, Objects365, SA-1B, UVO or KITTI files",
    ),
    "predict": (
        "configs/predict.py",
        "a trained detector on your images: predictions.json and pictures",
    ),
}


def resolve_mode(mode):
    """Returns the `run` callable for `mode`, or raises ValueError naming the valid modes."""
    if mode not in MODES:
        raise ValueError(
            f"Unknown config.mode {mode!r}; set --config.mode to one of: {', '.join(sorted(MODES))}"
        )
    module_name, fn_name = MODES[mode].split(":")
    return getattr(importlib.import_module(module_name), fn_name)
