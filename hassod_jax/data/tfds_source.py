"""Training records from ArrayRecord files in the TFDS layout, read WITHOUT TensorFlow.

What this is: `tensorflow_datasets` writes a prepared split as ArrayRecord shards
`{name}-{split}.array_record-NNNNN-of-MMMMM` whose records are serialized `tf.train.Example`
protos, nested feature names flattened with '/'. This module reads such shards with the
`array_record` package (installed with grain) and decodes `tf.train.Example` with a small
protobuf wire-format parser written here, so neither TensorFlow nor TFDS is imported. Tested on
shards written by `write_tfds_detection` below (protos checked against the `protobuf`
library) and on a split prepared by TFDS itself from a tiny builder
(tests/data/test_tfds_builder.py; TFDS prepares without TensorFlow when images are given as
encoded files).

Feature layout of a detection builder (one record = one image; names as TFDS flattens a
`FeaturesDict({'image': Image(), 'image/id': int64, 'objects': Sequence({...})})`):
  image                  bytes: the encoded image file (PNG/JPEG), as tfds.features.Image
  image/id               int64
  image/height, image/width  int64, optional (read from the image header when absent)
  objects/segmentation   bytes list: COCO compressed-RLE `counts` of each instance, at the
                         image size
  objects/hier_level     int64 list, optional (-> 0)
  objects/is_crowd       int64 list, optional (-> 0; crowd instances are ignored)
  objects/bbox           float list of n * 4, optional: tfds.features.BBoxFeature convention,
                         normalised [ymin, xmin, ymax, xmax]; without it boxes come from masks

Image sizes are needed before reading any pixel (for the batch plan), and a TFDS split does
not store them separately: `ArrayRecordRecords` reads them from the `sizes` sidecar JSON that
`write_tfds_detection` writes (`{name}-{split}.sizes.json`), or else scans every record once.
"""

import glob
import io
import json
import os

import numpy as np

# ----------------------------------------------------------------------------------------------
# tf.train.Example wire format (tensorflow/core/example/{example,feature}.proto):
#   Example  { Features features = 1; }
#   Features { map<string, Feature> feature = 1; }   map entry: key = 1, value = 2
#   Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
#                           Int64List int64_list = 3; } }
#   BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1 [packed]; }
#   Int64List { repeated int64 value = 1 [packed]; }


class ExampleParseError(ValueError):
    """A record is not a valid serialized tf.train.Example."""


def _varint(buf, pos):
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ExampleParseError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ExampleParseError("varint longer than 10 bytes")


