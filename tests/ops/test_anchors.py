"""Anchors against a float64 NumPy transcription of detectron2's DefaultAnchorGenerator
and against torchvision's AnchorGenerator (which rounds its cell anchors)."""

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from hassod_jax.ops import generate_anchors


def _d2_reference(feature_shapes, strides, sizes, ratios, offset):
    """detectron2 generate_cell_anchors + _create_grid_offsets + _grid_anchors, float64."""
    out = []
    for (h, w), stride, lvl_sizes in zip(feature_shapes, strides, sizes):
        cells = []
        for size in lvl_sizes:
            area = size**2.0
            for ar in ratios:
                cw = math.sqrt(area / ar)
                ch = ar * cw
                cells.append([-cw / 2.0, -ch / 2.0, cw / 2.0, ch / 2.0])
        cells = np.array(cells)
        anchors = []
        for y in range(h):  # y outer, x inner: x varies fastest
            for x in range(w):
                sx, sy = offset * stride + x * stride, offset * stride + y * stride
                for c in cells:
                    anchors.append(c + [sx, sy, sx, sy])
        out.append(np.array(anchors).reshape(-1, 4))
    return out


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_anchors_match_detectron2_transcription(offset):
    shapes = [(5, 7), (3, 4), (2, 2), (1, 1), (1, 1)]
    strides = (4, 8, 16, 32, 64)
    sizes = ((32,), (64,), (128,), (256,), (512,))
    got = generate_anchors(shapes, strides, sizes, (0.5, 1.0, 2.0), offset)
    ref = _d2_reference(shapes, strides, sizes, (0.5, 1.0, 2.0), offset)
    for g, r, (h, w) in zip(got, ref, shapes):
        assert g.shape == (h * w * 3, 4) and g.dtype == np.float32
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-6, atol=1e-4)


def test_anchors_multiple_sizes_and_broadcast():
    shapes = [(3, 2), (2, 3)]
    got = generate_anchors(shapes, (8, 16), (16, 40), (0.25, 1.0, 3.0))
    ref = _d2_reference(shapes, (8, 16), [(16, 40)] * 2, (0.25, 1.0, 3.0), 0.0)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="anchors.py"):
        generate_anchors(shapes, (8,), ((16,), (32,)))


def test_anchors_agree_with_torchvision_up_to_its_rounding():
    """torchvision rounds cell anchors to integers; otherwise the convention (offset 0,
    (y, x, anchor) order, size-major then ratio) is the same, so they agree within 0.5 px."""
    shapes = [(8, 12), (4, 6), (2, 3)]
    strides = (4, 8, 16)
    sizes = ((32,), (64,), (128,))
    ratios = (0.5, 1.0, 2.0)
    gen = AnchorGenerator(sizes=sizes, aspect_ratios=(ratios,) * 3)
    images = ImageList(torch.zeros(1, 3, 32, 48), [(32, 48)])
    feats = [torch.zeros(1, 1, h, w) for h, w in shapes]
    ref = gen(images, feats)[0].numpy()
    got = np.concatenate([np.asarray(a) for a in generate_anchors(shapes, strides, sizes, ratios)])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=0.5)
    # The unrounded square anchors coincide exactly.
    square = np.isclose(got[:, 2] - got[:, 0], got[:, 3] - got[:, 1])
    np.testing.assert_array_equal(got[square], ref[square])
