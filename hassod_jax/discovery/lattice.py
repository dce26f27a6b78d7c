"""Permutohedral lattice Gaussian filtering with static shapes (JAX).

Re-implements, from the description in Adams, Baek and Davis, "Fast High-Dimensional
Filtering Using the Permutohedral Lattice" (2010) and the numeric recipe of Philipp
Krähenbühl's ``densecrf/src/permutohedral.cpp`` (the SSE build that pydensecrf ships on
x86-64), the approximate Gaussian filter

    out[n] = sum_m exp(-|f_n - f_m|^2 / 2) * values[m]      (up to the lattice approximation)

used by the fully connected CRF. The steps follow that C++ exactly (same elevation, same
rounding to the nearest remainder-0 point, same tie-breaking of the ranks, same barycentric
weights, blur kernel [0.5, 1, 0.5] along each of the d+1 lattice directions in order 0..d,
slice scaled by alpha = 1 / (1 + 2^-d)), so that results agree with pydensecrf to float32
rounding.

What differs is the data structure: the C++ uses a growing hash table; here lattice vertices
are keys packed into one int64 (inside a local ``jax.enable_x64`` scope), de-duplicated by
sorting into a fixed ``capacity``, and the blur neighbours are found with ``searchsorted`` on
the sorted keys. Packing is linear with head-room in every digit, so key + delta packs to
packed(key) + packed(delta). Everything has static shapes, so it jits and vmaps.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_MAX_PACKED_BITS = 62


class Lattice(NamedTuple):
    """A permutohedral lattice built for N points with d-dimensional features.

    Attributes:
      offsets: (N, d+1) int32, lattice vertex index of each point's d+1 enclosing-simplex
        vertices, in [0, capacity]; ``capacity`` is a zero row (vertex dropped on overflow).
      weights: (N, d+1) float32 barycentric weights (sum to 1 per point).
      neighbors: (d+1, 2, capacity+1) int32, for each blur direction the index of the
        previous/next vertex along that direction, ``capacity`` where it does not exist.
      num_vertices: () int32, the number of distinct lattice vertices (may exceed
        ``capacity``, in which case the filter is wrong: see ``overflow``).
    """

    offsets: jax.Array
    weights: jax.Array
    neighbors: jax.Array
    num_vertices: jax.Array

    @property
    def capacity(self) -> int:
        return self.neighbors.shape[-1] - 1

    @property
    def dim(self) -> int:
        return self.offsets.shape[-1] - 1

    @property
    def overflow(self) -> jax.Array:
        """() bool, True when the lattice had more vertices than its capacity."""
        return self.num_vertices > self.capacity


def _scale_factors(d: int) -> np.ndarray:
    """Diagonal of the elevation matrix E, in float32 as the C++ computes it."""
    # inv_std_dev is a float computed in double; the factor is computed in double then
    # stored as float (_mm_set1_ps).
    inv_std_dev = np.float32(np.sqrt(2.0 / 3.0) * (d + 1))
    return np.array(
        [1.0 / np.sqrt(float((i + 2) * (i + 1))) * np.float64(inv_std_dev) for i in range(d)],
        dtype=np.float32,
    )


def _elevate(features: jax.Array, scale: np.ndarray) -> jax.Array:
    """(N, d) float32 features -> (N, d+1) float32 points on the hyperplane sum = 0."""
    d = features.shape[1]
    sm = jnp.zeros(features.shape[:1], jnp.float32)
    elevated = [None] * (d + 1)
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * scale[j - 1]
        elevated[j] = sm - np.float32(j) * cf
        sm = sm + cf
    elevated[0] = sm
    return jnp.stack(elevated, axis=1)


def _elevated_bounds(bounds: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Interval bounds (d+1, 2) of the elevated coordinates for features in ``bounds``."""
    d = bounds.shape[0]
    cf = np.sort(bounds * scale[:, None].astype(np.float64), axis=1)  # (d, 2) of f*s
    out = np.zeros((d + 1, 2))
    out[0] = cf.sum(axis=0)
    for j in range(1, d + 1):
        rest = cf[j:].sum(axis=0)  # features j .. d-1 (0-based), i.e. C++ indices > j-1
        mj = np.sort(-j * cf[j - 1])
        out[j] = rest + mj
    return out


