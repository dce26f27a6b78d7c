"""TFDS-layout ArrayRecord source read without TensorFlow: proto parsing and round trips."""

import os
import pickle

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from hassod_jax.data import loader, tfds_source
from hassod_jax.data.synthetic import write_synthetic_dataset


def example_class(packed=True, tag="a"):
    """tf.train.Example built with the protobuf library from its .proto field numbers."""
    F = descriptor_pb2.FieldDescriptorProto
    pkg = f"tfexample_{tag}"
    fdp = descriptor_pb2.FileDescriptorProto(name=f"{pkg}.proto", package=pkg, syntax="proto3")

    def scalar_list(name, ftype):
        m = fdp.message_type.add(name=name)
        f = m.field.add(name="value", number=1, type=ftype, label=F.LABEL_REPEATED)
        if ftype != F.TYPE_BYTES:
            f.options.packed = packed

    scalar_list("BytesList", F.TYPE_BYTES)
    scalar_list("FloatList", F.TYPE_FLOAT)
    scalar_list("Int64List", F.TYPE_INT64)
    feat = fdp.message_type.add(name="Feature")
    feat.oneof_decl.add(name="kind")
    for i, n in enumerate(["bytes_list", "float_list", "int64_list"]):
        tname = {"bytes_list": "BytesList", "float_list": "FloatList", "int64_list": "Int64List"}
        feat.field.add(
            name=n,
            number=i + 1,
            type=F.TYPE_MESSAGE,
            label=F.LABEL_OPTIONAL,
            type_name=f".{pkg}.{tname[n]}",
            oneof_index=0,
        )
    feats = fdp.message_type.add(name="Features")
    entry = feats.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(
        name="value",
        number=2,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        type_name=f".{pkg}.Feature",
    )
    feats.field.add(
        name="feature",
        number=1,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=f".{pkg}.Features.FeatureEntry",
    )
    ex = fdp.message_type.add(name="Example")
    ex.field.add(
        name="features",
        number=1,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        type_name=f".{pkg}.Features",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pkg}.Example"))


@pytest.mark.parametrize("packed", [True, False])
def test_parse_example_matches_protobuf(packed):
    Example = example_class(packed, tag="p" if packed else "u")
    msg = Example()
    msg.features.feature["image"].bytes_list.value.extend([b"\x00\xffabc", b""])
    msg.features.feature["ints"].int64_list.value.extend([0, 1, -2, 2**40, -(2**63), 2**63 - 1])
    msg.features.feature["floats"].float_list.value.extend([0.5, -1e-30, 3.25e20])
    msg.features.feature["empty"].int64_list.value.extend([])
    got = tfds_source.parse_example(msg.SerializeToString())
    assert got["image"] == [b"\x00\xffabc", b""]
    np.testing.assert_array_equal(got["ints"], [0, 1, -2, 2**40, -(2**63), 2**63 - 1])
    np.testing.assert_array_equal(got["floats"], np.array([0.5, -1e-30, 3.25e20], np.float32))
    assert len(got["empty"]) == 0
    # Our encoder, read back by protobuf.
    data = tfds_source.encode_example(
        {"b": [b"xy", "z"], "i": np.array([5, -7]), "f": np.array([1.5, 2.0], np.float32)}
    )
    back = Example.FromString(data)
    assert list(back.features.feature["b"].bytes_list.value) == [b"xy", b"z"]
    assert list(back.features.feature["i"].int64_list.value) == [5, -7]
    assert list(back.features.feature["f"].float_list.value) == [1.5, 2.0]
    with pytest.raises(tfds_source.ExampleParseError):
        tfds_source.parse_example(data[:-3])


@pytest.fixture(scope="module")
def coco_and_tfds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfds")
    image_dir, json_path = write_synthetic_dataset(str(folder / "coco"), 5, seed=3, size=(96, 128))
    paths = tfds_source.write_tfds_detection(
        str(folder / "tfds"), json_path, image_dir, num_shards=2
    )
    return image_dir, json_path, str(folder / "tfds"), paths


def test_round_trip_matches_coco_records(coco_and_tfds):
    image_dir, json_path, tfds_dir, paths = coco_and_tfds
    assert [os.path.basename(p) for p in paths] == [
        "hassod_detection-train.array_record-00000-of-00002",
        "hassod_detection-train.array_record-00001-of-00002",
    ]
    coco = loader.CocoRecords(json_path, image_dir)
    rec = tfds_source.ArrayRecordRecords(tfds_dir)
    assert len(rec) == len(coco) == 5
    np.testing.assert_array_equal(rec.sizes, coco.sizes)
    np.testing.assert_array_equal(rec.image_ids, coco.image_ids)
    for i in range(len(coco)):
        a, b = rec.load(i), coco.load(i)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["masks"], b["masks"])
        np.testing.assert_array_equal(a["levels"], b["levels"])
        # bbox goes through TFDS's normalised float32 [ymin, xmin, ymax, xmax].
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
    # The same training batches from either source (copy-paste, buckets and all).
    cfg = loader.LoaderConfig(
        global_batch_size=2,
        short_edges=(64, 96),
        max_size=200,
        buckets=((96, 160), (160, 96)),
        max_instances=30,
    )
    sa = loader.DetectionBatchSource(rec, cfg, 3, 0, 1)
    sb = loader.DetectionBatchSource(coco, cfg, 3, 0, 1)
    for k in range(3):
        ba, bb = sa[k], sb[k]
        for key in ("images", "masks", "levels", "valid", "image_sizes", "image_ids"):
            np.testing.assert_array_equal(ba[key], bb[key])
    # Picklable for grain's worker processes; reader reopened lazily.
    rec2 = pickle.loads(pickle.dumps(rec))
    np.testing.assert_array_equal(rec2.load(1)["masks"], rec.load(1)["masks"])


def test_scan_without_sizes_sidecar_and_errors(coco_and_tfds, tmp_path):
    _, _, tfds_dir, paths = coco_and_tfds
    with_side = tfds_source.ArrayRecordRecords(tfds_dir)
    # Copy only the shards: the sizes are then read by scanning the records.
    for p in paths:
        with open(p, "rb") as src, open(tmp_path / os.path.basename(p), "wb") as dst:
            dst.write(src.read())
    scanned = tfds_source.ArrayRecordRecords(str(tmp_path))
    np.testing.assert_array_equal(scanned.sizes, with_side.sizes)
    np.testing.assert_array_equal(scanned.image_ids, with_side.image_ids)
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards for split 'val'"):
        tfds_source.ArrayRecordRecords(tfds_dir, split="val")
