"""Learning check (issue 7): the small detector, trained from scratch with the real training
loop (`supervised.train`: loader, augmentation, losses, sharded step, periodic evaluation)
on generated scenes' ground truth for a few hundred steps on CPU, detects held-out
generated scenes with box AP50 >= 0.5 (pycocotools, class-agnostic).

Runs in a subprocess on ONE CPU device (the test session forces 8 host devices, which would
only split the small batch and add overhead on a 2-core machine).
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = (128, 128)
N_OBJECTS = (1, 2)
STEPS = 500

_SCRIPT = r"""
import json, sys
from hassod_jax import defaults
from hassod_jax.train import supervised

train_json, images, val_json, val_images, workdir, steps = sys.argv[1:7]
steps = int(steps)
c = defaults.training()
c.train_json, c.images = train_json, images
c.val_json, c.val_images = val_json, val_images
c.model.size = "small"
c.model.pooler_sampling_ratio = 2
c.model.rpn_pre_nms_topk_train = 256
c.model.rpn_post_nms_topk_train = 64
c.model.rpn_pre_nms_topk_test = 256
c.model.rpn_post_nms_topk_test = 64
c.model.roi_batch_size_per_image = 64
c.model.mask_max_fg = 16
c.dtype = "float32"
c.batch_size = 4
c.max_iter = steps
c.base_lr = 0.02
c.warmup_iters = 50
c.lr_steps = (int(0.8 * steps),)
c.log_every = 50
c.checkpoint_every = steps
c.keep_checkpoints = 1
c.eval_every = steps
c.val_short_edge = 128
c.val_max_size = 128
c.val_batch_size = 8
c.data.short_edges = (128,)
c.data.max_size = 128
c.data.buckets = ((128, 128),)
c.data.copy_paste = False
c.data.max_instances = 16
c.data.workers = 0
state, metrics = supervised.train(c, workdir)
print("METRICS " + json.dumps({k: float(v) for k, v in metrics.items()}))
"""


def _write_scenes(folder, n, seed):
    """Scenes with few, big objects (and their parts), all levels kept as ground truth."""
    from hassod_jax.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(folder, n, seed, SIZE, n_objects=N_OBJECTS)


def test_small_detector_learns_generated_scenes(tmp_path):
    train_images, train_json = _write_scenes(str(tmp_path / "train"), 64, seed=1)
    val_images, val_json = _write_scenes(str(tmp_path / "val"), 16, seed=2)
    work = tmp_path / "work"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT, train_json, train_images, val_json, val_images, str(work)]
        + [str(STEPS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-4000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("METRICS ")][-1]
    metrics = json.loads(line[len("METRICS ") :])
    print(f"learning check: {elapsed:.0f} s, {json.dumps(metrics)}")
    logged = [json.loads(x) for x in (work / "logs" / "metrics.jsonl").read_text().splitlines()]
    # The total loss is no progress measure here (the box losses grow as proposals improve
    # and more of them are foreground); objectness and masks are.
    first, last = logged[0], [x for x in logged if "rpn/cls" in x][-1]
    assert last["rpn/cls"] < 0.5 * first["rpn/cls"], (first, last)
    assert last["mask"] < first["mask"], (first, last)
    # The periodic evaluation logged the validation metrics at the last step.
    assert any("val/bbox/AP50" in x and x["step"] == STEPS for x in logged)
    assert metrics["val/bbox/AP50"] >= 0.5, metrics
