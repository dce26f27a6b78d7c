"""Does Mean Teacher do its job? A learning check on generated scenes (CPU-sized).

1. The small detector is trained (mode=train's loop) on INCOMPLETE labels: every fifth
   ground-truth instance of each of 256 training scenes removed (`--drop-every 5`; the first
   instance is always kept).
2. From that checkpoint, the same number of steps of (a) Mean Teacher with those labels (the
   recipe: EMA teacher, weak/strong views, teacher targets > 0.7 with recomputed levels, cosine
   loss weights, the recipe's base LR 0.01) and (b) the same loop with the unlabeled branch
   left out (`unsup=False`: plain continued training on the incomplete labels, same label
   data, views and schedule; the student's update is the one the branch weighted 0 gives).
3. The students are scored on 64 held-out scenes (`--val-images`) with their COMPLETE ground
   truth: mask and box AR@100 and AP (class-agnostic COCO, the original's protocol).

    python tests/train/mt_learning_check.py [--seed 0] [--stage1 1200] [--mt 300] \
        [--drop-every 5] [--train-images 256] [--val-images 64] [--size 128] [--mt-lr 0.01] \
        [--root DIR] [--out FILE.json]

Fixed data; `--seed` seeds the training runs. Prints a table and writes the numbers as JSON
(with stage 1's first and last logged losses).
About 8-9 minutes on one CPU core (515 s measured: stage 1 201 s, Mean Teacher 214 s, continued
103 s; experiments/RESULTS.md has the figures of several seeds); tests/train/test_mt_learning.py
runs it in the default test run and checks both stage 1 and Mean Teacher.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SIZE = 128  # scenes are SIZE x SIZE (--size)


def drop_instances(src_json, dst_json, every=2, withheld_json=None):
    """Instance i of each image removed where i % every == every - 1 (every=2: every other
    one, the first kept), levels untouched; the removed ones go to `withheld_json`."""
    from hassod_jax.data.coco import load_coco_json
    from hassod_jax.utils import atomic_write_json

    data = load_coco_json(src_json)
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    kept, withheld = [], []
    for anns in by_image.values():
        for i, a in enumerate(anns):
            (withheld if i % every == every - 1 else kept).append(a)
    atomic_write_json(dst_json, {**data, "annotations": kept})
    if withheld_json:
        atomic_write_json(withheld_json, {**data, "annotations": withheld})
    return len(data["annotations"]), len(kept)


def _common(c, seed, size=SIZE):
    c.seed = seed
    c.dtype = "float32"
    c.log_every = 50
    c.keep_checkpoints = 1
    c.data.short_edges = (size,)
    c.data.max_size = size
    c.data.buckets = ((size, size),)
    c.data.copy_paste = False
    c.data.max_instances = 16
    c.data.workers = 0
    for k, v in dict(pooler_sampling_ratio=2, rpn_pre_nms_topk_train=256,
                     rpn_post_nms_topk_train=64, rpn_pre_nms_topk_test=256,
                     rpn_post_nms_topk_test=64, roi_batch_size_per_image=64,
                     mask_max_fg=16).items():
        c.model[k] = v
    return c


def stage1_config(train_json, images, steps, seed, size=SIZE):
    from hassod_jax import defaults

    c = _common(defaults.training(), seed, size)
    c.train_json, c.images = train_json, images
    c.model.size = "small"
    c.batch_size = 4
    c.max_iter = steps
    c.base_lr = 0.02
    c.warmup_iters = 50
    c.lr_steps = ()
    c.checkpoint_every = steps
    c.precise_bn_iters = 20
    return c


def mt_config(init, train_json, images, steps, seed, unsup, base_lr=0.01, size=SIZE):
    from hassod_jax import defaults

    c = _common(defaults.mean_teacher(), seed, size)
    c.init_checkpoint, c.train_json, c.images = init, train_json, images
    c.model.detections_per_image = 100
    c.batch_size_label = 4
    c.batch_size_unlabel = 4
    c.max_iter = steps
    c.base_lr = base_lr
    c.warmup_iters = steps // 5
    c.checkpoint_every = steps
    c.max_targets = 16
    c.unsup = unsup
    return c


_PREDICT_FNS = {}  # one compiled forward per architecture: the scorings share it
# The check's models as they were trained (the training scenes' recall): its proposal counts
# and sampling ratio, not detectron2's 1000 / adaptive test settings (7x the cost).
TEST_SETTINGS = dict(detections_per_image=100, rpn_pre_nms_topk_test=256,
                     rpn_post_nms_topk_test=64, pooler_sampling_ratio=2)
RECALL_SCORES = (0.5, 0.7, 0.9)


def score(workdir, val_json, val_images, size=SIZE):
    from hassod_jax.data.coco import load_coco_json
    from hassod_jax.evaluate import coco_eval
    from hassod_jax.inference import predictor
    from hassod_jax.weights.detectron2 import load_detector

    module, variables = load_detector(workdir, detections_per_image=100)
    if module.config not in _PREDICT_FNS:
        _PREDICT_FNS[module.config] = predictor.make_predict_fn(module)
    fn = _PREDICT_FNS[module.config]
    gt = load_coco_json(val_json)
    preds = predictor.predict(module, variables, predictor.images_from_coco(gt, val_images),
                            short_edge=size, max_size=size, buckets=((size, size),), batch_size=8,
                            predict_fn=fn)
    m = coco_eval.evaluate_coco(gt, preds, iou_types=("bbox", "segm"))
    return {f"{t}/{k}": float(m[t][k]) for t in ("bbox", "segm") for k in ("AP", "AP50", "AR@100")}


def best_scores(workdir, gt_json, images, size=SIZE, which="student", iou_min=0.5):
    """For each instance of `gt_json`, the highest score among the model's detections whose
    mask has IoU >= iou_min with it (pycocotools), 0 when none: recall at a score s is the
    fraction >= s. The model runs at the check's own test settings (its proposal counts and
    sampling ratio) on the training images (`images`)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from hassod_jax.data.coco import load_coco_json
    from hassod_jax.inference import predictor
    from hassod_jax.weights.detectron2 import load_detector

    module, variables = load_detector(workdir, which=which, **TEST_SETTINGS)
    if module.config not in _PREDICT_FNS:
        _PREDICT_FNS[module.config] = predictor.make_predict_fn(module)
    gt = load_coco_json(gt_json)
    ids = sorted({a["image_id"] for a in gt["annotations"]})
    by_id = {im["id"]: im for im in gt["images"]}
    sub = {**gt, "images": [by_id[i] for i in ids]}
    preds = predictor.predict(module, variables, predictor.images_from_coco(sub, images),
                            short_edge=size, max_size=size, buckets=((size, size),), batch_size=8,
                            predict_fn=_PREDICT_FNS[module.config])
    dets = {}
    for p in preds:
        dets.setdefault(p["image_id"], []).append(p)
    out = []
    for a in gt["annotations"]:
        d = dets.get(a["image_id"], [])
        if not d:
            out.append(0.0)
            continue
        iou = mask_utils.iou([p["segmentation"] for p in d], [a["segmentation"]], [0])[:, 0]
        scores = np.array([p["score"] for p in d])[iou >= iou_min]
        out.append(float(scores.max()) if scores.size else 0.0)
    return np.array(out)


