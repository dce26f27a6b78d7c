"""The stage-2 config files at toy scale for the tests: `configs/train_coco.py:toy` and
`configs/mean_teacher_coco.py:toy` (the small detector on generated scenes, CPU-sized), run
through their modes (`python -m hassod_jax.main --config configs/X.py:toy --config.k=v ...`)
with these overrides. The test adds the data paths (and Mean Teacher's init checkpoint).
"""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_CONFIG = os.path.join(ROOT, "configs", "train_coco.py") + ":toy"
MEAN_TEACHER_CONFIG = os.path.join(ROOT, "configs", "mean_teacher_coco.py") + ":toy"

# The toy presets of the two config files (defaults.toy_training / toy_mean_teacher: the small
# detector on 96 x 128 scenes, 4 steps), with a checkpoint at every step for the resume tests.
_RUN = {"checkpoint_every": 1, "keep_checkpoints": 10}
TRAIN = dict(_RUN)  # float32 (the preset's) for the bitwise resume and PreciseBN checks
MEAN_TEACHER = dict(_RUN)


def flags(overrides):
    """--config.k=v arguments (strings bare, everything else as a Python literal)."""
    return [f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in overrides.items()]


def load(path, overrides):
    """The config file's get_config() with the overrides applied, as the command line does."""
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("toy_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg or None)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
