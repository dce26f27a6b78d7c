"""mode=demo, the embedded default: stage 1 on generated scenes and scikit-image's photos.

Needs no downloads. Writes, under the workdir:
    demo_data/               the generated scenes (with ground truth) and the photos
    pseudo_labels/           the discovery outputs (per threshold, ensemble, skipped)
    pseudo_labels/metrics.json  mask AR/AP of each threshold and of the ensemble against the
                             generated ground truth, the agreement of hierarchy levels and
                             (with train_steps > 0) the small detector's AP/AR
    detector/                the small detector's run (checkpoints, logs) and its
                             predictions.json on every demo image
    mean_teacher/            (mt_steps > 0) a short Mean Teacher run from that detector; its
                             student's and teacher's AP/AR go into metrics.json
    pictures/                one PNG per image: the pseudo-labels and the detector's outputs,
                             each instance in its own colour, the level as the contour's line
                             style (whole solid, part dashed, subpart dotted) and a tag
    config.json, log.txt     the resolved config and the log (written by main.py)
With `config.dino_checkpoint` set it uses the DINO ViT; otherwise the weight-free stand-in.
Rerunning the same command on the same workdir resumes: the generated data, the finished
discovery chunks and the detector's checkpoint are kept, and the outputs are written again.
"""

import json
import os
import shutil

import numpy as np
from absl import logging
from PIL import Image

from hassod_jax import utils
from hassod_jax.data import synthetic
from hassod_jax.discovery import pipeline, sweep
from hassod_jax.evaluate import visualize
from hassod_jax.inference import predictor

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins", "horse")


def _photo(name):
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3].astype(np.uint8)


def prepare_data(data_dir, num_synthetic, seed, size, photos):
    """Writes the scenes and photos into one folder and an image list JSON covering both.

    Returns (image_dir, image_list_json, synthetic_gt_json).
    """
    image_dir, gt_json = synthetic.write_synthetic_dataset(
        os.path.join(data_dir, "synthetic"), num_synthetic, seed, tuple(size)
    )
    gt = utils.read_json(gt_json, "synthetic ground truth")
    images = list(gt["images"])
    next_id = max([im["id"] for im in images], default=0) + 1
    for name in photos:
        file_name = f"skimage_{name}.png"
        img = _photo(name)
        Image.fromarray(img).save(os.path.join(image_dir, file_name))
        images.append(
            {"id": next_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]}
        )
        next_id += 1
    image_list = os.path.join(data_dir, "image_list.json")
    utils.atomic_write_json(
        image_list, {"images": images, "annotations": [], "categories": pipeline.CATEGORIES}
    )
    return image_dir, image_list, gt_json


def level_agreement(gt, rows, iou_threshold=0.5):
    """Share of ground-truth masks found (IoU >= 0.5) and, among those, with the right level."""
    from pycocotools import mask as mask_utils

    by_image = {im["id"]: res["ensemble"] for im, res in rows}
    found = right = total = 0
    per_level = {0: [0, 0], 1: [0, 0], 2: [0, 0]}
    gt_by_image = {}
    for a in gt["annotations"]:
        gt_by_image.setdefault(a["image_id"], []).append(a)
    for image_id, gts in gt_by_image.items():
        preds = by_image.get(image_id, [])
        total += len(gts)
        if not preds:
            continue
        ious = mask_utils.iou(
            [g["segmentation"] for g in gts], [p["segmentation"] for p in preds], [0] * len(preds)
        )
        ious = np.asarray(ious).reshape(len(gts), len(preds))
        for g, row in zip(gts, ious):
            j = int(np.argmax(row))
            if row[j] >= iou_threshold:
                found += 1
                ok = int(preds[j]["hier_level"] == g.get("hier_level", 0))
                right += ok
                per_level[g.get("hier_level", 0)][0] += 1
                per_level[g.get("hier_level", 0)][1] += ok
    return {
        "gt_masks": total,
        "found_at_iou_0.5": found,
        "level_accuracy_of_found": right / found if found else 0.0,
        "level_accuracy_by_gt_level": {
            str(k): (v[1] / v[0] if v[0] else None) for k, v in per_level.items()
        },
    }


def write_pictures(config, picture_dir, image_dir, rows, detections=None):
    """One PNG per image (the first `config.max_pictures`): the plain image, the pseudo-labels
    (the ensemble) and, when given, the detector's detections with score >= the threshold.

    detections: {image_id: [COCO result dicts]} or None.
    """
    limit = len(rows) if config.max_pictures < 0 else config.max_pictures
    threshold = config.picture_score_threshold
    sets = {}
    for im, res in rows[:limit]:
        sets[im["id"]] = [("pseudo-labels", res["ensemble"])]
        if detections is not None:
            dets = [d for d in detections.get(im["id"], []) if d["score"] >= threshold]
            sets[im["id"]].append((f"detector (score >= {threshold:g})", dets))
    return visualize.save_annotation_pictures(
        picture_dir,
        image_dir,
        [im for im, _ in rows[:limit]],
        sets,
        by_level=config.panel_per_level,
    )


