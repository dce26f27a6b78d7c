"""Threshold sweep 0.05 ... 0.6 from one merge sequence per image.

    python -m hassod_jax.main --config configs/sweep_thresholds.py --config.images=DIR \
        --config.dino_checkpoint=PATH [--config.gt_json=instances_val2017.json] --workdir W
"""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    return defaults.sweep()
