"""Toy-scale settings for the stage-2 config files. The tests run `configs/train_coco.py` and
`configs/mean_teacher_coco.py` themselves through their modes (`python -m hassod_jax.main
--config configs/X.py --config.k=v ...`) with these as overrides: the small detector on
generated scenes, CPU-sized. The test adds the data paths (and Mean Teacher's init checkpoint).
"""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_CONFIG = os.path.join(ROOT, "configs", "train_coco.py")
MEAN_TEACHER_CONFIG = os.path.join(ROOT, "configs", "mean_teacher_coco.py")

_DATA = {
    "data.short_edges": (96,),
    "data.max_size": 128,
    "data.buckets": ((96, 128), (128, 96), (128, 128)),
    "data.max_instances": 8,
    "data.workers": 0,
}
_RUN = {"max_iter": 4, "warmup_iters": 2, "log_every": 1, "checkpoint_every": 1,
        "keep_checkpoints": 10}

TRAIN = {
    "model.size": "small",
    "model.pooler_sampling_ratio": 2,
    "model.rpn_pre_nms_topk_train": 64,
    "model.rpn_post_nms_topk_train": 64,
    "model.roi_batch_size_per_image": 32,
    # float32 for the bitwise resume and PreciseBN checks; the bfloat16 step is tested in
    # test_bfloat16_step_and_config_errors.py.
    "dtype": "float32",
    "batch_size": 2,
    **_RUN,
    **_DATA,
}

MEAN_TEACHER = {
    "model.pooler_sampling_ratio": 2,
    "model.rpn_pre_nms_topk_train": 64,
    "model.rpn_post_nms_topk_train": 64,
    "model.rpn_pre_nms_topk_test": 64,
    "model.rpn_post_nms_topk_test": 32,
    "model.roi_batch_size_per_image": 32,
    "model.detections_per_image": 32,
    "model.mask_max_fg": 8,
    "score_thresh": 0.0,  # an untrained teacher: let its detections through
    "max_targets": 8,
    "batch_size_label": 2,
    "batch_size_unlabel": 2,
    **_RUN,
    **_DATA,
}


def flags(overrides):
    """--config.k=v arguments (strings bare, everything else as a Python literal)."""
    return [f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in overrides.items()]


def load(path, overrides):
    """The config file's get_config() with the overrides applied, as the command line does."""
    spec = importlib.util.spec_from_file_location("toy_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
