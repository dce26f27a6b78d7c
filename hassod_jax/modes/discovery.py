"""mode=discover, mode=sweep and mode=merge_pseudo_labels: the discovery library
(`discovery/pipeline.py`, `discovery/sweep.py`) run as jobs, with the pictures and reports."""

import os

from absl import logging

from hassod_jax.discovery import pipeline, sweep
from hassod_jax.evaluate import visualize


def run_discover(config, workdir):
    """mode=discover; then pictures of the first `config.max_pictures` images' pseudo-labels
    in W/pictures (when this process assembled the final files)."""
    result = pipeline.discover(config, workdir)
    limit = config.get("max_pictures", 0)
    if result is not None and limit:
        rows = result["rows"] if limit < 0 else result["rows"][:limit]
        written = visualize.save_annotation_pictures(
            os.path.join(workdir, "pictures"),
            config.images,
            [im for im, _ in rows],
            {im["id"]: [("pseudo-labels", res["ensemble"])] for im, res in rows},
            by_level=config.get("panel_per_level", False),
        )
        logging.info("%d pictures in %s", len(written), os.path.join(workdir, "pictures"))
    return result


def _sweep_report(config, workdir, rows, thresholds):
    """`sweep.write_report` with the config's refine, gt_json and ensemble_thresholds."""
    return sweep.write_report(
        workdir, rows, thresholds, refine=config.get("refine", True),
        gt_json=config.get("gt_json", ""),
        ensemble_thresholds=config.get("ensemble_thresholds", ()),
    )


def run_sweep(config, workdir):
    """mode=sweep: per-threshold statistics (and AR/AP with ground truth) from one merge
    sequence per image; the report (W/sweep/sweep.json, sweep.png), or None on a shard of a
    multi-job sweep (mode=merge_pseudo_labels reports)."""
    result = pipeline.discover(config, workdir, out_name=sweep.OUTPUT_DIR)
    if result is None:  # a shard of a multi-job sweep: mode=merge_pseudo_labels reports
        return None
    return _sweep_report(config, workdir, result["rows"], config.thresholds)


def run_merge(config, workdir):
    """mode=merge_pseudo_labels: joins the finished shards of independent jobs (num_jobs > 1)
    into the final files, for W/pseudo_labels (mode=discover) and W/sweep (mode=sweep, then
    also sweep.json; with AR/AP when the config has gt_json, as the sweep's own config run with
    --config.mode=merge_pseudo_labels has), whichever holds shards.

    Returns {output folder name: assemble's result}.
    """
    merged = {}
    for name in (pipeline.OUTPUT_DIR, sweep.OUTPUT_DIR):
        out_dir = os.path.join(workdir, name)
        if not os.path.isdir(os.path.join(out_dir, "work")):
            continue
        thresholds = pipeline.merge_thresholds(out_dir, config)
        merged[name] = pipeline.assemble(out_dir, thresholds)
        if name == sweep.OUTPUT_DIR:
            _sweep_report(config, workdir, merged[name]["rows"], thresholds)
    if not merged:
        raise FileNotFoundError(
            f"No discovery shards under {os.path.join(workdir, pipeline.OUTPUT_DIR, 'work')} or "
            f"{os.path.join(workdir, sweep.OUTPUT_DIR, 'work')}: run mode=discover (or "
            "mode=sweep) with this --workdir first"
        )
    return merged
