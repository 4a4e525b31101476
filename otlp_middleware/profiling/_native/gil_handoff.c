/* _handoff: a threading.Event for the library's background threads that gets the GIL back
 * without starving.
 *
 * The problem.  When a background thread wakes up and needs the GIL while the main thread
 * is busy, CPython (3.10 to 3.13) makes it wait on the GIL's condition variable with a
 * timeout of the switch interval (5 ms); only a wait that times out with no GIL switch in
 * between asks the holder to drop the GIL.  A server's main thread releases the GIL around
 * every system call (epoll_wait, recv, send), several times per request, and takes it back
 * at once; each release wakes the waiting thread, which finds the GIL taken again and starts
 * a new 5 ms wait.  So under load the background thread is woken hundreds of times per
 * second for nothing, each wake a context switch (measured: 6.6 per exported request and
 * about 17 us of CPU each on this project's 2-core test machine), and it may wait for most
 * of a second.
 *
 * The fix.  A waiting thread asks the main thread, through Py_AddPendingCall, to hand the
 * GIL over: the main thread runs the pending call at its next check of the eval breaker (as
 * it runs a Python signal handler), releases the GIL, lets the waiter take it, then queues
 * for it again.  The waiter waits for that offer on a semaphore, not on the GIL, so the
 * main thread's releases no longer wake it.  Every wait is bounded: without an offer within
 * OFFER_WAIT_MS (the main thread is blocked in C, idle, or finalizing), the waiter takes the
 * GIL the ordinary way; the main thread waits at most TAKE_WAIT_MS for the waiter to take
 * it.  Then the main thread queues for the GIL as after any forced switch: the background
 * thread keeps it for at most a switch interval of work before it must hand it back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

/* A busy main thread runs a pending call within microseconds (it checks the eval breaker at
 * every call and backward jump); one that does not within OFFER_WAIT_MS is blocked or idle,
 * the GIL then mostly free, or off its CPU (a loaded machine: 2 ms missed a quarter of the
 * offers with both CPUs busy, 5 ms one in ten), and the waiter takes the GIL the ordinary
 * way.  A force_flush() from a main thread blocked waiting for it costs that much more. */
#define OFFER_WAIT_MS 5
#define TAKE_WAIT_MS 10

static sem_t g_offered;          /* posted by the main thread: the GIL is free for the waiter */
static sem_t g_taken;            /* posted by the waiter: it holds the GIL */
static atomic_int g_wanted;      /* a waiter's request is outstanding (1) */
static pthread_mutex_t g_waiter = PTHREAD_MUTEX_INITIALIZER; /* one waiter at a time */
static unsigned long g_main_ident;
static atomic_ulong g_handoffs;  /* GIL handed over by the main thread */
static atomic_ulong g_fallbacks; /* no offer in time: the GIL taken the ordinary way */

/* now + seconds on clock clk, as a deadline for the timed waits */
static struct timespec deadline_after(clockid_t clk, double seconds)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    time_t whole = (time_t)seconds;
    ts.tv_sec += whole;
    ts.tv_nsec += (long)((seconds - (double)whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

static int sem_wait_ms(sem_t *sem, long ms)
{
    /* sem_timedwait counts on CLOCK_REALTIME */
    struct timespec dl = deadline_after(CLOCK_REALTIME, ms / 1000.0);
    int r;
    while ((r = sem_timedwait(sem, &dl)) != 0 && errno == EINTR) {
    }
    return r;
}

static void drain(sem_t *sem)
{
    while (sem_trywait(sem) == 0) {
    }
}

/* The pending call, on the main thread with the GIL: release it until the waiter took it. */
static int yield_gil(void *unused)
{
    (void)unused;
    if (!atomic_exchange(&g_wanted, 0)) {
        return 0; /* the waiter gave up (and took the GIL the ordinary way) */
    }
    drain(&g_taken); /* a late post from an earlier handoff */
    PyThreadState *ts = PyEval_SaveThread();
    sem_post(&g_offered);
    sem_wait_ms(&g_taken, TAKE_WAIT_MS);
    PyEval_RestoreThread(ts);
    return 0;
}

/* Take the GIL (released by the caller as `save`), by a handoff where one can be had. */
static void take_gil(PyThreadState *save)
{
    if (PyThread_get_thread_ident() == g_main_ident) {
        PyEval_RestoreThread(save); /* the main thread runs pending calls itself */
        return;
    }
    int offered = 0;
    pthread_mutex_lock(&g_waiter);
    drain(&g_offered);
    atomic_store(&g_wanted, 1);
    if (Py_AddPendingCall(yield_gil, NULL) == 0) {
        if (sem_wait_ms(&g_offered, OFFER_WAIT_MS) == 0) {
            offered = 1;
        }
        else if (!atomic_exchange(&g_wanted, 0)) {
            /* the main thread took the request just now: its offer follows at once */
            while (sem_wait(&g_offered) != 0 && errno == EINTR) {
            }
            offered = 1;
        }
    }
    else {
        atomic_store(&g_wanted, 0);
    }
    pthread_mutex_unlock(&g_waiter);
    PyEval_RestoreThread(save);
    if (offered) {
        sem_post(&g_taken);
        atomic_fetch_add(&g_handoffs, 1);
    }
    else {
        atomic_fetch_add(&g_fallbacks, 1);
    }
}

/* Bell: threading.Event's set/clear/is_set/wait, on a mutex and condition variable of its
 * own, with wait() taking the GIL back by take_gil(). */
typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int flag;
} Bell;

static int bell_init(Bell *self, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Bell() takes no arguments");
        return -1;
    }
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_mutex_init(&self->mu, NULL);
    pthread_cond_init(&self->cv, &attr);
    pthread_condattr_destroy(&attr);
    self->flag = 0;
    return 0;
}

