"""The TFDS source on a split prepared by TFDS itself (no TensorFlow): a tiny builder.

`tensorflow_datasets` prepares ArrayRecord data without TensorFlow when the images are given
as encoded files (only encoding pixel arrays needs TensorFlow). The builder here turns the
generated COCO scenes into TFDS's detection layout; our reader must load the same training
records from its shards as `loader.CocoRecords` loads from the COCO folder.
"""

import io
import json
import os

import numpy as np
import pytest

from hassod_jax.data import loader, tfds_source
from hassod_jax.data.coco import segmentation_to_rle
from hassod_jax.data.synthetic import write_synthetic_dataset

tfds = pytest.importorskip("tensorflow_datasets")


def _builder(json_path, image_dir):
    with open(json_path) as f:
        data = json.load(f)

    class HassodTinyDetection(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                        "image/id": np.int64,
                        "objects": tfds.features.Sequence(
                            {
                                "segmentation": np.object_,  # compressed RLE counts
                                "hier_level": np.int64,
                                "is_crowd": np.int64,
                                "bbox": tfds.features.BBoxFeature(),
                            }
                        ),
                    }
                )
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for img in data["images"]:
                h, w = img["height"], img["width"]
                anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
                objects = {"segmentation": [], "hier_level": [], "is_crowd": [], "bbox": []}
                for a in anns:
                    counts = segmentation_to_rle(a["segmentation"], h, w)["counts"]
                    objects["segmentation"].append(counts)
                    objects["hier_level"].append(int(a.get("hier_level", 0)))
                    objects["is_crowd"].append(int(a.get("iscrowd", 0)))
                    x, y, bw, bh = a["bbox"]
                    objects["bbox"].append(
                        tfds.features.BBox(
                            ymin=y / h, xmin=x / w, ymax=min((y + bh) / h, 1.0),
                            xmax=min((x + bw) / w, 1.0),
                        )
                    )  # fmt: skip
                with open(os.path.join(image_dir, img["file_name"]), "rb") as f:
                    png = io.BytesIO(f.read())
                yield img["id"], {"image": png, "image/id": img["id"], "objects": objects}

    return HassodTinyDetection


def test_split_prepared_by_tfds_matches_coco_records(tmp_path):
    image_dir, json_path = write_synthetic_dataset(
        str(tmp_path / "coco"), 4, seed=5, size=(80, 112), image_format="png"
    )
    builder = _builder(json_path, image_dir)(
        data_dir=str(tmp_path / "tfds"), file_format="array_record"
    )
    builder.download_and_prepare()
    shards = tfds_source.find_shards(builder.data_dir)
    assert shards and all(".array_record-" in os.path.basename(p) for p in shards)

    rec = tfds_source.ArrayRecordRecords(builder.data_dir)  # no sizes sidecar: a scan
    coco = loader.CocoRecords(json_path, image_dir)
    assert len(rec) == len(coco) == 4
    # TFDS stores the examples in its own (hashed) order: match them by image id.
    coco_index = {int(i): k for k, i in enumerate(coco.image_ids)}
    assert sorted(coco_index) == sorted(int(i) for i in rec.image_ids)
    for i, image_id in enumerate(rec.image_ids):
        j = coco_index[int(image_id)]
        np.testing.assert_array_equal(rec.sizes[i], coco.sizes[j])
        a, b = rec.load(i), coco.load(j)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["masks"], b["masks"])
        np.testing.assert_array_equal(a["levels"], b["levels"])
        # TFDS keeps boxes as normalised float32 [ymin, xmin, ymax, xmax].
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
