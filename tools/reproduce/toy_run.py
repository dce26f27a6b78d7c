"""The whole chain at toy scale on generated scenes: fake_tree.py writes the official layouts
(a few 96 x 128 scenes each), then hassod.py --toy runs every stage of the main row with its
real commands (prepare_gt on each benchmark, stage 1 with the weight-free stand-in backbone,
4 steps of stage 2.2 and 4 of Mean Teacher with the small detector, predictions and COCO
evaluation on COCO+LVIS, LVIS, Objects365 and SA-1B) and writes the table in the paper's
layout; then pseudo_labels.py --toy gives the pseudo-label rows. CPU only.

    python tools/reproduce/toy_run.py --work /tmp/hassod_toy [--ablations] [--dry-run]

The numbers mean nothing (a few steps on a few generated images); the run shows the chain
end to end. It takes about 3 minutes on a 2-core CPU with --ablations, mostly XLA compiles
(measured in docs/reproduce.md); tests/test_reproduce.py runs it and checks the table.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fake_tree  # noqa: E402
import hassod  # noqa: E402
import pseudo_labels  # noqa: E402


def toy_env(work):
    """One CPU device (the caller's other XLA flags kept) and a persistent compilation cache
    under the work folder."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    return {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(flags),
        "JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.abspath(work), "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def script_argv(work, data, dry_run, which, ablations=False):
    p = fake_tree.paths(data)
    common = ["--toy", "--kind", "cpu", "--gpus", "1"] + (["--dry-run"] if dry_run else [])
    if which == "hassod":
        common += ["--ablations"] if ablations else []
        return [
            "--work",
            os.path.join(work, "hassod"),
            "--coco",
            p["coco"],
            "--lvis",
            p["lvis"],
            "--objects365-json",
            p["objects365_json"],
            "--objects365-images",
            p["objects365_images"],
            "--sa1b",
            p["sa1b"],
            "--dino-resnet",
            "none",
        ] + common
    return [
        "--work",
        os.path.join(work, "pseudo_labels"),
        "--coco",
        p["coco"],
        "--lvis",
        p["lvis"],
    ] + common


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--skip-pseudo-labels", action="store_true")
    ap.add_argument("--ablations", action="store_true",
                    help="also the 'plain' and '+ Mean Teacher' rows (hassod.py --ablations)")
    a = ap.parse_args(argv)
    work = os.path.abspath(a.work)
    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "sa1b")):
        fake_tree.write_tree(data)
    os.environ.update(toy_env(work))
    t0 = time.time()
    code = hassod.main(script_argv(work, data, a.dry_run, "hassod", a.ablations))
    t1 = time.time()
    print(f"toy_run: hassod.py {'dry run ' if a.dry_run else ''}took {t1 - t0:.0f} s")
    if code == 0 and not a.skip_pseudo_labels:
        code = pseudo_labels.main(script_argv(work, data, a.dry_run, "pseudo_labels"))
        print(f"toy_run: pseudo_labels.py took {time.time() - t1:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