def _detector_config(config, train_json, image_dir, gt_json):
    import jax

    from hassod_jax import defaults

    c = defaults.training()
    c.train_json, c.images = train_json, image_dir
    c.val_json, c.val_images = gt_json, image_dir
    c.model.size = "small"
    c.model.pooler_sampling_ratio = 2
    c.model.rpn_pre_nms_topk_train = 256
    c.model.rpn_post_nms_topk_train = 64
    c.model.roi_batch_size_per_image = 64
    c.dtype = "float32"
    n = jax.device_count()
    c.batch_size = n * -(-4 // n)  # 4 images, or one per device
    c.max_iter = config.train_steps
    c.base_lr = 0.02
    c.warmup_iters = min(50, config.train_steps // 4)
    c.lr_steps = (int(0.8 * config.train_steps),)
    c.lr_gamma = 0.1  # a 10x drop for the last 20 % (the recipe's 40k steps never drop)
    c.log_every = max(1, config.train_steps // 5)
    c.checkpoint_every = config.train_steps
    c.keep_checkpoints = 1
    c.eval_every = config.train_steps
    c.val_short_edge, c.val_max_size, c.val_batch_size = 128, 192, 4
    c.data.short_edges, c.data.max_size = (128,), 192
    c.data.buckets = ((128, 192), (192, 128))
    c.data.max_instances = 32
    c.data.workers = 0
    if "precise_bn" in c:  # the recipe's PreciseBN, at the end, over a few batches
        c.precise_bn_every = 0
        c.precise_bn_iters = config.precise_bn_iters
        c.precise_bn = config.precise_bn_iters > 0
    return c


def train_detector(config, workdir, train_json, image_dir, gt_json, image_list):
    """A short run of the small detector on the pseudo-labels (stage 2 in miniature), then
    class-agnostic AP/AR of its detections on the generated scenes' ground truth, and its
    detections on every demo image (W/detector/predictions.json).

    A rerun on the same workdir finds the finished checkpoint: training has nothing left to
    do, and the restored detector is evaluated again. Returns (metrics, {image_id: results}).
    """
    import jax

    from hassod_jax.modes import train as train_mode
    from hassod_jax.train import loop

    c = _detector_config(config, train_json, image_dir, gt_json)
    state, final = train_mode.train(c, os.path.join(workdir, "detector"))
    model = train_mode.build_model(c)
    if "val/bbox/AP" not in final:  # resumed at the last step: nothing was trained or scored
        logging.info("The detector's run had finished: evaluating its restored checkpoint")
        final = {**final, **loop.evaluate_state(train_mode.validation(c), model, state)}
    metrics = {
        t: {
            "AP": final[f"val/{t}/AP"],
            "AP50": final[f"val/{t}/AP50"],
            "AR@100": final[f"val/{t}/AR@100"],
        }
        for t in ("bbox", "segm")
    } | {"level_accuracy": final["val/level_accuracy"], "steps": config.train_steps}
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    images = predictor.images_from_coco(image_list, image_dir)
    preds = predictor.predict(
        model,
        variables,
        images,
        short_edge=c.val_short_edge,
        max_size=c.val_max_size,
        buckets=c.data.buckets,
        batch_size=c.val_batch_size,
    )
    utils.atomic_write_json(os.path.join(workdir, "detector", "predictions.json"), preds)
    by_image = {}
    for p in preds:
        by_image.setdefault(p["image_id"], []).append(p)
    return metrics, by_image


def _mean_teacher_config(config, detector_config, workdir):
    import jax

    from hassod_jax import defaults

    d = detector_config
    c = defaults.mean_teacher()
    c.init_checkpoint = os.path.join(workdir, "detector")
    c.train_json, c.images = d.train_json, d.images
    c.val_json, c.val_images = d.val_json, d.val_images
    for k in ("pooler_sampling_ratio", "rpn_pre_nms_topk_train", "rpn_post_nms_topk_train",
              "roi_batch_size_per_image"):
        c.model[k] = d.model[k]
    c.model.detections_per_image = 100
    n = jax.device_count()
    c.batch_size_label = c.batch_size_unlabel = n * -(-2 // n)  # 2 + 2 images, or one per device
    c.max_iter = config.mt_steps
    c.warmup_iters = config.mt_steps // 2  # the original warms up for half of its 2000 steps
    c.log_every = max(1, config.mt_steps // 3)
    c.checkpoint_every = config.mt_steps
    c.keep_checkpoints = 1
    c.eval_every = config.mt_steps
    c.max_targets = 32
    c.val_short_edge, c.val_max_size, c.val_batch_size = (
        d.val_short_edge, d.val_max_size, d.val_batch_size
    )
    c.data = d.data
    c.data.copy_paste = False
    return c


def mean_teacher_phase(config, workdir, detector_config):
    """A short Mean Teacher run from the demo's detector (stage 2.3 in miniature); the student's
    and the teacher's AP/AR on the generated scenes' ground truth."""
    from hassod_jax.modes import mean_teacher as mt_mode
    from hassod_jax.modes import train as train_mode
    from hassod_jax.train import loop, mean_teacher

    c = _mean_teacher_config(config, detector_config, workdir)
    state, final = mt_mode.train(c, os.path.join(workdir, "mean_teacher"))
    if "val/segm/AR@100" not in final:  # resumed at the last step: score the restored models
        model, _ = mt_mode.build_model(c)
        val = train_mode.validation(c)
        final = {**final, **loop.evaluate_state(val, model, state)}
        teacher = loop.evaluate_state(val, model, mean_teacher.TeacherView(state))
        final.update({k.replace("val/", "val_teacher/", 1): v for k, v in teacher.items()})
    return {
        who: {
            t: {m: final[f"{prefix}/{t}/{m}"] for m in ("AP", "AP50", "AR@100")}
            for t in ("bbox", "segm")
        }
        for who, prefix in (("student", "val"), ("teacher", "val_teacher"))
    } | {"steps": config.mt_steps}


def run(config, workdir):
    data_dir = os.path.join(workdir, "demo_data")
    manifest = os.path.join(data_dir, "manifest.json")
    if os.path.exists(manifest):  # a resumed demo keeps the data it generated
        image_dir, image_list, gt_json = utils.read_json(manifest, "demo manifest")
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
        paths = prepare_data(
            data_dir, config.num_synthetic, config.seed, config.synthetic_size, config.photos
        )
        utils.atomic_write_json(manifest, list(paths))
        image_dir, image_list, gt_json = paths
    with config.unlocked():
        config.images = image_dir
        config.coco_json = image_list
        if config.backbone == "auto":
            config.backbone = "dino" if config.dino_checkpoint else "standin"
    logging.info(
        "Demo: %s", "DINO ViT" if config.backbone == "dino" else "stand-in backbone (no weights)"
    )
    result = pipeline.discover(config, workdir)
    rows = result["rows"]
    gt = utils.read_json(gt_json, "synthetic ground truth")
    metrics = {
        "backbone": config.backbone,
        "images": result["images"],
        "skipped": result["skipped"],
        "segm": sweep.evaluate_thresholds(rows, config.thresholds, gt_json),
        "levels": level_agreement(gt, rows),
        "statistics": sweep.threshold_statistics(rows, config.thresholds),
    }
    out_dir = os.path.join(workdir, pipeline.OUTPUT_DIR)
    detections = None
    if config.train_steps > 0:
        metrics["detector"], detections = train_detector(
            config,
            workdir,
            os.path.join(out_dir, pipeline.ENSEMBLE_FILE),
            image_dir,
            gt_json,
            image_list,
        )
        if config.get("mt_steps", 0) > 0:
            det_cfg = _detector_config(
                config, os.path.join(out_dir, pipeline.ENSEMBLE_FILE), image_dir, gt_json
            )
            metrics["mean_teacher"] = mean_teacher_phase(config, workdir, det_cfg)
    utils.atomic_write_json(os.path.join(out_dir, "metrics.json"), metrics, indent=1)
    write_pictures(config, os.path.join(workdir, "pictures"), image_dir, rows, detections)
    summary = {k: {m: round(v[m], 4) for m in ("AR@100", "AP")} for k, v in metrics["segm"].items()}
    logging.info("Demo metrics against the generated ground truth (mask): %s", json.dumps(summary))
    logging.info("Levels: %s", json.dumps(metrics["levels"]))
    if "detector" in metrics:
        logging.info(
            "Small detector trained %d steps on the pseudo-labels, against the generated ground "
            "truth: mask AR@100 %.4f (the pseudo-labels themselves: %.4f)",
            config.train_steps,
            metrics["detector"]["segm"]["AR@100"],
            metrics["segm"]["ensemble"]["AR@100"],
        )
    if "mean_teacher" in metrics:
        logging.info(
            "Mean Teacher, %d steps from that detector: the student's mask AR@100 %.4f "
            "(before: %.4f), the teacher's %.4f",
            config.mt_steps,
            metrics["mean_teacher"]["student"]["segm"]["AR@100"],
            metrics["detector"]["segm"]["AR@100"],
            metrics["mean_teacher"]["teacher"]["segm"]["AR@100"],
        )
    logging.info(
        "Wrote %s and pictures in %s",
        os.path.join(out_dir, "metrics.json"),
        os.path.join(workdir, "pictures"),
    )
    return metrics
