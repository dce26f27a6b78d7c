"""Stage 2: Cascade Mask R-CNN R50-FPN on the stage-1 pseudo-labels, the published recipe
(batch 16, 40k iterations, SGD 0.01 constant after a 1000-step warmup from 0.001x, as the
original's STEPS (80000,) lie beyond its 40k; copy-paste, DropLoss; PreciseBN over 200
batches every 5000 steps and at the last step, before the final checkpoint).

    python -m hassod_jax.main --config configs/train_coco.py --workdir W2 \
        --config.train_json=W1/pseudo_labels/pseudo_labels_hier.json \
        --config.images=/data/coco/train2017 \
        --config.resnet_checkpoint=/weights/dino_resnet50_pretrain.pth

The LR against the original's, step by step: `python experiments/print_schedule.py`.
"""

from hassod_jax import defaults


def get_config(arg=None):
    """The recipe; with ':toy' (`--config configs/train_coco.py:toy`) its toy-scale preset."""
    return defaults.preset(arg, defaults.training, defaults.toy_training, "configs/train_coco.py")
