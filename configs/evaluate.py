"""Class-agnostic COCO evaluation (boxes and masks) of predictions, by the original HASSOD's
protocol: pycocotools COCOeval with maxDets 10/100/1000; AP, AP50, AP75, APs/m/l at 1000
detections per image; AR@10, AR@100, AR@1000, ARs/m/l at 1000.

    python -m hassod_jax.main --config configs/evaluate.py --workdir W \
        --config.gt_json=instances_val2017.json \
        --config.predictions_json=W1/pseudo_labels/pseudo_labels_hier.json

Options: --config.restrict_to_gt=True scores only the ground truth's images and leaves out
(and counts) predictions on other images, which are refused otherwise;
--config.extras=AR@1,levels adds our own metrics (not the original's) under 'extra/' keys.
"""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    return defaults.evaluation()
