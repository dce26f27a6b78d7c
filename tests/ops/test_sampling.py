"""Matcher against a NumPy transcription of detectron2's Matcher; the fixed-size sampler's
counts, ordering and uniformity against detectron2's subsample_labels rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hassod_jax.ops import match, sample_fg_bg


def _d2_matcher(iou, thresholds, labels, allow_low_quality):
    """detectron2 modeling/matcher.py Matcher.__call__, in NumPy (iou (G, N), G >= 0)."""
    n = iou.shape[1]
    if iou.size == 0:
        return np.zeros(n, np.int64), np.full(n, labels[0], np.int8)
    thr = [-np.inf] + list(thresholds) + [np.inf]
    matched_vals = iou.max(axis=0)
    matches = iou.argmax(axis=0)
    match_labels = np.ones(n, np.int8)
    for lab, low, high in zip(labels, thr[:-1], thr[1:]):
        match_labels[(matched_vals >= low) & (matched_vals < high)] = lab
    if allow_low_quality:
        highest = iou.max(axis=1)
        _, pred_inds = np.nonzero(iou == highest[:, None])
        match_labels[pred_inds] = 1
    return matches, match_labels


CONFIGS = [((0.3, 0.7), (0, -1, 1), True), ((0.5,), (0, 1), False), ((0.6,), (0, 1), False)]


@pytest.mark.parametrize("thresholds,labels,low_quality", CONFIGS)
def test_match_matches_detectron2(thresholds, labels, low_quality):
    rng = np.random.default_rng(len(thresholds) + int(low_quality))
    fn = jax.jit(lambda q, v: match(q, v, thresholds, labels, low_quality))
    for g_valid in (1, 3, 8):
        # Quantised IoUs create ties, as exact IoUs of anchors do.
        iou = np.round(rng.uniform(0, 1, (g_valid, 200)) ** 3, 2).astype(np.float32)
        iou[:, rng.uniform(size=200) < 0.3] = 0.0
        ref_idx, ref_lab = _d2_matcher(iou, thresholds, labels, low_quality)
        # Pad to G = 10 with garbage rows that must be ignored.
        pad = np.concatenate([iou, np.full((10 - g_valid, 200), 0.99, np.float32)])
        valid = np.arange(10) < g_valid
        idx, lab = fn(pad, valid)
        assert idx.dtype == jnp.int32 and lab.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(lab), ref_lab)
        np.testing.assert_array_equal(np.asarray(idx), ref_idx)


def test_match_without_gt_is_all_background():
    iou = np.full((4, 30), 0.9, np.float32)
    idx, lab = match(iou, np.zeros(4, bool), (0.3, 0.7), (0, -1, 1), True)
    np.testing.assert_array_equal(np.asarray(lab), 0)
    np.testing.assert_array_equal(np.asarray(idx), 0)
    ref_idx, ref_lab = _d2_matcher(np.zeros((0, 30), np.float32), (0.3, 0.7), (0, -1, 1), True)
    np.testing.assert_array_equal(np.asarray(lab), ref_lab)
    with pytest.raises(ValueError, match="sampling.py"):
        match(iou, np.ones(4, bool), (0.3, 0.7), (0, 1), True)


def _check_sample(labels, idx, is_fg, valid, num_samples, fraction):
    labels, idx, is_fg, valid = map(np.asarray, (labels, idx, is_fg, valid))
    n_pos_avail, n_neg_avail = np.sum(labels == 1), np.sum(labels == 0)
    num_pos = min(n_pos_avail, int(num_samples * fraction))  # detectron2's counts
    num_neg = min(n_neg_avail, num_samples - num_pos)
    assert is_fg.sum() == num_pos and (valid & ~is_fg).sum() == num_neg
    # fg slots first, then bg, then padding
    np.testing.assert_array_equal(is_fg, np.arange(num_samples) < num_pos)
    np.testing.assert_array_equal(valid, np.arange(num_samples) < num_pos + num_neg)
    assert np.all(labels[idx[is_fg]] == 1)
    assert np.all(labels[idx[valid & ~is_fg]] == 0)
    assert len(set(idx[valid].tolist())) == num_pos + num_neg  # without replacement
    assert np.all(idx[~valid] == 0)


@pytest.mark.parametrize(
    "n_pos,n_neg,n_ign,num_samples,fraction",
    [(5, 300, 50, 64, 0.25), (100, 300, 0, 64, 0.25), (3, 10, 7, 64, 0.5), (0, 0, 9, 16, 0.5)],
)
def test_sampler_counts(n_pos, n_neg, n_ign, num_samples, fraction):
    rng = np.random.default_rng(n_pos + n_neg)
    labels = rng.permutation(np.array([1] * n_pos + [0] * n_neg + [-1] * n_ign, np.int32))
    fn = jax.jit(lambda k, lab: sample_fg_bg(k, lab, num_samples, fraction))
    for seed in range(3):
        out = fn(jax.random.PRNGKey(seed), labels)
        assert out[0].shape == (num_samples,) and out[0].dtype == jnp.int32
        _check_sample(labels, *out, num_samples, fraction)


def test_sampler_is_uniform_over_candidates():
    """Every positive is drawn with probability num_pos / n_pos (chi-square on 2000 draws)."""
    labels = np.array([1] * 20 + [0] * 40 + [-1] * 10, np.int32)
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    idx, is_fg, valid = jax.jit(jax.vmap(lambda k: sample_fg_bg(k, labels, 16, 0.25)))(keys)
    idx, is_fg, valid = map(np.asarray, (idx, is_fg, valid))
    fg_counts = np.bincount(idx[is_fg], minlength=70)[:20]
    bg_counts = np.bincount(idx[valid & ~is_fg], minlength=70)[20:60]
    for counts, expected in ((fg_counts, 2000 * 4 / 20), (bg_counts, 2000 * 12 / 40)):
        chi2 = np.sum((counts - expected) ** 2 / expected)
        # dof 19 / 39: the 99.99 % quantiles are about 50 / 80.
        assert chi2 < 2.5 * len(counts), chi2
    # Different keys give different draws; the same key the same draw.
    a = sample_fg_bg(jax.random.PRNGKey(1), labels, 16, 0.25)[0]
    b = sample_fg_bg(jax.random.PRNGKey(1), labels, 16, 0.25)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(idx[0], idx[1])