def recall_summary(scores):
    """Recall of the instances at score thresholds, and their mean best score."""
    out = {f"r@{t}": float((scores >= t).mean()) for t in RECALL_SCORES}
    out["mean_score"] = float(scores.mean())
    return out


def teacher_move(start_dir, mt_dir):
    """|teacher - start| / |student - start| over all parameters (one norm each): how far the
    EMA teacher followed the student. 0 for a teacher that never moves, 1 for one that is the
    student; for the recipe's EMA (keep 0.9996) over a few hundred steps a few hundredths."""
    import numpy as np

    from hassod_jax.weights.detectron2 import load_detector

    def flat(path, which="student"):
        _, v = load_detector(path, which=which)
        import jax

        return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(v["params"])])

    start, student, teacher = flat(start_dir), flat(mt_dir), flat(mt_dir, "teacher")
    return float(np.linalg.norm(teacher - start) / max(np.linalg.norm(student - start), 1e-30))


def _logged(workdir):
    """The rows a training run logged (its logs/metrics.jsonl)."""
    with open(os.path.join(workdir, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(root, stage1_steps=1200, mt_steps=300, seed=0, drop_every=5, train_images=256,
        mt_lr=0.01, val_images=64, size=SIZE):
    from hassod_jax.data.synthetic import write_synthetic_dataset
    from hassod_jax.modes import mean_teacher as mt_mode
    from hassod_jax.modes import train as train_mode

    def scenes(name, n, data_seed):  # written once per root (reruns and other seeds reuse it)
        folder = os.path.join(root, name)
        if os.path.exists(os.path.join(folder, "ground_truth.json")):
            return os.path.join(folder, "images"), os.path.join(folder, "ground_truth.json")
        return write_synthetic_dataset(folder, n, data_seed, (size, size), n_objects=(1, 3))

    px = "" if size == SIZE else f"_{size}px"
    images, full_json = scenes(f"train{train_images}{px}", train_images, 1)
    val_dir, val_json = scenes(f"val{val_images}{px}", val_images, 2)
    tag = f"drop{drop_every}_n{train_images}{px}_seed{seed}"
    half = os.path.join(root, f"train_drop{drop_every}_n{train_images}{px}.json")
    withheld = os.path.join(root, f"withheld_drop{drop_every}_n{train_images}{px}.json")
    n_all, n_kept = drop_instances(full_json, half, drop_every, withheld)
    out = {"instances": n_all, "kept": n_kept, "train_images": train_images,
           "drop_every": drop_every, "seed": seed, "stage1_steps": stage1_steps,
           "mt_steps": mt_steps, "mt_lr": mt_lr, "val_images": val_images, "size": size,
           "seconds": {}}
    t0 = time.perf_counter()
    w1 = os.path.join(root, f"stage1_{tag}_s{stage1_steps}")
    train_mode.train(stage1_config(half, images, stage1_steps, seed, size), w1)
    out["seconds"]["stage1"] = time.perf_counter() - t0
    out["start"] = score(w1, val_json, val_dir, size)
    for kind, js in (("withheld", withheld), ("labeled", half)):
        out["start"][kind] = recall_summary(best_scores(w1, js, images, size))
    # Stage 1's first and last logged losses.
    losses = [x for x in _logged(w1) if "rpn/cls" in x]
    out["stage1_log"] = {"first": losses[0], "last": losses[-1]}
    for name, unsup in (("mean_teacher", True), ("continued", False)):
        t0 = time.perf_counter()
        w = os.path.join(root, f"{name}_{tag}_s{stage1_steps}_m{mt_steps}_lr{mt_lr}")
        mt_mode.train(mt_config(w1, half, images, mt_steps, seed, unsup, mt_lr, size), w)
        out["seconds"][name] = time.perf_counter() - t0
        out[name] = score(w, val_json, val_dir, size)
        for kind, js in (("withheld", withheld), ("labeled", half)):
            out[name][kind] = recall_summary(best_scores(w, js, images, size))
        if unsup:
            out[name]["teacher_withheld"] = recall_summary(
                best_scores(w, withheld, images, size, which="teacher"))
            out[name]["teacher_move"] = teacher_move(w1, w)
        logged = _logged(w)
        out[name]["teacher_targets_per_image"] = sum(
            x["teacher/targets_per_image"] for x in logged) / len(logged)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage1", type=int, default=1200)
    p.add_argument("--mt", type=int, default=300)
    p.add_argument("--drop-every", type=int, default=5,
                   help="remove instance i of each scene where i %% N == N - 1 (2: half)")
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--mt-lr", type=float, default=0.01, help="base LR of the Mean Teacher phase")
    p.add_argument("--val-images", type=int, default=64, help="held-out scenes scored")
    p.add_argument("--size", type=int, default=SIZE, help="scenes of SIZE x SIZE pixels")
    p.add_argument("--seed", type=int, default=0, help="the training runs' seed (data fixed)")
    p.add_argument("--out", default="")
    p.add_argument("--root", default="", help="keep data and workdirs here (reruns resume)")
    a = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if a.root:
        os.makedirs(a.root, exist_ok=True)
    with contextlib.nullcontext(a.root) if a.root else tempfile.TemporaryDirectory() as root:
        res = run(root, a.stage1, a.mt, drop_every=a.drop_every, train_images=a.train_images,
                  seed=a.seed, mt_lr=a.mt_lr, val_images=a.val_images,
                  size=a.size)
    keys = [k for k in res["start"] if "/" in k]
    print(f"{res['instances']} training instances, {res['kept']} kept as labels; "
          f"stage 1 {res['stage1_steps']} steps, then {res['mt_steps']} steps each")
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name in ("start", "continued", "mean_teacher"):
        print(f"| {name} | " + " | ".join(f"{res[name][k]:.3f}" for k in keys) + " |")
    print("Training scenes: recall of the withheld (unlabeled) and labeled instances at a "
          "score, mask IoU >= 0.5")
    cols = [f"{kind} {k}" for kind in ("withheld", "labeled") for k in res["start"][kind]]
    print("| model | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    rows = [("start", res["start"]), ("continued", res["continued"]),
            ("mean_teacher", res["mean_teacher"]),
            ("mean_teacher's teacher", {"withheld": res["mean_teacher"]["teacher_withheld"],
                                        "labeled": {}})]
    for name, r in rows:
        vals = [r[kind].get(k) for kind in ("withheld", "labeled") for k in res["start"][kind]]
        print(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    print("teacher targets per image (mean of the logged steps): "
          f"{res['mean_teacher']['teacher_targets_per_image']:.2f}; the teacher moved "
          f"{res['mean_teacher']['teacher_move']:.3f} of the student's distance from the start")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
