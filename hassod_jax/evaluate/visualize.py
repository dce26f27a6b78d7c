"""Pictures of pseudo-labels and detections: masks filled in a colour per hierarchy level."""

import numpy as np
from PIL import Image

# whole / part / subpart
LEVEL_COLORS = np.array([[230, 60, 50], [60, 180, 75], [40, 110, 240]], dtype=np.float32)


def draw_masks(image, masks, levels, alpha=0.45):
    """Blends masks over an image, larger masks first so parts stay visible on their wholes.

    image: (H, W, 3) uint8; masks: (N, H, W) bool; levels: (N,) int in {0, 1, 2}.
    Returns (H, W, 3) uint8 with each mask tinted by its level's colour and outlined.
    """
    out = image.astype(np.float32).copy()
    order = np.argsort([-m.sum() for m in masks], kind="stable")
    for i in order:
        m = masks[i]
        color = LEVEL_COLORS[int(np.clip(levels[i], 0, 2))]
        out[m] = (1 - alpha) * out[m] + alpha * color
        edge = m & ~_erode(m)
        out[edge] = color
    return np.clip(out, 0, 255).astype(np.uint8)


def _erode(m):
    e = m.copy()
    e[1:] &= m[:-1]
    e[:-1] &= m[1:]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e


def save_picture(path, image, masks, levels):
    """Writes `draw_masks` beside the plain image as one PNG."""
    drawn = draw_masks(image, masks, levels)
    Image.fromarray(np.concatenate([image, drawn], axis=1)).save(path)
