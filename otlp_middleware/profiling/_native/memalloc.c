/*
 * otlp_middleware.profiling._memalloc: a sampling allocator hook for CPython 3.10 - 3.13.
 *
 * What it does
 *   PyMem_SetAllocator wraps the MEM and OBJ domains (the ones Python objects and buffers use).
 *   Each wrapper calls the original allocator and adds no header, so a block allocated while
 *   hooked stays valid for the original allocator after unhooking. The RAW domain is left
 *   alone: it is called without the GIL, and everything here relies on the GIL.
 *
 * Sampling by bytes (the tcmalloc / Go runtime scheme)
 *   A countdown of bytes is drawn from an exponential distribution with mean `rate`. Each
 *   allocation of size s (s >= min_size) consumes s bytes of it; the allocation in which the
 *   countdown runs out is sampled and a fresh countdown is drawn. Because the exponential is
 *   memoryless, every allocation is sampled independently with probability 1 - exp(-s/rate),
 *   whatever other threads allocate, so 1 / (1 - exp(-s/rate)) is its unbiased weight (the
 *   Python side applies it). rate <= 1 samples every allocation. The hot path is a compare
 *   and a subtraction; the countdown is shared by all threads and protected by the GIL.
 *
 * What a sample holds
 *   The allocating thread's Python stack (code object + line per frame, leaf first, at most
 *   max_depth frames) read through the public frame API, the thread id, and the value of the
 *   ContextVar the Python side passed to install(): a tuple of open scope ids, so asyncio tasks
 *   on one loop and work offloaded to threads with a copied context are told apart. Nothing is
 *   recorded when the tuple is empty or unset. While recording, a thread-local flag keeps the
 *   allocations made by the recording itself from being sampled, the cyclic GC is paused (so no
 *   finalizer runs inside an allocator call: frame objects are GC objects on 3.11+) and the
 *   thread's exception state is saved and restored.
 *
 * In-use tracking
 *   With track, each sampled block is entered, by address, in a bounded open-addressing table
 *   (linear probing, backward-shift deletion); free and realloc remove it, so a sample is "in
 *   use" while its (ptr, serial) pair is still in the table. A realloc counts as a free of the
 *   old block and an allocation of the new size. Every free probes the table, so it is kept
 *   small: the Python side untracks blocks that no open scope can report any more. Without
 *   tracking, free is not wrapped at all.
 *
 * Samples wait in a bounded buffer until drain() hands them to Python; when it is full,
 * new samples are dropped and counted. Everything here runs with the GIL held.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if PY_VERSION_HEX < 0x030A0000
#error "otlp_middleware._memalloc needs Python >= 3.10"
#endif
#ifdef Py_GIL_DISABLED
#error "the sampling allocator hook relies on the GIL; free-threaded builds use tracemalloc"
#endif

#define MAX_DEPTH_LIMIT 512
#define MAX_PENDING 65536
#define TABLE_MIN_BITS 6 /* 64 slots, 1 KiB: stays in L1 while few blocks are tracked */
#define TABLE_MAX_BITS 22

typedef struct {
    PyObject *code; /* strong reference */
    int line;
} mframe_t;

typedef struct {
    uint64_t serial;
    uintptr_t ptr;
    size_t size;
    uint64_t rate;
    unsigned long tid;
    PyObject *token; /* strong reference: the ContextVar's value */
    int depth;
    int truncated;
    mframe_t frames[];
} msample_t;

typedef struct {
    uintptr_t ptr; /* 0 = empty slot */
    uint64_t serial;
} slot_t;

static int g_installed = 0; /* our wrappers are in the allocator chain */
static int g_active = 0;    /* the wrappers sample (else they only forward) */

static uint64_t g_rate = 524288;
static size_t g_min_size = 0;
static int g_max_depth = 64;
static int g_track = 1;
static int64_t g_countdown = INT64_MAX;
static uint64_t g_rng = 0;
static uint64_t g_serial = 0;
static PyObject *g_var = NULL;
static PyInterpreterState *g_interp = NULL;
static __thread int t_busy = 0;

static mframe_t g_scratch[MAX_DEPTH_LIMIT];
static msample_t **g_pending = NULL;
static size_t g_npending = 0, g_cappending = 0;
static uint64_t g_recorded = 0, g_dropped = 0, g_untracked = 0;

static slot_t *g_table = NULL;
static unsigned g_tbits = 0;
static size_t g_tcount = 0;

