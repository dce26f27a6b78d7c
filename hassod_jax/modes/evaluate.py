"""mode=evaluate: class-agnostic COCO evaluation of a prediction file (the library is
`evaluate/coco_eval.py`)."""

import os

from hassod_jax import utils
from hassod_jax.evaluate import coco_eval


def run(config, workdir):
    """mode=evaluate: config.gt_json, config.predictions_json; optional config.output (default
    workdir/eval.json), config.iou_types, config.max_dets, config.extras, config.restrict_to_gt."""
    from absl import logging

    utils.require(config, "gt_json", "predictions_json", mode="evaluate")
    output = config.get("output") or os.path.join(workdir, "eval.json")
    iou_types = tuple(config.get("iou_types") or coco_eval.IOU_TYPES)
    max_dets = tuple(config.get("max_dets") or coco_eval.DEFAULT_MAX_DETS)
    extras = config.get("extras") or ()
    restrict = bool(config.get("restrict_to_gt", False))
    try:
        coco_eval.parse_extras(max_dets, extras)
    except ValueError as e:
        raise utils.ConfigError(f"--config.max_dets / --config.extras: {e}") from None
    preds = coco_eval.load_predictions(config.predictions_json)
    try:
        metrics = coco_eval.evaluate_coco(
            config.gt_json,
            preds,
            iou_types=iou_types,
            max_dets=max_dets,
            extras=extras,
            restrict_to_gt=restrict,
        )
    except utils.InputError as e:
        raise utils.InputError(
            f"mode=evaluate, predictions {config.predictions_json}: {e}"
        ) from None
    metrics["gt_json"] = str(config.gt_json)
    metrics["predictions_json"] = str(config.predictions_json)
    utils.atomic_write_json(output, metrics, indent=1)
    if "left_out" in metrics:
        lo = metrics["left_out"]
        logging.warning(
            "restrict_to_gt: left out %d prediction(s) on %d image(s) not in %s, e.g. %s",
            lo["predictions"],
            lo["images"],
            config.gt_json,
            lo["image_ids_sample"],
        )
    logging.info(
        "Scored %d prediction(s) on the %d image(s) of %s",
        metrics["num_predictions"],
        metrics["images"]["count"],
        config.gt_json,
    )
    for t in iou_types:
        m = metrics[t]
        if "skipped" in m:
            logging.info("%s: skipped (%s)", t, m["skipped"])
        else:
            logging.info("%s: %s", t, coco_eval.format_metrics(m))
    for k, v in metrics.items():
        if k.startswith(coco_eval.EXTRA_PREFIX):  # per-level extras (not the original's)
            for t in iou_types:
                if "skipped" not in v[t]:
                    logging.info("%s %s: %s", k, t, coco_eval.format_metrics(v[t]))
    logging.info("Wrote %s (%s protocol)", output, metrics["protocol"]["name"])
    return metrics
