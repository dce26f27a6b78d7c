"""Class-agnostic COCO ground truth ({id 1, "fg"}) from a benchmark's official files.

    python -m hassod_jax.main --config configs/prepare_gt.py --workdir W \
        --config.format=coco_lvis \
        --config.input=/data/coco/annotations/instances_val2017.json \
        --config.lvis_json=/data/lvis/lvis_v1_val.json

`--config configs/prepare_gt.py:lvis` sets the format too. Until hassod_jax/main.py lists the
mode, `python -m hassod_jax.data.prepare_gt` takes the same flags. Writes
W/<format>_cls_agnostic.json (or --config.output) and <output>.summary.json. The rules of each
format: hassod_jax/data/prepare_gt.py's docstring and docs/reproduce.md.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.mode = "prepare_gt"
    # coco | lvis | coco_lvis | objects365 | sa1b | uvo | kitti
    c.format = arg or config_dict.placeholder(str)
    # The official file (coco, lvis, objects365, uvo; coco_lvis: COCO's instances_val2017.json)
    # or folder (sa1b: the per-image JSONs; kitti: the object benchmark's training/).
    c.input = config_dict.placeholder(str)
    c.lvis_json = ""  # coco_lvis: LVIS v1's lvis_v1_val.json
    c.output = ""  # default: W/<format>_cls_agnostic.json
    c.max_images = -1  # the first N images (file order; natural name order for sa1b); -1 = all
    # coco_lvis: an LVIS instance with mask IoU >= this with a COCO instance of its image is a
    # duplicate and left out (the COCO instance is kept); the original's rule is unpublished.
    c.dedup_iou = 0.9
    # lvis: file_name from coco_url's last part ('last': 000000397133.jpg) or its last two
    # ('split': val2017/000000397133.jpg, detectron2's rule; one image root for both splits).
    c.lvis_file_name = "last"
    c.kitti_dontcare = "crowd"  # kitti: DontCare regions as iscrowd 1 ('crowd') or 'drop'
    # False: malformed records are skipped and counted in the summary; True: the first one
    # stops the run with one line naming the file and the record.
    c.strict = False
    c.max_examples = 5  # records listed per reason in the summary
    return c
