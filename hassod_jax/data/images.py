"""Reading images for discovery: any PIL mode to RGB uint8, DINO-ready resizing, image lists.

Conventions (HASSOD's `hac/hac.py` opens images with `Image.open(path).convert('RGB')`):
- EXIF orientation is NOT applied (unlike detectron2's `read_image`), so masks line up with
  the stored pixel grid that COCO annotations use.
- Alpha is dropped, not composited: RGBA/LA/PA -> the colour channels as stored (what
  PIL's `convert('RGB')` does). Palette images map through the palette; a palette
  transparency entry is ignored the same way.
- CMYK, YCbCr, LAB, HSV, 1-bit and 8-bit grey go through PIL's own `convert('RGB')`.
- 16-bit grey (`I;16*`) is scaled to 8 bits by keeping the high byte (v >> 8), so the full
  16-bit range maps onto 0..255 (PIL's `convert('RGB')` would clip everything above 255).
  32-bit integer `I` is treated the same way when its maximum exceeds 255 (values clipped
  to 0..65535 first), and as 8-bit data otherwise. Float `F`: values within [0, 1] are
  scaled by 255, otherwise clipped to [0, 255]; then rounded.
- Multi-frame files (GIF, TIFF) use their first frame.
- Truncated files are errors: `ImageFile.LOAD_TRUNCATED_IMAGES` is forced off while loading.
- Size guard: images with more than `max_pixels` pixels raise ImageReadError; the default is
  PIL's decompression-bomb error threshold (2 * Image.MAX_IMAGE_PIXELS, ~179 Mpx);
  `max_pixels=None` allows any size.
"""

import contextlib
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
)
DEFAULT_MAX_PIXELS = 2 * 89478485  # PIL's DecompressionBombError threshold.

_PIL_GLOBALS_LOCK = threading.Lock()


class ImageReadError(ValueError):
    """An image file could not be read; `path` and `reason` say which and why."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"Cannot read image {self.path}: {self.reason}")

    def __reduce__(self):  # picklable across worker processes
        return (ImageReadError, (self.path, self.reason))


@contextlib.contextmanager
def _strict_pil(max_pixels):
    """Forces truncated-file detection and lifts PIL's bomb limit when we check size ourselves.

    PIL's switches are process globals; they are only touched (under a lock) when they differ
    from what we need, so the common path takes no lock.
    """
    pil_limit = Image.MAX_IMAGE_PIXELS
    need_lift = pil_limit is not None and (max_pixels is None or max_pixels > 2 * pil_limit)
    need_strict = ImageFile.LOAD_TRUNCATED_IMAGES
    if not (need_lift or need_strict):
        yield
        return
    with _PIL_GLOBALS_LOCK:
        old_trunc, old_max = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        if need_lift:
            Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = old_trunc, old_max


def pil_to_rgb(im):
    """A loaded PIL image of any mode -> (H, W, 3) uint8 RGB array (rules in the module doc)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        if mode == "I" and a.size and a.max() <= 255:
            g = np.clip(a, 0, 255).astype(np.uint8)
        else:
            g = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def load_image_rgb(path, max_pixels=DEFAULT_MAX_PIXELS):
    """Reads an image file as RGB.

    Args:
      path: file path.
      max_pixels: refuse images with more pixels than this (None: no limit).
    Returns:
      (H, W, 3) uint8 array, no EXIF rotation applied.
    Raises:
      ImageReadError (a ValueError) naming the file for a missing, empty, truncated,
      oversized or non-image file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageReadError(path, "file not found")
    if os.path.isdir(path):
        raise ImageReadError(path, "is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        with _strict_pil(max_pixels):
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageReadError(
                        path,
                        f"image has {w}x{h}={w * h} pixels, more than max_pixels={max_pixels} "
                        "(raise the limit or pass max_pixels=None to allow it)",
                    )
                if w < 1 or h < 1:
                    raise ImageReadError(path, f"image has an empty size {w}x{h}")
                im.seek(0)
                im.load()
                return pil_to_rgb(im)
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"decompression bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated", "broken
        # data stream", ...) and some decoders as SyntaxError/ValueError/EOFError.
        raise ImageReadError(
            path, f"corrupt or truncated image data ({type(e).__name__}: {e})"
        ) from None


def resize_uint8(img, size=480):
    """(H, W, 3) uint8 -> (size, size, 3) uint8 with PIL Lanczos; aspect ratio NOT kept.

    `size` may be an int or a (height, width) pair.
    """
    img = check_rgb_uint8(img, "img")
    out_h, out_w = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    pil = Image.fromarray(img)
    if pil.size == (out_w, out_h):
        return img.copy()
    # np.array copies: PIL-backed arrays are read-only, and pydensecrf needs a writable buffer.
    return np.array(pil.resize((out_w, out_h), resample=Image.LANCZOS), dtype=np.uint8)


def normalize_imagenet(img_uint8):
    """(H, W, 3) uint8 -> float32 (x / 255 - mean) / std, as torchvision ToTensor + Normalize."""
    x = np.asarray(img_uint8).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return (x - mean) / std


def resize_for_dino(img, size=480, return_uint8=False):
    """(H, W, 3) uint8 -> (size, size, 3) float32 ImageNet-normalised DINO input (stage 1, step 1).

    With `return_uint8=True` also returns the resized uint8 image that the CRF uses.
    """
    small = resize_uint8(img, size)
    x = normalize_imagenet(small)
    return (x, small) if return_uint8 else x


def check_rgb_uint8(img, name):
    """`img` as a C-contiguous (H, W, 3) uint8 array, or a ValueError naming `name`."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{name} must be a (H, W, 3) uint8 array, got {img.dtype} {img.shape}")
    return np.ascontiguousarray(img)


def list_images(folder, coco_json=None):
    """Lists the images to process as [(image_id, file_name)], file_name relative to `folder`.

    - With `coco_json`: its 'images' entries (id, file_name), in file order.
    - Otherwise the image files directly in `folder` (extensions IMAGE_EXTENSIONS, hidden
      files skipped) sorted by name; if every stem is a decimal number and the numbers are
      unique, the numbers are the ids (COCO's `000000123456.jpg` -> 123456), else ids are
      1..N in sorted-name order.
    Raises FileNotFoundError when `folder` does not exist.
    """
    folder = os.fspath(folder) if folder is not None else None
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Image folder not found: {folder!r}. Set --config.images=DIR to a folder of images."
        )
    if coco_json:
        from hassod_jax.data.coco import load_coco_json

        data = load_coco_json(coco_json)
        out = []
        for i, img in enumerate(data["images"]):
            if "file_name" not in img:
                from hassod_jax.utils import InputError

                raise InputError(f"COCO JSON file {coco_json}: images[{i}] has no 'file_name'")
            out.append((img["id"], img["file_name"]))
        return out
    names = sorted(
        n
        for n in os.listdir(folder)
        if not n.startswith(".")
        and n.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, n))
    )
    stems = [os.path.splitext(n)[0] for n in names]
    if stems and all(s.isdigit() and s.isascii() for s in stems):
        ids = [int(s) for s in stems]
        if len(set(ids)) == len(ids):
            return list(zip(ids, names))
    return [(i + 1, n) for i, n in enumerate(names)]
