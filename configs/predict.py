"""A trained detector on your own images (detectron2's and HASSOD's demo, as a mode).

    python -m hassod_jax.main --config configs/predict.py --workdir OUT \
        --config.checkpoint=W2 --config.images=photos/ \
        [--config.score_threshold=0.5] [--config.levels=whole,part] [--config.max_pictures=20]

--config.checkpoint: a training workdir (its newest checkpoint), an orbax step directory, an
exported model directory, or a detectron2/HASSOD .pth. --config.images: a folder, a glob
('photos/*.jpg'), one file, or a COCO JSON (its folder: --config.image_dir). Writes
OUT/predictions.json (COCO results with hier_level and level_probs), OUT/images.json,
OUT/skipped.json (unreadable images and why) and OUT/pictures/*.png.
"""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    return defaults.prediction()
