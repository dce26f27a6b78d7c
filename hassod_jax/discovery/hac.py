"""Hierarchical adaptive clustering (HAC) of a patch-feature map (docs/recipe.md, Stage 1, step 2).

Greedy merging of 4-adjacent regions by the cosine similarity of their summed features.
All thresholds are cuts of ONE merge sequence: `merge_sequence` records every merge of a
(h, w, D) map (h*w - 1 merges: the 4-adjacency grid is connected), and `cut_labels` turns the
sequence into one labelling per threshold; the cut for θ is the state just before the first
merge whose similarity is below θ (similarities are not monotone along the sequence).

Design. The original HASSOD scans every edge in Python at each merge. Here the whole
sequence is one `lax.fori_loop` of h*w - 1 steps with static shapes, so it jit-compiles once
per (h, w, D) and vmaps over a batch. State per image:

* `sums (N, D)` and `inv_norm (N,)`: region feature sums and 1 / max(||sum||, 1e-12), indexed
  by region id; a region's id is the smallest patch index it contains (the survivor of a
  merge is the smaller id), so ids are stable and equal to the oracle's.
* `eu, ev, esim (E,)`: the original grid edges with their endpoints relabelled to current
  region ids and their current similarity. Merging t into r relabels t -> r in place; edges
  that become self-loops get similarity -inf for good. Two edges may then join the same pair
  of regions (parallel edges along a longer boundary); they always carry the same similarity,
  so this union of neighbour lists needs no de-duplication.

One step costs O(E) cheap vector work (argmax, relabel, a scatter of the merged region's
neighbours into a region mask) plus O(deg * D) feature work: only the distinct neighbours of
the merged region are gathered (in chunks, see `_CHUNK_CPU`) and dotted with its new sum. No
O(N * D) work is done per step. Memory is O(N * D + E). The argmax is two-level (blocks of
`_BLOCK` edges) and the neighbour compaction counts with two small matrix products, because
XLA:CPU's argmax and cumsum over long vectors are several times slower.

Cost is dominated by the neighbour gathers: sum over merges of the merged region's number of
distinct neighbours, times D. Growing regions keep many single-patch neighbours (about 100
on average for a 60x60 map with object-like structure), so a 60x60x768 map gathers about
0.4M feature rows (1 GB) in all; the same recomputation the original does.

On CPU, `hac_partitions` uses a host loop instead (`merge_sequence_host`, C in
`_hac_native.c`, built at install): the same merges with a lazy-deletion heap and neighbour
lists, no O(E) work per merge, about 4x faster than XLA:CPU runs the loop above (68 against
281 ms for 60x60x768 on 2 cores), and several maps run in parallel threads. Both paths are
checked against the float64 oracle.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_NATIVE_VERSION = 1  # must match HAC_NATIVE_VERSION in _hac_native.c


def _checked_native(module):
    """The built extension module, or None (with a warning) when it is a stale build."""
    version = getattr(module, "VERSION", None)
    if module is None or version == _NATIVE_VERSION:
        return module
    logging.warning(
        "HAC: %s is a stale build (version %s, expected %s); ignoring it. Rebuild it with "
        "pip install -e .",
        getattr(module, "__file__", module),
        version,
        _NATIVE_VERSION,
    )
    return None


try:  # the optional C extension (setup.py); absent when the install had no C compiler
    from hassod_jax.discovery import _hac_native
except ImportError:  # pragma: no cover - depends on the install
    _hac_native = None
_hac_native = _checked_native(_hac_native)

# Distinct neighbours handled per chunk of the similarity update (a region with more loops
# over further chunks). Small on CPU, where unused lanes cost gather bandwidth; large on
# accelerators, where each loop trip costs kernel launches for the whole batch.
_CHUNK_CPU = 64  # 60x60x768, shared 2-core CPU: 32 -> 249 ms, 64 -> 227, 96 -> 219, 192 -> 246
_CHUNK_ACCELERATOR = 256  # H200, B=512 noise maps: 256 -> 680 img/s, 128 -> ~380 (B=256)
_HIGHEST = jax.lax.Precision.HIGHEST
_EPS = 1e-12
# Edge-block length of the two-level argmax.
_BLOCK = 128


class MergeSequence(NamedTuple):
    """The whole greedy merge sequence of one feature map (or a batch: leading B axis).

    Merge i joins region `gone[i]` into region `keep[i]` (`keep < gone`, both region ids =
    smallest patch index of the region, row-major over (h, w)) at similarity `sim[i]`.

    Attributes:
      keep: (M,) int32, M = h*w - 1, the surviving region id of each merge.
      gone: (M,) int32, the id of the region absorbed (it is never used again).
      sim: (M,) float32 in [-1, 1], the cosine similarity at which the merge happened.
    """

    keep: jax.Array
    gone: jax.Array
    sim: jax.Array


def _grid_edges(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Static 4-adjacency edges of an h x w grid: horizontal ones first, then vertical."""
    idx = np.arange(h * w, dtype=np.int32).reshape(h, w)
    u = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    v = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    return u, v


