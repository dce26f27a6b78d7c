"""Stage 1 end to end: a folder of images -> hierarchical COCO pseudo-labels.

Flow per image: decode (worker) -> 480x480 Lanczos + ImageNet normalisation -> DINO keys
(device batch; on CPU one image per device at a time) -> ONE HAC merge sequence cut at every
threshold (device batch) -> per threshold, one job each: bilinear upsample, dense CRF, IoU
filter, resize to the original size, area and corner filters, hole filling, RLE (workers, or
the CRF on the device) -> pool all thresholds -> coverage tree levels (one job per image).
Host memory: a chunk's resized images, one full-size mask at a time in refinement, an image's
pooled masks for its levels; the final files are assembled streaming.

Resume: the image list of this shard is cut into chunks of `chunk_size` images; each finished
chunk is one JSON file written atomically under `W/pseudo_labels/work/shard_S_of_N/`. A rerun
skips finished chunks, so a kill at any point loses at most the chunk in flight. The final
files are assembled from the chunk files in global image order, and annotation ids are given
then, so a resumed, sharded or merged run writes exactly what one uninterrupted run writes.

Outputs (W = workdir):
    W/pseudo_labels/thresh_{θ}.json        one threshold's kept masks (levels from its own tree)
    W/pseudo_labels/pseudo_labels_hier.json the ensemble with hier_level
    W/pseudo_labels/skipped.json           images that could not be used, with the reason
"""

import contextlib
import glob
import heapq
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
import time
import types

import numpy as np
from absl import logging

from hassod_jax import utils
from hassod_jax.utils import threshold_name
from hassod_jax.data import images as image_io

OUTPUT_DIR = "pseudo_labels"
ENSEMBLE_FILE = "pseudo_labels_hier.json"
SKIPPED_FILE = "skipped.json"
CATEGORIES = [{"id": 1, "name": "fg", "supercategory": "fg"}]

# Config fields that change what a chunk holds: a resume with other values is refused.
_RESULT_FIELDS = (
    "backbone",
    "dino_checkpoint",
    "feature_kind",
    "dtype",
    "image_size",
    "thresholds",
    "coverage",
    "min_area",
    "crf_backend",
    "crf",
    "chunk_size",
    "coco_json",
    "max_images",
    "refine",
)
# Result fields added after runs were recorded: a record without one held this value.
_RECORDED_DEFAULTS = {"refine": True}


# ----------------------------------------------------------------------------------------------
# Backbones


class FeatureExtractor:
    """Maps a batch of normalised 480x480 images to (B, h, w, D) float32 patch features."""

    def __init__(self, config):
        check_backbone(config)
        self.kind = config.backbone
        if self.kind == "dino":
            path = config.dino_checkpoint
            dtype = utils.compute_dtype(config.dtype)
            from hassod_jax.models import vit
            from hassod_jax.weights.dino_vit import load_dino_vit

            module, params = load_dino_vit(path, dtype=dtype)
            self.patch = module.patch_size
            self._features = vit.make_feature_fn(module, params, kind=config.feature_kind)
            import jax

            # On a host (CPU) backend the ViT sees one image per device at a time: its
            # activations (each layer's attention maps, heads x (1 + h*w)^2 floats, 0.3 GB for
            # ViT-S/8 at 480 px) then take a few images' memory, not the batch's (8 images took
            # 11 GB), and no padding is computed. Accelerators keep whole batches.
            self.group = jax.local_device_count() if jax.default_backend() == "cpu" else 0
            self.description = f"DINO ViT from {path} ({config.feature_kind}, {config.dtype})"
        else:
            self.patch = 8
            self.description = (
                "stand-in backbone (per-patch colour and texture statistics, no weights); "
                "set --config.dino_checkpoint for real DINO features"
            )

    def __call__(self, normalized, uint8_images):
        """normalized: (B,S,S,3) float32; uint8_images: (B,S,S,3) uint8 -> (B,h,w,D) float32."""
        if self.kind == "dino":
            g = self.group or len(normalized)
            return np.concatenate(
                [
                    np.asarray(self._features(normalized[i : i + g]), dtype=np.float32)
                    for i in range(0, len(normalized), g)
                ]
            )
        from hassod_jax.discovery import standin

        size = uint8_images.shape[1]
        grid = (size // self.patch, size // self.patch)
        return np.stack([standin.standin_features(im, grid=grid) for im in uint8_images])


def check_backbone(config):
    """Raises ConfigError (FileNotFoundError for a missing checkpoint file) for a backbone that
    cannot be built, naming the flag."""
    if config.backbone not in ("dino", "standin"):
        raise utils.ConfigError(
            f"config.backbone must be 'dino' or 'standin', got {config.backbone!r}: set "
            "--config.backbone=dino (with --config.dino_checkpoint) or --config.backbone=standin"
        )
    if config.backbone == "dino":
        path = config.dino_checkpoint
        if not path:
            raise utils.ConfigError(
                "backbone='dino' needs the DINO ViT checkpoint: set "
                "--config.dino_checkpoint=/path/to/dino_vitbase8_pretrain.pth "
                "(or --config.backbone=standin for the weight-free demo stand-in)"
            )
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"DINO checkpoint not found: {path}. Download dino_vitbase8_pretrain.pth from "
                "the official DINO release and set --config.dino_checkpoint to its path."
            )


