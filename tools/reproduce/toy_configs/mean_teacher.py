"""hassod.py --toy's Mean Teacher: the small detector (widths from the stage-2.2 checkpoint) on
96 x 128 scenes, 4 steps of 2 + 2 images, every teacher detection a target (CPU size)."""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    c = defaults.mean_teacher()
    c.model.pooler_sampling_ratio = 2
    c.model.rpn_pre_nms_topk_train = 64
    c.model.rpn_post_nms_topk_train = 64
    c.model.rpn_pre_nms_topk_test = 64
    c.model.rpn_post_nms_topk_test = 32
    c.model.roi_batch_size_per_image = 32
    c.model.detections_per_image = 32
    c.model.mask_max_fg = 8
    c.score_thresh = 0.0  # a barely trained teacher: let its detections through
    c.max_targets = 8
    c.batch_size_label = 2
    c.batch_size_unlabel = 2
    c.max_iter = 4
    c.warmup_iters = 2
    c.log_every = 1
    c.checkpoint_every = 2
    c.data.short_edges = (96,)
    c.data.max_size = 128
    c.data.buckets = ((96, 128), (128, 96), (128, 128))
    c.data.max_instances = 8
    c.data.workers = 0
    return c
