"""The modes: config.mode -> the function that runs it, and the config file that sets it."""

import importlib
from typing import NamedTuple


class Mode(NamedTuple):
    run: str  # "module:function": imported only when the mode runs
    config: str  # the config file that sets the mode (for --help)
    help: str  # what it does (for --help)


MODES = {
    "discover": Mode(
        "hassod_jax.modes.discovery:run_discover",
        "configs/discover_coco.py",
        "stage 1: a folder of images -> hierarchical pseudo-labels (resumable, shardable)",
    ),
    "sweep": Mode(
        "hassod_jax.modes.discovery:run_sweep",
        "configs/sweep_thresholds.py",
        (
            "many HAC thresholds from one merge sequence per image; statistics, AR/AP with ground"
            " truth, a plot"
        ),
    ),
    "merge_pseudo_labels": Mode(
        "hassod_jax.modes.discovery:run_merge",
        "configs/merge_pseudo_labels.py",
        "joins the shards of independent discovery jobs",
    ),
    "demo": Mode(
        "hassod_jax.modes.demo:run",
        "configs/demo.py",
        (
            "the embedded default: stage 1 on generated scenes and photos, a short detector run, "
            "metrics and pictures; no downloads"
        ),
    ),
    "train": Mode(
        "hassod_jax.modes.train:run",
        "configs/train_coco.py",
        "stage 2: Cascade Mask R-CNN on the pseudo-labels",
    ),
    "mean_teacher": Mode(
        "hassod_jax.modes.mean_teacher:run",
        "configs/mean_teacher_coco.py",
        "stage 2, second part: Mean Teacher self-training from a trained detector",
    ),
    "prepare_gt": Mode(
        "hassod_jax.modes.prepare_gt:run",
        "configs/prepare_gt.py",
        "class-agnostic ground truth from COCO, LVIS, Objects365, SA-1B, UVO or KITTI files",
    ),
    "evaluate": Mode(
        "hassod_jax.modes.evaluate:run",
        "configs/evaluate.py",
        "class-agnostic COCO AP/AR of a prediction file",
    ),
    "predict": Mode(
        "hassod_jax.modes.predict:run",
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
    module_name, fn_name = MODES[mode].run.split(":")
    return getattr(importlib.import_module(module_name), fn_name)