/* ---------------------------------------------------------------- random gaps */

static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static void seed_rng(uint64_t extra) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t s = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ ((uint64_t)getpid() << 17) ^
                 (uint64_t)(uintptr_t)&g_rng ^ extra;
    g_rng = splitmix64(s);
    if (g_rng == 0) g_rng = 0x2545F4914F6CDD1DULL;
}

static inline uint64_t rng_next(void) { /* xorshift64* */
    uint64_t x = g_rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    g_rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* Bytes to skip before the next sample: floor(Exp(mean = rate)); -1 samples everything. */
static int64_t draw_gap(void) {
    if (g_rate <= 1) return -1;
    double u = (double)((rng_next() >> 11) + 1) * (1.0 / 9007199254740992.0); /* (0, 1] */
    double gap = -log(u) * (double)g_rate;
    if (gap > 9.0e18) gap = 9.0e18;
    return (int64_t)gap;
}

/* ---------------------------------------------------------------- pointer table */

static inline size_t slot_of(uintptr_t p) {
    return (size_t)(((uint64_t)(p >> 4) * 0x9E3779B97F4A7C15ULL) >> (64 - g_tbits));
}

static void table_clear(void) {
    free(g_table);
    g_table = NULL;
    g_tbits = 0;
    g_tcount = 0;
}

static int table_grow(void) {
    unsigned bits = g_tbits ? g_tbits + 1 : TABLE_MIN_BITS;
    if (bits > TABLE_MAX_BITS) return -1;
    slot_t *nt = calloc((size_t)1 << bits, sizeof(slot_t)); /* libc: never hooked */
    if (nt == NULL) return -1;
    slot_t *old = g_table;
    size_t oldcap = g_tbits ? (size_t)1 << g_tbits : 0;
    g_table = nt;
    g_tbits = bits;
    size_t mask = ((size_t)1 << bits) - 1;
    for (size_t i = 0; i < oldcap; i++) {
        if (old[i].ptr) {
            size_t j = slot_of(old[i].ptr);
            while (nt[j].ptr) j = (j + 1) & mask;
            nt[j] = old[i];
        }
    }
    free(old);
    return 0;
}

static void table_insert(uintptr_t p, uint64_t serial) {
    if (g_table == NULL || (g_tcount + 1) * 2 > ((size_t)1 << g_tbits)) {
        /* Keep the load under 1/2 so misses (every free) stop after ~1.5 probes. */
        if (table_grow() < 0 && (g_table == NULL || (g_tcount + 1) * 4 > ((size_t)3 << g_tbits))) {
            g_untracked++;
            return;
        }
    }
    size_t mask = ((size_t)1 << g_tbits) - 1;
    size_t i = slot_of(p);
    while (g_table[i].ptr && g_table[i].ptr != p) i = (i + 1) & mask;
    if (g_table[i].ptr == 0) g_tcount++;
    g_table[i].ptr = p;
    g_table[i].serial = serial;
}

static inline slot_t *table_find(uintptr_t p) {
    size_t mask = ((size_t)1 << g_tbits) - 1;
    size_t i = slot_of(p);
    while (g_table[i].ptr) {
        if (g_table[i].ptr == p) return &g_table[i];
        i = (i + 1) & mask;
    }
    return NULL;
}

static void table_remove(uintptr_t p) {
    slot_t *s = table_find(p);
    if (s == NULL) return;
    size_t mask = ((size_t)1 << g_tbits) - 1;
    size_t i = (size_t)(s - g_table), j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (g_table[j].ptr == 0) break;
        size_t k = slot_of(g_table[j].ptr);
        /* Entry j may stay if its home k lies cyclically in (i, j]. */
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue;
        g_table[i] = g_table[j];
        i = j;
    }
    g_table[i].ptr = 0;
    g_table[i].serial = 0;
    g_tcount--;
}

/* ---------------------------------------------------------------- samples */

static void sample_free(msample_t *s) {
    for (int i = 0; i < s->depth; i++) Py_XDECREF(s->frames[i].code);
    Py_XDECREF(s->token);
    free(s);
}

static void pending_clear(void) {
    msample_t **arr = g_pending;
    size_t n = g_npending;
    g_pending = NULL;
    g_npending = g_cappending = 0;
    for (size_t i = 0; i < n; i++) sample_free(arr[i]);
    free(arr);
}

