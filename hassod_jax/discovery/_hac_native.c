/* Host (CPU) merge sequence of HASSOD's hierarchical adaptive clustering (docs/recipe.md,
 * Stage 1, step 2).
 *
 * The same greedy merge as hac.py's jit-compiled loop, for one (h, w, D) float32 feature map,
 * written as the classic sequential algorithm: a binary max-heap of edge similarities with
 * lazy deletion (an entry is stale once either end has been merged since it was pushed; the
 * version-stamp scheme of the float64 oracle in tests/discovery/hac_reference.py and of
 * textbook agglomerative clustering), per-region neighbour lists, and for each merge only the
 * merged region's distinct neighbours re-scored (one D-long dot product each).
 *
 * Why it exists: XLA:CPU runs the jit loop's O(edges) vector work per merge as separate
 * kernels (about 25 us a merge before any feature work) and its row gathers at a few GB/s;
 * this loop does O(neighbours * D) work per merge and streams the rows, about 4x faster on
 * a 60x60x768 map. Results: region ids are the smallest patch index of each region; merge i
 * joins gone[i] into keep[i] (keep < gone) at similarity sim[i]. Exact ties are broken by the
 * smaller (keep, gone) pair. Float32 sums and dot products, as the jit path.
 *
 * Memory: the (N, D) sums, neighbour lists (O(edges) in all) and the heap, which is compacted
 * (stale entries dropped) instead of growing past 8 N entries.
 *
 * Python API (the GIL is released while merging, so several maps can run in threads):
 *   merge_sequence(features, h, w, d, keep, gone, sim) -> None
 *     features: C-contiguous float32 buffer of h*w*d values (row-major (h, w, D));
 *     keep, gone: writable int32 buffers of h*w - 1 values; sim: writable float32 buffer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  float s;
  int32_t a, b;   /* region ids, a < b */
  uint32_t va, vb; /* versions of a and b when pushed */
} Entry;

typedef struct {
  int32_t *v;
  int32_t n, cap;
} List;

typedef struct {
  Entry *e;
  int64_t n, cap;
} Heap;

/* x comes out of the heap before y: larger similarity, then smaller (a, b). */
static int before(const Entry *x, const Entry *y) {
  if (x->s != y->s) return x->s > y->s;
  if (x->a != y->a) return x->a < y->a;
  return x->b < y->b;
}

static void sift_down(Entry *h, int64_t n, int64_t i, Entry item) {
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && before(&h[c + 1], &h[c])) c++;
    if (!before(&h[c], &item)) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = item;
}

static int heap_push(Heap *h, Entry item) {
  if (h->n == h->cap) {
    int64_t cap = 2 * h->cap;
    Entry *e = (Entry *)realloc(h->e, (size_t)cap * sizeof(Entry));
    if (!e) return -1;
    h->e = e;
    h->cap = cap;
  }
  int64_t i = h->n++;
  while (i > 0) {
    int64_t p = (i - 1) >> 1;
    if (!before(&item, &h->e[p])) break;
    h->e[i] = h->e[p];
    i = p;
  }
  h->e[i] = item;
  return 0;
}

static Entry heap_pop(Heap *h) {
  Entry top = h->e[0];
  Entry last = h->e[--h->n];
  if (h->n > 0) sift_down(h->e, h->n, 0, last);
  return top;
}

static int stale(const Entry *x, const char *alive, const uint32_t *ver) {
  return !alive[x->a] || !alive[x->b] || ver[x->a] != x->va || ver[x->b] != x->vb;
}

/* Drops stale entries and re-heapifies, so the heap stays O(live edges) on large maps. */
static void heap_compact(Heap *h, const char *alive, const uint32_t *ver) {
  int64_t m = 0;
  for (int64_t i = 0; i < h->n; i++)
    if (!stale(&h->e[i], alive, ver)) h->e[m++] = h->e[i];
  h->n = m;
  for (int64_t i = m / 2 - 1; i >= 0; i--) sift_down(h->e, m, i, h->e[i]);
}

