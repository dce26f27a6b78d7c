"""Pictures of pseudo-labels and detections, and the threshold sweep's plot (matplotlib, Agg).

Each instance has its own colour: a translucent fill and a contour drawn over a dark
underlay. The hierarchy level is the contour's line style (whole solid, part dashed, subpart
dotted) and a small tag on the instance's top edge (W, P, S, with the score when there
is one); a legend on the picture says so and counts each level. A picture is one row of
panels: the plain image, then one panel per instance set (e.g. pseudo-labels, detector); with
`by_level` each set gets a row of one panel per level instead.

Figures are built with `matplotlib.figure.Figure` on an Agg canvas, never through pyplot, so
no global backend is switched and nothing needs a display. PNGs are written atomically.
"""

import io

import numpy as np

from hassod_jax import utils
from hassod_jax.data.coco import annotation_to_mask

LEVEL_NAMES = ("whole", "part", "subpart")
LEVEL_TAGS = ("W", "P", "S")
# Line styles as (offset, (on, off)) dash patterns in points: solid, dashed, dotted. Dots of
# 1.2 points on 1.2 points stay readable at linewidth 1.6.
LEVEL_STYLES = ("solid", (0, (4.0, 2.0)), (0, (1.2, 1.2)))
LEVEL_STYLE_NAMES = ("solid", "dashed", "dotted")
DPI = 100


def instance_colors(n):
    """(n, 3) float RGB in [0, 1]: hues a golden-ratio step apart (neighbours in the list are
    far apart on the colour wheel), saturation and brightness alternating in three steps."""
    from matplotlib.colors import hsv_to_rgb

    i = np.arange(n)
    hue = (0.08 + i * 0.618033988749895) % 1.0
    sat = np.array([0.95, 0.7, 0.85])[i % 3]
    val = np.array([1.0, 0.85, 0.7])[(i // 3) % 3]
    return hsv_to_rgb(np.stack([hue, sat, val], axis=-1)) if n else np.zeros((0, 3))


def _as_set(masks, levels, scores=None, name="", colors=None):
    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"visualize: masks must be (N, H, W) bool, got shape {masks.shape}")
    levels = np.clip(np.asarray(levels, np.int64).reshape(-1), 0, len(LEVEL_NAMES) - 1)
    if len(levels) != len(masks):
        raise ValueError(f"visualize: {len(masks)} masks but {len(levels)} levels")
    if scores is not None:
        scores = np.asarray(scores, np.float64).reshape(-1)
        if len(scores) != len(masks):
            raise ValueError(f"visualize: {len(masks)} masks but {len(scores)} scores")
    # Instance i keeps its colour in every panel it is drawn in.
    colors = instance_colors(len(masks)) if colors is None else np.asarray(colors)
    return {"name": name, "masks": masks, "levels": levels, "scores": scores, "colors": colors}


def instance_set(name, masks, levels, scores=None):
    """One panel's instances: masks (N, H, W) bool, levels (N,) in {0, 1, 2}, optional scores
    (N,) (shown in the tags; the highest first when a panel holds too many)."""
    return _as_set(masks, levels, scores, name)


def _draw(ax, image, inst, title, max_instances, legend, alpha):
    """Draws the image, then the instances of `inst` (a dict from `instance_set`)."""
    from matplotlib.lines import Line2D

    h, w = image.shape[:2]
    ax.imshow(image, interpolation="nearest")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    masks, levels, scores = inst["masks"], inst["levels"], inst["scores"]
    areas = masks.sum(axis=(1, 2))
    keep = np.nonzero(areas > 0)[0]
    if scores is not None:  # the best ones when there are too many
        keep = keep[np.argsort(-scores[keep], kind="stable")]
    keep = keep[:max_instances]
    hidden = int((areas > 0).sum()) - len(keep)
    # Largest first, so that parts stay visible on their wholes.
    order = keep[np.argsort(-areas[keep], kind="stable")]
    colors = inst["colors"][order]
    overlay = np.zeros((h, w, 4), np.float32)
    for color, i in zip(colors, order):
        overlay[masks[i]] = (*color, alpha)
    if len(order):
        ax.imshow(overlay, interpolation="nearest")
    for color, i in zip(colors, order):
        ys, xs = np.nonzero(masks[i])
        y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, h)
        x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, w)
        crop = np.zeros((y1 - y0 + 2, x1 - x0 + 2), np.float32)
        crop[1:-1, 1:-1] = masks[i][y0:y1, x0:x1]
        gx, gy = np.arange(x0 - 1, x1 + 1), np.arange(y0 - 1, y1 + 1)
        style = LEVEL_STYLES[levels[i]]
        ax.contour(gx, gy, crop, levels=[0.5], colors=["black"], linewidths=2.8, alpha=0.55)
        ax.contour(gx, gy, crop, levels=[0.5], colors=[color], linewidths=1.6, linestyles=[style])
        tag = LEVEL_TAGS[levels[i]]
        if scores is not None:
            tag += f" {scores[i]:.2f}"
        top = ys.min()  # the tag sits on the instance: its top row's leftmost pixel
        ax.text(
            xs[ys == top].min(),
            top,
            tag,
            fontsize=6.5,
            color="white",
            va="top",
            ha="left",
            clip_on=True,
            bbox=dict(boxstyle="square,pad=0.15", facecolor=color * 0.6, edgecolor="none"),
        )
    counts = np.bincount(levels[order], minlength=len(LEVEL_NAMES))
    label = f"{title}: {len(order)}" + (f" (+{hidden} not drawn)" if hidden else "")
    ax.set_title(label, fontsize=8)
    if legend:
        handles = [
            Line2D(
                [0],
                [0],
                color="black",
                linestyle=LEVEL_STYLES[k],
                linewidth=1.6,
                label=f"{LEVEL_TAGS[k]} {LEVEL_NAMES[k]} ({counts[k]}, {LEVEL_STYLE_NAMES[k]})",
            )
            for k in range(len(LEVEL_NAMES))
        ]
        ax.legend(
            handles=handles,
            loc="lower right",
            fontsize=6,
            framealpha=0.8,
            handlelength=2.6,
            borderpad=0.3,
            labelspacing=0.2,
        )


