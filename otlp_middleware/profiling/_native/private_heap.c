/*
 * _private_heap: the profiler's background threads allocate outside CPython's small-object
 * allocator (pymalloc) while they build and export records.
 *
 * Why: pymalloc's pools are shared by every thread. The records the collector and exporter
 * threads build are many small objects (tuples, ints, dicts) that live for a while and then
 * go together; they leave the pools of those sizes in another state and order, and the
 * app's own short-lived objects then take slower paths through them on every request (see
 * docs/deployment.md: with PYTHONMALLOC=malloc the effect is gone). Here a thread inside
 * enter()/exit() gets its objects from the C allocator (glibc gives each thread an arena of
 * its own), and every other thread keeps pymalloc as it was.
 *
 * How: while at least one thread is inside, the MEM and OBJ domains are wrapped. The
 * wrapper's malloc and calloc serve a marked thread from PyMem_RawMalloc/RawCalloc and any
 * other thread from the allocator found at install; realloc and free always go to the
 * allocator found at install. That is sound because pymalloc frees and reallocates blocks
 * that are not its own through the raw allocator (it checks every pointer's address: that
 * is how its blocks over 512 bytes work). So the wrapper is installed only over pymalloc
 * itself (the allocators found when this module was loaded, with no context: not the debug
 * hooks, not tracemalloc, not the heap profiler's hook); otherwise enter() does nothing.
 *
 * pymalloc counts the blocks it passes to the raw allocator (sys.getallocatedblocks()) and
 * uncounts each one it frees; ours were never counted, so that figure drifts down while the
 * profiler runs (documented in _heap.py).
 *
 * Installed only while a marked thread is inside, so the app pays the wrapper's test (a
 * thread-local flag) only then. Every call needs the GIL, which orders them against all
 * allocations: so it is never usable in a free-threaded build, and it is not for
 * subinterpreters with a GIL of their own (they would allocate while it is swapped in).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static __thread int tl_marked; /* how deep this thread is inside enter() (0: not) */

static PyMemAllocatorEx g_default[2]; /* MEM, OBJ as found at module load */
static PyMemAllocatorEx g_orig[2];    /* as found at install (the wrapper's ctx) */
static const PyMemAllocatorDomain g_domain[2] = {PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
static int g_usable;       /* the defaults are pymalloc's: the wrapper may go over them */
static int g_installed;    /* the wrapper is in the chain (maybe under another hook) */
static int g_inside;       /* threads inside enter() */
static unsigned long long g_routed, g_enters, g_installs;

static void *ph_malloc(void *ctx, size_t n) {
    if (tl_marked) {
        g_routed++;
        return PyMem_RawMalloc(n);
    }
    PyMemAllocatorEx *o = (PyMemAllocatorEx *)ctx;
    return o->malloc(o->ctx, n);
}

static void *ph_calloc(void *ctx, size_t nelem, size_t elsize) {
    if (tl_marked) {
        g_routed++;
        return PyMem_RawCalloc(nelem, elsize);
    }
    PyMemAllocatorEx *o = (PyMemAllocatorEx *)ctx;
    return o->calloc(o->ctx, nelem, elsize);
}

static void *ph_realloc(void *ctx, void *p, size_t n) {
    if (p == NULL && tl_marked) {
        g_routed++;
        return PyMem_RawMalloc(n);
    }
    PyMemAllocatorEx *o = (PyMemAllocatorEx *)ctx;
    return o->realloc(o->ctx, p, n);
}

static void ph_free(void *ctx, void *p) {
    PyMemAllocatorEx *o = (PyMemAllocatorEx *)ctx;
    o->free(o->ctx, p);
}

static int same(const PyMemAllocatorEx *a, const PyMemAllocatorEx *b) {
    return a->ctx == b->ctx && a->malloc == b->malloc && a->calloc == b->calloc &&
           a->realloc == b->realloc && a->free == b->free;
}

static int on_top(int i) {
    PyMemAllocatorEx cur;
    PyMem_GetAllocator(g_domain[i], &cur);
    return cur.malloc == ph_malloc && cur.ctx == &g_orig[i];
}

static void install(void) {
    if (g_installed) return; /* still in the chain: a hook over it forwards to it */
    for (int i = 0; i < 2; i++) {
        PyMemAllocatorEx cur;
        PyMem_GetAllocator(g_domain[i], &cur);
        if (!same(&cur, &g_default[i])) return; /* hooked since load: leave it alone */
    }
    for (int i = 0; i < 2; i++) {
        PyMem_GetAllocator(g_domain[i], &g_orig[i]);
        PyMemAllocatorEx wrap = {&g_orig[i], ph_malloc, ph_calloc, ph_realloc, ph_free};
        PyMem_SetAllocator(g_domain[i], &wrap);
    }
    g_installed = 1;
    g_installs++;
}

/* Leave the chain if on top of it; under another hook (tracemalloc started meanwhile),
   stay as a forwarder (nothing is marked) until a later exit finds it on top again. */
static void uninstall(void) {
    if (!g_installed || !on_top(0) || !on_top(1)) return;
    for (int i = 0; i < 2; i++) PyMem_SetAllocator(g_domain[i], &g_orig[i]);
    g_installed = 0;
}

/* The calling thread starts allocating from the C allocator at nesting depth `depth`; 0 where
   the wrapper cannot go on the allocator (it stays unmarked). */
static int join(int depth) {
    if (!g_usable) return 0;
    install();
    if (!g_installed) return 0;
    tl_marked = depth;
    g_inside++;
    g_enters++;
    return 1;
}

/* The calling thread (marked) allocates as before; the last one out removes the wrapper. */
static void leave(void) {
    tl_marked = 0;
    if (--g_inside <= 0) {
        g_inside = 0;
        uninstall();
    }
}

static PyObject *py_enter(PyObject *self, PyObject *unused) {
    if (tl_marked) { /* nested: the outermost exit ends it */
        tl_marked++;
        Py_RETURN_TRUE;
    }
    return PyBool_FromLong(join(1));
}

static PyObject *py_exit(PyObject *self, PyObject *unused) {
    if (tl_marked == 1)
        leave();
    else if (tl_marked > 1)
        tl_marked--;
    Py_RETURN_NONE;
}

static PyObject *py_pause(PyObject *self, PyObject *unused) {
    int depth = tl_marked;
    if (depth) leave();
    return PyLong_FromLong(depth);
}

static PyObject *py_resume(PyObject *self, PyObject *arg) {
    long depth = PyLong_AsLong(arg);
    if (depth == -1 && PyErr_Occurred()) return NULL;
    if (depth < 0 || depth > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "depth must be from 0 to %d, not %ld", INT_MAX, depth);
        return NULL;
    }
    if (depth > 0 && !tl_marked) join((int)depth);
    Py_RETURN_NONE;
}