static inline PyThreadState *current_tstate(void) {
#if PY_VERSION_HEX >= 0x030D0000
    return PyThreadState_GetUnchecked();
#else
    return _PyThreadState_UncheckedGet();
#endif
}

/* Read the scope token and the stack. Called with the GIL held and t_busy set. */
static msample_t *capture(size_t size) {
    PyThreadState *ts = current_tstate();
    if (ts == NULL || PyThreadState_GetInterpreter(ts) != g_interp || g_var == NULL) return NULL;
    if (ts->context == NULL) return NULL; /* no context yet in this thread: no scope */

#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
#endif
    /* Frame objects (3.11+) are GC objects: allocating them must not run a collection,
       whose finalizers would run Python code inside somebody else's allocator call. */
    int gc_was_enabled = PyGC_Disable();

    msample_t *s = NULL;
    PyObject *tok = NULL;
    if (PyContextVar_Get(g_var, NULL, &tok) < 0) {
        tok = NULL;
    }
    if (tok != NULL && PyTuple_Check(tok) && PyTuple_GET_SIZE(tok) > 0) {
        /* Walk into the scratch buffer (one user at a time: GIL held, t_busy set), then keep
           a record of the exact size. */
        int depth = 0, truncated = 0;
        PyFrameObject *f = PyThreadState_GetFrame(ts); /* new reference or NULL */
        while (f != NULL) {
            if (depth >= g_max_depth) {
                truncated = 1;
                Py_DECREF(f);
                break;
            }
            g_scratch[depth].code = (PyObject *)PyFrame_GetCode(f);
            g_scratch[depth].line = PyFrame_GetLineNumber(f);
            depth++;
            PyFrameObject *back = PyFrame_GetBack(f);
            Py_DECREF(f); /* the running frame keeps its object alive */
            f = back;
        }
        s = malloc(sizeof(msample_t) + (size_t)depth * sizeof(mframe_t));
        if (s != NULL) {
            s->size = size;
            s->rate = g_rate;
            s->tid = PyThread_get_thread_ident();
            s->token = tok;
            tok = NULL;
            s->depth = depth;
            s->truncated = truncated;
            memcpy(s->frames, g_scratch, (size_t)depth * sizeof(mframe_t));
        } else {
            /* The frames are running: dropping these references frees nothing. */
            for (int i = 0; i < depth; i++) Py_DECREF(g_scratch[i].code);
            g_dropped++;
        }
    }
    Py_XDECREF(tok);

    if (gc_was_enabled) PyGC_Enable();
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(et, ev, etb);
#endif
    return s;
}

static void on_sampled(void *ptr, size_t size) {
    if (t_busy) return; /* an allocation made while recording: not sampled */
    /* No current thread state means no GIL (an extension breaking the PyMem rules): touch
       nothing shared. */
    if (current_tstate() == NULL) return;
    if (g_npending >= MAX_PENDING) {
        g_dropped++;
        return;
    }
    if (g_npending == g_cappending) {
        size_t cap = g_cappending ? g_cappending * 2 : 256;
        msample_t **arr = realloc(g_pending, cap * sizeof(msample_t *));
        if (arr == NULL) {
            g_dropped++;
            return;
        }
        g_pending = arr;
        g_cappending = cap;
    }
    t_busy = 1;
    msample_t *s = capture(size);
    t_busy = 0;
    if (s == NULL) return;
    s->ptr = (uintptr_t)ptr;
    s->serial = ++g_serial;
    g_pending[g_npending++] = s;
    g_recorded++;
    if (g_track) table_insert((uintptr_t)ptr, s->serial);
}

/* ---------------------------------------------------------------- allocator wrappers */

/* One set of wrappers per domain, each calling its saved original through a static pointer
   with the caller's ctx unchanged (ours is the original's ctx), so the common case is two
   compares, a subtraction and a tail call. Without deallocation tracking, free is not wrapped
   at all. A sampled allocation goes through sampled(), out of line. */

#define COUNTDOWN_OFF INT64_MAX /* inactive: the fast path never samples */

static void sampled(void *ptr, size_t size) {
    if (!g_active) {
        g_countdown = COUNTDOWN_OFF;
        return;
    }
    g_countdown = draw_gap();
    on_sampled(ptr, size);
}

/* Fast paths: no stack frame, a compare or two, then a tail call to the original. Everything
   else (sampling, table removal) is out of line. */
