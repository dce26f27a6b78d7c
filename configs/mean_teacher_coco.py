"""Stage 2.3: Mean Teacher on the stage-1 pseudo-labels, the original's recipe (2000 steps,
8 + 8 images, EMA 0.9996, teacher targets > 0.7, cosine loss weights, peak LR 0.005).

    python -m hassod_jax.main --config configs/mean_teacher_coco.py --workdir W3 \
        --config.init_checkpoint=W2 \
        --config.train_json=W1/pseudo_labels/pseudo_labels_hier.json \
        --config.images=/data/coco/train2017

The student (the model it produces) is in W3/checkpoints and W3/model_final.
"""

from hassod_jax import defaults


def get_config(arg=None):
    """The recipe; with ':toy' (`--config configs/mean_teacher_coco.py:toy`) its toy-scale preset."""
    return defaults.preset(arg, defaults.mean_teacher, defaults.toy_mean_teacher, "configs/mean_teacher_coco.py")