def _packing(bounds: Sequence[tuple[float, float]], d: int, scale: np.ndarray):
    """Static per-coordinate key offsets and strides of the int64 packing."""
    b = np.asarray(bounds, dtype=np.float64).reshape(d, 2)
    if not np.all(np.isfinite(b)) or np.any(b[:, 1] < b[:, 0]):
        raise ValueError(f"build_lattice: feature_bounds must be finite (lo, hi) pairs, got {b}")
    eb = _elevated_bounds(b, scale)[:d]
    # Keys are rem0 + canonical with |rem0 - elevated| <= (d+1)/2 + (d+1) (the wrap-around
    # fix) and canonical in [-(d+1), d]; blur neighbours add at most d+1 more. A margin of
    # 4(d+1) on each side covers all of it with room to spare.
    margin = 4 * (d + 1) + 2
    lo = np.floor(eb[:, 0]) - margin
    hi = np.ceil(eb[:, 1]) + margin
    span = (hi - lo + 1).astype(np.int64)
    bits = float(np.sum(np.log2(span.astype(np.float64))))
    if bits > _MAX_PACKED_BITS:
        raise ValueError(
            f"build_lattice: feature_bounds span too large to pack lattice keys into int64 "
            f"({bits:.1f} bits > {_MAX_PACKED_BITS}); reduce the feature range"
        )
    strides = np.ones(d, np.int64)
    for i in range(1, d):
        strides[i] = strides[i - 1] * span[i - 1]
    return lo.astype(np.int64), strides


def build_lattice(
    features: jax.Array,
    feature_bounds: Sequence[tuple[float, float]],
    capacity: int | None = None,
) -> Lattice:
    """Builds the permutohedral lattice of a set of feature vectors.

    Args:
      features: (N, d) float32, already divided by the kernel widths (the filter is
        exp(-|f_i - f_j|^2 / 2)). Every value must lie in ``feature_bounds``.
      feature_bounds: static, d pairs (lo, hi) bounding each feature dimension; they fix the
        int64 packing of the lattice keys (a ValueError when it would not fit in 62 bits).
      capacity: static maximum number of lattice vertices; default N * (d+1), the exact upper
        bound. A smaller value saves memory and time; ``Lattice.overflow`` tells when it was
        too small.

    Returns:
      A ``Lattice``. Depends only on the features: build once, filter many times.
    """
    if features.ndim != 2:
        raise ValueError(f"build_lattice: features must be (N, d), got shape {features.shape}")
    n, d = features.shape
    if d < 1:
        raise ValueError("build_lattice: features need at least one dimension")
    if len(feature_bounds) != d:
        raise ValueError(
            f"build_lattice: feature_bounds has {len(feature_bounds)} pairs for d={d} features"
        )
    cap = n * (d + 1) if capacity is None else int(capacity)
    if cap < 1:
        raise ValueError(f"build_lattice: capacity must be >= 1, got {capacity}")
    features = features.astype(jnp.float32)
    scale = _scale_factors(d)
    lo, strides = _packing(feature_bounds, d, scale)
    dp1 = d + 1
    inv = np.float32(1.0) / np.float32(dp1)

    elevated = _elevate(features, scale)  # (N, d+1)
    # Closest remainder-0 point: round half to even, as _mm_cvtps_epi32 does.
    v = jnp.round(elevated * inv)
    rem0 = v * np.float32(dp1)
    total = v[:, 0]
    for i in range(1, dp1):
        total = total + v[:, i]

    # Ranks of the differential coordinates, ties broken as the C++ pair loop does:
    # for i < j, i outranks j unless d_i < d_j.
    diff = elevated - rem0
    lt = diff[:, :, None] < diff[:, None, :]
    le = diff[:, :, None] <= diff[:, None, :]
    upper = np.triu(np.ones((dp1, dp1), bool), 1)
    lower = np.tril(np.ones((dp1, dp1), bool), -1)
    rank = jnp.sum(jnp.where(upper, lt, jnp.where(lower, le, False)), axis=2).astype(jnp.int32)
    rank = rank + total.astype(jnp.int32)[:, None]
    fix = jnp.where(rank < 0, dp1, 0) - jnp.where(rank >= dp1, dp1, 0)
    rank = rank + fix
    rem0 = rem0 + fix.astype(jnp.float32)

    # Barycentric coordinates: position p = d - rank gets +v, p + 1 gets -v.
    vb = (elevated - rem0) * inv
    onehot = rank[:, :, None] == jnp.arange(dp1)[None, None, :]  # (N, i, k)
    vs = jnp.sum(jnp.where(onehot, vb[:, :, None], 0.0), axis=1)  # vs[k]: v of rank k
    bary = [None] * dp1
    for p in range(1, dp1):
        bary[p] = vs[:, d - p] - vs[:, d - p + 1]
    bary[0] = vs[:, d] + (np.float32(1.0) - vs[:, 0])
    weights = jnp.stack(bary, axis=1)  # (N, d+1)

    rem0_i = rem0[:, :d].astype(jnp.int32)
    rank_i = rank[:, :d]
    remainder = jnp.arange(dp1, dtype=jnp.int32)
    # key[n, r, i] = rem0[n, i] + canonical[r, rank[n, i]]
    keys = (
        rem0_i[:, None, :]
        + remainder[None, :, None]
        - dp1 * (rank_i[:, None, :] > (d - remainder)[None, :, None]).astype(jnp.int32)
    )  # (N, d+1, d)

    with jax.enable_x64(True):
        packed = jnp.sum((keys.astype(jnp.int64) - lo) * strides, axis=-1, dtype=jnp.int64).reshape(
            -1
        )
        m = packed.shape[0]
        sorted_keys, order = jax.lax.sort(
            (packed, jnp.arange(m, dtype=jnp.int32)), num_keys=1, is_stable=True
        )
        is_new = jnp.concatenate([jnp.ones((1,), bool), sorted_keys[1:] != sorted_keys[:-1]])
        vid = jnp.cumsum(is_new.astype(jnp.int32)) - 1  # vertex id in sorted-key order
        num_vertices = vid[-1] + 1
        vid = jnp.where(vid < cap, vid, cap)
        offsets = jnp.zeros((m,), jnp.int32).at[order].set(vid).reshape(n, dp1)
        sentinel = np.int64(1) << 62
        uniq = jnp.full((cap + 1,), sentinel, jnp.int64)
        uniq = uniq.at[jnp.where(is_new, vid, cap + 1)].set(sorted_keys, mode="drop")
        uniq = uniq.at[cap].set(sentinel)
        table = uniq[:cap]

        # Neighbour "n1" along direction j is key + delta_j (delta_j = -1 everywhere, +d at j
        # for j < d); one searchsorted over all directions at once. "n2" (key - delta_j) is
        # the inverse relation, so it is scattered from n1 instead of searched.
        deltas = np.full((dp1, d), -1, np.int64)
        deltas[np.arange(d), np.arange(d)] = d
        steps = deltas @ strides  # (d+1,) packed deltas
        query = uniq[None, :] + steps[:, None]  # (d+1, cap+1)
        pos = jnp.searchsorted(table, query.reshape(-1)).astype(jnp.int32).reshape(dp1, cap + 1)
        hit = (table[jnp.minimum(pos, cap - 1)] == query) & (uniq != sentinel)[None, :]
        n1 = jnp.where(hit, pos, cap)
        src = jnp.broadcast_to(jnp.arange(cap + 1, dtype=jnp.int32), (dp1, cap + 1))
        rows = jnp.broadcast_to(jnp.arange(dp1)[:, None], (dp1, cap + 1))
        n2 = jnp.full((dp1, cap + 1), cap, jnp.int32)
        n2 = n2.at[rows, jnp.where(hit, pos, cap + 1)].set(src, mode="drop")
        neighbors = jnp.stack([n1, n2], axis=1).astype(jnp.int32)  # (d+1, 2, cap+1)
        num_vertices = num_vertices.astype(jnp.int32)

    return Lattice(offsets, weights, neighbors, num_vertices)


