"""hassod.py --toy's Mean Teacher: `configs/mean_teacher_coco.py:toy` (the small detector, widths
from the stage-2.2 checkpoint, on 96 x 128 scenes, 4 steps of 2 + 2 images) with the chain's
checkpoint cadence."""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    c = defaults.toy_mean_teacher()
    c.checkpoint_every = 2
    return c
