"""Float64 NumPy transcription of HAC and of the coverage tree (docs/recipe.md, Stage 1, steps
2 and 4).

HAC, as transcribed here: every patch of an (h, w, D) map starts as a region with feature sum
s = f and direction a = s / max(|s|, 1e-12); 4-adjacent regions are joined by an edge of
similarity a_r . a_t. The edge of largest similarity is merged again and again (sums add, the
direction comes from the new sum, the neighbours are the union of both regions'), down to one
region. The partition for a threshold θ is the state just before the first merge whose
similarity is below θ (similarities are not monotone along the sequence, so this is not "every
merge at or above θ"). The coverage tree is `reference_hierarchy`'s docstring.

Written for clarity, not speed, as the oracle of tests/discovery/test_hac.py and
test_hierarchy.py; it shares no code with hassod_jax. The greedy loop uses a heap with lazy
deletion only so that a 60x60 map takes seconds; its decisions are exactly the rule's: take the
edge of largest similarity, merge, recompute the similarities of the merged region.
Region ids follow the same convention as hassod_jax (a region is named by its smallest patch
index), so merge sequences can be compared step by step.
"""

from __future__ import annotations

import heapq

import numpy as np


def _direction(s: np.ndarray) -> np.ndarray:
    return s / max(np.linalg.norm(s), 1e-12)


def _sim(a: np.ndarray, b: np.ndarray) -> float:
    # Clipped to [-1, 1] like hassod_jax (θ > 1: no merge, θ <= -1: merge all).
    return float(np.clip(np.dot(a, b), -1.0, 1.0))


def reference_merge_sequence(features: np.ndarray):
    """All merges of HAC's greedy loop (run down to one region), in float64.

    Args:
      features: (h, w, D) array.

    Returns:
      (merges, margins): merges is a list of (keep, gone, sim) with keep < gone region ids;
      margins[i] is the gap between the best and the second-best distinct region pair at
      step i (inf when there is only one pair).
    """
    h, w, d = features.shape
    n = h * w
    f = np.asarray(features, np.float64).reshape(n, d)
    sums = {i: f[i].copy() for i in range(n)}
    dirs = {i: _direction(f[i]) for i in range(n)}
    nbrs = {i: set() for i in range(n)}
    for y in range(h):
        for x in range(w):
            i = y * w + x
            if x + 1 < w:
                nbrs[i].add(i + 1)
                nbrs[i + 1].add(i)
            if y + 1 < h:
                nbrs[i].add(i + w)
                nbrs[i + w].add(i)
    version = dict.fromkeys(range(n), 0)
    heap = []

    def push(r, t):
        a, b = min(r, t), max(r, t)
        heapq.heappush(heap, (-_sim(dirs[a], dirs[b]), a, b, version[a], version[b]))

    def valid(entry):
        _, a, b, va, vb = entry
        return a in sums and b in sums and version[a] == va and version[b] == vb

    for i in range(n):
        for j in nbrs[i]:
            if i < j:
                push(i, j)
    merges, margins = [], []
    while len(sums) > 1:
        while not valid(heap[0]):
            heapq.heappop(heap)
        neg_sim, r, t, _, _ = heapq.heappop(heap)
        while heap and not valid(heap[0]):
            heapq.heappop(heap)
        margins.append(heap[0][0] - neg_sim if heap else np.inf)
        merges.append((r, t, -neg_sim))
        # Merge t into r: sums add, direction from the new sum, neighbours are the union.
        sums[r] = sums[r] + sums.pop(t)
        dirs[r] = _direction(sums[r])
        del dirs[t]
        union = (nbrs[r] | nbrs.pop(t)) - {r, t}
        for x in union:
            nbrs[x].discard(t)
            nbrs[x].add(r)
        nbrs[r] = union
        version[r] += 1
        for x in union:
            push(r, x)
    return merges, margins


def reference_cut(merges, n: int, theta: float) -> int:
    """Number of merges kept for θ: those before the first merge with similarity < θ."""
    for i, (_, _, s) in enumerate(merges):
        if s < theta:
            return i
    return len(merges)


def reference_masks(merges, h: int, w: int, n_kept: int) -> list[np.ndarray]:
    """The (h, w) bool masks of the partition after the first n_kept merges."""
    label = np.arange(h * w)
    for r, t, _ in merges[:n_kept]:
        label[label == t] = r
    return [(label == k).reshape(h, w) for k in np.unique(label)]


def reference_partitions(features: np.ndarray, thresholds) -> list[list[np.ndarray]]:
    """HAC end to end: one list of region masks per threshold, in the given order."""
    h, w, _ = features.shape
    merges, _ = reference_merge_sequence(features)
    return [reference_masks(merges, h, w, reference_cut(merges, h * w, t)) for t in thresholds]


def reference_hierarchy(masks: np.ndarray, coverage: float = 0.9):
    """The coverage tree with explicit loops: (levels, parents) for (N, H, W) bool masks.

    cov(a in b) = |a ∩ b| / |a| in float64 (0 for an empty a). Parent of a: among b != a
    with cov(a in b) >= θ and cov(b in a) < θ, the smallest area, first index on ties.
    Levels: roots 0, children of roots 1, deeper 2.
    """
    n = masks.shape[0]
    flat = masks.reshape(n, -1).astype(bool)
    area = flat.sum(1)

    def cov(a, b):
        return np.logical_and(flat[a], flat[b]).sum() / area[a] if area[a] > 0 else 0.0

    parents = np.full(n, -1, np.int64)
    for a in range(n):
        best = -1
        for b in range(n):
            if b == a:
                continue
            if cov(a, b) >= coverage and cov(b, a) < coverage:
                if best < 0 or area[b] < area[best]:
                    best = b
        parents[a] = best
    levels = np.zeros(n, np.int64)
    for a in range(n):
        depth, p = 0, parents[a]
        while p >= 0:
            depth += 1
            p = parents[p]
        levels[a] = min(depth, 2)
    return levels, parents


def dino_like_features(rng, b, h, w, d):
    """Piecewise-constant directions plus noise: region structure like real DINO keys."""
    k = 12
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(b):
        seeds = rng.uniform(0, [h, w], size=(k, 2))
        lab = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, -1)
        out.append(rng.standard_normal((k, d))[lab] + 0.7 * rng.standard_normal((h, w, d)))
    return np.stack(out).astype(np.float32)
