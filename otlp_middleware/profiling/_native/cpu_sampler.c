/*
 * otlp_middleware.profiling._cpu_native - the native CPU sampler (Linux, CPython 3.10-3.13).
 *
 * Contract
 * --------
 * Each thread that runs inside a profiling scope calls arm_thread(token): it gets a POSIX
 * timer on its own CPU-time clock (pthread_getcpuclockid) that fires on average every 1/hz
 * CPU-seconds (see "Sampling schedule" below) and is delivered to that very thread
 * (SIGEV_THREAD_ID) on SIGRTMIN+3.  The signal handler
 * runs on the interrupted thread, walks that thread's own Python frames (read from its own
 * thread state, found through PyGILState_GetThisThreadState, never from the GIL holder) and
 * copies, per frame, the function's qualified name, file name, first line and current line
 * into preallocated memory: a lock-free table of functions (interned by content) and a
 * lock-free ring of samples.  drain() turns the ring into Python tuples with the GIL.  A
 * frame cache keeps each (code, instruction)'s function and line, so a frame seen before
 * costs a lookup, not a copy, a hash and a line-table scan (see "Frame cache").
 *
 * The handler allocates nothing, takes no lock and calls no Python API except pure readers
 * (PyGILState_GetThisThreadState, PyCode_Addr2Line which only scans the immutable line
 * table of a code object that the interrupted - hence suspended - frame keeps alive).
 * It checks what it reads (walk_stack: code objects, alignment, and on 3.11/3.12 the link
 * between each C-level frame and its caller's) and reads it under a fault guard (on_fault):
 * a stale pointer costs one dropped sample, never the process.
 *
 * Line numbers are computed in the handler: the code object is provably alive while the
 * handler runs (its frame is on the suspended thread's stack), whereas in drain() nothing
 * would prove it still exists.
 *
 * A sample on a thread with no Python frame (thread start-up/teardown, pure C threads) is
 * skipped and counted in stats()["skipped_no_python"].
 *
 * Asyncio: add_root(frame, token) registers a coroutine's frame object (coro.cr_frame); a
 * sample whose stack contains that frame carries its token in root_tokens (leaf first).
 *
 * Sampling schedule
 * -----------------
 * A fixed period phase-locks with periodic work: two tasks alternating 5 ms bursts on a loop
 * whose cycle is close to the period get every sample in the same task.  So each thread's
 * timer is a one-shot timer that the handler re-arms (timer_settime is async-signal-safe)
 * for the next deadline of a per-thread random schedule, in the thread's CPU time:
 *
 *     deadline[k+1] = deadline[k] + period * U,   U uniform in [0.5, 1.5)
 *
 * drawn from a per-thread xorshift64* generator (thread-local, seeded at arm time; no libc
 * rand in the handler).  The mean gap is exactly the period, so the mean rate is the
 * configured frequency.  Uniform rather than exponential (Poisson) gaps: one draw already
 * spreads the next sample's phase over a whole period, which breaks any lock with a cycle of
 * about a period or less, and the gap never goes below half a period, so up to 2x the tick
 * rate (125 Hz with a 250 Hz tick) every deadline gets its own signal.  With exponential gaps
 * a third of the 99 Hz gaps would be shorter than a 4 ms tick and be merged, lowering the
 * sample count, and the count would vary more.
 *
 * Deadlines are absolute (TIMER_ABSTIME on the thread's CPU clock), so the late delivery of a
 * signal never shifts the schedule: the kernel checks CPU timers on its scheduler tick, so a
 * signal arrives up to one tick of CPU time after its deadline; the next deadline still
 * counts from the previous deadline, not from the late signal.
 *
 * Weights: each sample's cpu_ns is the CPU time the thread really consumed while armed since
 * its previous sample, read from its own CPU clock in the handler (clock_gettime is
 * async-signal-safe): the gap that just expired, its tick lateness, and every deadline the
 * kernel merged into this signal.  Over a run the weights add up to the thread's armed CPU
 * time, up to the tail after the last sample (a sample skipped - no Python frame, no thread
 * state - or dropped on a full ring loses its weight, as its stats counter says).  The first sample of a freshly armed thread
 * (random first deadline in (0, period]) is weighted as if the previous sample had been one
 * period before that deadline: a scope shorter than a period is then sampled with
 * probability length/period at weight ~period, i.e. counted in proportion.
 *
 * Overruns (stats()["overruns"]): the deadlines that passed before the signal came, beyond
 * the first, counted by the handler from its own schedule (a one-shot timer has no kernel
 * overrun count).  They appear when gaps are shorter than the tick (above ~2x the tick
 * rate) or when signal delivery was held up; their CPU time is in the sample's cpu_ns.
 *
 * Disarm keeps the remaining countdown and the CPU consumed since the last sample; the next
 * arm_thread() of the same thread continues from both, so a thread that runs many short
 * scopes is sampled as if it had stayed armed.
 *
 * Timer lifetime
 * --------------
 * arm/disarm run once per request, so they only arm and disarm: a thread's timer is created
 * by its first arm_thread() (after each start()) and deleted when the thread exits (a
 * pthread key destructor) or by stop(); the engine calls stop() once no scope has been open
 * for a while.  Each call is one timer_settime() and no clock read (a thread CPU clock read
 * is a system call as costly as timer_settime): disarm_thread() "parks" the timer PARK_NS
 * (~18 minutes) of CPU ahead; the old value it returns, the countdown to the expiry set at
 * tl_deadline_ns, gives the CPU clock (tl_deadline_ns - countdown), hence the parked expiry
 * exactly; arm_thread() sets the new expiry relative to the kernel's clock sample, and the
 * old value it returns, the countdown to the parked expiry, gives that sample.  The clock is
 * read only when the expiry is not known exactly: a deadline that came due while armed and
 * waits for its tick (it stays due: re-armed 1 ns ahead), after set_frequency(), or when a
 * parked timer expired.  A parked timer that expires, or a signal already on its way when
 * the thread disarms, finds tl_armed == 0: the handler counts it (skipped_not_armed) and
 * leaves the timer disarmed.  active_timers() counts the timers that exist (what
 * /proc/self/timers lists), armed_timers() those armed.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if !defined(__linux__)
#error "cpu_sampler: Linux only (POSIX CPU-clock timers with SIGEV_THREAD_ID)"
#endif
#if PY_VERSION_HEX < 0x030A0000 || PY_VERSION_HEX >= 0x030E0000
#error "cpu_sampler: supports CPython 3.10 to 3.13 frame layouts only"
#endif
#ifdef Py_GIL_DISABLED
#error "cpu_sampler: the free-threaded build is not supported"
#endif

#if PY_VERSION_HEX >= 0x030B0000
#define Py_BUILD_CORE 1
#include <internal/pycore_frame.h>
#undef Py_BUILD_CORE
#else
#include <frameobject.h>
#endif
#include <structmember.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

#define MAX_DEPTH 64            /* frames kept per sample (leaf first) */
#define MAX_WALK 4096           /* frames walked at most (root matching beyond MAX_DEPTH) */
#define MAX_ROOTS 8             /* root tokens kept per sample */
#define NAME_CAP 128            /* bytes of a qualified name kept */
#define FILE_CAP 256            /* bytes of a file name kept (its tail when longer) */
#define FUNC_CAP 8192           /* distinct functions interned per start() (power of two) */
#define FUNC_PROBES 64
#define FUNC_NONE 0xFFFFFFFFu
#define CODE_CACHE_CAP 4096     /* frame cache entries (power of two), see "Frame cache" */
#define ROOT_CAP 4096
#define TIMER_CAP 4096
#define MAX_CAPACITY (1u << 20)
#define PARK_NS (1LL << 40)     /* a disarmed timer's expiry: ~18 CPU-minutes ahead */

typedef struct {
    uint32_t func;
    int32_t line;
} frame_ref_t;

typedef struct {
    _Atomic uint64_t seq; /* Vyukov bounded queue sequence */
    int64_t token;
    int64_t cpu_ns;
    int64_t ts_ns;
    int64_t roots[MAX_ROOTS];
    int32_t tid;
    uint16_t depth;
    uint8_t n_roots;
    uint8_t truncated;
    frame_ref_t frames[MAX_DEPTH];
} slot_t;

typedef struct {
    _Atomic uint32_t state; /* 0 empty, 1 being written, 2 ready */
    int32_t first_line;
    uint64_t hash;
    uint16_t name_len;
    uint16_t file_len;
    char name[NAME_CAP];
    char file[FILE_CAP];
} func_t;

/* One entry of the frame cache (see "Frame cache" at frame_info): a seqlock (even:
 * stable, odd: being written) over what a frame's function and line were computed from. */
typedef struct {
    /* what a hit reads, in its first 32 bytes (one cache line: entries are 96 bytes) */
    _Atomic uint32_t seq;
    int32_t addr; /* the instruction offset in bytes (-1: before the first) */
    int32_t line;
    uint32_t func;
    const void *code;
    uint64_t code_deaths; /* g_code_deaths when the entry was made or last checked */
    /* what the entry was computed from, checked once a code object has died since */
    const void *qualname, *filename, *linetable;
    Py_hash_t qualname_hash, filename_hash; /* -1: not known, the texts are compared */
    Py_ssize_t linetable_len;
    uint64_t linetable_head; /* the line table's first bytes (up to 8) */
    int32_t first_line;
} frame_cache_t;

/* Code objects deallocated so far (see "Frame cache"): counted by a code watcher (3.12+) or
 * by PyCode_Type's tp_dealloc, wrapped (3.10, 3.11).  Until counting is in place
 * (count_code_deaths) every entry is checked in full: g_deaths_counted is 0. */
static _Atomic uint64_t g_code_deaths;
static int g_deaths_counted;

#if PY_VERSION_HEX >= 0x030C0000
static int on_code_event(PyCodeEvent event, PyCodeObject *co)
{
    (void)co;
    if (event == PY_CODE_EVENT_DESTROY) {
        atomic_fetch_add_explicit(&g_code_deaths, 1, memory_order_release);
    }
    return 0;
}
#else
static destructor g_code_dealloc; /* PyCode_Type's own */

static void counting_code_dealloc(PyObject *co)
{
    atomic_fetch_add_explicit(&g_code_deaths, 1, memory_order_release);
    g_code_dealloc(co);
}
#endif

/* Count every code object's end from now on (once per process; at import). */
static void count_code_deaths(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    if (PyCode_AddWatcher(on_code_event) < 0) {
        PyErr_Clear(); /* all watcher slots taken: entries are checked in full */
        return;
    }
#else
    if (PyCode_Type.tp_dealloc != counting_code_dealloc) { /* never wrapped twice */
        g_code_dealloc = PyCode_Type.tp_dealloc;
        PyCode_Type.tp_dealloc = counting_code_dealloc;
    }
#endif
    g_deaths_counted = 1;
}

typedef struct {
    _Atomic(void *) key; /* the PyFrameObject, compared with frames on the stack */
    _Atomic int64_t token;
    PyObject *frame; /* strong reference (GIL), so the address cannot be reused */
} root_t;

typedef struct {
    int used;
    int armed; /* changed by its thread (GIL), or under g_timer_lock by stop/thread exit */
    pid_t tid;
    timer_t timer;
} tslot_t;

/* ---------------------------------------------------------------- global state */
static int g_started;
static int g_signo;
static pid_t g_pid;
static unsigned g_gen = 1; /* bumped on start/stop/fork: invalidates per-thread caches */
static struct sigaction g_old_action;

static slot_t *g_ring;
static uint64_t g_mask;
static _Atomic uint64_t g_head;
/* Samples published since the module loaded; never reset (mark() compares two readings). */
static _Atomic uint64_t g_published;
static uint64_t g_tail; /* consumer side, touched only with the GIL */
static func_t *g_funcs;
static frame_cache_t *g_frame_cache; /* CODE_CACHE_CAP entries, allocated with g_funcs */

static _Atomic int g_enabled;
static _Atomic int64_t g_period_ns;
static _Atomic int g_in_handler;

static _Atomic uint64_t st_samples, st_dropped, st_signals, st_no_python, st_no_tstate,
    st_not_armed, st_func_full, st_truncated, st_overruns, st_faults, st_fallbacks,
    st_rejected, st_unowned, st_frame_cache_hits, st_frame_cache_misses, st_handler_ns;

/* the SIGSEGV/SIGBUS actions found at start() (see "Fault guard" at on_fault) */
static struct sigaction g_old_segv, g_old_bus;
static int g_guard_installed;

static root_t g_roots[ROOT_CAP];

/* The ASGI send callable of a profiled request (SendWatcher(send, scope)).  A request watcher
 * (made by a LeanPath: id != 0) is its request's scope until the response completes (open):
 * while its lean call runs the app (tl_running), the handler tags the samples with
 * WATCH_TAG(id) and counts them in samples, so the request path registers nothing. */
typedef struct SendWatcher_ {
    PyObject_HEAD
    PyObject *send;
    PyObject *scope; /* Py_None, or the scope this watcher ends (a request's lazy CodeScope) */
    PyObject *status;
    vectorcallfunc vectorcall;
    uint64_t id;                /* 0: not a request watcher */
    _Atomic uint32_t samples;   /* samples tagged with it (the handler, same thread) */
    _Atomic int open;           /* from its LeanPath call to the end of the response */
    int64_t opened_ns, closed_ns, period_ns, max_depth, max_duration_ns;
    unsigned long thread_id;
    unsigned gen; /* g_gen when made: counted in g_open_watchers while open */
    PyObject *finish; /* release_request()'s: the collector calls finish(watcher, scope) */
    /* A lean call's (LeanPath): the awaitable that runs its request.  NULL otherwise. */
    struct LeanPath *path;  /* the LeanPath that made it (its counters) */
    PyObject *inner;        /* the app's awaitable's iterator until the request ends */
    PyObject *on_end;       /* on_end(watcher, asgi_scope, root_path, error) if it took samples */
    PyObject *asgi_scope;   /* the request's ASGI scope, until it ends */
    PyObject *root_path;    /* scope["root_path"] as the request began */
    struct SendWatcher_ *running_prev; /* the lean call running below it on this thread */
    int running;            /* inside send()/throw()/close() of the app's awaitable */
    int started;            /* stepped once at least */
} SendWatcher;

static PyTypeObject SendWatcherType;
/* Watcher tags sit far below every -(frame address) tag (user-space addresses < 2**62). */
#define WATCH_TAG(id) (INT64_MIN + (int64_t)(id))
static _Atomic uint64_t g_watch_ids;   /* request watchers made (their ids: 1, 2, ...) */
static _Atomic int64_t g_open_watchers; /* request watchers still open */
static _Atomic int g_roots_hwm;
static int g_n_roots;

static tslot_t g_timers[TIMER_CAP];
static int g_timers_active;       /* timers that exist (under g_timer_lock) */
static _Atomic int g_timers_armed; /* of those, the ones currently armed */
/* bumped by rearm_all() after it re-armed timers on relative expiries: a thread whose
 * recorded epoch is older cannot trust its timer's expiry to be tl_deadline_ns */
static _Atomic unsigned g_rearm_epoch;
static pthread_mutex_t g_timer_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_key_t g_key;

/* Per thread. initial-exec: the variables live in the static TLS block every thread already
 * has, so the handler's first access on any thread is a plain load - the default model for a
 * dlopen()ed module may call __tls_get_addr, which can allocate (not async-signal-safe). */
#define TLS __thread __attribute__((tls_model("initial-exec")))
static TLS volatile int tl_armed;
static TLS uint32_t tl_frame_cache_hits, tl_frame_cache_misses; /* this sample's, then added */
static TLS volatile int64_t tl_token;
static TLS int tl_slot = -1;
static TLS volatile int tl_has_timer;
static TLS timer_t tl_timer;
static TLS pid_t tl_tid; /* this thread's kernel id, noted with its timer (create_thread_timer) */
static TLS unsigned tl_gen;
static TLS int64_t tl_remaining_ns;
static TLS unsigned tl_remaining_gen;
/* the sampling schedule, in this thread's CPU-clock nanoseconds (see "Sampling schedule") */
static TLS uint64_t tl_rng;         /* xorshift64* state, never 0 once seeded */
static TLS int64_t tl_deadline_ns;  /* the deadline the timer is armed for */
static TLS int64_t tl_last_ns;      /* CPU clock at the last sample (or at arm) */
static TLS int64_t tl_banked_ns;    /* CPU consumed while armed before tl_last_ns, unsampled */
static TLS int64_t tl_sched_period; /* the period tl_deadline_ns was drawn with */
/* the kernel's expiry of tl_timer is exactly tl_deadline_ns (set with TIMER_ABSTIME), as of
 * rearm epoch tl_exact_epoch: disarm then derives the CPU clock from the remaining time */