def _fields(buf):
    """Yields (field_number, wire_type, value) of a message; LEN values as memoryview."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
        elif wt == 1:
            if pos + 8 > n:
                raise ExampleParseError("truncated 64-bit field")
            v, pos = buf[pos : pos + 8], pos + 8
        elif wt == 2:
            ln, pos = _varint(buf, pos)
            if pos + ln > n:
                raise ExampleParseError("length-delimited field runs past the end")
            v, pos = buf[pos : pos + ln], pos + ln
        elif wt == 5:
            if pos + 4 > n:
                raise ExampleParseError("truncated 32-bit field")
            v, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ExampleParseError(f"unsupported wire type {wt}")
        yield field, wt, v


def _signed64(v):
    return v - (1 << 64) if v >= (1 << 63) else v


def _parse_feature(buf):
    """Feature bytes -> ('bytes', [bytes]) | ('float', float32 array) | ('int64', int64 array)."""
    kind, values = None, None
    for field, wt, v in _fields(buf):
        if field == 1 and wt == 2:
            kind, values = "bytes", [bytes(x) for f, w, x in _fields(v) if f == 1 and w == 2]
        elif field == 2 and wt == 2:
            out = []
            for f, w, x in _fields(v):
                if f == 1 and w == 2:  # packed
                    if len(x) % 4:
                        raise ExampleParseError("packed float list length not a multiple of 4")
                    out.append(np.frombuffer(bytes(x), dtype="<f4"))
                elif f == 1 and w == 5:
                    out.append(np.frombuffer(bytes(x), dtype="<f4"))
            kind = "float"
            values = np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
        elif field == 3 and wt == 2:
            out = []
            for f, w, x in _fields(v):
                if f == 1 and w == 2:  # packed varints
                    p, xb = 0, bytes(x)
                    while p < len(xb):
                        val, p = _varint(xb, p)
                        out.append(_signed64(val))
                elif f == 1 and w == 0:
                    out.append(_signed64(x))
            kind, values = "int64", np.array(out, dtype=np.int64)
    return kind, values


def parse_example(data):
    """Serialized tf.train.Example -> {name: list[bytes] | float32 array | int64 array}.

    A feature with no kind set (an empty Feature) maps to None.
    """
    buf = memoryview(bytes(data))
    out = {}
    for field, wt, v in _fields(buf):
        if field != 1 or wt != 2:
            continue
        for f2, w2, entry in _fields(v):
            if f2 != 1 or w2 != 2:
                continue
            key, value = None, None
            for f3, w3, x in _fields(entry):
                if f3 == 1 and w3 == 2:
                    key = bytes(x).decode("utf-8")
                elif f3 == 2 and w3 == 2:
                    value = _parse_feature(x)[1]
            if key is None:
                raise ExampleParseError("feature map entry without a key")
            out[key] = value
    return out


def _enc_varint(v):
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _enc_len(field, payload):
    return _enc_varint((field << 3) | 2) + _enc_varint(len(payload)) + payload


def encode_example(features):
    """{name: bytes | str | list[bytes|str] | int/float sequence | ndarray} -> tf.train.Example.

    Integer arrays/lists become Int64List (packed), floating ones FloatList (packed), bytes
    and str BytesList. Keys are written in sorted order.
    """
    entries = b""
    for key in sorted(features):
        value = features[key]
        if isinstance(value, (bytes, str)):
            value = [value]
        if isinstance(value, (list, tuple)) and (not value or isinstance(value[0], (bytes, str))):
            items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value]
            inner = b"".join(_enc_len(1, x) for x in items)
            feat = _enc_len(1, inner)
        else:
            arr = np.asarray(value)
            if arr.dtype.kind in "iub":
                packed = b"".join(_enc_varint(int(x)) for x in arr.reshape(-1).tolist())
                feat = _enc_len(3, _enc_len(1, packed))
            elif arr.dtype.kind == "f":
                packed = arr.reshape(-1).astype("<f4").tobytes()
                feat = _enc_len(2, _enc_len(1, packed))
            else:
                raise ValueError(f"feature {key!r}: unsupported value type {arr.dtype}")
        entry = _enc_len(1, key.encode("utf-8")) + _enc_len(2, feat)
        entries += _enc_len(1, entry)
    return _enc_len(1, entries)


# ----------------------------------------------------------------------------------------------
# Files.


def find_shards(path, split="train"):
    """ArrayRecord shard paths for `split` in a TFDS data folder, or the file(s) given.

    `path` may be a folder (shards named `*-{split}.array_record-*`), a glob or a file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, f"*-{split}.array_record-*")))
        if not files:
            raise FileNotFoundError(
                f"no ArrayRecord shards for split {split!r} in {path} "
                f"(expected files named '<name>-{split}.array_record-NNNNN-of-"
                "MMMMM', as TFDS writes them)"
            )
        return files
    files = sorted(glob.glob(path))
    if not files:
        raise FileNotFoundError(f"ArrayRecord file(s) not found: {path}")
    return files


class ArrayRecordExamples:
    """Random access to the tf.train.Example records of ArrayRecord shards (no TensorFlow).

    `len(self)`; `self[i]` -> parsed feature dict (`parse_example`); `raw(i)` -> bytes.
    Picklable: the reader is opened lazily in each process.
    """

    def __init__(self, path, split="train"):
        self.files = find_shards(path, split)
        self.split = split
        self._source = None
        from array_record.python import array_record_module

        self._len = 0
        for f in self.files:
            r = array_record_module.ArrayRecordReader(f)
            self._len += r.num_records()
            r.close()

    def _src(self):
        if self._source is None:
            from array_record.python import array_record_data_source

            self._source = array_record_data_source.ArrayRecordDataSource(self.files)
        return self._source

    def __len__(self):
        return self._len

    def raw(self, i):
        return self._src()[int(i)]

    def __getitem__(self, i):
        try:
            return parse_example(self.raw(i))
        except ExampleParseError as e:
            raise ExampleParseError(f"record {i} of {self.files}: {e}") from None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state


