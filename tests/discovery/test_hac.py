"""HAC (docs/recipe.md, Stage 1, step 2) against the float64 NumPy oracle in hac_reference.py.

Float32 (JAX) and float64 (oracle) may legitimately order near-ties differently. A partition
may therefore differ from the oracle's only where the oracle itself is within `_TIE` of a
decision (two best region pairs, or a merge similarity and θ) at or before the cut; such
cases are counted, and must be rare. Both merge loops are checked: the jit-compiled one
(`merge_sequence`, `merge_sequence_batch`) and the host C loop (`merge_sequence_host`).
"""


import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hassod_jax.discovery import hac

from tests.discovery.hac_reference import (
    dino_like_features,
    reference_cut,
    reference_masks,
    reference_merge_sequence,
)

_TIE = 1e-5
PAPER = [0.4, 0.2, 0.1]
SWEEP = list(np.linspace(-0.95, 0.99, 50))
EXTREMES = [1.5, 1.0 + 1e-6, -1.0, -3.0]
THRESHOLDS = PAPER + SWEEP + EXTREMES


def _make(kind: str, h: int, w: int, d: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "noise":
        return rng.standard_normal((h, w, d))
    if kind == "constant":
        return np.broadcast_to(rng.standard_normal(d), (h, w, d)).copy()
    if kind == "zero":
        return np.zeros((h, w, d))
    if kind == "piecewise":
        # A Voronoi partition of the grid into k pieces, each a random direction, plus noise.
        k = int(rng.integers(2, 7))
        seeds = rng.uniform(0, [h, w], size=(k, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        centres = rng.standard_normal((k, d))
        return centres[np.argmin(dist, -1)] + rng.uniform(0.1, 0.8) * rng.standard_normal((h, w, d))
    raise ValueError(kind)


def _mask_set(masks) -> set:
    return {np.packbits(m.ravel()).tobytes() + bytes(str(m.shape), "ascii") for m in masks}


def _compare(features: np.ndarray, candidates: dict, thresholds, stats):
    """Checks one map's merge sequences and cuts against the oracle; updates stats.

    candidates: name -> (keep, gone, sim, labels) with labels (T, h*w) from `cut_labels`.
    """
    h, w, _ = features.shape
    merges, margins = reference_merge_sequence(features)
    ref_sim = np.array([s for _, _, s in merges])
    ref_pairs = np.array([(r, t) for r, t, _ in merges]).reshape(-1, 2)
    for name, (seq_keep, seq_gone, seq_sim, labels) in candidates.items():
        pairs = np.stack([seq_keep, seq_gone], -1)
        same = np.all(ref_pairs == pairs, axis=1)
        first_diff = int(np.argmin(same)) if not same.all() else len(same)
        # Where the sequences agree, the similarities agree to float32 precision.
        np.testing.assert_allclose(seq_sim[:first_diff], ref_sim[:first_diff], rtol=0, atol=3e-6)
        if first_diff < len(same):
            # Sequences may only part at a near-tie of the oracle.
            assert margins[first_diff] < _TIE, (name, features.shape, first_diff)
        for j, theta in enumerate(thresholds):
            p = reference_cut(merges, h * w, theta)
            want = reference_masks(merges, h, w, p)
            got = hac.labels_to_masks(labels[j], h, w)
            stats[name]["cuts"] += 1
            if _mask_set(got) == _mask_set(want):
                continue
            near = np.abs(ref_sim[: p + 1] - theta)
            fragile = (len(margins[:p]) and np.min(margins[:p]) < _TIE) or (
                near.size and near.min() < _TIE
            )
            assert fragile, (name, features.shape, theta, p, len(got), len(want))
            stats[name]["skipped"] += 1
        stats[name]["maps"] += 1


def _new_stats():
    return {name: {"maps": 0, "cuts": 0, "skipped": 0} for name in ("xla", "host")}


# (h, w, D, draws) per shape; kinds cycle so that every shape sees each kind.
_SHAPES = [
    (1, 1, 4, 4),
    (1, 9, 4, 16),
    (9, 1, 4, 8),
    (2, 3, 5, 16),
    (7, 5, 8, 80),
    (12, 17, 32, 40),
    (30, 30, 16, 36),
]
_KINDS = ["noise", "piecewise", "noise", "piecewise", "constant", "zero"]


def test_against_oracle_many_maps():
    rng = np.random.default_rng(1234)
    stats = _new_stats()
    for h, w, d, draws in _SHAPES:
        feats = np.stack([_make(_KINDS[i % len(_KINDS)], h, w, d, rng) for i in range(draws)])
        runs = {
            "xla": hac.merge_sequence_batch(feats.astype(np.float32)),
            "host": hac.merge_sequence_host_batch(feats),
        }
        per_run = {}
        for name, seq in runs.items():
            labels = np.asarray(hac.cut_labels(seq, THRESHOLDS))
            per_run[name] = [np.asarray(x) for x in seq] + [labels]
        for i in range(draws):
            candidates = {name: [x[i] for x in arrays] for name, arrays in per_run.items()}
            _compare(feats[i], candidates, THRESHOLDS, stats)
    print("HAC oracle comparison:", stats)
    for name in stats:
        assert stats[name]["maps"] >= 200
        assert stats[name]["skipped"] <= 0.01 * stats[name]["cuts"], stats


def test_against_oracle_dino_sized():
    """60x60x768 maps, the size of DINO ViT-B/8 keys at 480 px."""
    rng = np.random.default_rng(7)
    stats = _new_stats()
    thresholds = PAPER + [1.5, -1.0]
    for kind in ["piecewise", "noise", "piecewise"]:
        f = _make(kind, 60, 60, 768, rng)
        candidates = {}
        for name, seq in [
            ("xla", hac.merge_sequence(f.astype(np.float32))),
            ("host", hac.merge_sequence_host(f)),
        ]:
            labels = np.asarray(hac.cut_labels(seq, thresholds))
            candidates[name] = [np.asarray(x) for x in seq] + [labels]
        _compare(f, candidates, thresholds, stats)
    print("HAC oracle comparison 60x60x768:", stats)
    for name in stats:
        assert stats[name]["skipped"] <= 1, stats


@pytest.mark.parametrize("backend", ["xla", "host", None])
def test_extremes_and_api(backend):
    rng = np.random.default_rng(3)
    f = rng.standard_normal((4, 6, 8)).astype(np.float32)
    out = hac.hac_partitions(f, [1.01, 0.2, -1.0], backend=backend)
    assert len(out) == 3
    assert out[0].shape == (24, 4, 6) and out[0].dtype == bool
    assert out[2].shape == (1, 4, 6) and out[2].all()
    for masks in out:  # every partition covers each patch exactly once
        np.testing.assert_array_equal(masks.sum(0), np.ones((4, 6)))
    single = hac.hac_partitions(np.ones((1, 1, 3), np.float32), [0.4, -2.0], backend=backend)
    assert [m.shape for m in single] == [(1, 1, 1), (1, 1, 1)]
    batch = hac.hac_partitions(np.ones((2, 1, 1, 3), np.float32), [0.4], backend=backend)
    assert [[m.shape for m in per_image] for per_image in batch] == [[(1, 1, 1)], [(1, 1, 1)]]


def test_host_loop_is_built_and_is_the_cpu_default():
    # setup.py builds the extension; an install without a C compiler would fall back silently
    # in CI, so the test suite insists on it.
    assert hac.native_available()
    assert hac._use_host(np.zeros((2, 2, 3), np.float32), None)
    assert not hac._use_host(np.zeros((2, 2, 3), np.float32), "xla")
    with pytest.raises(ValueError, match="backend"):
        hac.hac_partitions(np.zeros((2, 2, 3), np.float32), [0.1], backend="gpu")


def test_host_and_xla_partitions_agree_on_dino_like_maps():
    """Structured 60x60x768 maps (the benchmark's kind), batched on the host in threads."""
    feats = dino_like_features(np.random.default_rng(11), 3, 60, 60, 768)
    host = hac.hac_partitions(feats, PAPER + SWEEP, backend="host")
    for i in range(len(feats)):
        xla = hac.hac_partitions(feats[i], PAPER + SWEEP, backend="xla")
        for a, b in zip(host[i], xla):
            assert _mask_set(a) == _mask_set(b)


def test_without_the_extension_cpu_falls_back_to_xla(monkeypatch, caplog):
    monkeypatch.setattr(hac, "_hac_native", None)
    monkeypatch.setattr(hac, "_warned_no_native", False)
    f = np.random.default_rng(2).standard_normal((5, 4, 6)).astype(np.float32)
    with caplog.at_level("WARNING"):
        out = hac.hac_partitions(f, PAPER)
    assert "not built" in caplog.text
    monkeypatch.undo()
    for a, b in zip(out, hac.hac_partitions(f, PAPER, backend="host")):
        assert _mask_set(a) == _mask_set(b)
    monkeypatch.setattr(hac, "_hac_native", None)
    with pytest.raises(RuntimeError, match="not built"):
        hac.merge_sequence_host(f)


def test_stale_extension_build_is_refused(caplog):
    import types

    stale = types.SimpleNamespace(VERSION=hac._NATIVE_VERSION - 1, __file__="old/_hac_native.so")
    with caplog.at_level("WARNING"):
        assert hac._checked_native(stale) is None
    assert "old/_hac_native.so is a stale build" in caplog.text
    assert hac._checked_native(hac._hac_native) is hac._hac_native
    assert hac._checked_native(None) is None


def test_host_extension_checks_its_buffers():
    f = np.zeros((3, 4, 2), np.float32)
    keep, gone, sim = np.zeros(11, np.int32), np.zeros(11, np.int32), np.zeros(11, np.float32)
    with pytest.raises(ValueError, match="buffer sizes"):
        hac._hac_native.merge_sequence(f, 3, 4, 3, keep, gone, sim)
    with pytest.raises(ValueError, match="bad shape"):
        hac._hac_native.merge_sequence(f, 0, 4, 2, keep, gone, sim)
    with pytest.raises(TypeError):
        hac._hac_native.merge_sequence(f, 3, 4, 2, keep.tobytes(), gone, sim)  # read-only


def test_batched_equals_single_and_chunk_has_no_effect():
    rng = np.random.default_rng(5)
    feats = np.stack([_make(k, 8, 11, 16, rng) for k in ["noise", "piecewise", "constant"]])
    feats = feats.astype(np.float32)
    batched = hac.merge_sequence_batch(feats)
    batched_labels = np.asarray(hac.cut_labels(batched, SWEEP))
    for i in range(len(feats)):
        single = hac.merge_sequence(feats[i])
        # A chunk of 3 neighbours runs the multi-chunk loop at almost every merge.
        small_chunk = hac.merge_sequence(feats[i], chunk=3)
        # Same merges; similarities agree to the last bit or so (the vmapped and the
        # single-image programs may vectorise the dot products differently).
        np.testing.assert_array_equal(batched_labels[i], np.asarray(hac.cut_labels(single, SWEEP)))
        if i == 2:
            continue  # a constant map is all exact ties: the merge order is rounding noise
        row = hac.MergeSequence(*(x[i] for x in batched))
        for other in (row, small_chunk):
            np.testing.assert_array_equal(np.asarray(other.keep), np.asarray(single.keep))
            np.testing.assert_array_equal(np.asarray(other.gone), np.asarray(single.gone))
            np.testing.assert_allclose(np.asarray(other.sim), np.asarray(single.sim), atol=1e-6)
    out = hac.hac_partitions(feats, PAPER)
    assert len(out) == 3 and all(len(per_image) == 3 for per_image in out)
    for i in range(len(feats)):
        for a, b in zip(out[i], hac.hac_partitions(feats[i], PAPER)):
            np.testing.assert_array_equal(a, b)


def test_sharded_over_eight_devices_equals_one():
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py forces 8 host CPU devices"
    rng = np.random.default_rng(9)
    feats = np.stack([_make(_KINDS[i % 4], 10, 9, 16, rng) for i in range(8)]).astype(np.float32)
    mesh = Mesh(np.array(devices), ("data",))
    sharded = jax.device_put(feats, NamedSharding(mesh, PartitionSpec("data")))
    seq_sharded = hac.merge_sequence_batch(sharded)
    one = jax.device_put(feats, devices[0])
    seq_one = hac.merge_sequence_batch(one)
    # Same merges; similarities may differ in the last bit (each device compiles the vmapped
    # loop for its own batch size, which may vectorise the dot products differently).
    np.testing.assert_array_equal(np.asarray(seq_sharded.keep), np.asarray(seq_one.keep))
    np.testing.assert_array_equal(np.asarray(seq_sharded.gone), np.asarray(seq_one.gone))
    np.testing.assert_allclose(np.asarray(seq_sharded.sim), np.asarray(seq_one.sim), atol=1e-6)
    assert len(seq_sharded.sim.sharding.device_set) == 8
    np.testing.assert_array_equal(
        np.asarray(hac.cut_labels(seq_sharded, SWEEP)), np.asarray(hac.cut_labels(seq_one, SWEEP))
    )


def test_bad_input():
    with pytest.raises(ValueError, match="features"):
        hac.hac_partitions(np.zeros((3, 4)), [0.1])
    with pytest.raises(ValueError, match="features"):
        hac.hac_partitions(np.zeros((3, 4, 2), np.int32), [0.1])
    with pytest.raises(ValueError, match="NaN"):
        hac.hac_partitions(np.full((3, 4, 2), np.nan, np.float32), [0.1])
    with pytest.raises(ValueError, match="thresholds"):
        hac.hac_partitions(np.zeros((3, 4, 2), np.float32), [[0.1, 0.2]])
    with pytest.raises(ValueError, match="thresholds"):
        hac.hac_partitions(np.zeros((3, 4, 2), np.float32), [float("nan")])


def _exact_maps():
    """Maps whose merge similarities are exact in float32 (unit vectors with entries ±0.5 or
    ±1, norms powers of two), so a threshold can sit exactly on a merge similarity.

    name -> (features (h, w, D), merge similarities in order, {θ: number of regions}).
    """
    a = [1.0, 1.0, 1.0, 1.0]  # direction (.5, .5, .5, .5)
    c = [1.0, 1.0, 1.0, -1.0]  # cos(a, c) = 0.5; cos(a + a, c) = 0.5
    o = [1.0, 1.0, -1.0, -1.0]  # cos(a, o) = 0
    up = np.nextafter(0.5, 1.0)  # the float64 just above 0.5: rounds to a float32 above 0.5
    return {
        # θ <= -1 merges everything, even exactly opposite features (cos = -1).
        "opposite_2x1": (
            np.array([[[1.0, 0.0]], [[-1.0, 0.0]]]),
            [-1.0],
            {-1.0: 1, -3.0: 1, -0.999: 2, np.nextafter(-1.0, 0.0): 2, 0.0: 2},
        ),
        "opposite_1x2": (np.array([[[0.0, 2.0], [0.0, -3.0]]]), [-1.0], {-1.0: 1, -0.5: 2}),
        "orthogonal_1x2": (np.array([[a, o]]), [0.0], {0.0: 1, -1e-9: 1, 1e-9: 2, 0.4: 2}),
        "half_1x3": (
            np.array([[a, a, c]]),
            [1.0, 0.5],
            {0.5: 1, 0.4: 1, up: 2, 0.75: 2, 1.0: 2, 1.0 + 1e-6: 3, 1.5: 3, -1.0: 1},
        ),
    }


@pytest.mark.parametrize("name", sorted(_exact_maps()))
def test_cut_keeps_a_merge_exactly_at_the_threshold(name):
    """The cut for θ keeps a merge of similarity exactly θ (`sim >= θ`), for both merge loops
    and for hac_partitions with either backend; the float64 oracle agrees."""
    features, sims, want = _exact_maps()[name]
    h, w, _ = features.shape
    thresholds = list(want)
    merges, _ = reference_merge_sequence(features)
    assert [s for _, _, s in merges] == sims  # the premise: the similarities are exact
    for theta, n_regions in want.items():
        assert len(reference_masks(merges, h, w, reference_cut(merges, h * w, theta))) == n_regions
    f32 = features.astype(np.float32)
    for loop, seq in [("xla", hac.merge_sequence(f32)), ("host", hac.merge_sequence_host(f32))]:
        np.testing.assert_array_equal(np.asarray(seq.sim), np.float32(sims), err_msg=loop)
        labels = np.asarray(hac.cut_labels(seq, thresholds))
        got = [len(np.unique(lab)) for lab in labels]
        assert got == list(want.values()), (loop, dict(zip(thresholds, got)))
    batch = hac.cut_labels(hac.merge_sequence_batch(f32[None]), thresholds)
    assert [len(np.unique(lab)) for lab in np.asarray(batch)[0]] == list(want.values())
    for backend in ("xla", "host"):
        parts = hac.hac_partitions(f32, thresholds, backend=backend)
        assert [len(m) for m in parts] == list(want.values()), (backend, thresholds)
        for masks in parts:
            np.testing.assert_array_equal(masks.sum(0), np.ones((h, w)))