static TLS int tl_exact;
static TLS unsigned tl_exact_epoch;
/* disarm parks the timer PARK_NS of CPU ahead: tl_park_ns is that expiry on the thread's
 * CPU clock when known exactly (0 otherwise), so the next arm_thread() learns the clock from
 * the old value its timer_settime returns */
static TLS int64_t tl_park_ns;
static TLS volatile int tl_arming;       /* arm_thread() between its timer_settime and tl_armed */
static TLS volatile int tl_fired_arming; /* the timer fired in that window */
/* the fault guard: set while this thread's handler reads interpreter memory; tl_jmp points
 * at the handler's own (stack) jump buffer */
static TLS volatile sig_atomic_t tl_walking;
static TLS sigjmp_buf *volatile tl_jmp;

/* drain-side caches (GIL) */
static PyObject **g_func_objs; /* FUNC_CAP entries: (name, filename, first_line) */
typedef struct {
    uint64_t key; /* (func << 32 | line) + 1, 0 = empty */
    PyObject *tuple;
} fcache_t;
static fcache_t *g_fcache;
static size_t g_fcache_cap, g_fcache_len;
#define FCACHE_MAX (1u << 20)

static inline pid_t my_tid(void) { return (pid_t)syscall(SYS_gettid); }

static inline int64_t now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline struct timespec ns_to_ts(int64_t ns)
{
    struct timespec ts;
    ts.tv_sec = (time_t)(ns / 1000000000LL);
    ts.tv_nsec = (long)(ns % 1000000000LL);
    return ts;
}

