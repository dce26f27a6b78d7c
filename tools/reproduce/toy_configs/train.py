"""hassod.py --toy's stage 2.2: the small detector on 96 x 128 scenes, 4 steps (CPU size).

The model fields below are not fields of configs/train_coco.py (its `model` holds size,
use_droploss and level_loss_weight only), so the toy preset needs a config file of its own.
"""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    c = defaults.training()
    c.model.size = "small"
    c.model.pooler_sampling_ratio = 2
    c.model.rpn_pre_nms_topk_train = 64
    c.model.rpn_post_nms_topk_train = 64
    c.model.roi_batch_size_per_image = 32
    c.dtype = "float32"
    c.batch_size = 2
    c.max_iter = 4
    c.warmup_iters = 2
    c.log_every = 1
    c.checkpoint_every = 2
    c.precise_bn_every = 0
    c.precise_bn_iters = 2
    c.data.short_edges = (96,)
    c.data.max_size = 128
    c.data.buckets = ((96, 128), (128, 96), (128, 128))
    c.data.max_instances = 8
    c.data.workers = 0
    return c