def _alpha(d: int) -> np.float32:
    return np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-d))


def lattice_filter(lattice: Lattice, values: jax.Array) -> jax.Array:
    """Approximate Gaussian filtering of values at the lattice's points.

    Splat (barycentric scatter-add onto the vertices), blur ([0.5, 1, 0.5] along each of the
    d+1 lattice directions in order), slice (barycentric gather, times alpha), as
    ``Permutohedral::compute`` does. The result includes each point's own contribution.

    Args:
      lattice: from ``build_lattice`` for N points.
      values: (N, C) float32.

    Returns:
      (N, C) float32.
    """
    if values.ndim != 2 or values.shape[0] != lattice.offsets.shape[0]:
        raise ValueError(
            f"lattice_filter: values must be (N={lattice.offsets.shape[0]}, C), got {values.shape}"
        )
    values = values.astype(jnp.float32)
    n, c = values.shape
    d = lattice.dim
    cap = lattice.capacity
    contrib = lattice.weights[:, :, None] * values[:, None, :]  # (N, d+1, C)
    grid = jax.ops.segment_sum(
        contrib.reshape(n * (d + 1), c), lattice.offsets.reshape(-1), num_segments=cap + 1
    )
    grid = grid.at[cap].set(0.0)  # the "missing vertex" row stays zero
    # Indices are always in [0, cap]; mode="clip" gathers are markedly faster on CPU than
    # the default indexing.
    for j in range(d + 1):
        n1 = jnp.take(grid, lattice.neighbors[j, 0], axis=0, mode="clip")
        n2 = jnp.take(grid, lattice.neighbors[j, 1], axis=0, mode="clip")
        grid = grid + np.float32(0.5) * (n1 + n2)
        grid = grid.at[cap].set(0.0)
    alpha = _alpha(d)
    gathered = jnp.take(grid, lattice.offsets, axis=0, mode="clip")  # (N, d+1, C)
    if c <= 2:
        # Permutohedral::seqCompute: out += (w * value) * alpha
        terms = [(lattice.weights[:, j, None] * gathered[:, j]) * alpha for j in range(d + 1)]
    else:
        # Permutohedral::sseCompute: out += (w * alpha) * value
        wa = lattice.weights * alpha
        terms = [wa[:, j, None] * gathered[:, j] for j in range(d + 1)]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out
