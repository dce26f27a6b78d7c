"""Tiled NMS against torchvision.ops.nms / batched_nms: identical keep sets (no score ties)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from hassod_jax.ops import batched_nms, nms


def _boxes_scores(rng, k, scale=200.0):
    xy = rng.uniform(0, scale, (k, 2))
    wh = rng.uniform(1, 60, (k, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = (rng.permutation(k) + rng.uniform(0.1, 0.9, k)).astype(np.float32) / k  # no ties
    return boxes, scores


def _kept(idx, valid):
    idx, valid = np.asarray(idx), np.asarray(valid)
    # valid slots come first, then padding
    assert not np.any(valid[np.argmin(valid) :]) or valid.all()
    return idx[valid]


@pytest.mark.parametrize(
    "k,tile,max_output", [(1, 512, 1), (9, 4, 9), (300, 64, 5), (1200, 128, 1200)]
)
def test_nms_matches_torchvision(k, tile, max_output):
    rng = np.random.default_rng(k)
    boxes, scores = _boxes_scores(rng, k)
    # The threshold is traced: one compilation serves all three.
    fn = jax.jit(lambda b, s, t: nms(b, s, t, max_output, tile_size=tile))
    for thr in (0.3, 0.5, 0.7):
        ref = torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), thr).numpy()
        idx, valid = fn(boxes, scores, thr)
        assert idx.shape == (max_output,) and idx.dtype == jnp.int32
        np.testing.assert_array_equal(_kept(idx, valid), ref[:max_output])


def test_nms_valid_in_excludes_padding():
    rng = np.random.default_rng(3)
    boxes, scores = _boxes_scores(rng, 400)
    valid_in = rng.uniform(size=400) < 0.7
    # Padding gets high scores and boxes overlapping everything: must be ignored.
    boxes_p = np.where(valid_in[:, None], boxes, np.array([0, 0, 300, 300], np.float32))
    scores_p = np.where(valid_in, scores, 10.0).astype(np.float32)
    keep_ids = np.nonzero(valid_in)[0]
    ref = torchvision.ops.nms(torch.tensor(boxes[keep_ids]), torch.tensor(scores[keep_ids]), 0.5)
    idx, valid = jax.jit(lambda b, s, v: nms(b, s, 0.5, 400, valid_in=v, tile_size=64))(
        boxes_p, scores_p, valid_in
    )
    np.testing.assert_array_equal(_kept(idx, valid), keep_ids[ref.numpy()])
    assert np.all(np.asarray(idx)[~np.asarray(valid)] == 0)


@pytest.mark.parametrize("k,classes,max_output", [(50, 3, 17), (800, 7, 800)])
def test_batched_nms_matches_torchvision(k, classes, max_output):
    rng = np.random.default_rng(k + classes)
    boxes, scores = _boxes_scores(rng, k)
    idxs = rng.integers(0, classes, k)
    fn = jax.jit(lambda b, s, c, t: batched_nms(b, s, c, t, max_output, tile_size=128))
    for thr in (0.3, 0.7):
        ref = torchvision.ops.batched_nms(
            torch.tensor(boxes), torch.tensor(scores), torch.tensor(idxs), thr
        ).numpy()
        idx, valid = fn(boxes, scores, idxs, thr)
        np.testing.assert_array_equal(_kept(idx, valid), ref[:max_output])


def test_nms_large_k_dense_overlap():
    """Many heavily overlapping boxes (RPN-like) across several tiles, with early stop."""
    rng = np.random.default_rng(7)
    k = 6000
    centres = rng.uniform(0, 400, (30, 2))[rng.integers(0, 30, k)] + rng.normal(0, 6, (k, 2))
    wh = rng.uniform(20, 80, (k, 2))
    boxes = np.concatenate([centres - wh / 2, centres + wh / 2], 1).astype(np.float32)
    scores = rng.permutation(k).astype(np.float32) / k
    ref = torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), 0.65).numpy()
    idx, valid = jax.jit(lambda b, s: nms(b, s, 0.65, 1000))(boxes, scores)
    np.testing.assert_array_equal(_kept(idx, valid), ref[:1000])


def test_nms_bad_input():
    b = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="nms.py.*scores"):
        nms(b, np.zeros(3, np.float32), 0.5, 2)
    with pytest.raises(ValueError, match="max_output"):
        nms(b, np.zeros(4, np.float32), 0.5, 0)


def test_batched_nms_vmaps_over_images():
    rng = np.random.default_rng(11)
    boxes = np.stack([_boxes_scores(rng, 500)[0] for _ in range(2)])
    scores = np.stack([_boxes_scores(rng, 500)[1] for _ in range(2)])
    idxs = rng.integers(0, 5, (2, 500))
    fn = jax.jit(jax.vmap(lambda b, s, c: batched_nms(b, s, c, 0.5, 100)))
    idx, valid = fn(boxes, scores, idxs)
    for i in range(2):
        ref = torchvision.ops.batched_nms(
            torch.tensor(boxes[i]), torch.tensor(scores[i]), torch.tensor(idxs[i]), 0.5
        ).numpy()
        np.testing.assert_array_equal(_kept(idx[i], valid[i]), ref[:100])