static PyObject *py_after_fork(PyObject *self, PyObject *unused) {
    /* Only the forking thread lives on in the child: the others' marks are gone. */
    g_inside = tl_marked > 0;
    if (!g_inside) uninstall();
    Py_RETURN_NONE;
}

static PyObject *py_stats(PyObject *self, PyObject *unused) {
    return Py_BuildValue("{s:O,s:O,s:O,s:i,s:K,s:K,s:K}", "usable", g_usable ? Py_True : Py_False,
                         "installed", g_installed ? Py_True : Py_False, "marked",
                         tl_marked ? Py_True : Py_False, "inside", g_inside, "routed", g_routed,
                         "enters", g_enters, "installs", g_installs);
}

static PyMethodDef methods[] = {
    {"enter", py_enter, METH_NOARGS,
     "enter() -> bool: the calling thread allocates from the C allocator until exit()\n"
     "(False where pymalloc is not the allocator in use: nothing changes)."},
    {"exit", py_exit, METH_NOARGS, "exit(): the calling thread allocates as before."},
    {"pause", py_pause, METH_NOARGS,
     "pause() -> int: the calling thread allocates as before (blocking waits, for the app\n"
     "not to pay the wrapper meanwhile) until resume() with what this returns."},
    {"resume", py_resume, METH_O, "resume(depth): undo pause()."},
    {"after_fork", py_after_fork, METH_NOARGS,
     "after_fork(): in a forked child, forget the marks of threads that do not exist there."},
    {"stats", py_stats, METH_NOARGS,
     "stats() -> dict: usable, installed, marked (this thread), inside (threads), routed\n"
     "(allocations served from the C allocator), enters, installs."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_private_heap",
    "The profiler's threads allocate outside pymalloc (see private_heap.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__private_heap(void) {
    for (int i = 0; i < 2; i++) PyMem_GetAllocator(g_domain[i], &g_default[i]);
    /* pymalloc's own allocators have no context; the debug hooks, tracemalloc and other
       hooks have one. Both domains must be the same allocator. */
    g_usable = g_default[0].ctx == NULL && g_default[1].ctx == NULL &&
               g_default[0].malloc == g_default[1].malloc &&
               g_default[0].free == g_default[1].free;
#ifdef Py_GIL_DISABLED
    /* Without the GIL other threads allocate while the allocator would be swapped. */
    g_usable = 0;
#endif
    return PyModule_Create(&module);
}