static int list_add(List *l, int32_t x) {
  if (l->n == l->cap) {
    int32_t cap = l->cap ? 2 * l->cap : 8;
    int32_t *v = (int32_t *)realloc(l->v, (size_t)cap * sizeof(int32_t));
    if (!v) return -1;
    l->v = v;
    l->cap = cap;
  }
  l->v[l->n++] = x;
  return 0;
}

/* Eight independent partial sums: the compiler vectorises this without -ffast-math. */
static float dot(const float *x, const float *y, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8)
    for (int k = 0; k < 8; k++) acc[k] += x[j + k] * y[j + k];
  float s = 0;
  for (; j < d; j++) s += x[j] * y[j];
  for (int k = 0; k < 8; k++) s += acc[k];
  return s;
}

static float inv_norm(const float *x, int64_t d) {
  float q = sqrtf(dot(x, x, d));
  return 1.0f / (q > 1e-12f ? q : 1e-12f);
}

/* Clipping keeps θ > 1 (no merge) and θ <= -1 (merge all) exact despite rounding. */
static float clip1(float v) { return v > 1.0f ? 1.0f : (v < -1.0f ? -1.0f : v); }

static Entry make_entry(int32_t r, int32_t x, float s, const uint32_t *ver) {
  Entry e;
  e.s = s;
  e.a = r < x ? r : x;
  e.b = r < x ? x : r;
  e.va = ver[e.a];
  e.vb = ver[e.b];
  return e;
}

/* Returns 0, or -1 when memory ran out. */
static int merge_all(const float *feat, int64_t h, int64_t w, int64_t d, int32_t *keep,
                     int32_t *gone, float *sim) {
  int64_t n = h * w;
  int rc = -1;
  float *sums = (float *)malloc((size_t)(n * d) * sizeof(float));
  float *inv = (float *)malloc((size_t)n * sizeof(float));
  uint32_t *ver = (uint32_t *)calloc((size_t)n, sizeof(uint32_t));
  int64_t *stamp = (int64_t *)malloc((size_t)n * sizeof(int64_t));
  int32_t *found = (int32_t *)malloc((size_t)n * sizeof(int32_t));
  char *alive = (char *)malloc((size_t)n);
  List *nb = (List *)calloc((size_t)n, sizeof(List));
  Heap heap = {NULL, 0, 4 * n + 16};
  heap.e = (Entry *)malloc((size_t)heap.cap * sizeof(Entry));
  if (!sums || !inv || !ver || !stamp || !found || !alive || !nb || !heap.e) goto done;

  memcpy(sums, feat, (size_t)(n * d) * sizeof(float));
  for (int64_t i = 0; i < n; i++) {
    inv[i] = inv_norm(sums + i * d, d);
    stamp[i] = -1;
    alive[i] = 1;
  }
  for (int64_t y = 0; y < h; y++) {
    for (int64_t x = 0; x < w; x++) {
      int32_t p = (int32_t)(y * w + x);
      int32_t right = x + 1 < w ? p + 1 : -1;
      int32_t down = y + 1 < h ? (int32_t)(p + w) : -1;
      int32_t qs[2] = {right, down};
      for (int k = 0; k < 2; k++) {
        int32_t q = qs[k];
        if (q < 0) continue;
        if (list_add(&nb[p], q) || list_add(&nb[q], p)) goto done;
        float s = clip1(dot(sums + p * d, sums + (int64_t)q * d, d) * inv[p] * inv[q]);
        if (heap_push(&heap, make_entry(p, q, s, ver))) goto done;
      }
    }
  }

  for (int64_t i = 0; i + 1 < n; i++) {
    Entry e;
    do {
      e = heap_pop(&heap); /* never empty: the grid graph is connected */
    } while (stale(&e, alive, ver));
    int32_t r = e.a, t = e.b;
    keep[i] = r;
    gone[i] = t;
    sim[i] = e.s;
    float *sr = sums + (int64_t)r * d;
    const float *st = sums + (int64_t)t * d;
    for (int64_t j = 0; j < d; j++) sr[j] += st[j];
    inv[r] = inv_norm(sr, d);
    alive[t] = 0;
    ver[r]++;
    /* Distinct live neighbours of r ∪ t. */
    int32_t m = 0;
    stamp[r] = stamp[t] = i;
    for (int side = 0; side < 2; side++) {
      const List *l = &nb[side ? t : r];
      for (int32_t k = 0; k < l->n; k++) {
        int32_t x = l->v[k];
        if (!alive[x] || stamp[x] == i) continue;
        stamp[x] = i;
        found[m++] = x;
      }
    }
    free(nb[t].v);
    nb[t].v = NULL;
    nb[t].n = nb[t].cap = 0;
    nb[r].n = 0;
    if (heap.n + m > heap.cap && heap.cap >= 8 * n) heap_compact(&heap, alive, ver);
    for (int32_t k = 0; k < m; k++) {
      int32_t x = found[k];
      if (list_add(&nb[r], x)) goto done;
      /* x's own list: drop dead ids (t among them) and name r once. */
      List *lx = &nb[x];
      int32_t o = 0, has_r = 0;
      for (int32_t z = 0; z < lx->n; z++) {
        int32_t y = lx->v[z];
        if (!alive[y] || (y == r && has_r)) continue;
        has_r |= y == r;
        lx->v[o++] = y;
      }
      lx->n = o;
      if (!has_r && list_add(lx, r)) goto done;
      float s = clip1(dot(sr, sums + (int64_t)x * d, d) * inv[r] * inv[x]);
      if (heap_push(&heap, make_entry(r, x, s, ver))) goto done;
    }
  }
  rc = 0;

done:
  if (nb)
    for (int64_t i = 0; i < n; i++) free(nb[i].v);
  free(nb);
  free(heap.e);
  free(alive);
  free(found);
  free(stamp);
  free(ver);
  free(inv);
  free(sums);
  return rc;
}

