"""The coverage tree (docs/recipe.md, Stage 1, step 4) against the float64 loops of
hac_reference.py."""


import jax
import numpy as np
import pytest

from hassod_jax.discovery.hierarchy import hierarchy_levels, hierarchy_levels_padded

from tests.discovery.hac_reference import reference_hierarchy


def _rect(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _random_rects(rng, n, h, w):
    out = []
    for _ in range(n):
        y0, y1 = np.sort(rng.integers(0, h + 1, 2))
        x0, x1 = np.sort(rng.integers(0, w + 1, 2))
        out.append(_rect(h, w, y0, x0, y1 + 1, x1 + 1))
    return np.stack(out)


def _nested(rng, h, w):
    """Wholes containing parts containing subparts, with jittered (partial) containment."""
    masks = []
    for _ in range(int(rng.integers(1, 4))):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        whole = _rect(h, w, y0, x0, y0 + h // 2, x0 + w // 2)
        masks.append(whole)
        ys, xs = np.nonzero(whole)
        for _ in range(int(rng.integers(1, 4))):
            part = whole & (rng.random((h, w)) < rng.uniform(0.3, 1.0))
            part |= rng.random((h, w)) < 0.01  # a few pixels outside the whole
            masks.append(part)
            sub = part & (rng.random((h, w)) < 0.5)
            masks.append(sub)
    masks.append(masks[0].copy())  # an exact duplicate: neither is the other's parent
    order = rng.permutation(len(masks))
    return np.stack(masks)[order]


def _check(masks, coverage):
    want_levels, want_parents = reference_hierarchy(masks, coverage)
    levels, parents = hierarchy_levels(masks, coverage)
    assert levels.dtype == np.int32 and parents.dtype == np.int32
    np.testing.assert_array_equal(parents, want_parents)
    np.testing.assert_array_equal(levels, want_levels)
    return levels


def test_random_and_nested_against_oracle():
    rng = np.random.default_rng(0)
    seen_levels = set()
    for _ in range(40):
        masks = _random_rects(rng, int(rng.integers(1, 25)), 16, 20)
        for cov in (0.9, 0.75):
            seen_levels |= set(_check(masks, cov).tolist())
        masks = _nested(rng, 24, 30)
        for cov in (0.9, 0.75):
            seen_levels |= set(_check(masks, cov).tolist())
    assert seen_levels == {0, 1, 2}


def test_exact_coverage_boundary_and_empty():
    h, w = 1, 20
    b = _rect(h, w, 0, 0, 1, 20)  # area 20
    a = _rect(h, w, 0, 0, 1, 10)  # area 10, cov(a in c) = 9/10 exactly below
    c = _rect(h, w, 0, 1, 1, 15)
    empty = np.zeros((h, w), bool)
    masks = np.stack([a, b, c, empty, empty])
    levels = _check(masks, 0.9)
    parents = hierarchy_levels(masks, 0.9)[1]
    assert parents[0] == 2 and parents[3] == -1  # cov exactly θ counts; empty masks are roots
    assert levels[0] == 2


def test_empty_set():
    levels, parents = hierarchy_levels(np.zeros((0, 5, 6), bool))
    assert levels.shape == (0,) and parents.shape == (0,)


def test_padded_matches_unpadded_under_jit():
    rng = np.random.default_rng(4)
    fn = jax.jit(hierarchy_levels_padded, static_argnums=2)
    for _ in range(5):
        masks = _nested(rng, 24, 30)
        n = masks.shape[0]
        padded = np.concatenate([masks, _random_rects(rng, 28 - n, 24, 30)])
        valid = np.arange(28) < n
        # Valid entries scattered among padding, in their original order (ties in area go to
        # the first index, so the order matters).
        slots = np.sort(rng.choice(28, n, replace=False))
        perm = np.concatenate([slots, np.setdiff1d(np.arange(28), slots)])
        perm = np.argsort(perm)  # perm[j] = original index of the mask placed at j
        for cov in (0.9, 0.75):
            levels, parents = fn(padded[perm], valid[perm], cov)
            want_l, want_p = reference_hierarchy(masks, cov)
            inv = np.argsort(perm)[:n]  # position of original mask k in the permuted set
            got_p = np.asarray(parents)[inv]
            np.testing.assert_array_equal(np.asarray(levels)[inv], want_l)
            np.testing.assert_array_equal(np.where(got_p >= 0, perm[got_p], -1), want_p)
            assert np.all(np.asarray(levels)[~valid[perm]] == -1)
            assert np.all(np.asarray(parents)[~valid[perm]] == -1)


def test_bad_input():
    with pytest.raises(ValueError, match="masks"):
        hierarchy_levels(np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="coverage"):
        hierarchy_levels(np.zeros((2, 4, 5), bool), coverage=1.5)


def test_run_collapsed_intersections_are_exact():
    from hassod_jax.discovery.hierarchy import _intersections_host

    rng = np.random.default_rng(8)
    for masks in (_nested(rng, 24, 30), rng.random((9, 17, 13)) < 0.5, _random_rects(rng, 7, 5, 4)):
        flat = masks.reshape(masks.shape[0], -1).astype(np.int64)
        np.testing.assert_array_equal(_intersections_host(masks), flat @ flat.T)


def _pooled_partitions(rng, sizes, h, w):
    """Masks pooled from a few Voronoi partitions, each mask shifted by up to 2 pixels (as a
    refinement moves boundaries): the kind of pool the discovery stage builds."""
    yy, xx = np.mgrid[0:h, 0:w]
    masks = []
    for k in sizes:
        seeds = rng.uniform(0, [h, w], size=(k, 2))
        lab = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, -1)
        for j in range(k):
            shift = tuple(int(s) for s in rng.integers(-2, 3, 2))
            masks.append(np.roll(lab == j, shift, axis=(0, 1)))
    return np.stack(masks)


def test_atom_intersections_many_masks_and_hash_collisions(monkeypatch):
    from hassod_jax.discovery import hierarchy

    rng = np.random.default_rng(12)
    # 71 masks: two 64-bit membership words and a partial byte; 27 x 35 pixels: a partial
    # 8-pixel word at the end.
    pool = _pooled_partitions(rng, [9, 22, 40], 27, 35)
    blobs = rng.random((70, 27, 35)) < rng.uniform(0.05, 0.95, (70, 1, 1))
    for masks in (pool, blobs, pool[:1], np.zeros((3, 1, 1), bool)):
        flat = masks.reshape(masks.shape[0], -1).astype(np.int64)
        want = flat @ flat.T
        np.testing.assert_array_equal(hierarchy._intersections_host(masks), want)
        # Every hash colliding forces the exact fallback.
        with monkeypatch.context() as patch:
            patch.setattr(hierarchy, "_atom_hash", lambda keys: np.zeros(len(keys), np.uint64))
            np.testing.assert_array_equal(hierarchy._intersections_host(masks), want)


def test_atom_hash_separates_keys_that_move_top_bits_between_words():
    """Membership keys differing only in which word holds bit 63 (mask 8 * 8k + 7 of each
    word) must hash apart: a weighted sum of raw words maps all of them to 2**63."""
    from hassod_jax.discovery import hierarchy

    top, low = np.uint64(1 << 63), np.uint64(1 << 30)
    keys = np.array(
        [[low, 0, 0, top], [top | low, 0, 0, 0], [low, top, 0, 0], [low, 0, top, 0]], np.uint64
    )
    assert len(set(hierarchy._atom_hash(keys).tolist())) == 4
    # Many random sparse keys: no collisions at all (the exact fallback stays unused).
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 5 * 64, size=(20000, 3))
    keys = np.zeros((20000, 5), np.uint64)
    for col in range(3):
        np.bitwise_or.at(
            keys,
            (np.arange(20000), bits[:, col] // 64),
            np.uint64(1) << (bits[:, col] % 64).astype(np.uint64),
        )
    distinct_keys = len(np.unique(keys, axis=0))
    assert len(np.unique(hierarchy._atom_hash(keys))) == distinct_keys


def test_pooled_partitions_against_oracle():
    rng = np.random.default_rng(13)
    for sizes in ([3, 6, 12], [2, 5, 9, 15]):
        masks = _pooled_partitions(rng, sizes, 30, 40)
        for cov in (0.9, 0.75):
            _check(masks, cov)
        # 0/1 integers are accepted like bools.
        levels, parents = hierarchy_levels(masks.astype(np.uint8), 0.9)
        np.testing.assert_array_equal(parents, reference_hierarchy(masks, 0.9)[1])


def test_atom_products_sparse_and_dense_forms():
    from hassod_jax.discovery.hierarchy import _atom_products

    rng = np.random.default_rng(14)
    for n_atoms, n, density in ((40, 9, 0.1), (300, 70, 0.03), (25, 33, 0.6), (1, 1, 1.0)):
        atoms = (rng.random((n_atoms, n)) < density).astype(np.uint8)
        counts = rng.integers(1, 5000, n_atoms)
        want = atoms.T.astype(np.int64) @ (atoms.astype(np.int64) * counts[:, None])
        for dense in (None, True, False):
            got = _atom_products(atoms, counts, dense=dense)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("hw", [(24, 30), (64, 64), (61, 67)])
def test_intersections_over_pixel_chunks_are_exact(hw):
    """The device intersections (bfloat16 0/1 products summed in float32, over pixel chunks
    when the masks are large) against NumPy's integer products: the whole-image, the
    exact-multiple and the with-a-tail cases."""
    from hassod_jax.discovery.hierarchy import _intersections

    rng = np.random.default_rng(7)
    masks = rng.random((9,) + hw) < rng.random((9, 1, 1))
    flat = masks.reshape(9, -1).astype(np.int64)
    want = flat @ flat.T
    for chunk in (1 << 16, 64, 1000):
        got = np.asarray(jax.jit(_intersections, static_argnums=1)(masks, chunk))
        np.testing.assert_array_equal(got, want)


def test_padded_levels_of_large_masks_match_the_host():
    """Masks above the chunk size (300 x 320 pixels) take the looped intersections."""
    rng = np.random.default_rng(9)
    masks = np.zeros((12, 300, 320), bool)
    for i in range(12):
        y0, x0 = rng.integers(0, 150, 2)
        h, w = rng.integers(20, 150, 2)
        masks[i, y0:y0 + h, x0:x0 + w] = True
    masks[3] = masks[2] & masks[5]  # nested pieces
    for cov in (0.9, 0.75):
        levels, parents = jax.jit(hierarchy_levels_padded, static_argnums=2)(
            masks, np.ones(12, bool), cov)
        want_l, want_p = reference_hierarchy(masks, cov)
        np.testing.assert_array_equal(np.asarray(levels), want_l)
        np.testing.assert_array_equal(np.asarray(parents), want_p)