static inline uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* xorshift64* on the calling thread's state; async-signal-safe (no libc, no lock). */
static inline uint64_t tl_random(void)
{
    uint64_t x = tl_rng;
    if (x == 0) {
        x = 0x2545F4914F6CDD1DULL;
    }
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    tl_rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* A uniform value in [lo, lo + width) from a 64-bit random number (width > 0). */
static inline int64_t scale(uint64_t r, int64_t lo, int64_t width)
{
    return lo + (int64_t)(((unsigned __int128)r * (uint64_t)width) >> 64);
}

/* The next gap of the schedule: period * U, U uniform in [0.5, 1.5); mean = period. */
static inline int64_t next_gap(int64_t period)
{
    int64_t gap = scale(tl_random(), period - period / 2, period);
    return gap > 0 ? gap : 1;
}

/* Arm the one-shot timer for an absolute deadline on the thread's CPU clock. */
static inline int set_deadline(timer_t t, int64_t deadline_ns)
{
    struct itimerspec its;
    memset(&its, 0, sizeof(its));
    its.it_value = ns_to_ts(deadline_ns > 0 ? deadline_ns : 1);
    return timer_settime(t, TIMER_ABSTIME, &its, NULL);
}

/* ---------------------------------------------------------------- handler side */

/* A str object's UTF-8 text without copying (ASCII, or UTF-8 already cached); 0 if none. */
static inline int str_text(PyObject *s, const char **p, Py_ssize_t *n)
{
    if (s == NULL || Py_TYPE(s) != &PyUnicode_Type) {
        return 0;
    }
    PyASCIIObject *a = (PyASCIIObject *)s;
    if (!a->state.compact) {
        return 0;
    }
    if (a->state.ascii) {
        *p = (const char *)(a + 1);
        *n = a->length;
        return 1;
    }
    PyCompactUnicodeObject *c = (PyCompactUnicodeObject *)s;
    if (c->utf8 == NULL) {
        return 0;
    }
    *p = c->utf8;
    *n = c->utf8_length;
    return 1;
}

/* Copy a str object's text into dst (at most cap bytes), async-signal-safe. */
static int copy_str(PyObject *s, char *dst, int cap, int keep_tail)
{
    const char *src = NULL;
    Py_ssize_t n;
    if (!str_text(s, &src, &n)) {
        if (s == NULL || Py_TYPE(s) != &PyUnicode_Type || !((PyASCIIObject *)s)->state.compact) {
            dst[0] = '?';
            return 1;
        }
        src = NULL; /* compact non-ASCII without cached UTF-8: copied char by char below */
        n = ((PyASCIIObject *)s)->length;
    }
    Py_ssize_t start = 0;
    int off = 0;
    if (n > cap) {
        if (keep_tail) {
            memcpy(dst, "...", 3);
            off = 3;
            start = n - (cap - 3);
        }
        n = start + (cap - off);
    }
    if (src != NULL) {
        memcpy(dst + off, src + start, (size_t)(n - start));
        return off + (int)(n - start);
    }
    /* keep ASCII, mark the rest '?' */
    const void *data = (const void *)(((PyCompactUnicodeObject *)s) + 1);
    unsigned kind = ((PyASCIIObject *)s)->state.kind;
    for (Py_ssize_t i = start; i < n; i++) {
        uint32_t ch = kind == 1   ? ((const uint8_t *)data)[i]
                      : kind == 2 ? ((const uint16_t *)data)[i]
                                  : ((const uint32_t *)data)[i];
        dst[off++] = ch < 128 ? (char)ch : '?';
    }
    return off;
}

static inline uint64_t fnv1a(uint64_t h, const char *p, int n)
{
    for (int i = 0; i < n; i++) {
        h ^= (uint8_t)p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* Intern a code object's (qualname, filename, first line) into g_funcs; lock-free. */
static uint32_t intern_code(PyCodeObject *co)
{
    char name[NAME_CAP], file[FILE_CAP];
#if PY_VERSION_HEX >= 0x030B0000
    int nl = copy_str(co->co_qualname, name, NAME_CAP, 0);
#else
    int nl = copy_str(co->co_name, name, NAME_CAP, 0);
#endif
    int fl = copy_str(co->co_filename, file, FILE_CAP, 1);
    int32_t first = co->co_firstlineno;
    uint64_t h = fnv1a(14695981039346656037ULL, name, nl);
    h = fnv1a(h ^ 0xff, file, fl);
    h ^= (uint64_t)(uint32_t)first * 0x9E3779B97F4A7C15ULL;
    uint32_t i = (uint32_t)(h ^ (h >> 32)) & (FUNC_CAP - 1);
    for (int probe = 0; probe < FUNC_PROBES; probe++, i = (i + 1) & (FUNC_CAP - 1)) {
        func_t *e = &g_funcs[i];
        uint32_t st = atomic_load_explicit(&e->state, memory_order_acquire);
        if (st == 0) {
            uint32_t expected = 0;
            if (atomic_compare_exchange_strong_explicit(&e->state, &expected, 1,
                                                        memory_order_acq_rel,
                                                        memory_order_acquire)) {
                e->first_line = first;
                e->hash = h;
                e->name_len = (uint16_t)nl;
                e->file_len = (uint16_t)fl;
                memcpy(e->name, name, (size_t)nl);
                memcpy(e->file, file, (size_t)fl);
                atomic_store_explicit(&e->state, 2, memory_order_release);
                return i;
            }
            st = expected;
        }
        if (st == 2 && e->hash == h && e->first_line == first && e->name_len == nl &&
            e->file_len == fl && memcmp(e->name, name, (size_t)nl) == 0 &&
            memcmp(e->file, file, (size_t)fl) == 0) {
            return i;
        }
        /* st == 1: another thread is writing this entry; probe on (at worst a duplicate) */
    }
    atomic_fetch_add_explicit(&st_func_full, 1, memory_order_relaxed);
    return FUNC_NONE;
}

/* The watchers whose tags the current walk put in roots (their samples are counted once
 * the sample is published); parallel to the walk's roots, NULL for other roots. */
static TLS SendWatcher *tl_walk_watchers[MAX_ROOTS];

/* The lean calls (LeanPath) running on this thread, innermost first, linked by
 * running_prev: each is on the C stack, inside a step of its request's awaitable, so every
 * Python frame running meanwhile on this thread is its request's (see "Lean calls"). */
static TLS SendWatcher *volatile tl_running;

/* Add the tags of the open request watchers of the lean calls running on this thread. */
static inline void match_running(int64_t *roots, int *n_roots)
{
    for (SendWatcher *w = tl_running; w != NULL && *n_roots < MAX_ROOTS; w = w->running_prev) {
        if (w->id != 0 && atomic_load_explicit(&w->open, memory_order_relaxed)) {
            tl_walk_watchers[*n_roots] = w;
            roots[(*n_roots)++] = WATCH_TAG(w->id);
        }
    }
}

static inline void match_root(void *key, int64_t *roots, int *n_roots)
{
    int hwm = atomic_load_explicit(&g_roots_hwm, memory_order_acquire);
    for (int i = 0; i < hwm; i++) {
        if (atomic_load_explicit(&g_roots[i].key, memory_order_acquire) == key) {
            int64_t tok = atomic_load_explicit(&g_roots[i].token, memory_order_acquire);
            if (atomic_load_explicit(&g_roots[i].key, memory_order_acquire) == key &&
                *n_roots < MAX_ROOTS) {
                tl_walk_watchers[*n_roots] = NULL;
                roots[(*n_roots)++] = tok;
            }
            return;
        }
    }
}

/* Outcome of walk_stack(). */
#define WALK_OK 0
#define WALK_FALLBACK 1 /* 3.11/3.12: the newest C-level frame was not initialised yet */
#define WALK_REJECTED 2 /* the frame chain is inconsistent: the sample is dropped */

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
/* The frame a _PyEval_EvalFrameDefault() call starts with: on 3.12 its C-stack entry frame,
 * on 3.11 the first frame it runs, flagged is_entry. */
static inline int is_entry_frame(const _PyInterpreterFrame *f)
{
#if PY_VERSION_HEX >= 0x030C0000
    return f->owner == FRAME_OWNED_BY_CSTACK;
#else
    return f->is_entry;
#endif
}
#endif

#if PY_VERSION_HEX >= 0x030B0000
#define CO_QUALNAME(co) ((co)->co_qualname)
#else
#define CO_QUALNAME(co) ((co)->co_name)
#endif

/* Does g_funcs[func] hold exactly this code's text and first line (as intern_code finds)? */
static int func_matches(uint32_t func, PyCodeObject *co)
{
    if (func >= FUNC_CAP) {
        return 0;
    }
    func_t *e = &g_funcs[func];
    if (atomic_load_explicit(&e->state, memory_order_acquire) != 2 ||
        e->first_line != co->co_firstlineno) {
        return 0;
    }
    const char *p;
    Py_ssize_t n;
    /* a text longer than its cap was cut by copy_str: its length never matches, no hit */
    if (!str_text(CO_QUALNAME(co), &p, &n) || n != e->name_len || memcmp(p, e->name, (size_t)n)) {
        return 0;
    }
    if (!str_text(co->co_filename, &p, &n) || n != e->file_len || memcmp(p, e->file, (size_t)n)) {
        return 0;
    }
    return 1;
}

/* A str's cached hash (computed for the interned names of code objects), -1 if none yet. */
static inline Py_hash_t str_hash(PyObject *s)
{
    return (s != NULL && Py_TYPE(s) == &PyUnicode_Type) ? ((PyASCIIObject *)s)->hash : -1;
}

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

/* Frame cache
 * -----------
 * Per frame, a sample needs the function's entry in g_funcs (intern_code copies and hashes
 * the qualified name and the file name) and the line (PyCode_Addr2Line scans the code's
 * line table up to the instruction).  Under a server these two were most of the handler's
 * time - tens of microseconds for a stack of 30 frames with long functions such as asyncio's
 * _run_once - while the same (code, instruction) pairs come back sample after sample: the
 * frames below the leaf wait at the same call.  So a direct-mapped cache keyed by the code
 * object's address and the instruction offset keeps both, one seqlock per entry (a writer
 * that finds an entry being written does not cache; a reader that sees it change misses).
 *
 * A code object can die and another be made at its address, so an entry is trusted only if
 * what it was computed from is still what the frame's code holds: the same first line, the
 * same qualified-name, file-name and line-table objects, the line table's length and first
 * bytes, and the same texts - the names' cached str hashes equal the ones the entry was made
 * with (the names of code objects are interned, so hashed), else the function entry's text
 * compared byte for byte.  A wrong function would take a dead name's address reused by another name
 * of the same 64-bit hash.  The line could only be wrong for another code object of the
 * same function (same name, file and first line) made at the same address with a line table
 * at the same address as the dead one's, of the same length and first bytes, that differs
 * further on: generated code that varies only past its first lines, at the cost of a line
 * number, never of a function or a crash.
 *
 * Those checks read three more objects per frame (the names and the line table), cache
 * misses each when the handler runs with cold caches, as it does in a loaded server.  They
 * are needed only once a code object has died: no code object can be at an entry's address
 * but the one it was made for while none has been deallocated since.  So every code
 * object's end is counted (g_code_deaths), an entry keeps the count it was made or last
 * checked under, and while the two agree a hit reads the entry's first 32 bytes and nothing
 * else; an entry older than the last death is checked in full, and renewed if it holds.  In
 * a server, code objects die at start-up and rarely after. */
static inline void frame_info(PyCodeObject *co, int addr, uint32_t *func, int32_t *line)
{
    /* read before anything of co: a death from here on leaves the entry made below older */
    uint64_t deaths = atomic_load_explicit(&g_code_deaths, memory_order_acquire);
    uintptr_t k = (uintptr_t)co;
    frame_cache_t *e =
        &g_frame_cache[((k >> 4) ^ (k >> 17) ^ ((uint32_t)addr * 0x9E3779B1u)) &
                       (CODE_CACHE_CAP - 1)];
    uint32_t seq = atomic_load_explicit(&e->seq, memory_order_acquire);
    if (!(seq & 1)) {
        const void *c_code = LOAD(e->code);
        int32_t c_addr = LOAD(e->addr), c_line = LOAD(e->line);
        uint32_t c_func = LOAD(e->func);
        uint64_t c_deaths = LOAD(e->code_deaths);
        atomic_thread_fence(memory_order_acquire);
        if (c_deaths == deaths && g_deaths_counted && c_code == co && c_addr == addr &&
            atomic_load_explicit(&e->seq, memory_order_relaxed) == seq) {
            tl_frame_cache_hits++;
            *func = c_func;
            *line = c_line;
            return;
        }
    }
    PyObject *qual = CO_QUALNAME(co), *file = co->co_filename, *lt = co->co_linetable;
    int32_t first = (int32_t)co->co_firstlineno;
    Py_ssize_t lt_len = (lt != NULL && PyBytes_CheckExact(lt)) ? PyBytes_GET_SIZE(lt) : -1;
    uint64_t lt_head = 0;
    if (lt_len > 0) {
        memcpy(&lt_head, PyBytes_AS_STRING(lt), lt_len < 8 ? (size_t)lt_len : 8);
    }
    Py_hash_t qhash = str_hash(qual), fhash = str_hash(file);
    if (!(seq & 1)) {
        const void *c_code = LOAD(e->code), *c_qual = LOAD(e->qualname);
        const void *c_file = LOAD(e->filename), *c_lt = LOAD(e->linetable);
        Py_ssize_t c_lt_len = LOAD(e->linetable_len);
        uint64_t c_lt_head = LOAD(e->linetable_head);
        int32_t c_addr = LOAD(e->addr), c_line = LOAD(e->line), c_first = LOAD(e->first_line);
        uint32_t c_func = LOAD(e->func);
        Py_hash_t c_qhash = LOAD(e->qualname_hash), c_fhash = LOAD(e->filename_hash);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&e->seq, memory_order_relaxed) == seq && c_code == co &&
            c_addr == addr && c_first == first && c_qual == qual && c_file == file &&
            c_lt == lt && c_lt_len == lt_len && c_lt_head == lt_head &&
            (qhash != -1 && fhash != -1 && c_qhash == qhash && c_fhash == fhash
                 ? 1
                 : func_matches(c_func, co))) {
            tl_frame_cache_hits++;
            *func = c_func;
            *line = c_line;
            /* it holds: renewed under the current count (unless another thread writes it) */
            if (atomic_compare_exchange_strong_explicit(&e->seq, &seq, seq + 1,
                                                        memory_order_acq_rel,
                                                        memory_order_relaxed)) {
                STORE(e->code_deaths, deaths);
                atomic_store_explicit(&e->seq, seq + 2, memory_order_release);
            }
            return;
        }
    }
    tl_frame_cache_misses++;
    *line = addr < 0 ? first : PyCode_Addr2Line(co, addr);
    *func = intern_code(co);
    /* every read that could fault is done: an entry is never left half written */
    if (*func == FUNC_NONE || lt_len < 0 || (seq & 1) ||
        !atomic_compare_exchange_strong_explicit(&e->seq, &seq, seq + 1, memory_order_acq_rel,
                                                 memory_order_relaxed)) {
        return; /* not cacheable, or another thread is writing this entry */
    }
    STORE(e->code, (const void *)co);
    STORE(e->qualname, (const void *)qual);
    STORE(e->filename, (const void *)file);
    STORE(e->linetable, (const void *)lt);
    STORE(e->qualname_hash, qhash);
    STORE(e->filename_hash, fhash);
    STORE(e->linetable_len, lt_len);
    STORE(e->linetable_head, lt_head);
    STORE(e->addr, (int32_t)addr);
    STORE(e->first_line, first);
    STORE(e->line, *line);
    STORE(e->func, *func);
    STORE(e->code_deaths, deaths);
    atomic_store_explicit(&e->seq, seq + 2, memory_order_release);
}

/* addr: the frame's instruction offset in bytes (PyCode_Addr2Line's), or -1 before its
 * first instruction (the line is then the first line). */
static inline int record_frame(PyCodeObject *co, int addr, void *frame_obj, frame_ref_t *frames,
                               int *depth, int *truncated, int have_roots, int64_t *roots,
                               int *n_roots)
{
    if (have_roots && frame_obj != NULL) {
        match_root(frame_obj, roots, n_roots);
    }
    if (*depth < MAX_DEPTH) {
        frame_info(co, addr, &frames[*depth].func, &frames[*depth].line);
        (*depth)++;
        return 1;
    }
    *truncated = 1;
    return have_roots; /* beyond MAX_DEPTH, walk on only to match roots */
}

/* Walk the thread's Python frames, leaf first, into the caller's buffers.
 *
 * Runs under the fault guard (see "Fault guard" at on_fault): a pointer read here may be
 * stale, and a read through it may fault; the guard then jumps back to on_signal() and the
 * sample is dropped.  So what is read is also checked before it is trusted - a frame
 * pointer must be aligned, a frame's code a code object, the depth bounded (MAX_WALK) - so
 * that a stale chain is rejected, most often without faulting.
 *
 * 3.11/3.12: _PyEval_EvalFrameDefault() publishes its C-stack _PyCFrame (tstate->cframe =
 * &cframe) before it sets cframe.current_frame, so a signal in that window finds stack
 * garbage there.  Every C-level frame's chain of interpreter frames ends at an entry frame
 * (is_entry on 3.11, the FRAME_OWNED_BY_CSTACK entry_frame on 3.12) whose previous is the
 * current_frame of the enclosing _PyCFrame (CPython asserts this on return); the walk checks
 * that link at every entry frame.  When the newest _PyCFrame fails it, the walk restarts
 * from cframe->previous->current_frame (set before publication): the thread is then still
 * in the C code that is calling into the interpreter - the callee has not run a single
 * instruction - so the caller's stack is the true one and the sample keeps its CPU weight
 * (counted in stats()["walk_fallbacks"]).  Dropping it instead would lose the weight of
 * every sample that lands in that window, which on C-calls-Python-heavy code (sorted with a
 * key, tuple(generator)) is a systematic bias.  Any other inconsistency drops the sample
 * (stats()["walk_rejected"]). */
static int walk_stack(PyThreadState *ts, frame_ref_t *frames, int *depth, int *truncated,
                      int64_t *roots, int *n_roots)
{
    int have_roots = atomic_load_explicit(&g_roots_hwm, memory_order_relaxed) > 0;
    int walked = 0;
    int status = WALK_OK;
#if PY_VERSION_HEX >= 0x030D0000
    _PyInterpreterFrame *f = ts->current_frame;
    for (; f != NULL && walked < MAX_WALK; f = f->previous, walked++) {
        if (((uintptr_t)f & (sizeof(void *) - 1)) != 0) {
            return WALK_REJECTED;
        }
        PyObject *ex = f->f_executable;
        if (ex == NULL || Py_TYPE(ex) != &PyCode_Type) {
            continue;
        }
        if (f->owner == FRAME_OWNED_BY_CSTACK || _PyFrame_IsIncomplete(f)) {
            continue;
        }
        PyCodeObject *co = (PyCodeObject *)ex;
        int lasti = _PyInterpreterFrame_LASTI(f);
        if (!record_frame(co, lasti * (int)sizeof(_Py_CODEUNIT), (void *)f->frame_obj, frames,
                          depth, truncated, have_roots, roots, n_roots)) {
            break;
        }
    }
#elif PY_VERSION_HEX >= 0x030B0000
    _PyCFrame *cf = ts->cframe;    /* the C-level frame whose interpreter frames are walked */
    _PyInterpreterFrame *f = NULL;
restart:
    *depth = 0;
    *truncated = 0;
    *n_roots = 0;
    walked = 0;
    if (cf == NULL || ((uintptr_t)cf & (sizeof(void *) - 1)) != 0) {
        return cf == NULL ? status : WALK_REJECTED;
    }
    _PyCFrame *top = cf;
    f = cf->current_frame;
    while (f != NULL && walked < MAX_WALK) {
        if (((uintptr_t)f & (sizeof(void *) - 1)) != 0 ||
            (unsigned char)f->owner > 3 /* FRAME_OWNED_BY_CSTACK, the largest */) {
            goto inconsistent;
        }
        int entry = is_entry_frame(f);
        PyCodeObject *co = f->f_code;
        if (co == NULL || Py_TYPE(co) != &PyCode_Type) {
            if (!entry) {
                goto inconsistent; /* a Python frame always has its code object */
            }
        }
#if PY_VERSION_HEX >= 0x030C0000
        else if (f->owner != FRAME_OWNED_BY_CSTACK && !_PyFrame_IsIncomplete(f)) {
#else
        else if (!_PyFrame_IsIncomplete(f)) {
#endif
            int lasti = _PyInterpreterFrame_LASTI(f);
            if (!record_frame(co, lasti * (int)sizeof(_Py_CODEUNIT), (void *)f->frame_obj,
                              frames, depth, truncated, have_roots, roots, n_roots)) {
                f = NULL; /* deep enough, no roots to match: stop (truncated is set) */
                walked = -1;
                break;
            }
        }
        _PyInterpreterFrame *prev = f->previous;
        if (entry) {
            _PyCFrame *outer = cf->previous;
            if (outer != NULL && ((uintptr_t)outer & (sizeof(void *) - 1)) != 0) {
                goto inconsistent;
            }
            if (prev != (outer != NULL ? outer->current_frame : NULL)) {
                goto inconsistent;
            }
            cf = outer;
        }
        f = prev;
        walked++;
    }
    if (walked == -1) {
        return status;
    }
    goto done;
inconsistent:
    if (cf == top && status == WALK_OK && top->previous != NULL) {
        /* the newest C-level frame is not initialised: walk from its caller's frame */
        status = WALK_FALLBACK;
        cf = top->previous;
        goto restart;
    }
    *depth = 0;
    return WALK_REJECTED;
done:
#else /* 3.10: PyFrameObject chain */
    PyFrameObject *f = ts->frame;
    for (; f != NULL && walked < MAX_WALK; f = f->f_back, walked++) {
        if (((uintptr_t)f & (sizeof(void *) - 1)) != 0 || Py_TYPE(f) != &PyFrame_Type) {
            *depth = 0;
            return WALK_REJECTED;
        }
        PyCodeObject *co = f->f_code;
        if (co == NULL || Py_TYPE(co) != &PyCode_Type) {
            continue;
        }
        if (!record_frame(co, f->f_lasti < 0 ? -1 : f->f_lasti * 2, (void *)f, frames, depth,
                          truncated, have_roots, roots, n_roots)) {
            break;
        }
    }
#endif
    if (f != NULL) {
        *truncated = 1;
    }
    return status;
}

static void on_signal(int signo, siginfo_t *si, void *uctx)
{
    (void)signo;
    (void)si;
    (void)uctx;
    int saved_errno = errno;
    volatile int rearm = 0; /* read after a jump back from on_fault */
    volatile int64_t entered_at = 0; /* CLOCK_MONOTONIC when the sample began (stats) */
    atomic_fetch_add_explicit(&g_in_handler, 1, memory_order_acq_rel);
    atomic_fetch_add_explicit(&st_signals, 1, memory_order_relaxed);
    if (!atomic_load_explicit(&g_enabled, memory_order_acquire)) {
        goto out;
    }
    if (!tl_armed || tl_gen != g_gen) {
        /* a stray signal: the timer expired just before disarm_thread() (or stop()) and
         * the signal came after, or a parked timer expired; the timer stays disarmed (no
         * re-arm at "out").  Inside arm_thread(), the expiry is remembered: arm re-arms. */
        if (tl_arming) {
            tl_fired_arming = 1;
        }
        atomic_fetch_add_explicit(&st_not_armed, 1, memory_order_relaxed);
        goto out;
    }
    /* The schedule first: whatever happens to this sample, the thread's one-shot timer is
     * re-armed for its next deadline (at "out"). */
    int64_t period = atomic_load_explicit(&g_period_ns, memory_order_relaxed);
    int64_t now = now_ns(CLOCK_THREAD_CPUTIME_ID);
    int64_t weight = tl_banked_ns + (now - tl_last_ns);
    tl_banked_ns = 0;
    tl_last_ns = now;
    if (tl_sched_period != period) { /* set_frequency() re-armed the timer: start afresh */
        tl_sched_period = period;
        tl_deadline_ns = now;
    }
    int64_t passed = 0;
    while (tl_deadline_ns <= now && passed < 4096) {
        tl_deadline_ns += next_gap(period);
        passed++;
    }
    if (tl_deadline_ns <= now) { /* held up for thousands of periods: resynchronise */
        passed += (now - tl_deadline_ns) / period;
        tl_deadline_ns = now + next_gap(period);
    }
    rearm = 1;
    entered_at = now_ns(CLOCK_MONOTONIC);
    /* deadlines merged into this signal: CPU timers are checked on the scheduler tick, so
     * gaps shorter than the tick (or a delayed delivery) fold several into one signal */
    if (passed > 1) {
        atomic_fetch_add_explicit(&st_overruns, (uint64_t)(passed - 1), memory_order_relaxed);
    }
    frame_ref_t frames[MAX_DEPTH];
    int64_t roots[MAX_ROOTS];
    int depth = 0, truncated = 0, n_roots = 0;
    /* Everything that reads interpreter memory runs between the jump point and the clearing
     * of tl_walking: a fault there lands back here (on_fault), with nothing published - the
     * walk writes only this frame's buffers, the lock-free function table and the frame cache,
     * whose entries are copied from locals after every read that could fault. */
    sigjmp_buf jb;
    tl_jmp = &jb;
    if (sigsetjmp(jb, 0) != 0) {
        tl_walking = 0;
        atomic_signal_fence(memory_order_seq_cst);
        atomic_fetch_add_explicit(&st_faults, 1, memory_order_relaxed);
        goto out;
    }
    tl_walking = 1;
    atomic_signal_fence(memory_order_seq_cst);
    PyThreadState *ts = PyGILState_GetThisThreadState();
    tl_frame_cache_hits = tl_frame_cache_misses = 0;
    int status = ts != NULL ? walk_stack(ts, frames, &depth, &truncated, roots, &n_roots) : 0;
    if (tl_running != NULL) {
        match_running(roots, &n_roots);
    }
    atomic_signal_fence(memory_order_seq_cst);
    atomic_fetch_add_explicit(&st_frame_cache_hits, tl_frame_cache_hits, memory_order_relaxed);
    atomic_fetch_add_explicit(&st_frame_cache_misses, tl_frame_cache_misses,
                              memory_order_relaxed);
    tl_walking = 0;
    atomic_signal_fence(memory_order_seq_cst);
    if (ts == NULL) {
        atomic_fetch_add_explicit(&st_no_tstate, 1, memory_order_relaxed);
        goto out;
    }
    if (status == WALK_REJECTED) {
        atomic_fetch_add_explicit(&st_rejected, 1, memory_order_relaxed);
        goto out;
    }
    if (status == WALK_FALLBACK) {
        atomic_fetch_add_explicit(&st_fallbacks, 1, memory_order_relaxed);
    }
    if (depth == 0) {
        atomic_fetch_add_explicit(&st_no_python, 1, memory_order_relaxed);
        goto out;
    }
    if (tl_token == 0 && n_roots == 0) {
        /* armed with token 0 (a thread between scopes, kept armed) and no root on the stack:
         * the sample belongs to no scope */
        atomic_fetch_add_explicit(&st_unowned, 1, memory_order_relaxed);
        goto out;
    }

    /* claim a ring slot (Vyukov bounded queue, multi-producer) */
    uint64_t pos = atomic_load_explicit(&g_head, memory_order_relaxed);
    slot_t *s;
    for (;;) {
        s = &g_ring[pos & g_mask];
        uint64_t seq = atomic_load_explicit(&s->seq, memory_order_acquire);
        int64_t dif = (int64_t)(seq - pos);
        if (dif == 0) {
            if (atomic_compare_exchange_weak_explicit(&g_head, &pos, pos + 1,
                                                      memory_order_relaxed,
                                                      memory_order_relaxed)) {
                break;
            }
        }
        else if (dif < 0) {
            atomic_fetch_add_explicit(&st_dropped, 1, memory_order_relaxed);
            goto out;
        }
        else {
            pos = atomic_load_explicit(&g_head, memory_order_relaxed);
        }
    }
    s->token = tl_token;
    s->cpu_ns = weight;
    s->ts_ns = now_ns(CLOCK_REALTIME);
    s->tid = tl_tid; /* armed: this thread made its timer */
    s->depth = (uint16_t)depth;
    s->truncated = (uint8_t)truncated;
    s->n_roots = (uint8_t)n_roots;
    memcpy(s->roots, roots, sizeof(int64_t) * (size_t)n_roots);
    memcpy(s->frames, frames, sizeof(frame_ref_t) * (size_t)depth);
    atomic_store_explicit(&s->seq, pos + 1, memory_order_release);
    atomic_fetch_add_explicit(&st_samples, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&g_published, 1, memory_order_release);
    for (int i = 0; i < n_roots; i++) {
        if (tl_walk_watchers[i] != NULL) { /* its request's frame runs below: alive */
            atomic_fetch_add_explicit(&tl_walk_watchers[i]->samples, 1, memory_order_relaxed);
        }
    }
    if (truncated) {
        atomic_fetch_add_explicit(&st_truncated, 1, memory_order_relaxed);
    }
out:
    if (rearm && tl_has_timer) {
        /* the epoch is read before the timer is set: a rearm_all() in between bumps it
         * after its own timer_settime, so disarm then does not trust the expiry */
        tl_exact_epoch = atomic_load_explicit(&g_rearm_epoch, memory_order_acquire);
        tl_exact = 1;
        set_deadline(tl_timer, tl_deadline_ns);
    }
    if (entered_at) {
        atomic_fetch_add_explicit(&st_handler_ns, (uint64_t)(now_ns(CLOCK_MONOTONIC) - entered_at),
                                  memory_order_relaxed);
    }
    atomic_fetch_sub_explicit(&g_in_handler, 1, memory_order_acq_rel);
    errno = saved_errno;
}

/* Fault guard
 * -----------
 * The handler reads another piece of code's data structures at an arbitrary instruction of
 * the interrupted thread; however carefully it checks them (walk_stack), a pointer can be
 * stale.  While start()ed, SIGSEGV and SIGBUS go to on_fault first: a fault on a thread whose
 * handler is walking (tl_walking) is ours - on_fault jumps back into on_signal(), which drops
 * the sample (stats()["faults"]) and returns to the interrupted code.  Any other fault is a
 * real crash: on_fault puts back the action it found at start() (faulthandler's, or the
 * default that dumps core) and returns, so the faulting instruction runs again and faults
 * under that action; a SIGSEGV sent by kill() (no instruction to re-run) is raised again.
 * on_fault calls only sigaction(), raise() and siglongjmp(), all async-signal-safe.  The jump
 * leaves no lock held (the walk takes none) and no ring slot claimed (one is claimed only
 * after the walk).  A handler someone installs after start() (e.g. faulthandler enabled
 * later) takes precedence and, when it chains to the previous action, still reaches ours. */
static void on_fault(int signo, siginfo_t *si, void *uctx)
{
    (void)uctx;
    if (tl_walking && tl_jmp != NULL) {
        tl_walking = 0;
        siglongjmp(*tl_jmp, 1);
    }
    sigaction(signo, signo == SIGBUS ? &g_old_bus : &g_old_segv, NULL);
    if (si == NULL || si->si_code <= 0) { /* sent by kill()/raise(): deliver it again */
        raise(signo);
    }
}

/* Whether on_fault is the current action for signo. */
static int fault_guard_current(int signo)
{
    struct sigaction cur;
    return sigaction(signo, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
           cur.sa_sigaction == on_fault;
}

static int install_fault_guard(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_fault;
    /* SA_NODEFER: a real fault re-raised from on_fault is not blocked; an empty sa_mask, so
     * the jump back (sigsetjmp without the mask) leaves the sampling handler's mask as it was */
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &g_old_segv) != 0) {
        return -1;
    }
    if (sigaction(SIGBUS, &sa, &g_old_bus) != 0) {
        sigaction(SIGSEGV, &g_old_segv, NULL);
        return -1;
    }
    g_guard_installed = 1;
    return 0;
}

/* Put back the actions found at start(), where ours is still the current one. */
static void remove_fault_guard(void)
{
    if (!g_guard_installed) {
        return;
    }
    if (fault_guard_current(SIGSEGV)) {
        sigaction(SIGSEGV, &g_old_segv, NULL);
    }
    if (fault_guard_current(SIGBUS)) {
        sigaction(SIGBUS, &g_old_bus, NULL);
    }
    g_guard_installed = 0;
}

/* ---------------------------------------------------------------- timers */

/* Arm a one-shot timer first_ns of CPU time from now (the handler re-arms it). */
static int set_timer(timer_t t, int64_t first_ns)
{
    struct itimerspec its;
    memset(&its, 0, sizeof(its));
    its.it_value = ns_to_ts(first_ns > 0 ? first_ns : 1);
    return timer_settime(t, 0, &its, NULL);
}

/* pthread key destructor: a thread that exits with a timer (armed or not) deletes it. */
static void on_thread_exit(void *value)
{
    int i = (int)(intptr_t)value - 1;
    pid_t me = my_tid();
    tl_armed = 0;
    tl_has_timer = 0;
    pthread_mutex_lock(&g_timer_lock);
    if (i >= 0 && i < TIMER_CAP && g_timers[i].used && g_timers[i].tid == me) {
        timer_delete(g_timers[i].timer);
        g_timers[i].used = 0;
        if (g_timers[i].armed) {
            g_timers[i].armed = 0;
            atomic_fetch_sub(&g_timers_armed, 1);
        }
        g_timers_active--;
    }
    pthread_mutex_unlock(&g_timer_lock);
}

static void delete_all_timers(int really)
{
    pthread_mutex_lock(&g_timer_lock);
    for (int i = 0; i < TIMER_CAP; i++) {
        if (g_timers[i].used) {
            if (really) {
                timer_delete(g_timers[i].timer);
            }
            g_timers[i].used = 0;
            g_timers[i].armed = 0;
        }
    }
    g_timers_active = 0;
    atomic_store(&g_timers_armed, 0);
    pthread_mutex_unlock(&g_timer_lock);
}

/* ---------------------------------------------------------------- drain-side caches */

static void clear_caches(void)
{
    if (g_func_objs != NULL) {
        for (size_t i = 0; i < FUNC_CAP; i++) {
            Py_CLEAR(g_func_objs[i]);
        }
        PyMem_Free(g_func_objs);
        g_func_objs = NULL;
    }
    if (g_fcache != NULL) {
        for (size_t i = 0; i < g_fcache_cap; i++) {
            Py_XDECREF(g_fcache[i].tuple);
        }
        PyMem_Free(g_fcache);
        g_fcache = NULL;
    }
    g_fcache_cap = g_fcache_len = 0;
}

static void clear_roots(void)
{
    for (int i = 0; i < ROOT_CAP; i++) {
        atomic_store(&g_roots[i].key, NULL);
        atomic_store(&g_roots[i].token, 0);
        Py_CLEAR(g_roots[i].frame);
    }
    atomic_store(&g_roots_hwm, 0);
    g_n_roots = 0;
}

static void free_buffers(void)
{
    free(g_ring);
    g_ring = NULL;
    free(g_funcs);
    g_funcs = NULL;
    free(g_frame_cache);
    g_frame_cache = NULL;
    g_mask = 0;
    atomic_store(&g_head, 0);
    g_tail = 0;
}

static void reset_stats(void)
{
    atomic_store(&st_samples, 0);
    atomic_store(&st_dropped, 0);
    atomic_store(&st_signals, 0);
    atomic_store(&st_no_python, 0);
    atomic_store(&st_no_tstate, 0);
    atomic_store(&st_not_armed, 0);
    atomic_store(&st_unowned, 0);
    atomic_store(&st_func_full, 0);
    atomic_store(&st_frame_cache_hits, 0);
    atomic_store(&st_frame_cache_misses, 0);
    atomic_store(&st_handler_ns, 0);
    atomic_store(&st_truncated, 0);
    atomic_store(&st_overruns, 0);
    atomic_store(&st_faults, 0);
    atomic_store(&st_fallbacks, 0);
    atomic_store(&st_rejected, 0);
}

/* In a forked child: timers were not inherited; forget them, the buffers and the handler. */
static void reset_after_fork(void)
{
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&g_timer_lock, &fresh, sizeof(fresh));
    atomic_store(&g_enabled, 0);
    delete_all_timers(0);
    if (g_started) {
        sigaction(g_signo, &g_old_action, NULL);
    }
    remove_fault_guard();
    atomic_store(&g_in_handler, 0);
    free_buffers();
    clear_caches();
    clear_roots();
    reset_stats();
    atomic_store(&g_open_watchers, 0);
    g_started = 0;
    g_gen++;
    g_pid = getpid();
    tl_armed = 0;
    tl_has_timer = 0;
    tl_slot = -1;
}

