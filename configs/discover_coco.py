"""Stage 1 on COCO train2017 + unlabeled2017 with the published recipe.

    python -m hassod_jax.main --config configs/discover_coco.py \
        --config.images=/data/coco/train2017 \
        --config.dino_checkpoint=/weights/dino_vitbase8_pretrain.pth --workdir /runs/discover
"""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    return defaults.discovery()
