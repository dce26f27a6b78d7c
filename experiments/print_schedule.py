"""Prints the stage-2.2 learning rate of configs/train_coco.py against the original's.

The original is HASSOD's stage 2.2 as detectron2 runs it (cascade yaml: BASE_LR 0.01,
STEPS (80000,), GAMMA 0.02; launch script: MAX_ITER 40000; detectron2's warmup of 1000
iterations from 0.001x), computed in float64 by the transcription of detectron2's and
fvcore's schedulers in tests/train/test_schedules.py.

  python experiments/print_schedule.py [--config configs/train_coco.py] [--steps 0 999 ...]
"""

import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from tests.train.test_schedules import (  # noqa: E402
    TABLE_STEPS,
    format_table,
    load_config,
    schedule_table,
)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "train_coco.py"))
    p.add_argument("--steps", type=int, nargs="*", default=list(TABLE_STEPS))
    args = p.parse_args()
    config = load_config(args.config)
    rows = schedule_table(config, args.steps)
    print(f"LR of {os.path.relpath(args.config, ROOT)} (ours, float32) vs the original")
    print(format_table(rows))
    worst = max(abs(o - r) / r for _, o, r in rows)
    print(f"largest relative difference: {worst:.1e}")


if __name__ == "__main__":
    main()