#define DEFINE_WRAPPERS(D)                                                                     \
    static PyMemAllocatorEx D##_orig;                                                          \
    static __attribute__((noinline)) void *D##_malloc_slow(void *ctx, size_t size) {           \
        void *p = D##_orig.malloc(ctx, size);                                                  \
        if (p != NULL) sampled(p, size);                                                       \
        return p;                                                                              \
    }                                                                                          \
    static void *D##_malloc(void *ctx, size_t size) {                                          \
        if (__builtin_expect((int64_t)size > g_countdown, 0) && size >= g_min_size)            \
            return D##_malloc_slow(ctx, size);                                                 \
        if (size >= g_min_size) g_countdown -= (int64_t)size;                                  \
        return D##_orig.malloc(ctx, size);                                                     \
    }                                                                                          \
    static __attribute__((noinline)) void *D##_calloc_slow(void *ctx, size_t n, size_t e) {    \
        void *p = D##_orig.calloc(ctx, n, e);                                                  \
        if (p != NULL) sampled(p, n * e);                                                      \
        return p;                                                                              \
    }                                                                                          \
    static void *D##_calloc(void *ctx, size_t nelem, size_t elsize) {                          \
        size_t size;                                                                           \
        if (!__builtin_mul_overflow(nelem, elsize, &size) && size >= g_min_size) {             \
            if ((int64_t)size > g_countdown) return D##_calloc_slow(ctx, nelem, elsize);       \
            g_countdown -= (int64_t)size;                                                      \
        }                                                                                      \
        return D##_orig.calloc(ctx, nelem, elsize);                                            \
    }                                                                                          \
    static __attribute__((noinline)) void *D##_realloc_slow(void *ctx, void *ptr, size_t size) { \
        void *p = D##_orig.realloc(ctx, ptr, size);                                            \
        if (p != NULL) {                                                                       \
            if (ptr != NULL && g_tcount) table_remove((uintptr_t)ptr);                         \
            if (size >= g_min_size) {                                                          \
                if ((int64_t)size > g_countdown)                                               \
                    sampled(p, size);                                                          \
                else                                                                           \
                    g_countdown -= (int64_t)size;                                              \
            }                                                                                  \
        }                                                                                      \
        return p;                                                                              \
    }                                                                                          \
    static void *D##_realloc(void *ctx, void *ptr, size_t size) {                              \
        if (__builtin_expect(g_tcount == 0 && (int64_t)size <= g_countdown, 1)) {              \
            if (size >= g_min_size) g_countdown -= (int64_t)size;                              \
            return D##_orig.realloc(ctx, ptr, size);                                           \
        }                                                                                      \
        return D##_realloc_slow(ctx, ptr, size);                                               \
    }                                                                                          \
    static __attribute__((noinline)) void D##_free_tracked(void *ctx, void *ptr) {             \
        if (ptr != NULL) table_remove((uintptr_t)ptr);                                         \
        D##_orig.free(ctx, ptr);                                                               \
    }                                                                                          \
    static void D##_free(void *ctx, void *ptr) {                                               \
        if (g_tcount) return D##_free_tracked(ctx, ptr);                                       \
        D##_orig.free(ctx, ptr);                                                               \
    }

DEFINE_WRAPPERS(mem)
DEFINE_WRAPPERS(obj)

typedef struct {
    PyMemAllocatorDomain domain;
    PyMemAllocatorEx *orig;
    void *(*malloc)(void *, size_t);
    void *(*calloc)(void *, size_t, size_t);
    void *(*realloc)(void *, void *, size_t);
    void (*free)(void *, void *);
} domain_t;

static domain_t g_domains[2] = {
    {PYMEM_DOMAIN_MEM, &mem_orig, mem_malloc, mem_calloc, mem_realloc, mem_free},
    {PYMEM_DOMAIN_OBJ, &obj_orig, obj_malloc, obj_calloc, obj_realloc, obj_free},
};
static int g_free_hooked = 0; /* our free wrappers are installed (deallocation tracking) */

static int on_top(const domain_t *d) {
    PyMemAllocatorEx cur;
    PyMem_GetAllocator(d->domain, &cur);
    return cur.malloc == d->malloc;
}

static void set_hook(const domain_t *d, int hook_free) {
    PyMemAllocatorEx hook = {d->orig->ctx, d->malloc, d->calloc, d->realloc,
                             hook_free ? d->free : d->orig->free};
    PyMem_SetAllocator(d->domain, &hook);
}

