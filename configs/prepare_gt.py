"""Class-agnostic COCO ground truth ({id 1, "fg"}) from a benchmark's official files.

    python -m hassod_jax.main --config configs/prepare_gt.py --workdir W \
        --config.format=coco_lvis \
        --config.input=/data/coco/annotations/instances_val2017.json \
        --config.lvis_json=/data/lvis/lvis_v1_val.json

`--config configs/prepare_gt.py:lvis` sets the format too. Writes W/<format>_cls_agnostic.json
(or --config.output) and <output>.summary.json. The rules of each format:
hassod_jax/data/prepare_gt.py's docstring and docs/reproduce.md.
"""

from hassod_jax import defaults


def get_config(arg=None):
    c = defaults.prepare_gt()
    if arg:
        c.format = arg
    return c
