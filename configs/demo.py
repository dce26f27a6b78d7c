"""The embedded default: stage 1 on generated scenes and scikit-image photos, no downloads.

    python -m hassod_jax.main --config configs/demo.py --workdir /tmp/hassod_demo

Uses the DINO ViT when --config.dino_checkpoint is given, else a weight-free stand-in.
"""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    c = defaults.discovery()
    c.mode = "demo"
    c.backbone = "auto"  # dino when dino_checkpoint is set, else the stand-in
    c.num_synthetic = 6  # generated scenes with whole/part/subpart ground truth
    c.synthetic_size = (240, 320)  # (height, width) of the generated scenes
    c.seed = 0
    c.photos = ("astronaut", "coffee", "chelsea", "rocket", "coins", "horse")
    c.max_pictures = 12  # pictures of the first images; -1 = all, 0 = none
    c.train_steps = 200  # a short run of the small detector on the pseudo-labels; 0 = off
    c.mt_steps = 30  # then a short Mean Teacher run from that detector; 0 = off
    c.precise_bn_iters = 10  # PreciseBN at the detector's last step over this many batches; 0 = off
    c.picture_score_threshold = 0.5  # the detector's outputs drawn: score >= this
    c.chunk_size = 4
    c.batch_size = 4
    c.log_every_s = 10.0
    return c
