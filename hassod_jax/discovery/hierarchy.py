"""The whole / part / subpart tree of an image's masks by coverage (docs/recipe.md, Stage 1,
step 4).

cov(a in b) = |a ∩ b| / |a| (0 for an empty a). The parent of a is, among masks b != a with
cov(a in b) >= θ and cov(b in a) < θ, the one with the smallest area (first index on ties);
none makes a a root. Levels: roots 0, children of roots 1, all deeper descendants 2.

All pairwise intersections come from one matrix product of 0/1 membership in float32, which
is exact while a mask has fewer than 2**24 pixels (all partial sums are integers below
2**24). On the host, pixels that belong to exactly the same set of masks (an "atom") are
first collapsed into one weighted column: 300 masks pooled from 3 partitions of 480x640
pixels have about 3,000 atoms, each in about one mask per partition, so the counts are a
small sparse sum and the cost is mostly one pass that packs the membership into bits (see
`_intersections_host`; 300 masks: ~25 ms against ~750 ms for one product over pixel runs).
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


_PIXEL_CHUNK = 1 << 16


def _intersections(masks: jax.Array, chunk: int = _PIXEL_CHUNK) -> jax.Array:
    """(N, H, W) 0/1 masks -> (N, N) float32 pairwise intersection counts, exact.

    0/1 is exact in bfloat16 and every partial sum is an integer below 2**24 (`_check_masks`),
    so bfloat16 products accumulated in float32 are exact on every backend (a TPU's default
    matmul precision included). Above `chunk` pixels the product runs over pixel chunks in a
    loop, so no (N, H * W) copy wider than the masks is ever held (1000 teacher masks at
    800 x 1344 are 1.1 GB as bool, 4.3 GB as float32)."""
    n = masks.shape[0]
    flat = masks.reshape(n, -1)
    p = flat.shape[1]

    def gram(x):
        x = x.astype(jnp.bfloat16)
        return jax.lax.dot_general(x, x, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    if p <= chunk:
        return gram(flat)
    steps, tail = divmod(p, chunk)
    acc = gram(flat[:, steps * chunk:]) if tail else jnp.zeros((n, n), jnp.float32)
    return jax.lax.fori_loop(
        0, steps,
        lambda i, a: a + gram(jax.lax.dynamic_slice_in_dim(flat, i * chunk, chunk, axis=1)),
        acc,
    )


def _pack_membership(flat: np.ndarray) -> np.ndarray:
    """(N, P) bool -> (ceil(N/8), P) uint8: bit k of byte [g, p] is mask 8g+k at pixel p.

    Eight masks at a time, as whole uint64 words that hold eight pixels' 0/1 bytes: shifting
    a word left by k < 8 moves every pixel's 0/1 to bit k of its own byte, so one shift and
    one OR per mask handle eight pixels (no bit crosses into the next pixel's byte).
    """
    n, p = flat.shape
    groups = -(-n // 8)
    words = -(-p // 8)
    if p % 8:
        flat = np.pad(flat, ((0, 0), (0, words * 8 - p)))
    src = flat.view(np.uint64)  # (N, words): bool is one byte 0/1
    out = np.zeros((groups, words), np.uint64)
    tmp = np.empty((words,), np.uint64)
    for i in range(n):
        np.left_shift(src[i], np.uint64(i % 8), out=tmp)
        np.bitwise_or(out[i // 8], tmp, out=out[i // 8])
    return out.view(np.uint8)[:, :p]


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea & Flood 2014), elementwise on uint64, wrapping:
    every input bit affects every output bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _atom_hash(keys: np.ndarray) -> np.ndarray:
    """(K, W) uint64 membership words -> (K,) uint64 hash: the sum of the mixed words, each
    offset by its position first, modulo 2**64. Equal keys give equal hashes; unequal keys
    collide with probability about 2**-64 per pair, and the caller checks for that exactly.

    (A plain weighted sum of the raw words is not enough: multiplying by an odd number never
    moves a bit down, so bit 63 of any word adds the same 2**63 and keys that swap their top
    bits between words collide, which masks of 8 * 8k + 7 indices do all the time.)
    """
    offsets = _mix64(np.arange(1, keys.shape[1] + 1, dtype=np.uint64))
    with np.errstate(over="ignore"):
        return _mix64(keys + offsets).sum(axis=1, dtype=np.uint64)  # wraps modulo 2**64


def _intersections_host(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, N) int64 |a ∩ b| over membership atoms.

    Pixels that belong to exactly the same masks (an "atom") contribute alike to every
    count, so |a ∩ b| = sum over atoms of count(atom) [a in atom] [b in atom]. Membership is
    packed into bits (N/8 bytes per pixel); runs of equal consecutive pixels (masks are
    blobs) and then equal runs are merged into atoms by a 64-bit hash of the packed bytes,
    checked exactly afterwards (a collision falls back to an exact unique); the counts are
    then summed over the atoms (`_atom_products`).
    """
    n = masks.shape[0]
    flat = np.ascontiguousarray(masks, dtype=bool).reshape(n, -1)  # bytes 0/1, row-major
    packed = _pack_membership(flat)  # (G, P) uint8
    g, p = packed.shape
    change = np.empty((p,), bool)
    change[0] = True
    np.any(packed[:, 1:] != packed[:, :-1], axis=0, out=change[1:])
    starts = np.flatnonzero(change)
    run_length = np.diff(np.append(starts, p))
    # One row of 8-byte words per run: the run's membership bits.
    g8 = -(-g // 8) * 8
    rows = np.zeros((starts.shape[0], g8), np.uint8)
    rows[:, :g] = packed[:, starts].T
    keys = rows.view(np.uint64)  # (K, g8 / 8)
    _, first, inverse = np.unique(_atom_hash(keys), return_index=True, return_inverse=True)
    if not np.array_equal(keys[first[inverse]], keys):  # a hash collision: exact, slower
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse, weights=run_length, minlength=first.shape[0])
    atoms = np.unpackbits(rows[first, :g], axis=1, bitorder="little")[:, :n]  # (A, N) 0/1
    return _atom_products(atoms, counts.astype(np.int64))


@jax.jit
def _weighted_gram(atoms: jax.Array, counts: jax.Array) -> jax.Array:
    a = atoms.astype(jnp.float32)
    weighted = a.T * counts.astype(jnp.float32)
    return jnp.dot(weighted, a, precision=jax.lax.Precision.HIGHEST)


def _dense_atom_products(atoms: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The dense form of `_atom_products`: one float32 product, in XLA.

    XLA rather than NumPy's BLAS: with the cores shared, the multithreaded BLAS spins and
    was 10x slower (600 ms against 65 ms for 28k atoms x 300 masks). Shapes are padded to
    buckets (atoms to a power of two, masks to a multiple of 32; zero rows and columns add
    nothing) so that few programs are compiled.
    """
    n_atoms, n = atoms.shape
    rows = 1 << max(10, (n_atoms - 1).bit_length())
    cols = -(-n // 32) * 32
    padded = np.zeros((rows, cols), np.uint8)
    padded[:n_atoms, :n] = atoms
    weights = np.zeros((rows,), np.int32)
    weights[:n_atoms] = counts
    out = np.asarray(_weighted_gram(padded, weights))[:n, :n]
    return np.rint(out).astype(np.int64)


def _atom_products(atoms: np.ndarray, counts: np.ndarray, dense: bool | None = None) -> np.ndarray:
    """(A, N) 0/1 membership of A atoms, (A,) int64 pixel counts -> (N, N) int64 A^T diag A.

    Sparse when the atoms have few members (a pool from a few partitions: a pixel lies in
    about one mask per partition): every pair of members of an atom is one weighted count,
    sum_a k_a**2 entries in all. Otherwise one float32 matrix product, exact because all
    partial sums are integers below 2**24 (the caller checks the pixel count). `dense`
    forces a form (tests); None chooses.
    """
    n_atoms, n = atoms.shape
    atom_of, member = np.nonzero(atoms)  # sorted by atom, then mask
    size = np.bincount(atom_of, minlength=n_atoms)
    pairs = int(np.sum(size.astype(np.int64) ** 2))
    if dense is None:  # the product costs about N*N*A flops, the sparse form ~1000x per pair
        dense = pairs * 1000 > n * n * n_atoms
    if dense:
        return _dense_atom_products(atoms, counts)
    # Entry j (atom a, mask i) pairs with every entry of atom a: repeat it size[a] times and
    # walk the atom's entries alongside.
    first_entry = np.cumsum(size) - size
    reps = size[atom_of]
    left = np.repeat(np.arange(atom_of.shape[0]), reps)
    group_start = np.repeat(np.cumsum(reps) - reps, reps)
    right = first_entry[atom_of[left]] + (np.arange(left.shape[0]) - group_start)
    key = member[left] * n + member[right]
    out = np.bincount(key, weights=counts[atom_of[left]], minlength=n * n)
    return np.rint(out).astype(np.int64).reshape(n, n)


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
    """Hierarchy levels and parents of an image's masks (the coverage tree of the module docstring).

    Args:
      masks: (N, H, W) bool (or 0/1) array, N >= 0.
      coverage: θ_cover in (0, 1]; 0.9 in stage 1, 0.75 for the Mean Teacher.

    Returns:
      (levels, parents): (N,) int32 NumPy arrays; levels in {0, 1, 2}; parents the index of
      each mask's parent, -1 for roots. Coverages are compared in float64, exactly as a
      float64 NumPy transcription of the rule above would.
    """
    _check_masks(masks)
    _check_coverage(coverage)
    n = masks.shape[0]
    if n == 0:
        return np.zeros((0,), np.int32), np.zeros((0,), np.int32)
    masks = np.ascontiguousarray(masks, dtype=bool)  # no copy for C-ordered bool masks
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