/* Set in a forked child by the pthread_atfork() handler (fork() and os.fork() run it). */
static volatile sig_atomic_t g_forked;

static void on_fork_child(void) { g_forked = 1; }

/* The per-request calls (arm/disarm, add/remove_root, drain, thread_armed) only look at the
 * atfork flag: getpid() is a system call (glibc caches no pid), a noticeable part of their
 * cost. */
static inline void check_fork_fast(void)
{
    if (g_forked) {
        g_forked = 0;
        reset_after_fork();
    }
}

/* The other calls also compare the pid, for a child made without the atfork handlers. */
static inline void check_fork(void)
{
    check_fork_fast();
    if (g_pid != 0 && getpid() != g_pid) {
        reset_after_fork();
    }
}

/* ---------------------------------------------------------------- Python API */

static int period_from_hz(PyObject *hz_obj, int64_t *period)
{
    double hz = PyFloat_AsDouble(hz_obj);
    if (hz == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    if (!isfinite(hz) || hz <= 0.0 || hz > 100000.0) {
        PyErr_Format(PyExc_ValueError, "hz must be in (0, 100000], got %R", hz_obj);
        return -1;
    }
    *period = (int64_t)(1e9 / hz);
    if (*period < 1) {
        *period = 1;
    }
    return 0;
}

/* A new period for every armed timer: each gets a first expiry uniform in [0.5, 1.5) of the
 * new period; its thread's handler then notices the new period and draws a fresh schedule.
 * Disarmed timers stay disarmed: their next arm_thread() sees the new period and starts at a
 * random phase.  Runs with the GIL, so no thread arms or disarms meanwhile. */
static void rearm_all(int64_t period)
{
    static uint64_t seed;
    pthread_mutex_lock(&g_timer_lock);
    if (seed == 0) {
        seed = (uint64_t)now_ns(CLOCK_MONOTONIC);
    }
    for (int i = 0; i < TIMER_CAP; i++) {
        if (g_timers[i].used && g_timers[i].armed) {
            seed = splitmix64(seed);
            set_timer(g_timers[i].timer, scale(seed, period - period / 2, period));
        }
    }
    atomic_fetch_add_explicit(&g_rearm_epoch, 1, memory_order_release); /* after the sets */
    pthread_mutex_unlock(&g_timer_lock);
}

static PyObject *py_start(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"hz", "capacity", NULL};
    PyObject *hz_obj;
    Py_ssize_t capacity = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|n:start", kwlist, &hz_obj, &capacity)) {
        return NULL;
    }
    int64_t period;
    if (period_from_hz(hz_obj, &period) < 0) {
        return NULL;
    }
    if (capacity < 1 || (size_t)capacity > MAX_CAPACITY) {
        PyErr_Format(PyExc_ValueError, "capacity must be in [1, %u], got %zd",
                     MAX_CAPACITY, capacity);
        return NULL;
    }
    check_fork();
    if (g_started) {
        if (atomic_exchange(&g_period_ns, period) != period) {
            rearm_all(period);
        }
        Py_RETURN_NONE;
    }
    atomic_store(&g_period_ns, period);
    size_t cap = 2; /* the sequence-numbered ring needs two slots at least */
    while (cap < (size_t)capacity) {
        cap <<= 1;
    }
    struct sigaction cur;
    if (sigaction(g_signo, NULL, &cur) != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if ((cur.sa_flags & SA_SIGINFO) ? cur.sa_sigaction != on_signal
                                    : (cur.sa_handler != SIG_DFL && cur.sa_handler != SIG_IGN)) {
        PyErr_Format(PyExc_RuntimeError,
                     "signal %d (SIGRTMIN+3) already has a handler; the native sampler "
                     "cannot use it",
                     g_signo);
        return NULL;
    }
    g_ring = calloc(cap, sizeof(slot_t));
    g_funcs = calloc(FUNC_CAP, sizeof(func_t));
    g_frame_cache = calloc(CODE_CACHE_CAP, sizeof(frame_cache_t)); /* entries of g_funcs */
    g_func_objs = PyMem_Calloc(FUNC_CAP, sizeof(PyObject *));
    if (g_ring == NULL || g_funcs == NULL || g_frame_cache == NULL || g_func_objs == NULL) {
        free_buffers();
        clear_caches();
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < cap; i++) {
        atomic_store_explicit(&g_ring[i].seq, i, memory_order_relaxed);
    }
    g_mask = cap - 1;
    atomic_store(&g_head, 0);
    g_tail = 0;
    reset_stats();
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (install_fault_guard() != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        free_buffers();
        clear_caches();
        return NULL;
    }
    if (sigaction(g_signo, &sa, &g_old_action) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        remove_fault_guard();
        free_buffers();
        clear_caches();
        return NULL;
    }
    g_gen++;
    g_pid = getpid();
    g_started = 1;
    atomic_store(&g_enabled, 1);
    Py_RETURN_NONE;
}

static PyObject *py_stop(PyObject *self, PyObject *unused)
{
    check_fork();
    if (!g_started) {
        clear_roots();
        Py_RETURN_NONE;
    }
    atomic_store(&g_enabled, 0);
    delete_all_timers(1);
    /* Setting SIG_IGN discards signals still pending on any thread; then restore. */
    struct sigaction ign;
    memset(&ign, 0, sizeof(ign));
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    sigaction(g_signo, &ign, NULL);
    sigaction(g_signo, &g_old_action, NULL);
    /* Wait for handlers already running on other threads before freeing their memory.
     * The GIL stays held, so no thread can arm a new timer meanwhile; the handler itself
     * never needs the GIL. */
    struct timespec pause = {0, 100000};
    nanosleep(&pause, NULL);
    while (atomic_load(&g_in_handler) > 0) {
        sched_yield();
    }
    remove_fault_guard(); /* no handler is walking any more */
    free_buffers();
    clear_caches();
    clear_roots();
    g_started = 0;
    g_gen++;
    tl_armed = 0;
    tl_has_timer = 0;
    Py_RETURN_NONE;
}

static PyObject *py_set_frequency(PyObject *self, PyObject *hz_obj)
{
    int64_t period;
    if (period_from_hz(hz_obj, &period) < 0) {
        return NULL;
    }
    check_fork();
    if (atomic_exchange(&g_period_ns, period) != period && g_started) {
        rearm_all(period);
    }
    Py_RETURN_NONE;
}

