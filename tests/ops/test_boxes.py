"""Box area/IoU/clipping and the box coder against torchvision (an independent oracle)."""

import math

import jax
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder as TorchBoxCoder

from hassod_jax.ops import BoxCoder, box_area, box_iou, clip_boxes


def _random_boxes(rng, n, scale=100.0, min_size=0.5):
    xy = rng.uniform(-10, scale, (n, 2))
    wh = rng.uniform(min_size, scale / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.mark.parametrize("n,m", [(1, 1), (7, 13), (64, 5)])
def test_box_iou_and_area_match_torchvision(n, m):
    rng = np.random.default_rng(n * 100 + m)
    a, b = _random_boxes(rng, n), _random_boxes(rng, m)
    got = np.asarray(jax.jit(box_iou)(a, b))
    ref = torchvision.ops.box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    assert got.shape == (n, m)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(box_area(a)), torchvision.ops.box_area(torch.tensor(a)).numpy(), rtol=1e-6
    )


def test_box_iou_zero_union_is_zero():
    a = np.array([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 2.0, 2.0]], np.float32)
    got = np.asarray(box_iou(a, a))
    np.testing.assert_array_equal(got, [[0.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="boxes.py"):
        box_iou(a[:, :3], a)


def test_clip_boxes_matches_torchvision_with_traced_size():
    rng = np.random.default_rng(1)
    b = _random_boxes(rng, 50, scale=120.0)
    got = jax.jit(clip_boxes)(b, 77, 95)
    ref = torchvision.ops.clip_boxes_to_image(torch.tensor(b), (77, 95)).numpy()
    np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.parametrize(
    "weights", [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (1, 1, 1, 1)]
)
def test_box_coder_matches_torchvision(weights):
    """torchvision's BoxCoder has detectron2's Box2BoxTransform arithmetic (no +1 widths,
    centre x1 + 0.5 w, clamp of dw/dh at log(1000/16) before exp)."""
    rng = np.random.default_rng(2)
    props = _random_boxes(rng, 200, min_size=2.0)
    tgts = _random_boxes(rng, 200, min_size=2.0)
    coder = BoxCoder(weights=weights)
    ref_coder = TorchBoxCoder(weights, bbox_xform_clip=math.log(1000.0 / 16))
    deltas = np.asarray(jax.jit(coder.encode)(props, tgts))
    ref = ref_coder.encode_single(torch.tensor(tgts), torch.tensor(props)).numpy()
    np.testing.assert_allclose(deltas, ref, rtol=1e-5, atol=1e-5)
    # Decoding, including deltas large enough to hit the clamp.
    big = rng.normal(0, 1, (200, 4)).astype(np.float32) * np.array([1, 1, 30, 30], np.float32)
    for d in (deltas, big):
        got = np.asarray(jax.jit(coder.decode)(d, props))
        ref = ref_coder.decode_single(torch.tensor(d), torch.tensor(props)).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
    # Round trip and broadcasting over leading dims.
    back = coder.decode(deltas.reshape(10, 20, 4), props.reshape(10, 20, 4))
    np.testing.assert_allclose(np.asarray(back).reshape(-1, 4), tgts, rtol=1e-5, atol=1e-3)


def test_box_coder_is_hashable_static():
    coder = BoxCoder((10, 10, 5, 5))
    assert coder == BoxCoder()
    assert hash(coder) == hash(BoxCoder())
    with pytest.raises(ValueError, match="weights"):
        BoxCoder((1.0, 2.0))


def test_box_coder_degenerate_pairs_give_zero_deltas():
    """Padding (zero-size boxes) gives 0 deltas, not inf/NaN, so masked losses stay finite."""
    props = np.array([[0, 0, 10, 10], [0, 0, 0, 0], [5, 5, 9, 9]], np.float32)
    tgts = np.array([[1, 1, 12, 9], [0, 0, 4, 4], [0, 0, 0, 0]], np.float32)
    coder = BoxCoder()
    d = np.asarray(coder.encode(props, tgts))
    np.testing.assert_array_equal(d[1:], 0.0)
    ref = TorchBoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(
        torch.tensor(tgts[:1]), torch.tensor(props[:1])
    )
    np.testing.assert_allclose(d[:1], ref.numpy(), rtol=1e-6)
    grad = jax.grad(lambda p: jax.numpy.sum(coder.encode(p, tgts) * (d != 0)))(props)
    assert np.all(np.isfinite(np.asarray(grad)))