/* Stop sampling and leave the allocator chain if we are on top of it. If another hook
   (tracemalloc) wrapped ours since, removing ours would remove it too: stay in the chain as a
   pure forwarder. The saved originals are kept forever, so late calls still work. */
static void do_uninstall(void) {
    g_active = 0;
    g_countdown = COUNTDOWN_OFF;
    if (g_installed && on_top(&g_domains[0]) && on_top(&g_domains[1])) {
        for (int i = 0; i < 2; i++) PyMem_SetAllocator(g_domains[i].domain, g_domains[i].orig);
        g_installed = 0;
        g_free_hooked = 0;
    }
    table_clear();
    pending_clear();
}

/* ---------------------------------------------------------------- Python API */

static PyObject *py_install(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"var", "sampling_rate", "min_allocation_size", "max_stack_depth",
                             "track_deallocations", NULL};
    PyObject *var;
    unsigned long long rate;
    Py_ssize_t min_size;
    int max_depth, track;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OKnip:install", kwlist, &var, &rate,
                                     &min_size, &max_depth, &track))
        return NULL;
    if (!PyContextVar_CheckExact(var)) {
        PyErr_SetString(PyExc_TypeError, "var must be a contextvars.ContextVar");
        return NULL;
    }
    if (rate < 1 || min_size < 0 || max_depth < 1 || max_depth > MAX_DEPTH_LIMIT) {
        PyErr_SetString(PyExc_ValueError, "invalid sampling parameters");
        return NULL;
    }
    Py_INCREF(var);
    Py_XSETREF(g_var, var);
    int rate_changed = (uint64_t)rate != g_rate || !g_active;
    g_rate = (uint64_t)rate;
    g_min_size = (size_t)min_size;
    g_max_depth = max_depth;
    if (rate_changed) g_countdown = draw_gap();
    g_interp = PyInterpreterState_Get();
    if (!g_installed) {
        for (int i = 0; i < 2; i++) {
            PyMem_GetAllocator(g_domains[i].domain, g_domains[i].orig);
            set_hook(&g_domains[i], track);
        }
        g_installed = 1;
        g_free_hooked = track;
    } else if (track != g_free_hooked && on_top(&g_domains[0]) && on_top(&g_domains[1])) {
        for (int i = 0; i < 2; i++) set_hook(&g_domains[i], track);
        g_free_hooked = track;
    }
    /* Wrapped by another hook since: frees can only be seen if our free wrapper is in. */
    g_track = track && g_free_hooked;
    if (!g_track) table_clear();
    g_active = 1;
    Py_RETURN_NONE;
}

static PyObject *py_uninstall(PyObject *self, PyObject *unused) {
    do_uninstall();
    Py_RETURN_NONE;
}

static PyObject *py_is_installed(PyObject *self, PyObject *unused) {
    /* A forwarder left in the chain (another hook wrapped ours, then unwrapped itself) is
       back on top: remove it now. */
    if (!g_active && g_installed) do_uninstall();
    int hooked = g_active || on_top(&g_domains[0]) || on_top(&g_domains[1]);
    return PyBool_FromLong(hooked);
}