def figure(image, sets, *, by_level=False, max_instances=100, alpha=0.35, panel_width=None):
    """A matplotlib Figure (Agg canvas) of `image` (H, W, 3) uint8 and the instance sets.

    Args:
      image: the picture's pixels, the masks' frame.
      sets: a list of `instance_set(...)` (or (name, masks, levels[, scores]) tuples).
      by_level: one panel per level for each set (one row per set) instead of one panel per
        set after the plain image.
      max_instances: at most this many instances per panel (by score when scores are given).
      panel_width: width of one panel in pixels (default the image's, between 360 and 640).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"visualize: image must be (H, W, 3) uint8, got {image.dtype} {image.shape}"
        )
    sets = [s if isinstance(s, dict) else instance_set(*s) for s in sets]
    for s in sets:
        if s["masks"].shape[1:] != image.shape[:2]:
            raise ValueError(
                f"visualize: {s['name']!r} masks are {s['masks'].shape[1:]}, the image "
                f"{image.shape[:2]}"
            )
    h, w = image.shape[:2]
    pw = panel_width or int(np.clip(w, 360, 640))
    ph = pw * h / w
    if by_level:
        rows, cols = max(len(sets), 1), len(LEVEL_NAMES)
    else:
        rows, cols = 1, 1 + len(sets)
    fig = Figure(figsize=(cols * pw / DPI, rows * (ph + 22) / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    if by_level:
        for r, s in enumerate(sets):
            for k in range(len(LEVEL_NAMES)):
                sel = s["levels"] == k
                one = _as_set(
                    s["masks"][sel],
                    s["levels"][sel],
                    None if s["scores"] is None else s["scores"][sel],
                    colors=s["colors"][sel],
                )
                _draw(
                    axes[r][k],
                    image,
                    one,
                    f"{s['name']} {LEVEL_NAMES[k]}",
                    max_instances,
                    legend=k == 0,
                    alpha=alpha,
                )
    else:
        ax = axes[0][0]
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"image {w}x{h}", fontsize=8)
        for c, s in enumerate(sets, start=1):
            _draw(axes[0][c], image, s, s["name"], max_instances, legend=True, alpha=alpha)
    fig.subplots_adjust(
        left=0.005,
        right=0.995,
        bottom=0.005,
        top=1 - 22 / (ph + 22) / rows,
        wspace=0.02,
        hspace=22 / ph,
    )
    return fig


def render(image, sets, **kwargs):
    """The picture as an (H', W', 3) uint8 array (what `save_picture` writes)."""
    fig = figure(image, sets, **kwargs)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _png_bytes(fig):
    """The figure as RGB PNG bytes (a quarter smaller than matplotlib's RGBA)."""
    from PIL import Image

    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def save_picture(path, image, sets, **kwargs):
    """Writes `figure(image, sets, **kwargs)` as a PNG at `path` (atomically)."""
    utils.atomic_write_bytes(path, _png_bytes(figure(image, sets, **kwargs)))


def masks_of(anns, shape):
    """(N, H, W) bool masks of COCO annotations or results (RLE, polygons) on an image of
    `shape` (H, W)."""
    if not anns:
        return np.zeros((0,) + tuple(shape), bool)
    return np.stack([annotation_to_mask(a, *shape).astype(bool) for a in anns])


def save_annotation_pictures(picture_dir, image_dir, images, sets_by_image, *, by_level=False):
    """One PNG per image of COCO-format instances (pseudo-labels, detector results).

    Args:
      picture_dir: output folder; a picture is named after its image file (PNG).
      image_dir: the folder of the images' file names.
      images: COCO image dicts (id, file_name), in the order to draw.
      sets_by_image: {image id: [(panel name, [annotation or result dict])]}; each dict has a
        segmentation, optionally hier_level (default 0) and score.
    Returns the paths written.
    """
    import os

    from hassod_jax.data import images as image_io

    written = []
    for im in images:
        img = image_io.load_image_rgb(os.path.join(image_dir, im["file_name"]))
        sets = []
        for name, anns in sets_by_image.get(im["id"], []):
            scores = [a["score"] for a in anns] if anns and "score" in anns[0] else None
            sets.append(
                instance_set(
                    name,
                    masks_of(anns, img.shape[:2]),
                    [a.get("hier_level", 0) for a in anns],
                    scores,
                )
            )
        stem = os.path.splitext(im["file_name"])[0].replace(os.sep, "__").replace("/", "__")
        path = os.path.join(picture_dir, f"{stem}.png")
        save_picture(path, img, sets, by_level=by_level)
        written.append(path)
    return written


def plot_sweep(path, report):
    """A PNG of a threshold sweep report (`discovery.sweep.write_report`): mask AR@100 and AP
    against θ (when the report has ground-truth metrics; the ensembles as horizontal lines),
    and masks and HAC regions per image against θ."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    thetas = [float(t) for t in report["thresholds"]]
    names = [utils.threshold_name(t) for t in thetas]
    stats = report["statistics"]
    segm = report.get("segm")
    fig = Figure(figsize=(10.0 if segm else 5.2, 3.6), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if segm else 1, squeeze=False)[0]
    if segm:
        ax = axes[0]
        for metric, marker in (("AR@100", "o"), ("AP", "s")):
            ys = [segm.get(n, {}).get(metric, np.nan) for n in names]
            (line,) = ax.plot(thetas, ys, marker=marker, label=f"mask {metric}")
            if "ensemble" in segm:
                ax.axhline(
                    segm["ensemble"][metric],
                    color=line.get_color(),
                    linestyle="--",
                    linewidth=1,
                    label=f"{metric}, ensemble of all",
                )
            for key in segm:
                if key.startswith("ensemble_"):
                    ax.axhline(
                        segm[key][metric],
                        color=line.get_color(),
                        linestyle=":",
                        linewidth=1,
                        label=f"{metric}, {key.replace('_', ' ', 1)}",
                    )
        ax.set_xlabel("HAC merge threshold θ")
        ax.set_ylabel("class-agnostic mask metric")
        ax.set_title(f"against the ground truth ({report['images']} images)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    ax.plot(
        thetas,
        [stats[n]["masks_per_image"] for n in names],
        marker="o",
        label="masks per image (refined)",
    )
    ax.plot(
        thetas,
        [stats[n].get("regions_per_image", np.nan) for n in names],
        marker="^",
        label="HAC regions per image",
    )
    if "ensemble" in stats:
        ax.axhline(
            stats["ensemble"]["masks_per_image"],
            color="gray",
            linestyle="--",
            linewidth=1,
            label="masks per image, ensemble",
        )
    ax.set_yscale("log")
    ax.set_xlabel("HAC merge threshold θ")
    ax.set_title("per image", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    utils.atomic_write_bytes(path, _png_bytes(fig))
    return path
