"""Stage 2: Cascade Mask R-CNN R50-FPN on the stage-1 pseudo-labels, the published recipe
(batch 16, 40k iterations, SGD 0.01, warmup 1000, copy-paste, DropLoss).

    python -m hassod_jax.main --config configs/train_coco.py --workdir W2 \
        --config.train_json=W1/pseudo_labels/pseudo_labels_hier.json \
        --config.images=/data/coco/train2017 \
        --config.resnet_checkpoint=/weights/dino_resnet50_pretrain.pth
"""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    return defaults.training()
