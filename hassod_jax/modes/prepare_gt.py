"""mode=prepare_gt: class-agnostic COCO ground truth from the benchmarks' official files
(the library is `data/prepare_gt.py`)."""

import os

from absl import logging

from hassod_jax import utils
from hassod_jax.data import prepare_gt


def run(config, workdir):
    """mode=prepare_gt (configs/prepare_gt.py). Returns the summary."""
    utils.require(config, "format", "input", mode="prepare_gt")
    fmt = config.format
    output = config.get("output") or os.path.join(workdir, f"{fmt}_cls_agnostic.json")
    data, summary = prepare_gt.prepare(
        fmt,
        config.input,
        lvis_json=config.get("lvis_json", ""),
        max_images=config.get("max_images", -1),
        dedup_iou=config.get("dedup_iou", 0.9),
        dedup_rule=config.get("dedup_rule", "vs_coco"),
        lvis_file_name_rule=config.get("lvis_file_name", "split"),
        kitti_dontcare=config.get("kitti_dontcare", "crowd"),
        strict=config.get("strict", False),
        max_examples=config.get("max_examples", 5),
    )
    summary["output"] = output
    utils.atomic_write_json(output, data)
    utils.atomic_write_json(prepare_gt.summary_path(output), summary, indent=1)
    logging.info(
        "%s: %d images, %d instances (%.2f per image, %d crowd) -> %s",
        fmt,
        summary["images"],
        summary["instances"],
        summary["instances_per_image"],
        summary["crowd"],
        output,
    )
    if fmt == "coco_lvis":
        rules = summary["dedup_rules"]
        logging.info(
            "coco_lvis: %d COCO + %d LVIS instances on %d shared images; LVIS duplicates "
            "removed by dedup_rule=%s: %d. Per image: vs_coco (IoU >= %g with a COCO mask) "
            "%.2f, cutler (kept only below IoU %g with every kept mask) %.2f",
            summary["coco_instances"],
            summary["lvis_instances"],
            summary["shared_images"],
            summary["dedup_rule"],
            summary["duplicates_removed"],
            summary["dedup_iou"],
            rules["vs_coco"]["instances_per_image"],
            prepare_gt.CUTLER_MERGE_IOU,
            rules["cutler"]["instances_per_image"],
        )
    for reason, n in summary["dropped"].items():
        logging.warning(
            "dropped %d: %s (e.g. %s)",
            n,
            reason,
            "; ".join(summary["examples"].get(reason, [])[:2]) or "-",
        )
    logging.info("Summary in %s", prepare_gt.summary_path(output))
    return summary