def _prefix_count(flags: jax.Array, tri: jax.Array) -> jax.Array:
    """Inclusive running count of a (n,) bool vector, exact, as two small matrix products.

    XLA:CPU lowers a long cumsum to a quadratic reduce-window; rows of length c = tri.shape[0]
    are summed with one (n/c, c) @ (c, c) product (exact: integers far below 2**24) and the
    row offsets with a second one.
    """
    n = flags.shape[0]
    c = tri.shape[0]
    rows = -(-n // c)
    x = jnp.pad(flags.astype(jnp.float32), (0, rows * c - n)).reshape(rows, c)
    within = jnp.dot(x, tri, precision=_HIGHEST)
    row_tri = jnp.asarray(np.triu(np.ones((rows, rows), np.float32), 1))
    offsets = jnp.dot(within[:, -1], row_tri, precision=_HIGHEST)
    return (within + offsets[:, None]).reshape(-1)[:n].astype(jnp.int32)


def _merge_sequence_impl(features: jax.Array, chunk: int) -> MergeSequence:
    h, w, d = features.shape
    n = h * w
    m = n - 1
    if m == 0:  # a single patch: nothing to merge
        return MergeSequence(
            jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32)
        )
    f = features.astype(jnp.float32)
    sums = f.reshape(n, d)
    inv_norm = 1.0 / jnp.maximum(jnp.linalg.norm(sums, axis=-1), _EPS)
    a = f * inv_norm.reshape(h, w, 1)
    # Initial similarities straight from the grid (no (E, D) gather).
    esim = jnp.concatenate(
        [jnp.sum(a[:, :-1] * a[:, 1:], -1).ravel(), jnp.sum(a[:-1] * a[1:], -1).ravel()]
    )
    # Clipping to [-1, 1] makes θ > 1 (no merge) and θ <= -1 (merge all) exact despite
    # float32 rounding of unit-vector dot products.
    esim = jnp.clip(esim, -1.0, 1.0)
    u_np, v_np = _grid_edges(h, w)
    n_edges = u_np.shape[0]
    # Edges are padded to whole blocks of _BLOCK: padding edges are dead self-loops (0, 0).
    n_blocks = -(-n_edges // _BLOCK)
    pad = n_blocks * _BLOCK - n_edges
    eu = jnp.asarray(np.pad(u_np, (0, pad)))
    ev = jnp.asarray(np.pad(v_np, (0, pad)))
    esim = jnp.pad(esim, (0, pad), constant_values=-jnp.inf)
    regsim = jnp.zeros((n,), jnp.float32)
    chunk = min(chunk, n)
    lanes = jnp.arange(chunk, dtype=jnp.int32)
    region_ids = jnp.arange(n, dtype=jnp.int32)
    cols = max(1, int(np.ceil(np.sqrt(n))))
    tri = jnp.asarray(np.triu(np.ones((cols, cols), np.float32)))

    def step(i, state):
        sums, inv_norm, eu, ev, esim, regsim, keep, gone, msim = state
        # Two-level argmax (max of each block, then within the best block): XLA:CPU's
        # argmax over one long vector is several times slower. Both levels take the first
        # maximum, so this is the first maximum overall.
        blocks = esim.reshape(n_blocks, _BLOCK)
        b = jnp.argmax(jnp.max(blocks, axis=1))
        e = b * _BLOCK + jnp.argmax(blocks[b])
        s_best = esim[e]
        r = jnp.minimum(eu[e], ev[e])
        t = jnp.maximum(eu[e], ev[e])
        s_r = sums[r] + sums[t]
        sums = sums.at[r].set(s_r)
        inv_r = 1.0 / jnp.maximum(jnp.linalg.norm(s_r), _EPS)
        inv_norm = inv_norm.at[r].set(inv_r)
        # The union of neighbour lists: every edge end that named t now names r.
        eu = jnp.where(eu == t, r, eu)
        ev = jnp.where(ev == t, r, ev)
        at_u = eu == r
        at_v = ev == r
        touch = at_u != at_v  # exactly one end is r; both ends r is a dead self-loop
        other = jnp.where(at_u, ev, eu)
        # Distinct neighbour regions of r, compacted to the front of `order`, then handled
        # `chunk` at a time.
        is_nb = jnp.zeros((n,), jnp.bool_).at[jnp.where(touch, other, n)].set(True, mode="drop")
        pos = _prefix_count(is_nb, tri) - 1
        count = pos[-1] + 1
        order = jnp.zeros((n + chunk,), jnp.int32)
        order = order.at[jnp.where(is_nb, pos, n + chunk)].set(region_ids, mode="drop")
        a_r = s_r * inv_r

        def chunk_body(carry):
            start, regsim = carry
            ids = jax.lax.dynamic_slice(order, (start,), (chunk,))
            rows = jnp.take(sums, ids, axis=0, mode="clip")
            vals = jnp.dot(rows, a_r, precision=_HIGHEST) * inv_norm[ids]
            vals = jnp.clip(vals, -1.0, 1.0)
            ids = jnp.where(start + lanes < count, ids, n)  # padding lanes write nothing
            return start + chunk, regsim.at[ids].set(vals, mode="drop")

        # The first chunk unconditionally (most merges have few neighbours), then a loop.
        carry = chunk_body((jnp.int32(0), regsim))
        _, regsim = jax.lax.while_loop(lambda carry: carry[0] < count, chunk_body, carry)
        dead = eu == ev
        esim = jnp.where(dead, -jnp.inf, jnp.where(touch, regsim[other], esim))
        keep = keep.at[i].set(r)
        gone = gone.at[i].set(t)
        msim = msim.at[i].set(s_best)
        return sums, inv_norm, eu, ev, esim, regsim, keep, gone, msim

    init = (
        sums,
        inv_norm,
        eu,
        ev,
        esim,
        regsim,
        jnp.zeros((m,), jnp.int32),
        jnp.zeros((m,), jnp.int32),
        jnp.zeros((m,), jnp.float32),
    )
    out = jax.lax.fori_loop(0, m, step, init)
    return MergeSequence(out[6], out[7], out[8])


def _check_features(features, ndim: tuple[int, ...], name: str = "features") -> None:
    shape = getattr(features, "shape", None)
    if shape is None or len(shape) not in ndim:
        want = " or ".join(f"{k}-D" for k in ndim)
        raise ValueError(f"{name}: expected a {want} array (…, h, w, D), got shape {shape}")
    if min(shape[-3:]) < 1:
        raise ValueError(f"{name}: h, w and D must be >= 1, got shape {tuple(shape)}")
    dtype = getattr(features, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {dtype}")


_merge_jit = jax.jit(_merge_sequence_impl, static_argnums=1)
_merge_batch_jit = jax.jit(jax.vmap(_merge_sequence_impl, in_axes=(0, None)), static_argnums=1)


def _platform(x) -> str:
    """The platform a (JAX or NumPy) array's computation runs on."""
    devices = getattr(x, "devices", None)
    return next(iter(devices())).platform if callable(devices) else jax.default_backend()


def _default_chunk(x) -> int:
    return _CHUNK_CPU if _platform(x) == "cpu" else _CHUNK_ACCELERATOR


def native_available() -> bool:
    """Whether the host merge loop (the C extension `_hac_native`) was built at install."""
    return _hac_native is not None


def merge_sequence_host(features) -> MergeSequence:
    """The merge sequence of one (h, w, D) map on the host CPU (C loop, no XLA).

    Same merges as `merge_sequence` (float32; exact ties may be broken differently: by the
    smaller region pair here, by the first grid edge there), as NumPy arrays. Releases the
    GIL, so maps can be merged in parallel threads.

    Raises:
      RuntimeError: the C extension was not built (install with a C compiler available).
    """
    if _hac_native is None:
        raise RuntimeError(
            "hassod_jax.discovery._hac_native is not built: reinstall hassod_jax "
            "(pip install -e .) on a machine with a C compiler, or use merge_sequence"
        )
    _check_features(features, (3,))
    h, w, d = features.shape
    f = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    m = h * w - 1
    keep, gone = np.zeros(m, np.int32), np.zeros(m, np.int32)
    sim = np.zeros(m, np.float32)
    _hac_native.merge_sequence(f, h, w, d, keep, gone, sim)
    return MergeSequence(keep, gone, sim)


def merge_sequence_host_batch(features) -> MergeSequence:
    """`merge_sequence_host` over a (B, h, w, D) batch, one thread per CPU core (the C loop
    releases the GIL): (B, h*w - 1) NumPy arrays."""
    _check_features(features, (4,))
    maps = np.asarray(features, dtype=np.float32)
    workers = max(1, min(len(maps), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        seqs = list(pool.map(merge_sequence_host, maps))
    return MergeSequence(*map(np.stack, zip(*seqs)))


_warned_no_native = False


def _use_host(features, backend: str | None) -> bool:
    global _warned_no_native
    if backend not in (None, "host", "xla"):
        raise ValueError(f"backend: expected None, 'host' or 'xla', got {backend!r}")
    if backend is not None:
        return backend == "host"
    if _platform(features) != "cpu":
        return False
    if _hac_native is None and not _warned_no_native:
        _warned_no_native = True
        logging.warning(
            "HAC: the C extension _hac_native is not built; using the XLA loop on CPU "
            "(same results, about 4x slower). Reinstall with a C compiler to build it."
        )
    return _hac_native is not None


def merge_sequence(features: jax.Array, chunk: int | None = None) -> MergeSequence:
    """Records the whole greedy merge sequence of one feature map (the module docstring's merge).

    Jit-compiled once per shape; `jax.vmap`-able (see `merge_sequence_batch`).

    Args:
      features: (h, w, D) floating array of patch features (computed in float32).
      chunk: neighbours per step of the similarity update (a tuning knob, no effect on the
        result); default 64 on CPU, 256 on accelerators.

    Returns:
      MergeSequence with (h*w - 1,) arrays `keep`, `gone` (int32 region ids) and `sim`.
    """
    _check_features(features, (3,))
    return _merge_jit(features, int(chunk or _default_chunk(features)))


def merge_sequence_batch(features: jax.Array, chunk: int | None = None) -> MergeSequence:
    """`merge_sequence` vmapped over a batch: features (B, h, w, D) -> (B, h*w - 1) arrays.

    The input may be sharded over devices along B (e.g. `NamedSharding(mesh, P("data"))`);
    the merge is independent per image, so the output is sharded the same way.
    """
    _check_features(features, (4,))
    return _merge_batch_jit(features, int(chunk or _default_chunk(features)))


def _cut_prefix(sim: jax.Array, thresholds: jax.Array) -> jax.Array:
    """(M,) merge similarities, (T,) thresholds -> (T,) int32 number of merges kept.

    The cut for θ keeps the merges before the first one with similarity < θ. The running
    minimum of the similarities is non-increasing, and the first merge below θ is the first
    place the running minimum falls below θ, so the prefix length is a count.
    """
    run_min = jax.lax.cummin(sim)
    return jnp.sum(run_min[None, :] >= thresholds[:, None], axis=1, dtype=jnp.int32)


def _cut_labels_impl(keep: jax.Array, gone: jax.Array, sim: jax.Array, thresholds: jax.Array):
    m = sim.shape[0]
    n = m + 1
    t_count = thresholds.shape[0]
    self_ids = jnp.arange(n, dtype=jnp.int32)
    if m == 0:
        return jnp.zeros((t_count, 1), jnp.int32)
    prefix = _cut_prefix(sim, thresholds)
    # Each region is absorbed at most once: parent[t] = r at time `merged_at[t]`. Along any
    # path towards the root, merge times increase, so the root of x after the first p merges
    # is reached by following only the links made before p: pointer doubling then finds it.
    parent = self_ids.at[gone].set(keep)
    merged_at = jnp.full((n,), m, jnp.int32).at[gone].set(jnp.arange(m, dtype=jnp.int32))
    steps = max(1, int(np.ceil(np.log2(n))))

    def labels_for(p):
        link = jnp.where(merged_at < p, parent, self_ids)
        return jax.lax.fori_loop(0, steps, lambda _, q: q[q], link)

    return jax.vmap(labels_for)(prefix)


_cut_jit = jax.jit(_cut_labels_impl)
_cut_batch_jit = jax.jit(jax.vmap(_cut_labels_impl, in_axes=(0, 0, 0, None)))


def cut_labels(seq: MergeSequence, thresholds) -> jax.Array:
    """Region labels of the cuts of a merge sequence at several thresholds.

    Args:
      seq: a MergeSequence of one map ((M,) arrays) or of a batch ((B, M) arrays).
      thresholds: (T,) floats in any order.

    Returns:
      (T, h*w) int32, or (B, T, h*w) for a batch: the region id of every patch (row-major),
      a region's id being its smallest patch index.
    """
    thr = np.asarray(thresholds, dtype=np.float64)
    if thr.ndim != 1 or not np.all(np.isfinite(thr)):
        raise ValueError(f"thresholds: expected a 1-D list of finite numbers, got {thresholds!r}")
    # float32 thresholds, nudged so that the comparison against float32 similarities agrees
    # with a comparison of their exact values: sim >= θ  <=>  sim >= (smallest float32 >= θ).
    thr32 = thr.astype(np.float32)
    below = thr32.astype(np.float64) < thr
    thr32[below] = np.nextafter(thr32[below], np.float32(np.inf))
    thr_j = jnp.asarray(thr32)
    if seq.sim.ndim == 1:
        return _cut_jit(seq.keep, seq.gone, seq.sim, thr_j)
    if seq.sim.ndim == 2:
        return _cut_batch_jit(seq.keep, seq.gone, seq.sim, thr_j)
    raise ValueError(f"seq: expected (M,) or (B, M) arrays, got sim of shape {seq.sim.shape}")


def labels_to_masks(labels: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h*w,) region ids (smallest patch index of each region) -> (R, h, w) bool masks.

    Masks are ordered by their first patch in row-major order.
    """
    labels = np.asarray(labels)
    is_root = labels == np.arange(labels.shape[0])
    rank = np.cumsum(is_root) - 1
    compact = rank[labels]
    r = int(is_root.sum())
    masks = np.zeros((r, labels.shape[0]), bool)
    masks[compact, np.arange(labels.shape[0])] = True  # a zero fill and h*w writes
    return masks.reshape(r, h, w)


def hac_partitions(features, thresholds, backend: str | None = None) -> list:
    """HAC region masks of one feature map or a batch, one entry per threshold.

    Args:
      features: (h, w, D) or (B, h, w, D) floating array (NumPy or JAX) of patch features.
      thresholds: sequence of T finite floats, any order (the paper uses 0.4, 0.2, 0.1).
        θ > 1 gives no merge (h*w single-patch masks); θ <= -1 merges everything.
      backend: None picks the host C loop (`merge_sequence_host`, maps in parallel threads)
        when the features live on CPU and the extension is built, else the jit-compiled loop;
        "host" or "xla" forces one. Results are the same up to exact ties.

    Returns:
      For (h, w, D): a list of T (R_t, h, w) bool NumPy arrays, in the order of
      `thresholds`, masks ordered by their first patch (row-major). For (B, h, w, D): a list
      of B such lists.
    """
    _check_features(features, (3, 4))
    # NumPy input is checked where it is (no copy to a device just for the check).
    xp = np if isinstance(features, np.ndarray) else jnp
    if not bool(xp.all(xp.isfinite(features))):
        raise ValueError("features: contains NaN or infinite values")
    h, w = features.shape[-3], features.shape[-2]
    if _use_host(features, backend):
        maps = features[None] if features.ndim == 3 else features
        labels = np.asarray(cut_labels(merge_sequence_host_batch(maps), thresholds))
        out = [[labels_to_masks(lab, h, w) for lab in per_image] for per_image in labels]
        return out[0] if features.ndim == 3 else out
    if features.ndim == 4 and _platform(features) == "cpu":
        # On CPU one image at a time is faster than the vmapped loop (same results).
        return [hac_partitions(f, thresholds, backend) for f in features]
    if features.ndim == 3:
        labels = np.asarray(cut_labels(merge_sequence(features), thresholds))
        return [labels_to_masks(lab, h, w) for lab in labels]
    labels = np.asarray(cut_labels(merge_sequence_batch(features), thresholds))
    return [[labels_to_masks(lab, h, w) for lab in per_image] for per_image in labels]