/* Create the calling thread's timer (disarmed) and register it; -1 with an exception set. */
static int create_thread_timer(void)
{
    clockid_t clk;
    int err = pthread_getcpuclockid(pthread_self(), &clk);
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = g_signo;
    sev.sigev_notify_thread_id = my_tid();
    timer_t timer;
    if (timer_create(clk, &sev, &timer) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    int slot = -1;
    pthread_mutex_lock(&g_timer_lock);
    for (int i = 0; i < TIMER_CAP; i++) {
        if (!g_timers[i].used) {
            g_timers[i].used = 1;
            g_timers[i].armed = 0;
            g_timers[i].tid = my_tid();
            g_timers[i].timer = timer;
            g_timers_active++;
            slot = i;
            break;
        }
    }
    pthread_mutex_unlock(&g_timer_lock);
    if (slot < 0) {
        timer_delete(timer);
        PyErr_SetString(PyExc_RuntimeError, "too many threads with a timer at once");
        return -1;
    }
    tl_armed = 0;
    tl_slot = slot;
    tl_gen = g_gen;
    tl_timer = timer;
    tl_tid = sev.sigev_notify_thread_id;
    tl_exact = 0;
    tl_has_timer = 1;
    /* the key's destructor deletes the timer when the thread exits */
    pthread_setspecific(g_key, (void *)(intptr_t)(slot + 1));
    return 0;
}

static inline int64_t ts_to_ns(struct timespec ts)
{
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* arm_thread(): the first call of a thread (or the first since start()) creates its timer;
 * later calls find it parked by disarm_thread() and arm it with one timer_settime(), whose
 * old value (the countdown to the parked expiry, known exactly) gives the CPU clock: no
 * clock read.  The timer lives until the thread exits or stop(). */
static PyObject *py_arm_thread(PyObject *self, PyObject *token_obj)
{
    long long token = PyLong_AsLongLong(token_obj);
    if (token == -1 && PyErr_Occurred()) {
        return NULL;
    }
    check_fork_fast();
    if (!g_started) {
        PyErr_SetString(PyExc_RuntimeError, "the native CPU sampler is not started");
        return NULL;
    }
    tl_token = token;
    int have_timer = tl_has_timer && tl_slot >= 0 && tl_gen == g_gen;
    if (have_timer && tl_armed) { /* already armed: only the token changes */
        Py_RETURN_NONE;
    }
    if (!have_timer) {
        if (create_thread_timer() < 0) {
            return NULL;
        }
        tl_park_ns = 0;
    }
    int64_t period = atomic_load(&g_period_ns);
    int64_t first;
    int fresh = 0;
    if (tl_remaining_gen == g_gen && tl_sched_period == period &&
        tl_remaining_ns <= 2 * period) {
        /* the countdown left when the thread last disarmed, and the CPU it consumed armed
         * since its last sample (tl_banked_ns) carry over.  A deadline that was already due
         * (its tick had not come yet) stays due: the timer fires on the next tick and the
         * handler counts it, so short scopes do not push the schedule back. */
        first = tl_remaining_ns;
    }
    else { /* a random phase, so scopes shorter than a period are sampled in proportion */
        tl_rng = splitmix64((uint64_t)now_ns(CLOCK_MONOTONIC) ^ ((uint64_t)my_tid() << 32) ^
                            (uint64_t)(uintptr_t)&tl_rng);
        if (tl_rng == 0) {
            tl_rng = 1;
        }
        first = scale(tl_random(), 1, period);
        fresh = 1;
    }
    int rc;
    int64_t now = -1;
    /* GIL held: no rearm_all() runs until this thread releases it */
    unsigned epoch = atomic_load(&g_rearm_epoch);
    if (tl_park_ns > 0) {
        /* Parked: arm relative to the kernel's own clock sample, which is also the one the
         * old value is computed from (now = park - old), so the expiry is now + first
         * exactly.  The schedule is only known after the call: a signal in between finds
         * tl_armed == 0 and sets tl_fired_arming (handled below). */
        struct itimerspec its, old;
        memset(&its, 0, sizeof(its));
        memset(&old, 0, sizeof(old));
        its.it_value = ns_to_ts(first > 0 ? first : 1);
        tl_fired_arming = 0;
        tl_arming = 1;
        atomic_signal_fence(memory_order_seq_cst);
        rc = timer_settime(tl_timer, 0, &its, &old);
        int64_t left = ts_to_ns(old.it_value);
        if (rc == 0 && left > 1) {
            now = tl_park_ns - left;
        }
        else if (rc == 0) { /* the parked expiry passed (or is due): the clock is unknown */
            now = now_ns(CLOCK_THREAD_CPUTIME_ID);
        }
        tl_exact = rc == 0 && left > 1 && first > 0;
    }
    else {
        now = now_ns(CLOCK_THREAD_CPUTIME_ID);
        tl_deadline_ns = now + first;
        tl_last_ns = now;
        if (fresh) {
            tl_banked_ns = period - first;
        }
        tl_sched_period = period;
        tl_exact = first > 0;
        atomic_signal_fence(memory_order_seq_cst); /* the schedule is set before the handler */
        tl_armed = 1;
        /* absolute, so the kernel's expiry is exactly tl_deadline_ns; a due deadline fires
         * on the next tick (an absolute one in the past would fire inside this call) */
        rc = first > 0 ? set_deadline(tl_timer, tl_deadline_ns) : set_timer(tl_timer, 1);
    }
    tl_park_ns = 0;
    tl_exact_epoch = epoch;
    if (rc != 0) {
        tl_armed = 0;
        tl_arming = 0;
        return PyErr_SetFromErrno(PyExc_OSError); /* the timer stays, disarmed */
    }
    if (!tl_armed) { /* the parked path: set the schedule, then mark armed */
        tl_deadline_ns = now + first;
        tl_last_ns = now;
        if (fresh) {
            /* weigh the first sample as if the previous one came a period before its
             * deadline */
            tl_banked_ns = period - first;
        }
        tl_sched_period = period;
        atomic_signal_fence(memory_order_seq_cst);
        tl_armed = 1;
        atomic_signal_fence(memory_order_seq_cst);
        tl_arming = 0;
        if (tl_fired_arming) { /* a one-shot that fired unhandled: fire again on the next tick */
            tl_fired_arming = 0;
            tl_exact = 0;
            set_timer(tl_timer, 1);
        }
    }
    g_timers[tl_slot].armed = 1;
    atomic_fetch_add(&g_timers_armed, 1);
    Py_RETURN_NONE;
}

/* disarm_thread(): one timer_settime() that parks the timer PARK_NS of CPU ahead (a timer
 * that expires after that much unscoped CPU sends one stray signal, ignored); the timer and
 * its slot stay. */
static PyObject *py_disarm_thread(PyObject *self, PyObject *unused)
{
    check_fork_fast();
    if (!tl_armed || !tl_has_timer || tl_slot < 0 || tl_gen != g_gen) {
        tl_armed = 0; /* not armed, or armed before a stop(): its timer is gone */
        Py_RETURN_NONE;
    }
    tl_armed = 0;
    atomic_signal_fence(memory_order_seq_cst); /* the handler no longer touches the schedule */
    struct itimerspec park, old;
    memset(&park, 0, sizeof(park));
    memset(&old, 0, sizeof(old));
    int64_t now = -1;
    tl_park_ns = 0;
    if (tl_exact && tl_exact_epoch == atomic_load(&g_rearm_epoch)) {
        /* The old value is the countdown to the expiry, which is tl_deadline_ns: the CPU
         * clock the kernel sampled is tl_deadline_ns - remaining, and the parked expiry
         * that clock + PARK_NS, without reading the clock here.  A deadline that came due
         * while armed (its tick not yet come) reads 1 ns, a fired one 0: then the clock is
         * read, so the due deadline stays due (remaining <= 0). */
        park.it_value = ns_to_ts(PARK_NS);
        if (timer_settime(tl_timer, 0, &park, &old) == 0) {
            int64_t remaining = ts_to_ns(old.it_value);
            if (remaining > 1 && tl_deadline_ns - remaining >= tl_last_ns) {
                now = tl_deadline_ns - remaining;
                tl_park_ns = now + PARK_NS;
            }
        }
        if (now < 0) {
            now = now_ns(CLOCK_THREAD_CPUTIME_ID);
        }
    }
    else {
        /* The expiry is not tl_deadline_ns: a due deadline armed to fire on the next tick, or
         * a set_frequency() re-arm.  Read the clock and park at an absolute expiry, so the
         * next arm_thread() still needs no clock read. */
        now = now_ns(CLOCK_THREAD_CPUTIME_ID);
        park.it_value = ns_to_ts(now + PARK_NS);
        if (timer_settime(tl_timer, TIMER_ABSTIME, &park, NULL) == 0) {
            tl_park_ns = now + PARK_NS;
        }
    }
    /* keep the CPU consumed since the last sample and the countdown to the next deadline
     * (<= 0 when it is due but its tick has not come) for the next arm_thread() */
    tl_banked_ns += now - tl_last_ns;
    tl_last_ns = now;
    tl_remaining_ns = tl_deadline_ns - now;
    tl_remaining_gen = g_gen;
    if (g_timers[tl_slot].armed) {
        g_timers[tl_slot].armed = 0;
        atomic_fetch_sub(&g_timers_armed, 1);
    }
    Py_RETURN_NONE;
}

/* Whether the calling thread's timer is armed (add_root() returns it: the request path then
 * needs no separate call to learn that its thread is already being sampled). */
static PyObject *thread_armed_now(void)
{
    return PyBool_FromLong(g_started && tl_armed && tl_has_timer && tl_gen == g_gen);
}

static PyObject *py_add_root(PyObject *self, PyObject *args)
{
    PyObject *frame;
    long long token;
    if (!PyArg_ParseTuple(args, "OL:add_root", &frame, &token)) {
        return NULL;
    }
    if (!PyFrame_Check(frame)) {
        PyErr_Format(PyExc_TypeError, "add_root() needs a frame object, got %.100s",
                     Py_TYPE(frame)->tp_name);
        return NULL;
    }
    check_fork_fast();
    int free_i = -1;
    int hwm = atomic_load(&g_roots_hwm);
    for (int i = 0; i < hwm; i++) {
        void *k = atomic_load(&g_roots[i].key);
        if (k == (void *)frame) {
            atomic_store(&g_roots[i].token, token);
            return thread_armed_now();
        }
        if (k == NULL && free_i < 0) {
            free_i = i;
        }
    }
    if (free_i < 0) {
        if (hwm >= ROOT_CAP) {
            PyErr_SetString(PyExc_RuntimeError, "too many async roots registered");
            return NULL;
        }
        free_i = hwm;
    }
    Py_INCREF(frame);
    g_roots[free_i].frame = frame;
    atomic_store(&g_roots[free_i].token, token);
    atomic_store(&g_roots[free_i].key, (void *)frame);
    if (free_i >= hwm) {
        atomic_store(&g_roots_hwm, free_i + 1);
    }
    g_n_roots++;
    return thread_armed_now();
}

static PyObject *py_remove_root(PyObject *self, PyObject *frame)
{
    check_fork_fast();
    int hwm = atomic_load(&g_roots_hwm);
    for (int i = 0; i < hwm; i++) {
        if (atomic_load(&g_roots[i].key) == (void *)frame) {
            atomic_store(&g_roots[i].key, NULL);
            atomic_store(&g_roots[i].token, 0);
            Py_CLEAR(g_roots[i].frame);
            g_n_roots--;
            while (hwm > 0 && atomic_load(&g_roots[hwm - 1].key) == NULL) {
                hwm--;
            }
            atomic_store(&g_roots_hwm, hwm);
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}

static PyObject *func_obj(uint32_t id)
{
    if (id == FUNC_NONE || id >= FUNC_CAP) {
        static PyObject *unknown;
        if (unknown == NULL) {
            unknown = Py_BuildValue("(ssi)", "<unknown>", "<unknown>", 0);
        }
        return unknown;
    }
    PyObject *o = g_func_objs[id];
    if (o != NULL) {
        return o;
    }
    func_t *e = &g_funcs[id];
    if (atomic_load_explicit(&e->state, memory_order_acquire) != 2) {
        return func_obj(FUNC_NONE);
    }
    PyObject *name = PyUnicode_DecodeUTF8(e->name, e->name_len, "replace");
    PyObject *file = PyUnicode_DecodeUTF8(e->file, e->file_len, "replace");
    if (name != NULL) {
        PyUnicode_InternInPlace(&name);
    }
    if (file != NULL) {
        PyUnicode_InternInPlace(&file);
    }
    PyObject *first = PyLong_FromLong(e->first_line);
    if (name == NULL || file == NULL || first == NULL) {
        Py_XDECREF(name);
        Py_XDECREF(file);
        Py_XDECREF(first);
        return NULL;
    }
    o = PyTuple_Pack(3, name, file, first);
    Py_DECREF(name);
    Py_DECREF(file);
    Py_DECREF(first);
    g_func_objs[id] = o;
    return o;
}

static int fcache_grow(void)
{
    size_t ncap = g_fcache_cap ? g_fcache_cap * 2 : 1024;
    fcache_t *n = PyMem_Calloc(ncap, sizeof(fcache_t));
    if (n == NULL) {
        return -1;
    }
    for (size_t i = 0; i < g_fcache_cap; i++) {
        if (g_fcache[i].key) {
            size_t j = (size_t)(g_fcache[i].key * 0x9E3779B97F4A7C15ULL >> 20) & (ncap - 1);
            while (n[j].key) {
                j = (j + 1) & (ncap - 1);
            }
            n[j] = g_fcache[i];
        }
    }
    PyMem_Free(g_fcache);
    g_fcache = n;
    g_fcache_cap = ncap;
    return 0;
}

/* A (name, filename, first_line, line) tuple; new reference. */
static PyObject *frame_tuple(frame_ref_t fr)
{
    uint64_t key = (((uint64_t)fr.func << 32) | (uint32_t)fr.line) + 1;
    int cacheable = fr.func != FUNC_NONE && key != 0;
    if (cacheable && (g_fcache_len + 1) * 2 > g_fcache_cap && g_fcache_cap < FCACHE_MAX) {
        if (fcache_grow() < 0) {
            PyErr_Clear();
            cacheable = 0;
        }
    }
    size_t j = 0;
    if (cacheable && g_fcache_cap) {
        j = (size_t)(key * 0x9E3779B97F4A7C15ULL >> 20) & (g_fcache_cap - 1);
        while (g_fcache[j].key) {
            if (g_fcache[j].key == key) {
                Py_INCREF(g_fcache[j].tuple);
                return g_fcache[j].tuple;
            }
            j = (j + 1) & (g_fcache_cap - 1);
        }
    }
    PyObject *fo = func_obj(fr.func);
    if (fo == NULL) {
        return NULL;
    }
    PyObject *t = PyTuple_New(4);
    if (t == NULL) {
        return NULL;
    }
    for (int k = 0; k < 3; k++) {
        PyObject *item = PyTuple_GET_ITEM(fo, k);
        Py_INCREF(item);
        PyTuple_SET_ITEM(t, k, item);
    }
    PyObject *line = PyLong_FromLong(fr.line);
    if (line == NULL) {
        Py_DECREF(t);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 3, line);
    if (cacheable && g_fcache_cap && (g_fcache_len + 1) * 2 <= g_fcache_cap) {
        g_fcache[j].key = key;
        g_fcache[j].tuple = t;
        Py_INCREF(t);
        g_fcache_len++;
    }
    return t;
}

static PyObject *sample_tuple(const slot_t *s)
{
    PyObject *roots = PyTuple_New(s->n_roots);
    PyObject *frames = PyTuple_New(s->depth);
    if (roots == NULL || frames == NULL) {
        goto error;
    }
    for (int i = 0; i < s->n_roots; i++) {
        PyObject *r = PyLong_FromLongLong(s->roots[i]);
        if (r == NULL) {
            goto error;
        }
        PyTuple_SET_ITEM(roots, i, r);
    }
    for (int i = 0; i < s->depth; i++) {
        PyObject *f = frame_tuple(s->frames[i]);
        if (f == NULL) {
            goto error;
        }
        PyTuple_SET_ITEM(frames, i, f);
    }
    PyObject *result = Py_BuildValue("(LNiLLN)", (long long)s->token, roots, (int)s->tid,
                                     (long long)s->cpu_ns, (long long)s->ts_ns, frames);
    return result;
error:
    Py_XDECREF(roots);
    Py_XDECREF(frames);
    return NULL;
}

static PyObject *py_drain(PyObject *self, PyObject *unused)
{
    check_fork_fast();
    PyObject *out = PyList_New(0);
    if (out == NULL || !g_started || g_ring == NULL) {
        return out;
    }
    slot_t local;
    for (;;) {
        slot_t *s = &g_ring[g_tail & g_mask];
        uint64_t seq = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (seq != g_tail + 1) {
            break; /* empty, or a producer is still writing this slot */
        }
        memcpy(&local, s, offsetof(slot_t, frames));
        memcpy(local.frames, s->frames, sizeof(frame_ref_t) * local.depth);
        atomic_store_explicit(&s->seq, g_tail + g_mask + 1, memory_order_release);
        g_tail++;
        PyObject *t = sample_tuple(&local);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}

static PyObject *py_stats(PyObject *self, PyObject *unused)
{
    check_fork();
    pthread_mutex_lock(&g_timer_lock);
    int active = g_timers_active;
    pthread_mutex_unlock(&g_timer_lock);
    int armed = atomic_load(&g_timers_armed);
    return Py_BuildValue(
        "{sKsKsisisKsKsKsKsKsKsKsKsKsKsKsKsKsKsisisisKsi}", "samples",
        (unsigned long long)atomic_load(&st_samples), "dropped",
        (unsigned long long)atomic_load(&st_dropped), "timers_active", active, "timers_armed",
        armed,
        "signals_received", (unsigned long long)atomic_load(&st_signals), "skipped_no_python",
        (unsigned long long)atomic_load(&st_no_python), "skipped_no_thread_state",
        (unsigned long long)atomic_load(&st_no_tstate), "skipped_not_armed",
        (unsigned long long)atomic_load(&st_not_armed), "skipped_unowned",
        (unsigned long long)atomic_load(&st_unowned), "function_table_full",
        (unsigned long long)atomic_load(&st_func_full), "truncated",
        (unsigned long long)atomic_load(&st_truncated), "overruns",
        (unsigned long long)atomic_load(&st_overruns), "faults",
        (unsigned long long)atomic_load(&st_faults), "walk_fallbacks",
        (unsigned long long)atomic_load(&st_fallbacks), "walk_rejected",
        (unsigned long long)atomic_load(&st_rejected), "frame_cache_hits",
        (unsigned long long)atomic_load(&st_frame_cache_hits), "frame_cache_misses",
        (unsigned long long)atomic_load(&st_frame_cache_misses), "handler_ns",
        (unsigned long long)atomic_load(&st_handler_ns), "roots", g_n_roots, "started",
        g_started, "signal", g_signo, "code_deaths",
        (unsigned long long)atomic_load(&g_code_deaths), "code_deaths_counted",
        g_deaths_counted);
}

static PyObject *py_active_timers(PyObject *self, PyObject *unused)
{
    check_fork();
    pthread_mutex_lock(&g_timer_lock);
    int active = g_timers_active;
    pthread_mutex_unlock(&g_timer_lock);
    return PyLong_FromLong(active);
}

static PyObject *py_armed_timers(PyObject *self, PyObject *unused)
{
    check_fork();
    return PyLong_FromLong(atomic_load(&g_timers_armed));
}

static PyObject *py_thread_armed(PyObject *self, PyObject *unused)
{
    check_fork_fast();
    return thread_armed_now();
}

/* The request path's one call per scope edge: -1 unless the sampler runs and the calling
 * thread is armed, else the count of samples published so far.  Equal readings at a
 * scope's open and close mean no sample at all was recorded in between (a thread's own
 * samples are published before its handler returns), so the close need not drain. */
/* Whether the sampler runs and samples the calling thread (after check_fork_fast()). */
static inline int thread_sampled(void)
{
    return g_started && tl_armed && tl_has_timer && tl_gen == g_gen;
}

static PyObject *py_mark(PyObject *self, PyObject *unused)
{
    check_fork_fast();
    if (!thread_sampled()) {
        return PyLong_FromLong(-1);
    }
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&g_published, memory_order_acquire));
}

static PyObject *py_is_started(PyObject *self, PyObject *unused)
{
    check_fork_fast(); /* on every scope opened */
    return PyBool_FromLong(g_started);
}

static PyObject *py_after_fork_child(PyObject *self, PyObject *unused)
{
    reset_after_fork();
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- the request path in C
 *
 * An ASGI request profiled at every request runs this at every request, after ~1 ms of
 * other code has evicted the caches: each Python function it needs costs a few
 * microseconds there.  So the two things the adapter does per response message (note the
 * status, end the scope at the last body chunk) and the scope's end are C. */

static PyObject *s_type, *s_status, *s_more_body, *s_closed_ns, *s_quiet, *s_mark;
static PyObject *s_response_start, *s_response_body;
static PyObject *s_append;
static _Atomic uint64_t g_code_opens;

/* ScopeCore: the C base of CodeScope (see _scope.py).  One is made for every profiled
 * request of an async app, so what the request path reads and writes lives in C fields:
 * no instance dict entries, no int objects for the times and marks.  Python reads and sets
 * them as ordinary attributes; closed_ns and deadline_ns are None when unset.  Other scope
 * objects (tests pass plain ones) take the attribute path in end_scope. */
#define NO_NS INT64_MIN

typedef struct {
    PyObject_HEAD
    unsigned long thread_id;
    long long period_ns, max_depth, opened_ns, mark;
    int64_t closed_ns, deadline_ns; /* NO_NS: None */
    char quiet;
    PyObject *root_key; /* code_roots' key of a request's scope (its watcher's tag); 0 else */
    PyObject *finish;   /* NULL: None */
} ScopeCore;

static PyTypeObject ScopeCoreType;

static inline int is_core(PyObject *scope)
{
    return PyObject_TypeCheck(scope, &ScopeCoreType);
}

/* A scope with Scope's defaults (request_scope in _native_tier.py sets its fields). */
static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    ScopeCore *c = (ScopeCore *)type->tp_alloc(type, 0);
    if (c != NULL) {
        c->mark = -1;
        c->closed_ns = c->deadline_ns = NO_NS;
        c->root_key = PyLong_FromLong(0); /* a cached small int: cannot fail */
    }
    return (PyObject *)c;
}

static int core_traverse(ScopeCore *c, visitproc visit, void *arg)
{
    Py_VISIT(c->finish);
    return 0;
}

static int core_clear(ScopeCore *c)
{
    Py_CLEAR(c->finish);
    return 0;
}

static void core_dealloc(ScopeCore *c)
{
    PyObject_GC_UnTrack(c);
    core_clear(c);
    Py_CLEAR(c->root_key);
    PyTypeObject *type = Py_TYPE(c);
    type->tp_free((PyObject *)c);
}

static PyObject *ns_get(int64_t v)
{
    return v == NO_NS ? Py_NewRef(Py_None) : PyLong_FromLongLong(v);
}

static int ns_set(int64_t *field, PyObject *value, const char *name)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "cannot delete %s", name);
        return -1;
    }
    if (value == Py_None) {
        *field = NO_NS;
        return 0;
    }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v == NO_NS) {
        PyErr_Format(PyExc_OverflowError, "%s out of range", name);
        return -1;
    }
    *field = v;
    return 0;
}

