"""The whole / part / subpart tree of an image's masks by coverage, HASSOD_SPEC §1.4.

cov(a in b) = |a ∩ b| / |a| (0 for an empty a). The parent of a is, among masks b != a with
cov(a in b) >= θ and cov(b in a) < θ, the one with the smallest area (first index on ties);
none makes a a root. Levels: roots 0, children of roots 1, all deeper descendants 2.

All pairwise intersections come from one matrix product of the flattened 0/1 masks in
float32, which is exact while a mask has fewer than 2**24 pixels (all partial sums are
integers below 2**24). On the host, runs of consecutive pixels (row-major) that belong to
exactly the same masks are first collapsed into one weighted column: masks are blobs, so
this shrinks the product several-fold and changes no count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_EXACT_PIXELS = 2**24


def _check_masks(masks, name: str = "masks") -> None:
    shape = getattr(masks, "shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"{name}: expected an (N, H, W) array, got shape {shape}")
    if shape[1] * shape[2] >= _EXACT_PIXELS:
        raise ValueError(
            f"{name}: {shape[1]}x{shape[2]} masks have 2**24 pixels or more; the float32 "
            "intersection counts would not be exact"
        )


def _check_coverage(coverage) -> None:
    if not 0.0 < float(coverage) <= 1.0:
        raise ValueError(f"coverage: expected a number in (0, 1], got {coverage!r}")


@jax.jit
def _intersections(masks: jax.Array) -> jax.Array:
    flat = masks.reshape(masks.shape[0], -1).astype(jnp.float32)
    return jnp.dot(flat, flat.T, precision=jax.lax.Precision.HIGHEST)


def _intersections_host(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, N) int64 |a ∩ b|, via run-collapsed columns and one sgemm."""
    n = masks.shape[0]
    flat = masks.reshape(n, -1)
    change = np.empty(flat.shape[1], bool)
    change[0] = True
    np.any(flat[:, 1:] != flat[:, :-1], axis=0, out=change[1:])
    starts = np.flatnonzero(change)
    run_length = np.diff(np.append(starts, flat.shape[1])).astype(np.float32)
    cols = flat[:, starts].astype(np.float32)
    return np.rint((cols * run_length) @ cols.T).astype(np.int64)


def _levels_from_parents(parents, valid, xp):
    """Level 0 for roots, 1 when the parent is a root, else 2; -1 where not valid."""
    is_root = parents < 0
    parent_is_root = xp.where(is_root, False, is_root[xp.maximum(parents, 0)])
    levels = xp.where(is_root, 0, xp.where(parent_is_root, 1, 2)).astype(xp.int32)
    return xp.where(valid, levels, -1).astype(xp.int32)


def _parents_from_intersections(inter, area, valid, coverage, xp, dtype):
    n = inter.shape[0]
    inter = inter.astype(dtype)
    area_f = area.astype(dtype)
    cov = xp.where(area_f[:, None] > 0, inter / xp.maximum(area_f[:, None], 1), 0)
    inside = cov >= coverage  # inside[a, b]: a is covered by b
    cand = inside & ~inside.T & ~xp.eye(n, dtype=bool) & valid[None, :] & valid[:, None]
    big = xp.asarray(np.iinfo(np.int32).max, dtype=xp.int64 if xp is np else xp.int32)
    keyed = xp.where(cand, area[None, :].astype(big.dtype), big)
    best = xp.argmin(keyed, axis=1)  # argmin takes the first index among equal areas
    return xp.where(cand.any(axis=1), best, -1).astype(xp.int32)


def hierarchy_levels(masks, coverage: float = 0.9):
    """Hierarchy levels and parents of an image's masks (HASSOD_SPEC §1.4).

    Args:
      masks: (N, H, W) bool (or 0/1) array, N >= 0.
      coverage: θ_cover in (0, 1]; 0.9 in stage 1, 0.75 for the Mean Teacher.

    Returns:
      (levels, parents): (N,) int32 NumPy arrays; levels in {0, 1, 2}; parents the index of
      each mask's parent, -1 for roots. Coverages are compared in float64, exactly as a
      NumPy transcription of the spec would.
    """
    _check_masks(masks)
    _check_coverage(coverage)
    n = masks.shape[0]
    if n == 0:
        return np.zeros((0,), np.int32), np.zeros((0,), np.int32)
    masks = np.asarray(masks).astype(bool)
    inter = _intersections_host(masks)
    area = np.diagonal(inter).copy()
    valid = np.ones((n,), bool)
    parents = _parents_from_intersections(inter, area, valid, coverage, np, np.float64)
    return _levels_from_parents(parents, valid, np), parents


def hierarchy_levels_padded(masks: jax.Array, valid: jax.Array, coverage: float):
    """Jit-able `hierarchy_levels` over a padded, fixed-size set of masks.

    Args:
      masks: (N, H, W) bool or 0/1 array with a static N.
      valid: (N,) bool, which masks exist; the others take no part.
      coverage: θ_cover (a Python float or a traced scalar).

    Returns:
      (levels, parents): (N,) int32; -1 for both where not valid. Coverages are compared in
      float32: identical to `hierarchy_levels` unless a coverage lies within one float32 ulp
      of θ without being equal to it (impossible for θ in {0.9, 0.75} below 2**22 pixels).
    """
    _check_masks(masks)
    inter = _intersections(masks).astype(jnp.int32)
    area = jnp.diagonal(inter)
    valid = jnp.asarray(valid, bool)
    parents = _parents_from_intersections(inter, area, valid, coverage, jnp, jnp.float32)
    parents = jnp.where(valid, parents, -1)
    return _levels_from_parents(parents, valid, jnp), parents
