"""Class-agnostic COCO evaluation (boxes and masks, maxDets 1/10/100/1000) of predictions.

    python -m hassod_jax.main --config configs/evaluate.py --workdir W \
        --config.gt_json=instances_val2017.json \
        --config.predictions_json=W1/pseudo_labels/pseudo_labels_hier.json
"""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    return defaults.evaluation()