static PyObject *core_get_closed(ScopeCore *c, void *closure)
{
    return ns_get(c->closed_ns);
}

static int core_set_closed(ScopeCore *c, PyObject *value, void *closure)
{
    return ns_set(&c->closed_ns, value, "closed_ns");
}

static PyObject *core_get_deadline(ScopeCore *c, void *closure)
{
    return ns_get(c->deadline_ns);
}

static int core_set_deadline(ScopeCore *c, PyObject *value, void *closure)
{
    return ns_set(&c->deadline_ns, value, "deadline_ns");
}

static PyObject *core_get_root_key(ScopeCore *c, void *closure)
{
    return Py_NewRef(c->root_key);
}

static int core_set_root_key(ScopeCore *c, PyObject *value, void *closure)
{
    if (value == NULL || !PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "root_key must be an int");
        return -1;
    }
    Py_SETREF(c->root_key, Py_NewRef(value));
    return 0;
}

static PyGetSetDef core_getset[] = {
    {"closed_ns", (getter)core_get_closed, (setter)core_set_closed,
     "When the scope ended (Unix ns), None while open.", NULL},
    {"deadline_ns", (getter)core_get_deadline, (setter)core_set_deadline,
     "Unix time after which samples are not kept, or None.", NULL},
    {"root_key", (getter)core_get_root_key, (setter)core_set_root_key,
     "A request scope's key in the engine's code roots (its watcher's tag); 0 otherwise.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef core_members[] = {
    {"thread_id", T_ULONG, offsetof(ScopeCore, thread_id), 0, "The thread's ident."},
    {"period_ns", T_LONGLONG, offsetof(ScopeCore, period_ns), 0, "The sampling period."},
    {"max_depth", T_LONGLONG, offsetof(ScopeCore, max_depth), 0, "Frames kept per sample."},
    {"opened_ns", T_LONGLONG, offsetof(ScopeCore, opened_ns), 0, "When it opened (Unix ns)."},
    {"mark", T_LONGLONG, offsetof(ScopeCore, mark), 0,
     "The extension's count of published samples at the open (-1: none read)."},
    {"quiet", T_BOOL, offsetof(ScopeCore, quiet), 0,
     "No sample at all was published between the open and the end."},
    {"finish", T_OBJECT, offsetof(ScopeCore, finish), 0,
     "A released code root's finish (the engine calls it), or None."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ScopeCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "otlp_middleware.profiling._cpu_native.ScopeCore",
    .tp_basicsize = sizeof(ScopeCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "ScopeCore()\n--\n\nThe C fields of a code scope (the base of CodeScope): "
              "thread_id, period_ns, max_depth, opened_ns, closed_ns, deadline_ns, mark, "
              "quiet, root_key and finish, read and set by the request path without "
              "dictionaries or int objects.",
    .tp_new = core_new,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_getset = core_getset,
    .tp_members = core_members,
};

static PyObject *py_code_opens(PyObject *self, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&g_code_opens, memory_order_relaxed));
}

/* scope.closed_ns = now (Unix ns) unless set; scope.quiet = no sample published since
 * scope.mark was read (mark() at the end equals the one at the open). */
static int end_scope(PyObject *scope)
{
    if (is_core(scope)) {
        ScopeCore *c = (ScopeCore *)scope;
        if (c->closed_ns != NO_NS) {
            return 0;
        }
        check_fork_fast();
        long long mark_now = thread_sampled() ? (long long)atomic_load_explicit(
                                                    &g_published, memory_order_acquire)
                                              : -1;
        c->closed_ns = now_ns(CLOCK_REALTIME);
        c->quiet = c->mark >= 0 && mark_now == c->mark;
        return 0;
    }
    PyObject *closed = PyObject_GetAttr(scope, s_closed_ns);
    if (closed == NULL) {
        return -1;
    }
    int open = closed == Py_None;
    Py_DECREF(closed);
    if (!open) {
        return 0;
    }
    long long mark_now = -1;
    check_fork_fast();
    if (thread_sampled()) {
        mark_now = (long long)atomic_load_explicit(&g_published, memory_order_acquire);
    }
    PyObject *mark = PyObject_GetAttr(scope, s_mark);
    if (mark == NULL) {
        return -1;
    }
    long long mark_open = PyLong_AsLongLong(mark);
    Py_DECREF(mark);
    if (mark_open == -1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *now = PyLong_FromLongLong(now_ns(CLOCK_REALTIME));
    if (now == NULL) {
        return -1;
    }
    int err = PyObject_SetAttr(scope, s_closed_ns, now);
    Py_DECREF(now);
    if (err < 0) {
        return -1;
    }
    int quiet = mark_open >= 0 && mark_now == mark_open;
    return PyObject_SetAttr(scope, s_quiet, quiet ? Py_True : Py_False);
}

static PyObject *py_end_scope(PyObject *self, PyObject *scope)
{
    if (end_scope(scope) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* message[key], a new reference; NULL without an error when missing */
static PyObject *message_get(PyObject *message, PyObject *key)
{
    if (PyDict_Check(message)) {
        PyObject *v = PyDict_GetItemWithError(message, key);
        Py_XINCREF(v);
        return v;
    }
    PyObject *v = PyObject_GetItem(message, key);
    if (v == NULL && PyErr_ExceptionMatches(PyExc_KeyError)) {
        PyErr_Clear();
    }
    return v;
}

static int is_str(PyObject *v, PyObject *literal)
{
    return v != NULL &&
           (v == literal || (PyUnicode_CheckExact(v) && PyUnicode_Compare(v, literal) == 0));
}


/* A request watcher's end: samples taken from now on are not its request's. */
static void close_watcher(SendWatcher *w)
{
    if (w->id != 0 && atomic_exchange_explicit(&w->open, 0, memory_order_relaxed)) {
        atomic_signal_fence(memory_order_seq_cst); /* the handler sees it closed from here */
        w->closed_ns = now_ns(CLOCK_REALTIME);
        if (w->gen == g_gen) {
            atomic_fetch_sub_explicit(&g_open_watchers, 1, memory_order_relaxed);
        }
    }
}

/* Note what the request needs from one message; never fails (the app must not see our
 * errors: a message we cannot read is passed on unread). */
static void watch(SendWatcher *w, PyObject *message)
{
    PyObject *exc_type, *exc_value, *exc_tb;
    PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
    PyObject *kind = message_get(message, s_type);
    if (is_str(kind, s_response_start)) {
        PyObject *status = message_get(message, s_status);
        if (status != NULL) {
            Py_XSETREF(w->status, status);
        }
    }
    else if (is_str(kind, s_response_body)) {
        PyObject *more = message_get(message, s_more_body);
        int more_body = more != NULL ? PyObject_IsTrue(more) : 0;
        Py_XDECREF(more);
        if (more_body == 0) {
            close_watcher(w);
            if (w->scope != Py_None) {
                (void)end_scope(w->scope);
            }
        }
    }
    Py_XDECREF(kind);
    PyErr_Clear();
    PyErr_Restore(exc_type, exc_value, exc_tb);
}

static PyObject *watcher_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames)
{
    SendWatcher *w = (SendWatcher *)self;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (n == 1 && kwnames == NULL) {
        watch(w, args[0]);
    }
    if (w->send == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "send() after the request ended");
        return NULL;
    }
    return PyObject_Vectorcall(w->send, args, nargsf, kwnames);
}

/* A new SendWatcher of send and scope (both strong references taken). */
static PyObject *make_watcher(PyObject *send, PyObject *scope)
{
    SendWatcher *w = (SendWatcher *)SendWatcherType.tp_alloc(&SendWatcherType, 0);
    if (w == NULL) {
        return NULL;
    }
    w->send = Py_NewRef(send);
    w->scope = Py_NewRef(scope);
    w->status = NULL;
    w->vectorcall = watcher_vectorcall;
    return (PyObject *)w;
}

static PyObject *watcher_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *send, *scope;
    if (!PyArg_ParseTuple(args, "OO:SendWatcher", &send, &scope)) {
        return NULL;
    }
    return make_watcher(send, scope);
}

/* A new request watcher of send, open (the caller checked the sampler runs at period). */
static PyObject *open_request_watcher(PyObject *send, long long period, long long max_depth,
                                      long long max_duration)
{
    SendWatcher *w = (SendWatcher *)make_watcher(send, Py_None);
    if (w == NULL) {
        return NULL;
    }
    w->id = atomic_fetch_add_explicit(&g_watch_ids, 1, memory_order_relaxed) + 1;
    w->opened_ns = now_ns(CLOCK_REALTIME);
    w->thread_id = PyThread_get_thread_ident();
    w->period_ns = period;
    w->max_depth = max_depth;
    w->max_duration_ns = max_duration;
    w->gen = g_gen;
    atomic_fetch_add_explicit(&g_open_watchers, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&g_code_opens, 1, memory_order_relaxed);
    atomic_store_explicit(&w->open, 1, memory_order_relaxed);
    return (PyObject *)w;
}

static PyObject *py_open_watchers(PyObject *self, PyObject *unused)
{
    check_fork_fast();
    return PyLong_FromLongLong(atomic_load_explicit(&g_open_watchers, memory_order_relaxed));
}

/* release_request(released, watcher, finish): end the request watcher (and its scope, if any),
 * keep finish on it and append it to the deque released, where the engine's collector
 * makes its scope (request_scope) and calls finish(watcher, scope) once the samples are in.
 * So a request that took samples costs its request path one call more, no scope object. */
static PyObject *py_release_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || Py_TYPE(args[1]) != &SendWatcherType || ((SendWatcher *)args[1])->id == 0) {
        PyErr_SetString(PyExc_TypeError,
                        "release_request(released, watcher: a request watcher, finish)");
        return NULL;
    }
    SendWatcher *w = (SendWatcher *)args[1];
    close_watcher(w);
    if (w->scope != Py_None && end_scope(w->scope) < 0) {
        return NULL;
    }
    Py_XSETREF(w->finish, Py_NewRef(args[2]));
    Py_CLEAR(w->send); /* the request has ended: what the server's send holds can go now */
    PyObject *res = PyObject_CallMethodOneArg(args[0], s_append, args[1]);
    if (res == NULL) {
        return NULL;
    }
    Py_DECREF(res);
    Py_RETURN_NONE;
}

/* Lean calls
 * ----------
 * The ASGI request path at its leanest, when every profiled request needs only on-CPU
 * samples: ProfilingMiddleware.__call__ (a plain function) calls a LeanPath, which makes the
 * request's watcher, calls app(scope, receive, watcher) and returns the watcher itself as
 * the awaitable the server awaits.  It drives the app's awaitable step by step (send(),
 * throw(), close(), as a coroutine would through "await"), and while a step runs the
 * watcher is on this thread's tl_running chain: the signal handler tags every sample taken
 * meanwhile with it (match_running), so the request needs no coroutine frame of its own for
 * the handler to find, nor any registration.  When the app's awaitable is done, the watcher
 * ends the request: a request that took no sample is only counted (LeanPath.empty); one
 * that did is handed to on_end(watcher, asgi_scope, root_path, error) (Python), which
 * releases it to the collector (release_request). */

typedef struct LeanPath {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    long long period_ns, max_depth, max_duration_ns;
    /* undecided calls: the paths not profiled (a set of exact paths, a tuple of prefixes,
     * a match(path) function, each or NULL), and the strategy whose _count counts each
     * decision (AlwaysSample's, as its should_sample() would), or NULL */
    PyObject *exact, *prefixes, *match, *sampler;
    unsigned long long always, decided, excluded, empty, failures;
} LeanPath;

