"""mode=merge_pseudo_labels (mode=discover is `discovery.pipeline.run`, mode=sweep
`discovery.sweep.run`)."""

import os

from hassod_jax.discovery import pipeline, sweep


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
            sweep.write_report(config, workdir, merged[name]["rows"], thresholds)
    if not merged:
        raise FileNotFoundError(
            f"No discovery shards under {os.path.join(workdir, pipeline.OUTPUT_DIR, 'work')} or "
            f"{os.path.join(workdir, sweep.OUTPUT_DIR, 'work')}: run mode=discover (or "
            "mode=sweep) with this --workdir first"
        )
    return merged