def _decode_image(data, where):
    from PIL import Image

    from hassod_jax.data.images import ImageReadError, pil_to_rgb

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return pil_to_rgb(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(where, f"undecodable image bytes ({e})") from None


def _image_size(data, where):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{where}: undecodable image bytes ({e})") from None
    return h, w


def sizes_path(files):
    """Sidecar path for the image sizes of a split: `{name}-{split}.sizes.json` by the shards."""
    first = files[0]
    base = first.split(".array_record-")[0]
    return base + ".sizes.json"


class ArrayRecordRecords:
    """Training records (interface of `loader.CocoRecords`) over a TFDS ArrayRecord split.

    Args:
      path: TFDS data folder, shard glob or file.
      split: split name in the shard file names.
      filter_empty: skip records without a non-crowd instance (needs the sidecar's
        'num_instances', else a scan).
    Attributes: sizes (N, 2) int64 (height, width), image_ids (N,) int64, `load(i)`.
    """

    def __init__(self, path, split="train", filter_empty=True):
        self.examples = ArrayRecordExamples(path, split)
        meta = self._read_or_scan_meta()
        keep = np.ones(len(self.examples), dtype=bool)
        if filter_empty:
            keep = np.asarray(meta["num_instances"]) > 0
        self.index = np.nonzero(keep)[0]
        if len(self.index) == 0:
            raise ValueError(f"{self.examples.files}: no record with a non-crowd instance")
        self.sizes = np.asarray(meta["sizes"], dtype=np.int64).reshape(-1, 2)[self.index]
        self.image_ids = np.asarray(meta["image_ids"], dtype=np.int64)[self.index]

    def _read_or_scan_meta(self):
        side = sizes_path(self.examples.files)
        if os.path.exists(side):
            with open(side) as f:
                meta = json.load(f)
            if len(meta.get("sizes", [])) != len(self.examples):
                raise ValueError(
                    f"{side} lists {len(meta.get('sizes', []))} sizes but the shards "
                    f"hold {len(self.examples)} records; delete it to rescan"
                )
            return meta
        meta = {"sizes": [], "image_ids": [], "num_instances": []}
        for i in range(len(self.examples)):
            ex = self.examples[i]
            h, w = self._size_of(ex, i)
            meta["sizes"].append([h, w])
            meta["image_ids"].append(int(_first(ex.get("image/id"), i)))
            crowd = ex.get("objects/is_crowd")
            segs = ex.get("objects/segmentation") or []
            n = len(segs) if crowd is None or len(crowd) == 0 else int((crowd == 0).sum())
            meta["num_instances"].append(n)
        return meta

    def _size_of(self, ex, i):
        hh, ww = ex.get("image/height"), ex.get("image/width")
        if hh is not None and ww is not None and len(hh) and len(ww):
            return int(hh[0]), int(ww[0])
        img = ex.get("image")
        if not img:
            raise ValueError(f"record {i} of {self.examples.files} has no 'image' feature")
        return _image_size(img[0], f"record {i} of {self.examples.files}")

    def __len__(self):
        return len(self.index)

    def load(self, i):
        """Example dict (see `augment`) of training record i (crowd instances dropped)."""
        from hassod_jax.data.augment import masks_to_boxes
        from hassod_jax.data.coco import _mask_utils

        rec = int(self.index[i])
        where = f"record {rec} of {self.examples.files}"
        ex = self.examples[rec]
        if not ex.get("image"):
            raise ValueError(f"{where} has no 'image' feature")
        image = _decode_image(ex["image"][0], where)
        h, w = (int(v) for v in self.sizes[i])
        if image.shape[:2] != (h, w):
            raise ValueError(
                f"{where}: image is {image.shape[0]}x{image.shape[1]}, expected {h}x{w}"
            )
        segs = ex.get("objects/segmentation") or []
        n = len(segs)
        levels = _opt(ex.get("objects/hier_level"), n, where, "objects/hier_level")
        crowd = _opt(ex.get("objects/is_crowd"), n, where, "objects/is_crowd")
        mask_utils = _mask_utils()
        masks = np.zeros((n, h, w), dtype=bool)
        for j, counts in enumerate(segs):
            masks[j] = mask_utils.decode({"size": [h, w], "counts": counts}).astype(bool)
        bbox = ex.get("objects/bbox")
        if bbox is not None and len(bbox):
            if len(bbox) != 4 * n:
                raise ValueError(f"{where}: objects/bbox has {len(bbox)} values for {n} objects")
            b = np.asarray(bbox, dtype=np.float32).reshape(n, 4)
            boxes = np.stack([b[:, 1] * w, b[:, 0] * h, b[:, 3] * w, b[:, 2] * h], axis=1)
        else:
            boxes = masks_to_boxes(masks)
        keep = crowd == 0
        if np.any((levels < 0) | (levels > 2)):
            raise ValueError(f"{where}: objects/hier_level must be 0, 1 or 2, got {levels}")
        return {
            "image": image,
            "masks": masks[keep],
            "boxes": boxes[keep].astype(np.float32),
            "levels": levels[keep].astype(np.int32),
        }


def _first(v, default):
    if v is None or len(v) == 0:
        return default
    return v[0]


def _opt(v, n, where, name):
    if v is None or len(v) == 0:
        return np.zeros(n, dtype=np.int64)
    if len(v) != n:
        raise ValueError(f"{where}: {name} has {len(v)} values for {n} objects")
    return np.asarray(v, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Writer (tests, and converting a COCO folder without TFDS).


def write_tfds_detection(
    out_dir,
    coco_json,
    image_dir,
    name="hassod_detection",
    split="train",
    num_shards=1,
    write_sizes=True,
):
    """Writes a COCO-format dataset as TFDS-layout ArrayRecord shards (layout in module doc).

    Images are stored as their original file bytes; segmentations as compressed RLE counts.
    Returns the list of shard paths. With `write_sizes`, also the sizes sidecar.
    """
    from array_record.python import array_record_module

    from hassod_jax.data.coco import load_coco_json, segmentation_to_rle

    data = load_coco_json(coco_json)
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    os.makedirs(out_dir, exist_ok=True)
    images = data["images"]
    paths = [
        os.path.join(out_dir, f"{name}-{split}.array_record-{s:05d}-of-{num_shards:05d}")
        for s in range(num_shards)
    ]
    per = -(-len(images) // num_shards) if images else 0
    meta = {"sizes": [], "image_ids": [], "num_instances": []}
    for s, path in enumerate(paths):
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for img in images[s * per : (s + 1) * per]:
            with open(os.path.join(image_dir, img["file_name"]), "rb") as f:
                raw = f.read()
            h, w = _image_size(raw, img["file_name"])
            anns = by_image.get(img["id"], [])
            segs, levels, crowd, boxes = [], [], [], []
            for a in anns:
                rle = segmentation_to_rle(a["segmentation"], h, w)
                segs.append(rle["counts"])
                levels.append(int(a.get("hier_level", 0)))
                crowd.append(int(a.get("iscrowd", 0)))
                x, y, bw, bh = a["bbox"]
                boxes.append([y / h, x / w, (y + bh) / h, (x + bw) / w])
            feats = {
                "image": raw,
                "image/id": [int(img["id"])],
                "image/height": [h],
                "image/width": [w],
                "objects/segmentation": segs,
                "objects/hier_level": np.asarray(levels, np.int64),
                "objects/is_crowd": np.asarray(crowd, np.int64),
                "objects/bbox": np.asarray(boxes, np.float32).reshape(-1),
            }
            writer.write(encode_example(feats))
            meta["sizes"].append([h, w])
            meta["image_ids"].append(int(img["id"]))
            meta["num_instances"].append(int(sum(1 for c in crowd if c == 0)))
        writer.close()
    if write_sizes:
        from hassod_jax.utils import atomic_write_json

        atomic_write_json(sizes_path(paths), meta)
    return paths