static PyObject *py_drain(PyObject *self, PyObject *unused) {
    /* Detach first: building the result allocates, and those allocations (or other threads,
       should a finalizer release the GIL) append to a fresh buffer. */
    msample_t **arr = g_pending;
    size_t n = g_npending;
    g_pending = NULL;
    g_npending = g_cappending = 0;

    PyObject *out = PyList_New(0);
    size_t i = 0;
    if (out == NULL) goto fail;
    for (; i < n; i++) {
        msample_t *s = arr[i];
        PyObject *frames = PyTuple_New((Py_ssize_t)s->depth * 2);
        if (frames == NULL) goto fail;
        for (int k = 0; k < s->depth; k++) {
            PyObject *line = PyLong_FromLong(s->frames[k].line);
            if (line == NULL) {
                Py_DECREF(frames);
                goto fail;
            }
            PyTuple_SET_ITEM(frames, 2 * k, s->frames[k].code); /* steals */
            s->frames[k].code = NULL;
            PyTuple_SET_ITEM(frames, 2 * k + 1, line);
        }
        PyObject *item = Py_BuildValue("(KKnKkOOO)", (unsigned long long)s->serial,
                                       (unsigned long long)s->ptr, (Py_ssize_t)s->size,
                                       (unsigned long long)s->rate, s->tid, s->token, frames,
                                       s->truncated ? Py_True : Py_False);
        Py_DECREF(frames);
        if (item == NULL) goto fail;
        int rc = PyList_Append(out, item);
        Py_DECREF(item);
        if (rc < 0) goto fail;
        sample_free(s);
    }
    free(arr);
    return out;
fail:
    for (; i < n; i++) sample_free(arr[i]);
    free(arr);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *py_is_alive(PyObject *self, PyObject *args) {
    unsigned long long ptr, serial;
    if (!PyArg_ParseTuple(args, "KK:is_alive", &ptr, &serial)) return NULL;
    if (g_tcount == 0) Py_RETURN_FALSE;
    slot_t *s = table_find((uintptr_t)ptr);
    return PyBool_FromLong(s != NULL && s->serial == (uint64_t)serial);
}

static PyObject *py_untrack(PyObject *self, PyObject *args) {
    unsigned long long ptr, serial;
    if (!PyArg_ParseTuple(args, "KK:untrack", &ptr, &serial)) return NULL;
    if (g_tcount) {
        slot_t *s = table_find((uintptr_t)ptr);
        if (s != NULL && s->serial == (uint64_t)serial) table_remove((uintptr_t)ptr);
    }
    Py_RETURN_NONE;
}

static PyObject *py_stats(PyObject *self, PyObject *unused) {
    return Py_BuildValue("{s:K,s:K,s:K,s:n,s:n,s:n,s:K,s:O}", "recorded",
                         (unsigned long long)g_recorded, "dropped", (unsigned long long)g_dropped,
                         "untracked", (unsigned long long)g_untracked, "tracked",
                         (Py_ssize_t)g_tcount, "table_capacity",
                         (Py_ssize_t)(g_tbits ? (size_t)1 << g_tbits : 0), "pending",
                         (Py_ssize_t)g_npending, "sampling_rate", (unsigned long long)g_rate,
                         "active", g_active ? Py_True : Py_False);
}

static PyObject *py_reset_after_fork(PyObject *self, PyObject *unused) {
    /* In a forked child only the forking thread survives; start from a clean state and a
       different random stream than the parent's. */
    do_uninstall();
    seed_rng((uint64_t)getpid());
    g_recorded = g_dropped = g_untracked = 0;
    Py_RETURN_NONE;
}

static PyObject *py_seed(PyObject *self, PyObject *arg) {
    unsigned long long s = PyLong_AsUnsignedLongLongMask(arg);
    if (s == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    g_rng = splitmix64((uint64_t)s);
    if (g_rng == 0) g_rng = 1;
    if (g_active) g_countdown = draw_gap();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"install", (PyCFunction)(void (*)(void))py_install, METH_VARARGS | METH_KEYWORDS,
     "install(var, sampling_rate, min_allocation_size, max_stack_depth, track_deallocations)\n"
     "Hook the MEM and OBJ allocators (or update the parameters of the installed hook)."},
    {"uninstall", py_uninstall, METH_NOARGS,
     "Restore the original allocators; forget pending samples and tracked blocks."},
    {"is_installed", py_is_installed, METH_NOARGS, "True while the hook samples or is in place."},
    {"drain", py_drain, METH_NOARGS,
     "Take the pending samples: [(serial, ptr, size, rate, thread_id, token, "
     "(code, line, ...) leaf first, truncated)]."},
    {"is_alive", py_is_alive, METH_VARARGS,
     "is_alive(ptr, serial): True if that sampled block has not been freed."},
    {"untrack", py_untrack, METH_VARARGS,
     "untrack(ptr, serial): stop watching a sampled block no open scope needs."},
    {"stats", py_stats, METH_NOARGS, "Counters of the hook."},
    {"reset_after_fork", py_reset_after_fork, METH_NOARGS, "Clean state in a forked child."},
    {"seed", py_seed, METH_O, "Seed the sampling random stream (tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "otlp_middleware.profiling._memalloc",
    "Sampling allocator hook (see memory.py for the Python API).", -1, methods,
};

PyMODINIT_FUNC PyInit__memalloc(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (g_rng == 0) seed_rng(0);
    if (PyModule_AddIntConstant(m, "MAX_STACK_DEPTH", MAX_DEPTH_LIMIT) < 0 ||
        PyModule_AddIntConstant(m, "MAX_PENDING", MAX_PENDING) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