static void bell_dealloc(Bell *self)
{
    pthread_cond_destroy(&self->cv);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *bell_set(Bell *self, PyObject *unused)
{
    pthread_mutex_lock(&self->mu);
    self->flag = 1;
    pthread_cond_broadcast(&self->cv);
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

static PyObject *bell_clear(Bell *self, PyObject *unused)
{
    pthread_mutex_lock(&self->mu);
    self->flag = 0;
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

static PyObject *bell_is_set(Bell *self, PyObject *unused)
{
    return PyBool_FromLong(self->flag);
}

static PyObject *bell_wait(Bell *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "wait(timeout=None)");
        return NULL;
    }
    double timeout = -1.0; /* none: wait until set */
    if (nargs == 1 && args[0] != Py_None) {
        timeout = PyFloat_AsDouble(args[0]);
        if (timeout == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        if (isnan(timeout)) {
            PyErr_SetString(PyExc_ValueError, "timeout must be a number");
            return NULL;
        }
        if (timeout < 0) {
            timeout = 0;
        }
        else if (timeout > 1e9) { /* decades: as good as none (and no overflow) */
            timeout = -1.0;
        }
    }
    int flag;
    pthread_mutex_lock(&self->mu);
    flag = self->flag;
    pthread_mutex_unlock(&self->mu);
    if (flag) {
        Py_RETURN_TRUE; /* set already: no wait, the GIL kept (no handoff to ask for) */
    }
    struct timespec dl = deadline_after(CLOCK_MONOTONIC, timeout >= 0 ? timeout : 0);
    PyThreadState *save = PyEval_SaveThread();
    pthread_mutex_lock(&self->mu);
    while (!self->flag) {
        int r = timeout >= 0 ? pthread_cond_timedwait(&self->cv, &self->mu, &dl)
                             : pthread_cond_wait(&self->cv, &self->mu);
        if (r == ETIMEDOUT) {
            break;
        }
    }
    flag = self->flag;
    pthread_mutex_unlock(&self->mu);
    take_gil(save);
    return PyBool_FromLong(flag);
}

static PyMethodDef bell_methods[] = {
    {"set", (PyCFunction)bell_set, METH_NOARGS, "set()\n--\n\nSet the flag, wake the waiters."},
    {"clear", (PyCFunction)bell_clear, METH_NOARGS, "clear()\n--\n\nReset the flag."},
    {"is_set", (PyCFunction)bell_is_set, METH_NOARGS, "is_set()\n--\n\nWhether set."},
    {"wait", (PyCFunction)(void (*)(void))bell_wait, METH_FASTCALL,
     "wait(timeout=None)\n--\n\nBlock until set or timeout seconds pass; return the flag. "
     "Off the main thread, the GIL comes back by a handoff from the main thread."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BellType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "otlp_middleware.profiling._handoff.Bell",
    .tp_basicsize = sizeof(Bell),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An event (threading.Event's methods) for background threads.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)bell_init,
    .tp_dealloc = (destructor)bell_dealloc,
    .tp_methods = bell_methods,
};

static PyObject *py_stats(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("{s:k,s:k}", "handoffs", atomic_load(&g_handoffs), "fallbacks",
                         atomic_load(&g_fallbacks));
}

static PyMethodDef methods[] = {
    {"stats", py_stats, METH_NOARGS,
     "stats()\n--\n\nGIL takes by a handoff from the main thread, and without one."},
    {NULL, NULL, 0, NULL},
};

/* In a forked child the only thread is the one that forked: it is the main thread now, and
 * no waiter or handoff exists. */
static void after_fork_child(void)
{
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&g_waiter, &fresh, sizeof(fresh));
    sem_destroy(&g_offered);
    sem_destroy(&g_taken);
    sem_init(&g_offered, 0, 0);
    sem_init(&g_taken, 0, 0);
    atomic_store(&g_wanted, 0);
    g_main_ident = PyThread_get_thread_ident();
}

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_handoff", "GIL handoff for background threads.", -1, methods,
};

PyMODINIT_FUNC PyInit__handoff(void)
{
    static int once;
    if (!once) {
        /* the main thread's ident, from threading (this module may be imported elsewhere) */
        PyObject *threading = PyImport_ImportModule("threading");
        PyObject *main = threading ? PyObject_CallMethod(threading, "main_thread", NULL) : NULL;
        PyObject *ident = main ? PyObject_GetAttrString(main, "ident") : NULL;
        Py_XDECREF(threading);
        Py_XDECREF(main);
        if (ident == NULL) {
            return NULL;
        }
        g_main_ident = PyLong_AsUnsignedLong(ident);
        Py_DECREF(ident);
        if (PyErr_Occurred()) {
            return NULL;
        }
        if (sem_init(&g_offered, 0, 0) != 0 || sem_init(&g_taken, 0, 0) != 0 ||
            pthread_atfork(NULL, NULL, after_fork_child) != 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return NULL;
        }
        once = 1;
    }
    if (PyType_Ready(&BellType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&BellType);
    if (PyModule_AddObject(m, "Bell", (PyObject *)&BellType) < 0) {
        Py_DECREF(&BellType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