def check_thresholds(thresholds):
    """config.thresholds -> list of floats; ConfigError when empty or not finite numbers."""
    try:
        values = [float(t) for t in thresholds]
    except (TypeError, ValueError):
        values = None
    if values is None or not all(np.isfinite(values)):
        raise utils.ConfigError(
            f"config.thresholds must be finite numbers, got {thresholds!r}: set e.g. "
            "--config.thresholds='(0.4,0.2,0.1)'"
        )
    if not values:
        raise utils.ConfigError(
            "config.thresholds is empty: give at least one HAC threshold, e.g. "
            "--config.thresholds='(0.4,0.2,0.1)'"
        )
    return values


def check_config(config):
    """Checks the settings a run needs before it writes anything (in particular the resume
    record), so that a rerun with a corrected flag in the same --workdir just runs."""
    check_backbone(config)
    resolve_crf_backend(config.crf_backend)
    check_thresholds(config.thresholds)
    for name in ("image_size", "batch_size", "chunk_size"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise utils.ConfigError(f"config.{name} must be a positive integer, got {value!r}")
    coverage = config.coverage
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not (
        0.0 < coverage <= 1.0
    ):
        raise utils.ConfigError(
            f"--config.coverage must be a number in (0, 1] (the recipe's 0.9), got {coverage!r}"
        )


def resolve_crf_backend(name):
    """'auto' -> `crf.default_crf_backend()`: 'jax' on an accelerator, 'pydensecrf' on CPU
    (the faster one there) when it is installed, else 'jax'."""
    if name == "auto":
        from hassod_jax.discovery import crf

        return crf.default_crf_backend()
    if name not in ("jax", "pydensecrf"):
        raise utils.ConfigError(f"config.crf_backend must be auto, jax or pydensecrf; got {name!r}")
    return name


# ----------------------------------------------------------------------------------------------
# Per-image work that runs in worker processes (no JAX there: they are started with 'spawn').


def _decode(args):
    """Reads one image. Returns a dict with the resized inputs, or with `reason` on failure."""
    index, path, size, patch = args
    t0 = time.perf_counter()
    try:
        img = image_io.load_image_rgb(path)
    except image_io.ImageReadError as e:
        return {"index": index, "reason": str(e)}
    h, w = img.shape[:2]
    if h < patch or w < patch:
        return {
            "index": index,
            "reason": f"{path}: image is {w}x{h}, smaller than one {patch}x{patch} patch",
        }
    small = image_io.resize_uint8(img, size)
    return {
        "index": index,
        "height": h,
        "width": w,
        "uint8": small,
        "normalized": image_io.normalize_imagenet(small),
        "seconds": time.perf_counter() - t0,
    }


class _FixedQ:
    """A crf_fn that returns CRF marginals computed elsewhere (on the device)."""

    def __init__(self, q):
        self.q = q

    def __call__(self, image, probs, **kwargs):
        return self.q


def _pydensecrf_fn(crf_kwargs):
    from hassod_jax.discovery import crf

    fn = crf.get_crf_fn("pydensecrf")
    return lambda image, probs: fn(image, probs, **crf_kwargs)


def _raw_regions(image, probs):
    """The crf_fn of `refine=False`: the regions' own upsampled masks stand for the CRF's."""
    return probs


def refine_job(job):
    """One (image, threshold): its HAC regions refined into COCO masks (`refine_regions`).

    job: dict with uint8 (S,S,3), height, width, regions (R,h,w) bool, min_area, refine, and
    either q ((R,S,S) CRF marginals computed on the device) or crf_kwargs (pydensecrf here).
    With refine False no CRF runs: each region's bilinear upsampling stands for its CRF
    marginal, so the IoU filter keeps every non-empty region and the masks are the raw HAC
    regions at the original size (area, corner and hole rules applied as to refined masks).
    Returns the list of annotations (segmentation, area, bbox).
    """
    from hassod_jax.discovery import refine

    if not job["refine"]:
        crf_fn = _raw_regions
    elif job.get("q") is not None:
        crf_fn = _FixedQ(job["q"])
    else:
        crf_fn = _pydensecrf_fn(job["crf_kwargs"])
    return refine.refine_regions(
        job["uint8"], job["regions"], (job["height"], job["width"]), crf_fn,
        min_area=job["min_area"],
    )  # fmt: skip


def levels_job(job):
    """One image: the hierarchy levels of each threshold's masks and of their pool.

    job: dict with height, width, coverage and per_threshold (list over thresholds of the
    annotations `refine_job` made). Returns {'per_threshold': [[ann...] per threshold],
    'ensemble': [ann...]}, every annotation with its hier_level.
    """
    from pycocotools import mask as mask_utils

    from hassod_jax.discovery import hierarchy

    per_threshold = job["per_threshold"]

    def with_levels(anns, masks):
        if not anns:
            return []
        levels, _ = hierarchy.hierarchy_levels(masks, coverage=job["coverage"])
        return [dict(a, hier_level=int(lv)) for a, lv in zip(anns, levels)]

    # Every mask is decoded once, into one C-ordered bool array at the original size that
    # serves the ensemble's tree and, as slices, each threshold's: no second copy of the
    # pool (a 12-megapixel photo's 100 masks are 1.2 GB).
    pooled = [a for anns in per_threshold for a in anns]
    masks = np.empty((len(pooled), job["height"], job["width"]), bool)
    for i in range(0, len(pooled), 8):  # decoded 8 at a time (pycocotools gives uint8)
        rles = [a["segmentation"] for a in pooled[i : i + 8]]
        masks[i : i + len(rles)] = mask_utils.decode(rles).transpose(2, 0, 1)
    ensemble = with_levels(pooled, masks)
    bounds = np.cumsum([0] + [len(anns) for anns in per_threshold])
    per_threshold = [
        with_levels(anns, masks[a:b]) for anns, a, b in zip(per_threshold, bounds, bounds[1:])
    ]
    return {"per_threshold": per_threshold, "ensemble": ensemble}


# ----------------------------------------------------------------------------------------------
# The run


def _pool(num_workers):
    if num_workers == 0:
        return None
    if num_workers < 0:
        num_workers = max(1, (os.cpu_count() or 2) - 1)
    # 'spawn': the parent has started JAX's threads, and forking a threaded process is unsafe.
    return multiprocessing.get_context("spawn").Pool(num_workers)


def _imap(pool, fn, items):
    if pool is None:
        return map(fn, items)
    return pool.imap(fn, items)


def _list_images(config):
    if not config.images:
        raise utils.ConfigError(
            "config.images is not set: set --config.images=/path/to/image/folder "
            f"(mode={config.mode})"
        )
    items = image_io.list_images(config.images, config.coco_json or None)
    if config.max_images is not None and config.max_images >= 0:
        items = items[: config.max_images]
    return items


def _shard_dir(out_dir, shard, num_shards):
    return os.path.join(out_dir, "work", f"shard_{shard:04d}_of_{num_shards:04d}")


def _settings_snapshot(config):
    snapshot = {k: _jsonable(config[k]) for k in _RESULT_FIELDS if k in config}
    for k, v in _RECORDED_DEFAULTS.items():  # a config without the field means its default
        snapshot.setdefault(k, v)
    return snapshot


def _check_resume_config(out_dir, config):
    """Refuses to resume a workdir whose committed work used other result-changing settings."""
    snapshot = _settings_snapshot(config)
    path = os.path.join(out_dir, "work", "config.json")
    if os.path.exists(path):
        previous = utils.read_json(path, "resume record")
        changed = {
            k: (previous.get(k, _RECORDED_DEFAULTS.get(k)), v)
            for k, v in snapshot.items()
            if previous.get(k, _RECORDED_DEFAULTS.get(k)) != v
        }
        if changed:
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise utils.ConfigError(
                f"{out_dir} holds a run with other settings ({lines}); use a fresh --workdir "
                "or restore the settings to resume it"
            )


def _lock_settings(out_dir, config):
    """Writes the resume record when the first chunk is about to be committed: a run that fails
    before it has finished any work (a wrong path, a broken checkpoint) leaves nothing to
    resume, so its corrected rerun in the same workdir is not refused."""
    path = os.path.join(out_dir, "work", "config.json")
    if not os.path.exists(path):
        utils.atomic_write_json(path, _settings_snapshot(config), indent=1)


def _jsonable(v):
    if hasattr(v, "to_dict"):
        return {k: _jsonable(x) for k, x in v.to_dict().items()}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def process_shard(config, out_dir, items, shard, num_shards):
    """Discovers pseudo-labels for slice `shard` of `items`, chunk by chunk, resumably."""
    thresholds = check_thresholds(config.thresholds)
    indices = list(range(shard, len(items), num_shards))
    shard_dir = _shard_dir(out_dir, shard, num_shards)
    os.makedirs(shard_dir, exist_ok=True)
    chunks = [indices[i : i + config.chunk_size] for i in range(0, len(indices), config.chunk_size)]
    pending = [
        k
        for k in range(len(chunks))
        if not os.path.exists(os.path.join(shard_dir, f"chunk_{k:06d}.json"))
    ]
    if len(pending) < len(chunks):
        logging.info(
            "Resuming: %d of %d chunks already done", len(chunks) - len(pending), len(chunks)
        )
    timing = {"images": 0, "seconds": 0.0, "stage_seconds": {}}
    if pending:
        extractor = FeatureExtractor(config)
        logging.info("Backbone: %s", extractor.description)
        backend = resolve_crf_backend(config.crf_backend)
        logging.info("CRF backend: %s", backend)
        crf_kwargs = dict(config.crf.to_dict())
        n_images = sum(len(chunks[k]) for k in pending)
        progress = utils.Progress(n_images, name="images", every_s=config.log_every_s)
        # One refinement (a dense CRF at image_size and the steps after it) per image and
        # threshold: a line per threshold and chunk, with the run's ETA.
        refinements = utils.Progress(
            n_images * len(thresholds), name="refinements", every_s=float("inf")
        )
        logging.info(
            "%d images x %d thresholds = %d refinements%s",
            n_images,
            len(thresholds),
            n_images * len(thresholds),
            "" if config.get("refine", True) else " (refine=False: raw HAC masks, no CRF)",
        )
        pool = _pool(config.num_workers)
        try:
            run = types.SimpleNamespace(
                extractor=extractor,
                backend=backend,
                crf_kwargs=crf_kwargs,
                thresholds=thresholds,
                pool=pool,
                progress=progress,
                refinements=refinements,
            )
            for n, k in enumerate(pending):
                where = f"chunk {n + 1}/{len(pending)}, " if len(pending) > 1 else ""
                record = _process_chunk(config, items, chunks[k], run, where)
                # The settings are locked just before the first commit (not after it: a kill
                # in between would leave work that a rerun with other settings could mix in).
                _lock_settings(out_dir, config)
                utils.atomic_write_json(os.path.join(shard_dir, f"chunk_{k:06d}.json"), record)
            progress.update(0, force=True)
            timing = {
                "images": progress.done,
                "seconds": time.perf_counter() - progress.start,
                "stage_seconds": dict(progress.stage_time),
            }
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    utils.atomic_write_json(
        os.path.join(shard_dir, "done.json"),
        {"num_chunks": len(chunks), "num_images": len(indices)},
    )
    return timing


def _process_chunk(config, items, chunk, run, where=""):
    """Decodes, extracts, merges and refines one chunk; returns its JSON record. `run` holds
    what the chunks share: extractor, backend, crf_kwargs, thresholds, pool, progress (images)
    and refinements (images x thresholds); `where` prefixes the per-threshold log lines."""
    import jax

    from hassod_jax.discovery import hac

    extractor, backend, crf_kwargs = run.extractor, run.backend, run.crf_kwargs
    thresholds, pool, progress = run.thresholds, run.pool, run.progress
    size = config.image_size
    t0 = time.perf_counter()
    decode_args = [
        (i, os.path.join(config.images, items[i][1]), size, extractor.patch) for i in chunk
    ]
    decoded = list(_imap(pool, _decode, decode_args))
    progress.add_time("decode", time.perf_counter() - t0)

    skipped = [{"index": d["index"], "reason": d["reason"]} for d in decoded if "reason" in d]
    for s in skipped:
        logging.warning("Skipping image: %s", s["reason"])
    good = [d for d in decoded if "reason" not in d]

    # Features and the merge sequence, a fixed device batch at a time. On accelerators the last
    # batch is padded so that every call has the same shape and compiles once; on CPU the ViT
    # runs per device group and HAC image by image (host loop), so padding would be pure waste.
    partitions, bs = [], config.batch_size
    host = jax.default_backend() == "cpu"
    for b in range(0, len(good), bs):
        batch = good[b : b + bs]
        pad = 0 if host else bs - len(batch)
        norm = np.stack([d["normalized"] for d in batch] + [batch[-1]["normalized"]] * pad)
        u8 = np.stack([d["uint8"] for d in batch] + [batch[-1]["uint8"]] * pad)
        t1 = time.perf_counter()
        feats = extractor(norm, u8)
        t2 = time.perf_counter()
        parts = hac.hac_partitions(feats, thresholds)[: len(batch)]
        t3 = time.perf_counter()
        progress.add_time("features", t2 - t1)
        progress.add_time("hac", t3 - t2)
        partitions.extend(parts)

    refine_on = bool(config.get("refine", True))
    qs = [[None] * len(thresholds) for _ in good]
    if backend == "jax" and refine_on:
        t1 = time.perf_counter()
        qs = jax_crf_all([d["uint8"] for d in good], partitions, crf_kwargs, size, bs)
        progress.add_time("crf", time.perf_counter() - t1)

    # Refinement, threshold by threshold (each (image, threshold) is one job), so that the log
    # says when each threshold is done; then the levels, image by image.
    def refine_jobs():
        for t in range(len(thresholds)):
            for i, d in enumerate(good):
                yield {
                    "uint8": d["uint8"],
                    "height": d["height"],
                    "width": d["width"],
                    "regions": partitions[i][t],
                    "q": qs[i][t],
                    "refine": refine_on,
                    "min_area": config.min_area,
                    "crf_kwargs": crf_kwargs,
                }

    t1 = time.perf_counter()
    refined = _imap(pool, refine_job, refine_jobs())
    anns = [[None] * len(thresholds) for _ in good]
    for t, theta in enumerate(thresholds):
        if not good:
            break
        for i in range(len(good)):
            anns[i][t] = next(refined)
        run.refinements.update(len(good))
        logging.info(
            "%sθ=%s (%d/%d)%s: %d images, %.1f masks per image | %s",
            where,
            threshold_name(theta),
            t + 1,
            len(thresholds),
            "" if refine_on else " raw",
            len(good),
            sum(len(a[t]) for a in anns) / len(good),
            run.refinements.summary(),
        )
    progress.add_time("refine", time.perf_counter() - t1)

    t1 = time.perf_counter()
    level_jobs = (
        {
            "height": d["height"],
            "width": d["width"],
            "coverage": config.coverage,
            "per_threshold": per_t,
        }
        for d, per_t in zip(good, anns)
    )
    images, per_image = [], []
    for d, parts, result in zip(good, partitions, _imap(pool, levels_job, level_jobs)):
        index = d["index"]
        image_id, file_name = items[index]
        images.append(
            {
                "index": index,
                "id": image_id,
                "file_name": file_name,
                "height": d["height"],
                "width": d["width"],
            }
        )
        per_image.append(
            {
                "ensemble": result["ensemble"],
                "per_threshold": result["per_threshold"],
                "regions": [int(p.shape[0]) for p in parts],
            }
        )
        progress.update(1)
    progress.add_time("levels", time.perf_counter() - t1)
    for s in skipped:
        s["file_name"] = items[s["index"]][1]
        s["image_id"] = items[s["index"]][0]
    progress.update(len(skipped))
    return {"images": images, "results": per_image, "skipped": skipped}


def label_bucket(r):
    """Labels are padded to a power of two (at least 8) so the CRF compiles a few shapes."""
    return max(8, 1 << (r - 1).bit_length())


def jax_crf_all(images_u8, partitions, crf_kwargs, size, batch_size):
    """CRF marginals on the devices for every (image, threshold) of a chunk.

    Pairs whose region counts fall in the same label bucket go through `dense_crf` together,
    `batch_size` at a time rounded up to a multiple of this host's devices (the last batch
    padded with repeats), so the devices see a few static shapes. Each batch is split over
    the host's devices (a CRF pair at 480 x 480 and 32 labels needs about 2 GB of device
    memory; 8 pairs on one device did not fit 16 GB). Returns, per image, a list over
    thresholds of (R, S, S) float32 arrays.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from hassod_jax import parallel
    from hassod_jax.discovery import crf, refine

    mesh = parallel.local_mesh()
    n_dev = mesh.devices.size
    batch_size = -(-batch_size // n_dev) * n_dev
    pairs_sharding = NamedSharding(mesh, PartitionSpec("data"))
    groups = {}
    for i, parts in enumerate(partitions):
        for t, regions in enumerate(parts):
            groups.setdefault(label_bucket(regions.shape[0]), []).append((i, t))
    out = [[None] * len(parts) for parts in partitions]
    for bucket, pairs in sorted(groups.items()):
        for b in range(0, len(pairs), batch_size):
            batch = pairs[b : b + batch_size]
            batch = batch + [batch[-1]] * (batch_size - len(batch))
            probs = np.zeros((batch_size, bucket, size, size), np.float32)
            valid = np.zeros((batch_size, bucket), bool)
            for k, (i, t) in enumerate(batch):
                r = partitions[i][t].shape[0]
                probs[k, :r] = refine.upsample_masks(partitions[i][t], (size, size))
                valid[k, :r] = True
            images = np.stack([images_u8[i] for i, _ in batch])
            args = jax.device_put((images, probs, valid), pairs_sharding)
            q = np.asarray(crf.dense_crf(*args, **crf_kwargs))
            for k, (i, t) in enumerate(batch[: len(pairs[b : b + batch_size])]):
                out[i][t] = q[k, : partitions[i][t].shape[0]]
    return out


# ----------------------------------------------------------------------------------------------
# Assembly of the final files


def _shard_chunks(out_dir):
    """The chunk files of every shard under `out_dir/work`, [shard][chunk] in order, after
    checking that the shards are of one sharding and all finished."""
    shard_dirs = sorted(glob.glob(os.path.join(out_dir, "work", "shard_*_of_*")))
    if not shard_dirs:
        raise FileNotFoundError(
            f"No discovery shards under {out_dir}/work: run mode=discover first"
        )
    counts = {int(os.path.basename(d).split("_of_")[1]) for d in shard_dirs}
    if len(counts) != 1:
        raise utils.ConfigError(
            f"{out_dir}/work mixes shards of runs split {sorted(counts)} ways (other "
            "--config.num_jobs or process counts); use one sharding per --workdir"
        )
    total = counts.pop()
    missing = [
        s
        for s in range(total)
        if not os.path.exists(os.path.join(_shard_dir(out_dir, s, total), "done.json"))
    ]
    if missing:
        raise utils.InputError(
            f"Shards {missing} of {total} under {out_dir}/work are not finished; run (or resume) "
            "those jobs (--config.job_index of --config.num_jobs), then merge again"
        )
    shards = []
    for s in range(total):
        d = _shard_dir(out_dir, s, total)
        n = utils.read_json(os.path.join(d, "done.json"), "shard record")["num_chunks"]
        paths = [os.path.join(d, f"chunk_{k:06d}.json") for k in range(n)]
        for path in paths:
            if not os.path.exists(path):
                raise FileNotFoundError(f"chunk file not found: {path}")
        shards.append(paths)
    return shards


def _merged_entries(shards):
    """(index, image, result) for every image and (index, skipped record, None) for every
    skipped one, in global image order: each shard's chunks hold ascending indices, so the
    shards are merged reading one chunk file per shard at a time."""

    def stream(paths):
        for path in paths:
            rec = utils.read_json(path, "chunk file")
            entries = [(im["index"], im, res) for im, res in zip(rec["images"], rec["results"])]
            entries += [(sk["index"], sk, None) for sk in rec["skipped"]]
            yield from sorted(entries, key=lambda e: e[0])

    return heapq.merge(*(stream(paths) for paths in shards), key=lambda e: e[0])


class Rows:
    """The assembled (image, result) pairs in global image order, read from the chunk files on
    every pass rather than held: memory stays that of one chunk per shard however many images
    the run has. Iterable (again and again), `len()`, and prefix slices `rows[:n]` (a list)."""

    def __init__(self, shards, count):
        self._shards, self._count = shards, count

    def __len__(self):
        return self._count

    def __iter__(self):
        for _, im, res in _merged_entries(self._shards):
            if res is not None:
                yield im, res

    def __getitem__(self, key):
        if isinstance(key, slice) and not key.start and key.step in (None, 1):
            return list(itertools.islice(self, key.stop))
        raise TypeError("Rows supports iteration, len() and prefix slices [:n] only")


def _annotation(ann_id, image_id, a):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "segmentation": a["segmentation"],
        "area": a["area"],
        "bbox": a["bbox"],
        "hier_level": a["hier_level"],
    }


def assemble(out_dir, thresholds):
    """Writes the per-threshold files, the ensemble and skipped.json from all chunk files.

    Images are ordered by their index in the global image list and annotation ids run from 1
    in that order, so the result does not depend on sharding or on resumption. The files are
    written in one streaming pass (each file's annotations go to a temporary file first, as
    the images list comes before them), so memory does not grow with the number of images
    beyond the images list itself. Returns the counts and `rows`, a `Rows` over the result.
    """
    shards = _shard_chunks(out_dir)
    names = [f"thresh_{threshold_name(theta)}.json" for theta in thresholds] + [ENSEMBLE_FILE]
    picks = [lambda res, t=t: res["per_threshold"][t] for t in range(len(thresholds))]
    picks.append(lambda res: res["ensemble"])
    images, skipped_rows, counts = [], [], [0] * len(names)
    with contextlib.ExitStack() as stack:
        parts = [stack.enter_context(tempfile.TemporaryFile(dir=out_dir)) for _ in names]
        for _, im, res in _merged_entries(shards):
            if res is None:
                skipped_rows.append({k: v for k, v in im.items() if k != "index"})
                continue
            images.append({k: v for k, v in im.items() if k != "index"})
            for k, (part, pick) in enumerate(zip(parts, picks)):
                for a in pick(res):
                    counts[k] += 1
                    text = json.dumps(_annotation(counts[k], im["id"], a))
                    part.write(((", " if counts[k] > 1 else "") + text).encode("utf-8"))
        # The bytes json.dumps gives the whole {"images", "annotations", "categories"} dict.
        head = ('{"images": ' + json.dumps(images) + ', "annotations": [').encode("utf-8")
        tail = ('], "categories": ' + json.dumps(CATEGORIES) + "}").encode("utf-8")
        for name, part in zip(names, parts):
            part.seek(0)
            with utils.atomic_open(os.path.join(out_dir, name)) as f:
                f.write(head)
                shutil.copyfileobj(part, f)
                f.write(tail)
    utils.atomic_write_json(os.path.join(out_dir, SKIPPED_FILE), skipped_rows, indent=1)
    for name, n in zip(names, counts):
        logging.info("%s: %d annotations on %d images", name, n, len(images))
    logging.info("%d images skipped (listed in %s)", len(skipped_rows), SKIPPED_FILE)
    return {
        "images": len(images),
        "skipped": len(skipped_rows),
        "annotations": dict(zip(names, counts)),
        "rows": Rows(shards, len(images)),
    }


def discover(config, workdir, out_name=OUTPUT_DIR):
    """Runs (or resumes) this process's shard; assembles the final files when it can."""
    import jax

    from hassod_jax import parallel

    parallel.maybe_initialize_distributed()
    out_dir = os.path.join(workdir, out_name)
    items = _list_images(config)
    check_config(config)
    logging.info("%d images listed from %s", len(items), config.images)
    shard, num_shards = parallel.shard_index(config.job_index, config.num_jobs)
    if jax.process_index() == 0:
        _check_resume_config(out_dir, config)
    timing = process_shard(config, out_dir, items, shard, num_shards)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("hassod_discovery_shards_done")
    if num_shards == 1 or (config.num_jobs == 1 and jax.process_index() == 0):
        return {**assemble(out_dir, config.thresholds), "timing": timing}
    logging.info(
        "Shard %d of %d done; when every job has finished, merge them: the same command with "
        "--config.mode=merge_pseudo_labels on --workdir %s",
        shard,
        num_shards,
        workdir,
    )
    return None


def merge_thresholds(out_dir, config):
    """The thresholds to assemble `out_dir` with: config.thresholds, which must be those the
    shards were discovered with (the resume record holds them)."""
    thresholds = check_thresholds(config.thresholds)
    path = os.path.join(out_dir, "work", "config.json")
    if os.path.exists(path):
        recorded = utils.read_json(path, "resume record").get("thresholds")
        if recorded is not None and [float(t) for t in recorded] != thresholds:
            flag = repr(tuple(float(t) for t in recorded)).replace(" ", "")
            raise utils.ConfigError(
                f"{out_dir} was discovered with thresholds {flag}, not {tuple(thresholds)}: merge "
                f"with --config.thresholds='{flag}'"
            )
    return thresholds