static PyObject *py_merge_sequence(PyObject *self, PyObject *args) {
  (void)self;
  Py_buffer f, k, g, s;
  Py_ssize_t h, w, d;
  if (!PyArg_ParseTuple(args, "y*nnnw*w*w*", &f, &h, &w, &d, &k, &g, &s)) return NULL;
  PyObject *result = NULL;
  Py_ssize_t n = h * w;
  if (h < 1 || w < 1 || d < 1 || n > INT32_MAX) {
    PyErr_Format(PyExc_ValueError, "merge_sequence: bad shape (%zd, %zd, %zd)", h, w, d);
  } else if (f.len != (Py_ssize_t)(n * d * sizeof(float)) ||
             k.len != (Py_ssize_t)((n - 1) * sizeof(int32_t)) || g.len != k.len ||
             s.len != (Py_ssize_t)((n - 1) * sizeof(float))) {
    PyErr_SetString(PyExc_ValueError, "merge_sequence: buffer sizes do not match the shape");
  } else {
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = merge_all((const float *)f.buf, h, w, d, (int32_t *)k.buf, (int32_t *)g.buf,
                   (float *)s.buf);
    Py_END_ALLOW_THREADS
    if (rc) {
      PyErr_NoMemory();
    } else {
      Py_INCREF(Py_None);
      result = Py_None;
    }
  }
  PyBuffer_Release(&f);
  PyBuffer_Release(&k);
  PyBuffer_Release(&g);
  PyBuffer_Release(&s);
  return result;
}

static PyMethodDef methods[] = {
    {"merge_sequence", py_merge_sequence, METH_VARARGS,
     "merge_sequence(features, h, w, d, keep, gone, sim): the HAC merge sequence of one map."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hac_native", "Host merge sequence of HASSOD's HAC (see hac.py).",
    -1, methods, NULL, NULL, NULL, NULL};

/* Bumped whenever the Python API above changes; hac.py refuses a stale build. */
#define HAC_NATIVE_VERSION 1

PyMODINIT_FUNC PyInit__hac_native(void) {
  PyObject *m = PyModule_Create(&module);
  if (m && PyModule_AddIntConstant(m, "VERSION", HAC_NATIVE_VERSION)) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