static PyTypeObject LeanPathType;
/* set_lean(): whether LeanPath calls apply at all (the engine's native tier is in use) */
static int g_lean_enabled;
static PyObject *s_root_path, *s_empty_str, *s_throw, *s_close, *s_gi_code, *s_co_flags;
static PyObject *s_path, *s_count;

/* The exception being raised, normalised, with its traceback; cleared (NULL: none). */
static PyObject *take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL) {
        return NULL;
    }
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_DECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Raise exc again (a reference taken from take_exception()). */
static void raise_again(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

/* The iterator "await o" would drive (a new reference), or NULL with TypeError. */
static PyObject *awaitable_iter(PyObject *o)
{
    if (PyCoro_CheckExact(o)) {
        return Py_NewRef(o);
    }
    if (PyGen_CheckExact(o)) { /* a generator-based coroutine (types.coroutine) */
        PyObject *code = PyObject_GetAttr(o, s_gi_code);
        PyObject *flags = code != NULL ? PyObject_GetAttr(code, s_co_flags) : NULL;
        long f = flags != NULL ? PyLong_AsLong(flags) : 0;
        Py_XDECREF(code);
        Py_XDECREF(flags);
        PyErr_Clear();
        if (f & CO_ITERABLE_COROUTINE) {
            return Py_NewRef(o);
        }
    }
    unaryfunc getter = Py_TYPE(o)->tp_as_async != NULL ? Py_TYPE(o)->tp_as_async->am_await : NULL;
    if (getter == NULL) {
        PyErr_Format(PyExc_TypeError,
                     "the ASGI app returned %.100s, which can't be used in 'await' expression",
                     Py_TYPE(o)->tp_name);
        return NULL;
    }
    PyObject *it = getter(o);
    if (it != NULL && (PyCoro_CheckExact(it) || !PyIter_Check(it))) {
        PyErr_Format(PyExc_TypeError, "__await__() returned non-iterator of type '%.100s'",
                     Py_TYPE(it)->tp_name);
        Py_CLEAR(it);
    }
    return it;
}

/* End a lean call's request, its app's awaitable done (error: how it failed, or NULL).  No
 * exception may be set; none is left set. */
static void lean_end(SendWatcher *w, PyObject *error)
{
    PyObject *inner = w->inner, *on_end = w->on_end, *asgi_scope = w->asgi_scope,
             *root_path = w->root_path;
    w->inner = w->on_end = w->asgi_scope = w->root_path = NULL;
    close_watcher(w);
    if (w->scope == Py_None && atomic_load_explicit(&w->samples, memory_order_relaxed) == 0) {
        if (w->path != NULL) {
            w->path->empty++; /* as about 9 requests in 10 at 99 Hz: nothing more to do */
        }
    }
    else if (on_end != NULL) {
        PyObject *args[4] = {(PyObject *)w, asgi_scope, root_path, error != NULL ? error : Py_None};
        PyObject *res = PyObject_Vectorcall(on_end, args, 4, NULL);
        if (res == NULL) {
            PyErr_WriteUnraisable(on_end); /* on_end logs its own failures: not reached */
        }
        Py_XDECREF(res);
    }
    Py_XDECREF(on_end);
    Py_XDECREF(asgi_scope);
    Py_XDECREF(root_path);
    Py_XDECREF(inner);
}

/* Put w on this thread's running chain for one step of its app's awaitable. */
static inline int lean_enter(SendWatcher *w)
{
    if (w->inner == NULL) {
        PyErr_SetString(w->path != NULL ? PyExc_RuntimeError : PyExc_TypeError,
                        w->path != NULL ? "cannot reuse an ended request's awaitable"
                                        : "only a LeanPath's request watcher can be awaited");
        return -1;
    }
    if (w->running) {
        PyErr_SetString(PyExc_ValueError, "the request's awaitable is already running");
        return -1;
    }
    w->running = 1;
    w->started = 1;
    w->running_prev = tl_running;
    atomic_signal_fence(memory_order_seq_cst); /* the handler never sees a broken chain */
    tl_running = w;
    atomic_signal_fence(memory_order_seq_cst);
    return 0;
}

static inline void lean_leave(SendWatcher *w)
{
    tl_running = w->running_prev;
    atomic_signal_fence(memory_order_seq_cst);
    w->running_prev = NULL;
    w->running = 0;
}

/* After a step that raised: end the request unless the app's awaitable merely yielded
 * (NULL result, exception set).  StopIteration is a return. */
static void lean_failed(SendWatcher *w)
{
    PyObject *exc = take_exception();
    lean_end(w, exc != NULL && PyErr_GivenExceptionMatches(exc, PyExc_StopIteration) ? NULL : exc);
    if (exc != NULL) {
        raise_again(exc);
    }
}

/* One step of the app's awaitable with arg sent in: PyIter_Send's outcome. */
static PySendResult lean_send(SendWatcher *w, PyObject *arg, PyObject **result)
{
    *result = NULL;
    if (lean_enter(w) < 0) {
        return PYGEN_ERROR;
    }
    Py_INCREF(w);
    PySendResult r = PyIter_Send(w->inner, arg, result);
    lean_leave(w);
    if (r == PYGEN_RETURN) {
        lean_end(w, NULL);
    }
    else if (r == PYGEN_ERROR) {
        lean_failed(w);
    }
    Py_DECREF(w);
    return r;
}

static void stop_with(PyObject *value) /* raise StopIteration(value) */
{
    PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, value);
    if (exc != NULL) {
        PyErr_SetObject(PyExc_StopIteration, exc);
        Py_DECREF(exc);
    }
}

static PyObject *watcher_iternext(SendWatcher *w)
{
    PyObject *result;
    PySendResult r = lean_send(w, Py_None, &result);
    if (r == PYGEN_RETURN) {
        if (result != Py_None) {
            stop_with(result);
        }
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static PySendResult watcher_am_send(SendWatcher *w, PyObject *arg, PyObject **result)
{
    return lean_send(w, arg, result);
}

static PyObject *watcher_send_method(SendWatcher *w, PyObject *arg)
{
    PyObject *result;
    PySendResult r = lean_send(w, arg, &result);
    if (r == PYGEN_RETURN) {
        stop_with(result);
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static PyObject *watcher_throw(SendWatcher *w, PyObject *args)
{
    if (PyTuple_GET_SIZE(args) < 1 || PyTuple_GET_SIZE(args) > 3) {
        PyErr_SetString(PyExc_TypeError, "throw() takes from 1 to 3 arguments");
        return NULL;
    }
    if (lean_enter(w) < 0) {
        return NULL;
    }
    Py_INCREF(w);
    PyObject *result = NULL;
    PyObject *throw = PyObject_GetAttr(w->inner, s_throw);
    if (throw != NULL) {
        result = PyObject_Call(throw, args, NULL);
        Py_DECREF(throw);
    }
    else if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        /* no throw(): the exception is raised where the app's awaitable is awaited */
        PyErr_Clear();
        PyObject *typ = PyTuple_GET_ITEM(args, 0);
        PyObject *val = PyTuple_GET_SIZE(args) > 1 ? PyTuple_GET_ITEM(args, 1) : NULL;
        if (PyExceptionInstance_Check(typ)) {
            PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
        }
        else if (PyExceptionClass_Check(typ)) {
            PyErr_SetObject(typ, val);
        }
        else {
            PyErr_SetString(PyExc_TypeError, "exceptions must derive from BaseException");
        }
    }
    lean_leave(w);
    if (result == NULL) {
        lean_failed(w);
    }
    Py_DECREF(w);
    return result;
}

static PyObject *watcher_close(SendWatcher *w, PyObject *unused)
{
    if (w->inner == NULL) {
        Py_RETURN_NONE;
    }
    if (lean_enter(w) < 0) {
        return NULL;
    }
    Py_INCREF(w);
    PyObject *res = NULL;
    PyObject *close = PyObject_GetAttr(w->inner, s_close);
    if (close != NULL) {
        res = PyObject_CallNoArgs(close);
        Py_DECREF(close);
    }
    else if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        res = Py_NewRef(Py_None);
    }
    lean_leave(w);
    if (res == NULL) {
        lean_failed(w);
    }
    else {
        /* closed while suspended: the request ends as a coroutine's would, by GeneratorExit */
        PyObject *exit = PyObject_CallNoArgs(PyExc_GeneratorExit);
        PyErr_Clear();
        lean_end(w, exit);
        Py_XDECREF(exit);
        Py_SETREF(res, Py_NewRef(Py_None));
    }
    Py_DECREF(w);
    return res;
}

static PyObject *watcher_await(SendWatcher *w)
{
    if (w->path == NULL) {
        PyErr_SetString(PyExc_TypeError, "only a LeanPath's request watcher can be awaited");
        return NULL;
    }
    return Py_NewRef(w);
}

/* A lean call dropped before its app's awaitable ended: closed as a coroutine is. */
static void watcher_finalize(PyObject *self)
{
    SendWatcher *w = (SendWatcher *)self;
    if (w->inner == NULL) {
        return;
    }
    PyObject *saved = take_exception();
    if (w->started) {
        PyObject *res = watcher_close(w, NULL);
        if (res == NULL) {
            PyErr_WriteUnraisable(self);
        }
        Py_XDECREF(res);
    }
    else {
        lean_end(w, NULL); /* never awaited: the app's awaitable goes unrun */
    }
    if (saved != NULL) {
        raise_again(saved);
    }
}

static PyMethodDef watcher_methods[] = {
    {"send", (PyCFunction)watcher_send_method, METH_O,
     "send(value)\n--\n\nA lean call: send value into the app's awaitable; returns what it "
     "yields, raises StopIteration when it returns."},
    {"throw", (PyCFunction)watcher_throw, METH_VARARGS,
     "throw(exc)\n--\n\nA lean call: raise exc where the app's awaitable is suspended."},
    {"close", (PyCFunction)watcher_close, METH_NOARGS,
     "close()\n--\n\nA lean call: close the app's awaitable and end the request."},
    {NULL, NULL, 0, NULL},
};

static PyAsyncMethods watcher_async = {
    .am_await = (unaryfunc)watcher_await,
    .am_send = (sendfunc)watcher_am_send,
};

/* Whether the request's path is one not profiled (never fails: a path it cannot read is
 * profiled). */
static int lean_excluded(LeanPath *p, PyObject *scope)
{
    PyObject *path = message_get(scope, s_path);
    if (path == NULL) {
        PyErr_Clear();
        path = Py_NewRef(s_empty_str);
    }
    int hit = 0;
    if (PyUnicode_Check(path)) {
        if (p->exact != NULL) {
            hit = PySet_Contains(p->exact, path) == 1;
        }
        for (Py_ssize_t i = 0; !hit && p->prefixes != NULL && i < PyTuple_GET_SIZE(p->prefixes);
             i++) {
            hit = PyUnicode_Tailmatch(path, PyTuple_GET_ITEM(p->prefixes, i), 0,
                                      PY_SSIZE_T_MAX, -1) == 1;
        }
        if (!hit && p->match != NULL) {
            PyObject *m = PyObject_CallOneArg(p->match, path);
            hit = m != NULL && m != Py_None;
            Py_XDECREF(m);
        }
        PyErr_Clear();
    }
    Py_DECREF(path);
    return hit;
}

/* Count one decision on the strategy, as its should_sample() would: next(sampler._count). */
static void lean_count(LeanPath *p)
{
    PyObject *count = PyObject_GetAttr(p->sampler, s_count);
    if (count != NULL && Py_TYPE(count)->tp_iternext != NULL) {
        Py_XDECREF(Py_TYPE(count)->tp_iternext(count));
    }
    Py_XDECREF(count);
    PyErr_Clear();
}

/* LeanPath(app, scope, receive, send, on_end, decided): a lean call, or None where it
 * does not apply (the sampler does not run at period_ns, or this thread is not armed).
 * decided False: the path is checked first, and a path not profiled gets
 * app(scope, receive, send) itself; else the decision is counted on the strategy. */
static PyObject *leanpath_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames)
{
    LeanPath *p = (LeanPath *)self;
    if (PyVectorcall_NARGS(nargsf) != 6 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError,
                        "LeanPath(app, scope, receive, send, on_end, decided) takes 6 "
                        "positional arguments");
        return NULL;
    }
    check_fork_fast();
    if (!g_lean_enabled || !thread_sampled() ||
        p->period_ns != atomic_load_explicit(&g_period_ns, memory_order_relaxed)) {
        Py_RETURN_NONE;
    }
    int decided = args[5] == Py_True;
    if (!decided) {
        if (lean_excluded(p, args[1])) {
            p->excluded++;
            return PyObject_Vectorcall(args[0], args + 1, 3, NULL);
        }
        if (p->sampler != NULL) {
            lean_count(p);
        }
    }
    SendWatcher *w = (SendWatcher *)open_request_watcher(args[3], p->period_ns, p->max_depth,
                                                         p->max_duration_ns);
    if (w == NULL) {
        PyErr_Clear(); /* our failure: the request goes the general way */
        p->failures++;
        Py_RETURN_NONE;
    }
    PyObject *root_path = message_get(args[1], s_root_path);
    if (root_path == NULL) {
        PyErr_Clear();
        root_path = Py_NewRef(s_empty_str);
    }
    w->path = (LeanPath *)Py_NewRef(self);
    w->on_end = Py_NewRef(args[4]);
    w->asgi_scope = Py_NewRef(args[1]);
    w->root_path = root_path;
    if (decided) {
        p->decided++;
    }
    else {
        p->always++;
    }
    PyObject *app_args[3] = {args[1], args[2], (PyObject *)w};
    PyObject *awaitable = PyObject_Vectorcall(args[0], app_args, 3, NULL);
    PyObject *it = awaitable != NULL ? awaitable_iter(awaitable) : NULL;
    Py_XDECREF(awaitable);
    if (it == NULL) { /* the app's own error: the request ends with it, and it propagates */
        lean_failed(w);
        Py_DECREF(w);
        return NULL;
    }
    w->inner = it;
    return (PyObject *)w;
}

static PyObject *none_to_null(PyObject *o) { return o == Py_None ? NULL : Py_NewRef(o); }

static PyObject *leanpath_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    long long period, max_depth;
    PyObject *max_duration, *exact = Py_None, *prefixes = Py_None, *match = Py_None,
                            *sampler = Py_None;
    static char *kwlist[] = {"period_ns", "max_depth", "max_duration_ns", "exact",
                             "prefixes", "match", "sampler", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LLO|$OOOO:LeanPath", kwlist, &period,
                                     &max_depth, &max_duration, &exact, &prefixes, &match,
                                     &sampler)) {
        return NULL;
    }
    if ((exact != Py_None && !PyAnySet_Check(exact)) ||
        (prefixes != Py_None && !PyTuple_Check(prefixes)) ||
        (match != Py_None && !PyCallable_Check(match))) {
        PyErr_SetString(PyExc_TypeError, "LeanPath: exact must be a set, prefixes a tuple of "
                                         "str, match callable (or each None)");
        return NULL;
    }
    for (Py_ssize_t i = 0; prefixes != Py_None && i < PyTuple_GET_SIZE(prefixes); i++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(prefixes, i))) {
            PyErr_SetString(PyExc_TypeError, "LeanPath: prefixes must be str");
            return NULL;
        }
    }
    long long duration = 0;
    if (max_duration != Py_None) {
        duration = PyLong_AsLongLong(max_duration);
        if (duration == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    if (period <= 0 || max_depth < 0 || duration < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "LeanPath: period_ns must be > 0, max_depth and max_duration_ns >= 0");
        return NULL;
    }
    LeanPath *p = (LeanPath *)type->tp_alloc(type, 0);
    if (p == NULL) {
        return NULL;
    }
    p->vectorcall = leanpath_vectorcall;
    p->exact = none_to_null(exact);
    p->prefixes = none_to_null(prefixes);
    p->match = none_to_null(match);
    p->sampler = none_to_null(sampler);
    p->period_ns = period;
    p->max_depth = max_depth;
    p->max_duration_ns = duration;
    return (PyObject *)p;
}

