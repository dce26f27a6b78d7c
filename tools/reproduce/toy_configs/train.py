"""hassod.py --toy's stage 2.2: `configs/train_coco.py:toy` (the small detector on 96 x 128
scenes, 4 steps) with the chain's checkpoint cadence and a short PreciseBN at the end."""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    c = defaults.toy_training()
    c.checkpoint_every = 2
    c.precise_bn_every = 0
    c.precise_bn_iters = 2
    return c
