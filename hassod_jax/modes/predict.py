"""mode=predict: a trained detector on a folder, a glob, a file or a COCO image list ->
predictions.json and pictures (the library is `inference/`)."""

import os

import numpy as np

from hassod_jax.data.images import ImageReadError, load_image_rgb
from hassod_jax.inference import predictor, processing


def _picture_name(file_name, image_id, used):
    stem = os.path.splitext(file_name)[0].replace(os.sep, "__").replace("/", "__")
    name = f"{stem}.png"
    if name in used:
        name = f"{stem}_{image_id}.png"
    used.add(name)
    return name


def _check_predict_config(config):
    from hassod_jax import utils

    utils.require(config, "checkpoint", "images", mode="predict")
    if not 0.0 <= float(config.score_threshold) <= 1.0:
        raise utils.ConfigError(
            f"--config.score_threshold must be in [0, 1], got {config.score_threshold}"
        )
    for name in ("short_edge", "max_size", "detections"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise utils.ConfigError(f"--config.{name} must be a positive integer, got {value!r}")
    if config.batch_size < 0:
        raise utils.ConfigError(
            f"--config.batch_size must be >= 0 (0: one image per device), got {config.batch_size}"
        )
    utils.compute_dtype(config.dtype)
    return processing.parse_levels(config.levels)


def run(config, workdir):
    """mode=predict: the detector of `config.checkpoint` on the images of `config.images`.

    Writes, in `workdir`: predictions.json (COCO results of the kept detections, with
    hier_level and level_probs), images.json (the images and their ids), skipped.json (images
    that could not be read, with the reason; they are skipped), pictures/*.png (the first
    `config.max_pictures` images). Logs progress with an ETA. Returns a summary dict.
    """
    import time

    import jax
    from absl import logging

    from hassod_jax import utils
    from hassod_jax.evaluate import visualize
    from hassod_jax.weights.detectron2 import load_detector

    levels = _check_predict_config(config)
    items = predictor.list_inputs(config.images, config.get("image_dir", ""))
    if config.max_images >= 0:
        items = items[: config.max_images]
    if not items:
        raise FileNotFoundError(f"--config.images={config.images}: no image files found there")
    dtype = utils.compute_dtype(config.dtype)
    module, variables = load_detector(
        config.checkpoint, which=config.which, dtype=dtype, detections_per_image=config.detections
    )
    devices = jax.local_devices()
    batch_size = config.batch_size or len(devices)
    if batch_size % len(devices):
        raise utils.ConfigError(
            f"--config.batch_size={batch_size} must be a multiple of the {len(devices)} local "
            "devices (0: one image per device)"
        )
    fn, put = predictor.make_sharded_predict_fn(module, devices)
    variables = put(variables)
    buckets = tuple(tuple(b) for b in config.buckets) or None
    names = ", ".join(processing.LEVEL_NAMES[k] for k in levels)
    logging.info(
        "Detector from %s on %d image(s) of %s, %d device(s), batch %d: keeping score >= %g, "
        "levels %s",
        config.checkpoint,
        len(items),
        config.images,
        len(devices),
        batch_size,
        config.score_threshold,
        names,
    )
    picture_dir = os.path.join(workdir, "pictures")
    progress = utils.Progress(len(items), name="images", every_s=config.log_every_s)
    skipped, images, results, used_names = [], {}, {}, set()

    def readable():
        for path, image_id, file_name in items:
            t0 = time.perf_counter()
            try:
                img = load_image_rgb(path)
            except ImageReadError as e:
                logging.warning("Skipping %s: %s", file_name, e.reason)
                skipped.append({"file_name": file_name, "image_id": image_id, "reason": e.reason})
                progress.update(1)
                continue
            finally:
                progress.add_time("decode", time.perf_counter() - t0)
            h, w = img.shape[:2]
            images[image_id] = {"id": image_id, "file_name": file_name, "height": h, "width": w}
            yield img, (image_id, file_name)

    max_pictures = config.max_pictures
    stream = predictor.batch_by_shape(
        readable(),
        config.short_edge,
        config.max_size,
        buckets,
        batch_size,
        keep_image=lambda pos: max_pictures < 0 or pos < max_pictures,
    )
    for shape, chunk in stream:
        t0 = time.perf_counter()
        raw = predictor.run_batch(fn, variables, shape, chunk, batch_size)
        progress.add_time("detector", time.perf_counter() - t0)
        for entry, one in zip(chunk, raw):
            t0 = time.perf_counter()
            image_id, file_name = entry.key
            dets = processing.postprocess_detections(
                one, entry.resized_hw, entry.original_hw, config.score_threshold
            )
            dets = processing.filter_detections(dets, levels=levels)
            results[entry.position] = processing.detections_to_results(dets, image_id)
            t1 = time.perf_counter()
            progress.add_time("postprocess", t1 - t0)
            if entry.image is not None:
                visualize.save_picture(
                    os.path.join(picture_dir, _picture_name(file_name, image_id, used_names)),
                    entry.image,
                    [
                        visualize.instance_set(
                            f"detector (score >= {config.score_threshold:g})",
                            dets["masks"],
                            dets["levels"],
                            dets["scores"],
                        )
                    ],
                    by_level=config.panel_per_level,
                )
                progress.add_time("pictures", time.perf_counter() - t1)
            progress.update(1)
    progress.update(0, force=True)
    predictions = [r for pos in sorted(results) for r in results[pos]]
    out = os.path.join(workdir, "predictions.json")
    utils.atomic_write_json(out, predictions)
    utils.atomic_write_json(
        os.path.join(workdir, "images.json"),
        {"images": list(images.values()), "source": str(config.images)},
        indent=1,
    )
    utils.atomic_write_json(os.path.join(workdir, "skipped.json"), skipped, indent=1)
    per_level = np.bincount([p["hier_level"] for p in predictions], minlength=3).tolist()
    logging.info(
        "Wrote %s: %d detection(s) on %d image(s) (%s); %d image(s) skipped (listed in %s)%s",
        out,
        len(predictions),
        len(images),
        ", ".join(f"{n} {c}" for n, c in zip(processing.LEVEL_NAMES, per_level)),
        len(skipped),
        os.path.join(workdir, "skipped.json"),
        f"; pictures in {picture_dir}" if used_names else "",
    )
    return {
        "images": len(images),
        "skipped": len(skipped),
        "detections": len(predictions),
        "detections_per_level": per_level,
        "pictures": len(used_names),
    }