static PyMemberDef leanpath_members[] = {
    {"period_ns", T_LONGLONG, offsetof(LeanPath, period_ns), READONLY, "The sampling period."},
    {"max_depth", T_LONGLONG, offsetof(LeanPath, max_depth), READONLY,
     "Frames kept per sample."},
    {"always", T_ULONGLONG, offsetof(LeanPath, always), READONLY,
     "Lean calls made with decided=False (requests it counted as decided and sampled)."},
    {"decided", T_ULONGLONG, offsetof(LeanPath, decided), READONLY,
     "Lean calls made with decided=True (the caller counted the decision)."},
    {"excluded", T_ULONGLONG, offsetof(LeanPath, excluded), READONLY,
     "Undecided calls whose path is not profiled (passed to the app as they came)."},
    {"empty", T_ULONGLONG, offsetof(LeanPath, empty), READONLY,
     "Lean calls that ended with no sample of their own (on_end not called)."},
    {"failures", T_ULONGLONG, offsetof(LeanPath, failures), READONLY,
     "Calls that returned None for want of memory."},
    {NULL, 0, 0, 0, NULL},
};

static int leanpath_traverse(LeanPath *p, visitproc visit, void *arg)
{
    Py_VISIT(p->exact);
    Py_VISIT(p->prefixes);
    Py_VISIT(p->match);
    Py_VISIT(p->sampler);
    return 0;
}

static int leanpath_clear(LeanPath *p)
{
    Py_CLEAR(p->exact);
    Py_CLEAR(p->prefixes);
    Py_CLEAR(p->match);
    Py_CLEAR(p->sampler);
    return 0;
}

static void leanpath_dealloc(LeanPath *p)
{
    PyObject_GC_UnTrack(p);
    leanpath_clear(p);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyTypeObject LeanPathType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "otlp_middleware.profiling._cpu_native.LeanPath",
    .tp_basicsize = sizeof(LeanPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)leanpath_traverse,
    .tp_clear = (inquiry)leanpath_clear,
    .tp_dealloc = (destructor)leanpath_dealloc,
    .tp_doc = "LeanPath(period_ns, max_depth, max_duration_ns, *, exact=None, prefixes=None, "
              "match=None, sampler=None)\n--\n\nThe ASGI request path at its leanest (see "
              "\"Lean calls\" in the source). Called as (app, scope, receive, send, on_end, "
              "decided): a request watcher that is also the awaitable running app(scope, "
              "receive, watcher), or None where the sampler does not run at period_ns on this "
              "thread. Undecided (decided=False), a path in exact, starting with one of "
              "prefixes or matched by match is not profiled (app(scope, receive, send) is "
              "returned), and every other request is counted on sampler (next(sampler._count)).",
    .tp_new = leanpath_new,
    .tp_vectorcall_offset = offsetof(LeanPath, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_members = leanpath_members,
};

static PyObject *py_set_lean(PyObject *self, PyObject *flag)
{
    int on = PyObject_IsTrue(flag);
    if (on < 0) {
        return NULL;
    }
    g_lean_enabled = on;
    Py_RETURN_NONE;
}

/* running_request(): the innermost open request watcher of the lean calls running on this
 * thread, or None. */
static PyObject *py_running_request(PyObject *self, PyObject *unused)
{
    for (SendWatcher *w = tl_running; w != NULL; w = w->running_prev) {
        if (w->id != 0 && atomic_load_explicit(&w->open, memory_order_relaxed)) {
            return Py_NewRef(w);
        }
    }
    Py_RETURN_NONE;
}

static int watcher_traverse(SendWatcher *w, visitproc visit, void *arg)
{
    Py_VISIT(w->send);
    Py_VISIT(w->scope);
    Py_VISIT(w->status);
    Py_VISIT(w->finish);
    Py_VISIT(w->path);
    Py_VISIT(w->inner);
    Py_VISIT(w->on_end);
    Py_VISIT(w->asgi_scope);
    Py_VISIT(w->root_path);
    return 0;
}

static int watcher_clear(SendWatcher *w)
{
    Py_CLEAR(w->send);
    Py_CLEAR(w->scope);
    Py_CLEAR(w->status);
    Py_CLEAR(w->finish);
    Py_CLEAR(w->inner);
    Py_CLEAR(w->on_end);
    Py_CLEAR(w->asgi_scope);
    Py_CLEAR(w->root_path);
    Py_CLEAR(w->path);
    return 0;
}

static void watcher_dealloc(SendWatcher *w)
{
    if (w->inner != NULL && PyObject_CallFinalizerFromDealloc((PyObject *)w) < 0) {
        return; /* resurrected */
    }
    PyObject_GC_UnTrack(w);
    close_watcher(w);
    watcher_clear(w);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *watcher_get_status(SendWatcher *w, void *closure)
{
    if (w->status == NULL) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(w->status);
}

static PyObject *watcher_get_open(SendWatcher *w, void *closure)
{
    return PyBool_FromLong(atomic_load_explicit(&w->open, memory_order_relaxed));
}

static PyObject *watcher_get_samples(SendWatcher *w, void *closure)
{
    return PyLong_FromUnsignedLong(atomic_load_explicit(&w->samples, memory_order_relaxed));
}

static PyObject *watcher_get_tag(SendWatcher *w, void *closure)
{
    return PyLong_FromLongLong(w->id != 0 ? WATCH_TAG(w->id) : 0);
}

static PyObject *watcher_get_closed(SendWatcher *w, void *closure)
{
    return w->id != 0 && !atomic_load_explicit(&w->open, memory_order_relaxed)
               ? PyLong_FromLongLong(w->closed_ns)
               : Py_NewRef(Py_None);
}

static PyObject *watcher_get_deadline(SendWatcher *w, void *closure)
{
    return w->max_duration_ns ? PyLong_FromLongLong(w->opened_ns + w->max_duration_ns)
                              : Py_NewRef(Py_None);
}

static PyObject *watcher_get_finish(SendWatcher *w, void *closure)
{
    return Py_NewRef(w->finish != NULL ? w->finish : Py_None);
}

static PyObject *watcher_get_scope(SendWatcher *w, void *closure)
{
    return Py_NewRef(w->scope);
}

static int watcher_set_scope(SendWatcher *w, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete scope");
        return -1;
    }
    Py_SETREF(w->scope, Py_NewRef(value));
    return 0;
}

static PyGetSetDef watcher_getset[] = {
    {"status", (getter)watcher_get_status, NULL,
     "The status of the http.response.start message sent so far (None before it).", NULL},
    {"open", (getter)watcher_get_open, NULL,
     "A request watcher whose response has not completed yet.", NULL},
    {"samples", (getter)watcher_get_samples, NULL,
     "Samples the handler tagged with this request watcher.", NULL},
    {"tag", (getter)watcher_get_tag, NULL,
     "The root tag of this request watcher's samples in drain()'s root_tokens (0: none).",
     NULL},
    {"root_key", (getter)watcher_get_tag, NULL,
     "The tag again, under the name the engine's code scopes give theirs.", NULL},
    {"finish", (getter)watcher_get_finish, NULL,
     "What release_request() was given to call once the samples are in, or None.", NULL},
    {"closed_ns", (getter)watcher_get_closed, NULL,
     "When the response completed (Unix ns); None while open.", NULL},
    {"deadline_ns", (getter)watcher_get_deadline, NULL,
     "Unix time after which samples are not kept, or None.", NULL},
    {"scope", (getter)watcher_get_scope, (setter)watcher_set_scope,
     "The scope ended with the response: None, or a request's scope made on demand.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef watcher_members[] = {
    {"opened_ns", T_LONGLONG, offsetof(SendWatcher, opened_ns), READONLY,
     "When its LeanPath call made it (Unix ns)."},
    {"period_ns", T_LONGLONG, offsetof(SendWatcher, period_ns), READONLY,
     "The sampling period."},
    {"max_depth", T_LONGLONG, offsetof(SendWatcher, max_depth), READONLY,
     "Frames kept per sample."},
    {"thread_id", T_ULONG, offsetof(SendWatcher, thread_id), READONLY, "The thread's ident."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SendWatcherType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "otlp_middleware.profiling._cpu_native.SendWatcher",
    .tp_basicsize = sizeof(SendWatcher),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "SendWatcher(send, scope)\n--\n\nAn ASGI send callable: passes every message to "
              "send unchanged and returns its awaitable; notes the response status (status) "
              "and ends scope (end_scope) at the last http.response.body message.",
    .tp_new = watcher_new,
    .tp_traverse = (traverseproc)watcher_traverse,
    .tp_clear = (inquiry)watcher_clear,
    .tp_dealloc = (destructor)watcher_dealloc,
    .tp_vectorcall_offset = offsetof(SendWatcher, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getset = watcher_getset,
    .tp_members = watcher_members,
    .tp_methods = watcher_methods,
    .tp_as_async = &watcher_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)watcher_iternext,
    .tp_finalize = watcher_finalize,
};

static int init_request_path(PyObject *m)
{
    s_type = PyUnicode_InternFromString("type");
    s_status = PyUnicode_InternFromString("status");
    s_more_body = PyUnicode_InternFromString("more_body");
    s_closed_ns = PyUnicode_InternFromString("closed_ns");
    s_quiet = PyUnicode_InternFromString("quiet");
    s_mark = PyUnicode_InternFromString("mark");
    s_response_start = PyUnicode_InternFromString("http.response.start");
    s_response_body = PyUnicode_InternFromString("http.response.body");
    s_append = PyUnicode_InternFromString("append");
    s_root_path = PyUnicode_InternFromString("root_path");
    s_empty_str = PyUnicode_InternFromString("");
    s_throw = PyUnicode_InternFromString("throw");
    s_close = PyUnicode_InternFromString("close");
    s_gi_code = PyUnicode_InternFromString("gi_code");
    s_co_flags = PyUnicode_InternFromString("co_flags");
    s_path = PyUnicode_InternFromString("path");
    s_count = PyUnicode_InternFromString("_count");
    if (!s_root_path || !s_empty_str || !s_throw || !s_close || !s_gi_code || !s_co_flags ||
        !s_path || !s_count) {
        return -1;
    }
    if (!s_type || !s_status || !s_more_body || !s_closed_ns || !s_quiet || !s_mark || !s_append ||
        !s_response_start || !s_response_body) {
        return -1;
    }
    if (PyType_Ready(&SendWatcherType) < 0 || PyType_Ready(&ScopeCoreType) < 0 ||
        PyType_Ready(&LeanPathType) < 0) {
        return -1;
    }
    Py_INCREF(&LeanPathType);
    if (PyModule_AddObject(m, "LeanPath", (PyObject *)&LeanPathType) < 0) {
        Py_DECREF(&LeanPathType);
        return -1;
    }
    Py_INCREF(&ScopeCoreType);
    if (PyModule_AddObject(m, "ScopeCore", (PyObject *)&ScopeCoreType) < 0) {
        Py_DECREF(&ScopeCoreType);
        return -1;
    }
    Py_INCREF(&SendWatcherType);
    if (PyModule_AddObject(m, "SendWatcher", (PyObject *)&SendWatcherType) < 0) {
        Py_DECREF(&SendWatcherType);
        return -1;
    }
    return 0;
}

static PyMethodDef methods[] = {
    {"start", (PyCFunction)(void (*)(void))py_start, METH_VARARGS | METH_KEYWORDS,
     "start(hz, capacity=4096)\n--\n\nInstall the signal handler and allocate the sample "
     "ring (idempotent; when already started only the frequency changes)."},
    {"stop", py_stop, METH_NOARGS,
     "stop()\n--\n\nDelete every timer, restore the previous signal disposition, free the "
     "buffers (undrained samples are discarded) and forget all roots."},
    {"set_frequency", py_set_frequency, METH_O,
     "set_frequency(hz)\n--\n\nChange the sampling frequency of every armed timer."},
    {"arm_thread", py_arm_thread, METH_O,
     "arm_thread(token)\n--\n\nSample the calling thread's CPU time; its samples carry "
     "token. Called again, only the token changes."},
    {"disarm_thread", py_disarm_thread, METH_NOARGS,
     "disarm_thread()\n--\n\nStop sampling the calling thread; its timer is disarmed, not "
     "deleted (it goes at thread exit or stop())."},
    {"add_root", py_add_root, METH_VARARGS,
     "add_root(frame, token)\n--\n\nSamples whose stack holds frame carry token in "
     "root_tokens. Returns thread_armed()."},
    {"remove_root", py_remove_root, METH_O,
     "remove_root(frame)\n--\n\nForget a root; returns whether it was registered."},
    {"drain", py_drain, METH_NOARGS,
     "drain()\n--\n\nTake the samples recorded so far: a list of (thread_token, "
     "root_tokens, native_thread_id, cpu_ns, timestamp_ns, frames), frames leaf first as "
     "(name, filename, first_line, line)."},
    {"stats", py_stats, METH_NOARGS, "stats()\n--\n\nCounters of the sampler."},
    {"active_timers", py_active_timers, METH_NOARGS,
     "active_timers()\n--\n\nThe number of timers that exist (armed or not), as "
     "/proc/self/timers lists them."},
    {"armed_timers", py_armed_timers, METH_NOARGS,
     "armed_timers()\n--\n\nThe number of timers currently armed."},
    {"thread_armed", py_thread_armed, METH_NOARGS,
     "thread_armed()\n--\n\nWhether the calling thread's timer is armed."},
    {"is_started", py_is_started, METH_NOARGS, "is_started()\n--\n\nWhether start() ran."},
    {"end_scope", py_end_scope, METH_O,
     "end_scope(scope)\n--\n\nUnless scope.closed_ns is set: set it to now (Unix ns) and "
     "scope.quiet to whether mark() still equals scope.mark."},
    {"release_request", (PyCFunction)(void (*)(void))py_release_request, METH_FASTCALL,
     "release_request(released, watcher, finish)\n--\n\nEnd the request watcher and its "
     "scope, if any; keep finish on it; append it to released (a deque the collector "
     "empties)."},
    {"set_lean", py_set_lean, METH_O,
     "set_lean(on)\n--\n\nWhether LeanPath calls make lean calls at all (off: they return "
     "None, for the caller's general path). Off at import."},
    {"running_request", py_running_request, METH_NOARGS,
     "running_request()\n--\n\nThe innermost open request watcher among the lean calls "
     "(LeanPath) running on this thread, or None."},
    {"open_watchers", py_open_watchers, METH_NOARGS,
     "open_watchers()\n--\n\nRequest watchers made and not yet ended."},
    {"code_opens", py_code_opens, METH_NOARGS,
     "code_opens()\n--\n\nThe number of request watchers LeanPath calls have made (never "
     "reset)."},
    {"mark", py_mark, METH_NOARGS,
     "mark()\n--\n\n-1 unless started and the calling thread is armed; else the number of "
     "samples published so far (two equal readings: no sample in between)."},
    {"_after_fork_child", py_after_fork_child, METH_NOARGS,
     "_after_fork_child()\n--\n\nReset all state in a forked child (timers are not "
     "inherited)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_cpu_native",
    "Native CPU sampler: per-thread CPU-time timers and an async-signal-safe stack copier.",
    -1,
    methods,
};

PyMODINIT_FUNC PyInit__cpu_native(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    g_signo = SIGRTMIN + 3;
    g_pid = getpid();
    count_code_deaths();
    int err = pthread_key_create(&g_key, on_thread_exit);
    if (err == 0) {
        err = pthread_atfork(NULL, NULL, on_fork_child);
    }
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "SIGNAL", g_signo) < 0 ||
        PyModule_AddIntConstant(m, "MAX_DEPTH", MAX_DEPTH) < 0 ||
        PyModule_AddIntConstant(m, "MAX_ROOTS", MAX_ROOTS) < 0 || init_request_path(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* Tear down at interpreter exit, before thread states of daemon threads are freed: a
     * timer still armed on such a thread would otherwise make the handler read a dead
     * thread state. */
    PyObject *atexit = PyImport_ImportModule("atexit");
    PyObject *stop = atexit != NULL ? PyObject_GetAttrString(m, "stop") : NULL;
    PyObject *res = stop != NULL ? PyObject_CallMethod(atexit, "register", "O", stop) : NULL;
    Py_XDECREF(atexit);
    Py_XDECREF(stop);
    if (res == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(res);
    return m;
}
