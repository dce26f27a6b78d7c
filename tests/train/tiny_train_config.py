"""A tiny training config for the tests: the small detector on generated scenes, CPU-sized.

The test sets `--config.train_json` and `--config.images` on the command line.
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
    c.checkpoint_every = 1
    c.keep_checkpoints = 10
    c.data.short_edges = (96,)
    c.data.max_size = 128
    c.data.buckets = ((96, 128), (128, 96), (128, 128))
    c.data.max_instances = 8
    c.data.workers = 0
    return c
