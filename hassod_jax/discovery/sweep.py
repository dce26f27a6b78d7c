"""mode=sweep: many HAC thresholds from ONE merge sequence per image.

The merging is shared by every threshold; the refinement is not: each threshold's regions are
refined as in discovery, one dense CRF per image and threshold, so 12 thresholds cost 12 CRFs
per image (about 4x a 3-threshold discovery run). The log reports each threshold as it is done,
with the run's ETA. `config.refine=False` skips the CRF and its IoU filter: the raw HAC regions
at the original size (area, corner and hole rules as for refined masks), the quick curve.

Writes `W/sweep/sweep.json` with `refine`, per threshold, the mean number of HAC regions and
of kept masks per image and, when `config.gt_json` is given, class-agnostic mask AR/AP of
that threshold's pseudo-labels, of the sweep's full ensemble and of the published ensemble
(`config.ensemble_thresholds`, when every one of them is in the sweep); `W/sweep/sweep.png`
plots them against the threshold.

A sweep split over independent jobs (`num_jobs` > 1) writes only shards; the same command with
`--config.mode=merge_pseudo_labels` joins them and writes `sweep.json`
(`modes.discovery.run_merge`).
"""

import os

import numpy as np
from absl import logging

from hassod_jax import utils
from hassod_jax.data import coco
from hassod_jax.discovery import pipeline
from hassod_jax.evaluate import coco_eval, visualize

OUTPUT_DIR = "sweep"


def _predictions(rows, pick, image_ids=None):
    # No `hier_level`: evaluate_coco would then also score each level separately, and only
    # the overall mask metrics are reported here.
    preds = []
    for im, res in rows:
        if image_ids is not None and im["id"] not in image_ids:
            continue
        for a in pick(res):
            preds.append(
                {
                    "image_id": im["id"],
                    "category_id": 1,
                    "segmentation": a["segmentation"],
                    "bbox": a["bbox"],
                    "area": a["area"],
                    "score": 1.0,
                }
            )
    return preds


def threshold_statistics(rows, thresholds):
    """Mean HAC regions and kept masks per image for each threshold (one pass over `rows`)."""
    regions, kept = np.zeros(len(thresholds)), np.zeros(len(thresholds))
    ensemble, n = 0, 0
    for _, res in rows:
        n += 1
        regions += res["regions"]
        kept += [len(anns) for anns in res["per_threshold"]]
        ensemble += len(res["ensemble"])
    n = max(n, 1)
    stats = {
        pipeline.threshold_name(theta): {
            "regions_per_image": float(regions[t]) / n,
            "masks_per_image": float(kept[t]) / n,
        }
        for t, theta in enumerate(thresholds)
    }
    stats["ensemble"] = {"masks_per_image": ensemble / n}
    return stats


def evaluate_thresholds(rows, thresholds, gt_json, ensemble_thresholds=()):
    """Class-agnostic mask AR/AP per threshold and for the ensembles, against `gt_json`."""
    gt = coco.load_coco_json(gt_json)
    gt_ids = {im["id"] for im in gt["images"]}

    def score(pick):
        preds = _predictions(rows, pick, gt_ids)
        return coco_eval.evaluate_coco(gt, preds, iou_types=("segm",))["segm"]

    out = {}
    for t, theta in enumerate(thresholds):
        out[pipeline.threshold_name(theta)] = score(lambda res, t=t: res["per_threshold"][t])
    out["ensemble"] = score(lambda res: res["ensemble"])
    names = [pipeline.threshold_name(t) for t in thresholds]
    wanted = [pipeline.threshold_name(t) for t in ensemble_thresholds]
    if wanted and all(w in names for w in wanted):
        idx = [names.index(w) for w in wanted]
        key = "ensemble_" + "_".join(wanted)
        out[key] = score(lambda res: [a for i in idx for a in res["per_threshold"][i]])
    return out


def write_report(
    workdir, rows, thresholds, *, refine=True, gt_json="", ensemble_thresholds=()
):
    """Writes `W/sweep/sweep.json` for assembled rows and logs its table; returns the report.

    refine: whether the rows' masks went through the CRF (recorded in the report). AR/AP are
    computed against `gt_json` when given (the sweep config has one; the discovery config used
    by configs/merge_pseudo_labels.py has none), for each threshold and each of the
    `ensemble_thresholds`.
    """
    thresholds = [float(t) for t in thresholds]
    report = {
        "thresholds": thresholds,
        "images": len(rows),
        "refine": bool(refine),
    }
    report["statistics"] = threshold_statistics(rows, thresholds)
    if gt_json:
        report["segm"] = evaluate_thresholds(rows, thresholds, gt_json, ensemble_thresholds)
    out = os.path.join(workdir, OUTPUT_DIR, "sweep.json")
    utils.atomic_write_json(out, report, indent=1)

    visualize.plot_sweep(os.path.join(workdir, OUTPUT_DIR, "sweep.png"), report)
    lines = [f"{'threshold':>10} {'regions/img':>12} {'masks/img':>10} {'AR@100':>8} {'AP':>8}"]
    for key, st in report["statistics"].items():
        ev = report.get("segm", {}).get(key, {})
        lines.append(
            f"{key:>10} {st.get('regions_per_image', np.nan):12.2f} {st['masks_per_image']:10.2f} "
            f"{ev.get('AR@100', np.nan):8.4f} {ev.get('AP', np.nan):8.4f}"
        )
    logging.info("Threshold sweep (%s):\n%s", out, "\n".join(lines))
    return report
