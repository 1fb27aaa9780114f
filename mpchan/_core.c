/*
 * mpchan._core -- the shared-memory channel segment (layers 1-2 in C).
 * Beside it: two datagram helpers of the wake-up layer that keep the GIL,
 * and ChunkIter, the iterator a pool's map returns (items of result chunks).
 *
 * One segment per channel, a file in the shared-memory directory mapped
 * MAP_SHARED by every process that holds a handle:
 *
 *   +------------------------------+ 0
 *   | hdr_t                        |   magic, robust mutex, counters,
 *   |   waiters[MAXW]              |   parked waiters (who to wake),
 *   |   holders[MAXH]              |   processes holding a handle,
 *   |   blobs[MAXB]                |   reusable out-of-band payload segments
 *   +------------------------------+ HDR_SIZE
 *   | ring (ring_size bytes)       |   records: rec_t + payload, 8-aligned
 *   +------------------------------+
 *
 * A record never wraps: when it does not fit before the end of the ring a
 * PAD record (or, when fewer than sizeof(rec_t) bytes remain, an implicit
 * gap) fills the rest and the record starts at offset 0.
 *
 * Invariants (all fields are read and written under hdr->mu):
 *   - head <= tail, tail - head <= ring_size; both only grow.
 *   - every byte in [head, tail) belongs to a complete record; records are
 *     appended at tail and the commit point of a send is the single store
 *     to `tail` (a sender that dies before it leaves nothing visible).
 *   - count == number of live records (not PAD, not DEAD) in [head, tail).
 *     It is derived state: recover() recomputes it after a holder died.
 *   - the record at head is never DEAD or PAD once an operation returns
 *     (leading dead records are skipped by advancing head).
 *   - a blob slot in state BUSY has owner 0 while a live record refers to
 *     it, else the pid of the process that copies in or out of it.
 *
 * Ownership:
 *   - the process that creates the segment initialises it; any holder may
 *     write under the mutex; the last holder to detach (or the program's
 *     reaper) unlinks the file -- never this module.
 *   - waking parked waiters happens in Python after the mutex is released:
 *     every call that changes readiness returns the keys to wake.
 *
 * The lock is a process-shared *robust* pthread mutex: when a holder dies
 * (even by SIGKILL) the next locker gets EOWNERDEAD, runs recover() and
 * marks the mutex consistent, so a dead process never freezes the channel.
 * No Python object that the garbage collector tracks is created while the
 * mutex is held (a collection could run finalisers that lock again).
 *
 * What else lives here, and why it is not in Python:
 *   - dgram_wake / dgram_drain (the wake-up layer, _wake.py): one datagram
 *     per parked waiter, sent and drained without releasing the GIL --
 *     socket.sendto releases it, and a waker that gives the GIL away per
 *     wake-up hands a 2-core machine to its waiters mid-send.
 *   - ChunkIter (a pool's map, _pool/map.py): it yields the items of result
 *     chunks and *steals* each item's reference as it yields it, so a
 *     consumed result is freed at once (the map contract: results are
 *     dropped as they are yielded) for no cost per item; a Python
 *     generator over lists keeps every item of a chunk alive until the
 *     chunk is done, or pays a del per item. It is data plane: it touches
 *     every result a map returns.
 *   - waiters() and _die_locked() are test hooks on a channel core: the
 *     waiter table as data, and a deliberate death holding the robust mutex
 *     (the crash tests of recover()). Neither is reachable from the public
 *     API, and a death holding the mutex cannot be produced from Python.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/types.h>
#include <unistd.h>

#define MAGIC 0x4d504348u /* "MPCH" */
#define VERSION 2u
#define MAXW 256
#define MAXH 256
#define MAXB 16
#define HDR_SIZE 16384
#define MAXWAKE 64
#define NOBLOB 0xFFFFFFFFu

/* status codes shared with _channel.py */
enum { ST_OK = 0, ST_FULL = 1, ST_CLOSED = 2, ST_NOSPACE = 3, ST_EMPTY = 4 };

/* waiter kinds */
#define W_RECV 1
#define W_SEND 2
#define W_SELECT 4

/* record flags (the low 16 bits belong to the codec) */
#define F_PAD 0x80000000u
#define F_DEAD 0x40000000u
#define F_USER 0x0000FFFFu

/* operation flags */
#define OP_NEED_RECEIVER 1 /* unbuffered nowait: only if a receiver waits */
#define OP_SELECT 2        /* registration comes from a select */

/* blob slot states */
enum { B_EMPTY = 0, B_FREE = 1, B_BUSY = 2 };

typedef struct {
    uint64_t key;    /* wake address; 0 = free entry */
    uint64_t ticket; /* unbuffered sender: the ticket it waits on */
    uint64_t token;  /* select token (never pairs with itself) */
    uint32_t pid;
    uint16_t kind;
    uint16_t notified; /* woken, not yet run: the next wake picks another */
} waiter_t;

typedef struct {
    uint32_t pid;
    uint32_t refs;
} holder_t;

typedef struct {
    uint32_t state;
    uint32_t owner;
    uint64_t size;
    uint64_t gen;
    uint64_t pad;
} blob_t;

typedef struct {
    uint32_t magic;
    uint32_t version;
    union {
        pthread_mutex_t mu;
        char mu_pad[64];
    };
    uint64_t capacity;  /* messages; 0 = unbuffered (rendezvous) */
    uint64_t ring_size; /* bytes, multiple of 8 */
    uint64_t hard_span; /* ring bytes every message of the capacity may use */
    uint64_t head;
    uint64_t tail;
    uint64_t count;
    uint64_t sent;
    uint64_t received;
    uint64_t next_ticket;
    uint64_t transit; /* pickled handles not yet unpickled */
    uint32_t closed;
    uint32_t nwaiters; /* live entries in waiters[] */
    uint32_t whi;      /* waiters[whi:] are all free */
    uint32_t recoveries;
    int64_t counter; /* WaitGroup counter */
    waiter_t waiters[MAXW];
    holder_t holders[MAXH];
    blob_t blobs[MAXB];
} hdr_t;

_Static_assert(sizeof(hdr_t) <= HDR_SIZE, "header too large");

typedef struct {
    uint32_t len; /* payload bytes (PAD: bytes skipped after the header) */
    uint32_t flags;
    uint64_t ticket;
    uint64_t token;
    uint32_t blob;
    uint32_t pad;
} rec_t;

#define REC (sizeof(rec_t))
#define ALIGN8(x) (((x) + 7u) & ~(uint64_t)7u)

typedef struct {
    PyObject_HEAD
    hdr_t *h;
    char *ring;
    size_t size;
} ChanObject;

/* A zombie (dead, not yet reaped -- common where pid 1 does not reap
 * orphans) holds nothing: it counts as dead. */
static int pid_alive(uint32_t pid) {
    if (pid == 0) return 0;
    if (kill((pid_t)pid, 0) != 0) return errno != ESRCH;
#ifdef __linux__
    char path[48], buf[256];
    snprintf(path, sizeof path, "/proc/%u/stat", (unsigned)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X')) return 0;
#endif
    return 1;
}

/* ---------------------------------------------------------------- ring walk */

/* Position of the record that starts at or after p (skipping the implicit
 * end-of-ring gap). */
static inline uint64_t rec_pos(hdr_t *h, uint64_t p) {
    uint64_t off = p % h->ring_size;
    if (h->ring_size - off < REC) p += h->ring_size - off;
    return p;
}

static inline rec_t *rec_at(ChanObject *c, uint64_t p) {
    return (rec_t *)(c->ring + (p % c->h->ring_size));
}

static inline uint64_t rec_span(rec_t *r) { return ALIGN8(REC + (uint64_t)r->len); }

static void advance_head(ChanObject *c) {
    hdr_t *h = c->h;
    uint64_t p = h->head;
    while (p < h->tail) {
        p = rec_pos(h, p);
        if (p >= h->tail) break;
        rec_t *r = rec_at(c, p);
        if (!(r->flags & (F_PAD | F_DEAD))) break;
        p += rec_span(r);
    }
    if (p > h->tail) p = h->tail;
    h->head = p;
    if (h->head == h->tail) {
        /* empty: restart at 0 so records stay contiguous longer */
        uint64_t base = h->tail - (h->tail % h->ring_size) + h->ring_size;
        h->head = h->tail = base;
    }
}

/* After a holder died inside the critical section: make the derived state
 * consistent again.  Records in [head, tail) are complete (tail is the
 * commit point); a record cut short by a bad length ends the ring there. */
static void recover(ChanObject *c) {
    hdr_t *h = c->h;
    uint64_t p = h->head, n = 0;
    while (p < h->tail) {
        p = rec_pos(h, p);
        if (p >= h->tail) break;
        rec_t *r = rec_at(c, p);
        uint64_t span = rec_span(r);
        if (span > h->ring_size || p + span > h->tail) {
            h->tail = p;
            break;
        }
        if (!(r->flags & (F_PAD | F_DEAD))) n++;
        p += span;
    }
    if (p > h->tail) p = h->tail;
    h->count = n;
    for (uint32_t i = 0; i < h->whi; i++) {
        waiter_t *w = &h->waiters[i];
        if (w->key && !pid_alive(w->pid)) {
            memset(w, 0, sizeof(*w));
            h->nwaiters--;
        }
    }
    advance_head(c);
    h->recoveries++;
}

/* ---------------------------------------------------------------- locking */

static int chan_lock(ChanObject *c) {
    hdr_t *h = c->h;
    int r;
    for (int spin = 0; spin < 64; spin++) {
        r = pthread_mutex_trylock(&h->mu);
        if (r != EBUSY) goto got;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    for (;;) {
        /* Wait for the mutex without the GIL, but never hold the mutex while
         * waiting for the GIL: take it, give it back, then retry with the GIL. */
        Py_BEGIN_ALLOW_THREADS
        r = pthread_mutex_lock(&h->mu);
        if (r == EOWNERDEAD) {
            recover(c);
            pthread_mutex_consistent(&h->mu);
            r = 0;
        }
        if (r == 0) pthread_mutex_unlock(&h->mu);
        Py_END_ALLOW_THREADS
        if (r != 0) break;
        r = pthread_mutex_trylock(&h->mu);
        if (r != EBUSY) break;
    }
got:
    if (r == EOWNERDEAD) {
        recover(c);
        pthread_mutex_consistent(&h->mu);
        r = 0;
    }
    if (r != 0) {
        errno = r;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static inline void chan_unlock(ChanObject *c) { pthread_mutex_unlock(&c->h->mu); }

#define CHECK_OPEN(c)                                                      \
    do {                                                                   \
        if ((c)->h == NULL) {                                              \
            PyErr_SetString(PyExc_ValueError, "channel segment is closed"); \
            return NULL;                                                   \
        }                                                                  \
    } while (0)

/* A fast-call method's arguments, checked: a TypeError naming its usage. */
#define EXPECT_ARGS(ok, usage)                          \
    do {                                                \
        if (!(ok)) {                                    \
            PyErr_SetString(PyExc_TypeError, (usage));  \
            return NULL;                                \
        }                                               \
    } while (0)

/* ---------------------------------------------------------------- waiters */

typedef struct {
    int n;
    uint64_t keys[MAXWAKE];
} wakes_t;

static inline void wake_add(wakes_t *wk, waiter_t *w) {
    if (wk->n >= MAXWAKE) return; /* not marked: a later wake reaches it */
    w->notified = 1;
    wk->keys[wk->n++] = w->key;
}

/* Wake every select waiting for `kind` and one plain waiter not yet woken. */
static void wake_kind(hdr_t *h, int kind, wakes_t *wk) {
    if (h->nwaiters == 0) return;
    int plain = 0;
    for (uint32_t i = 0; i < h->whi; i++) {
        waiter_t *w = &h->waiters[i];
        if (!w->key || !(w->kind & kind)) continue;
        if (w->kind & W_SELECT) {
            if (!w->notified) wake_add(wk, w);
        } else if (!plain && !w->notified) {
            wake_add(wk, w);
            plain = 1;
        }
    }
}

/* Unbuffered: wake the sender whose staged record was taken, and one sender
 * waiting for ring space (ticket 0). */
static void wake_ticket(hdr_t *h, uint64_t ticket, wakes_t *wk) {
    int space = 0;
    for (uint32_t i = 0; i < h->whi; i++) {
        waiter_t *w = &h->waiters[i];
        if (!w->key || !(w->kind & W_SEND)) continue;
        if (w->ticket == ticket) {
            wake_add(wk, w);
        } else if (w->ticket == 0 && !space && !w->notified) {
            wake_add(wk, w);
            space = 1;
        }
    }
}

static int add_waiter(hdr_t *h, uint64_t key, int kind, uint64_t token, uint64_t ticket) {
    for (uint32_t i = 0; i < MAXW; i++) {
        waiter_t *w = &h->waiters[i];
        if (w->key == 0) {
            w->key = key;
            w->kind = (uint16_t)kind;
            w->token = token;
            w->ticket = ticket;
            w->pid = (uint32_t)getpid();
            w->notified = 0;
            h->nwaiters++;
            if (i + 1 > h->whi) h->whi = i + 1;
            return 0;
        }
    }
    return -1;
}

static void remove_waiter(hdr_t *h, uint64_t key) {
    for (uint32_t i = 0; i < h->whi; i++) {
        waiter_t *w = &h->waiters[i];
        if (w->key == key) {
            memset(w, 0, sizeof(*w));
            h->nwaiters--;
        }
    }
    while (h->whi > 0 && h->waiters[h->whi - 1].key == 0) h->whi--;
}

/* Receivers parked (not select of `token`) and not yet claimed. */
static uint64_t free_receivers(hdr_t *h, uint64_t token) {
    uint64_t n = 0;
    for (uint32_t i = 0; i < h->whi; i++) {
        waiter_t *w = &h->waiters[i];
        if (w->key && (w->kind & W_RECV) && (token == 0 || w->token != token)) n++;
    }
    return n;
}

/* A receiver parked on an unbuffered channel: selects with a send case that
 * is not staged here may now proceed -- wake them to retry. */
static void wake_select_senders(hdr_t *h, wakes_t *wk) {
    if (h->capacity != 0) return;
    for (uint32_t i = 0; i < h->whi; i++) {
        waiter_t *w = &h->waiters[i];
        if (w->key && (w->kind & W_SELECT) && (w->kind & W_SEND) && w->ticket == 0 &&
            !w->notified)
            wake_add(wk, w);
    }
}

static PyObject *wakes_tuple(wakes_t *wk) {
    if (wk->n == 0) {
        Py_RETURN_NONE;
    }
    PyObject *t = PyTuple_New(wk->n);
    if (!t) return NULL;
    for (int i = 0; i < wk->n; i++) {
        PyObject *k = PyLong_FromUnsignedLongLong(wk->keys[i]);
        if (!k) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, k);
    }
    return t;
}

/* ---------------------------------------------------------------- object */

static void Chan_dealloc(ChanObject *c) {
    if (c->h) munmap((void *)c->h, c->size);
    c->h = NULL;
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int Chan_init(ChanObject *c, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "size", "init", "capacity", "ring_size", "hard_span", NULL};
    int fd, init = 0;
    Py_ssize_t size;
    unsigned long long capacity = 0, ring_size = 0, hard = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "in|pKKK", kwlist, &fd, &size, &init, &capacity,
                                     &ring_size, &hard))
        return -1;
    if (size < HDR_SIZE + 64) {
        PyErr_SetString(PyExc_ValueError, "segment too small");
        return -1;
    }
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (c->h) munmap((void *)c->h, c->size);
    c->h = (hdr_t *)p;
    c->ring = (char *)p + HDR_SIZE;
    c->size = (size_t)size;
    hdr_t *h = c->h;
    if (init) {
        if (ring_size == 0 || ring_size % 8 || ring_size + HDR_SIZE > (unsigned long long)size) {
            PyErr_SetString(PyExc_ValueError, "bad ring size");
            return -1;
        }
        memset(h, 0, sizeof(hdr_t));
        pthread_mutexattr_t at;
        pthread_mutexattr_init(&at);
        pthread_mutexattr_setpshared(&at, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&at, PTHREAD_MUTEX_ROBUST);
        int r = pthread_mutex_init(&h->mu, &at);
        pthread_mutexattr_destroy(&at);
        if (r) {
            errno = r;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        h->capacity = capacity;
        h->ring_size = ring_size;
        /* default: the whole ring shared by the capacity, at most 64 KiB */
        uint64_t per = ring_size / 4;
        if (ring_size / (capacity + 1) < per) per = ring_size / (capacity + 1);
        per &= ~(uint64_t)7;
        if (hard && hard < per) per = hard & ~(uint64_t)7;
        h->hard_span = per < 65536 ? per : 65536;
        h->holders[0].pid = (uint32_t)getpid(); /* the creator holds it from birth */
        h->holders[0].refs = 1;
        h->next_ticket = 1;
        h->version = VERSION;
        __atomic_store_n(&h->magic, MAGIC, __ATOMIC_RELEASE);
    } else {
        if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != MAGIC || h->version != VERSION) {
            PyErr_SetString(PyExc_ValueError, "not an mpchan channel segment");
            return -1;
        }
    }
    return 0;
}

static PyObject *Chan_unmap(ChanObject *c, PyObject *Py_UNUSED(a)) {
    if (c->h) munmap((void *)c->h, c->size);
    c->h = NULL;
    Py_RETURN_NONE;
}

/* Ring bytes of the largest record a buffered channel always has room for:
 * ``capacity`` of them plus one end-of-ring PAD fit in the ring. */
static inline uint64_t hard_span(hdr_t *h) { return h->hard_span; }

/* Append one record; returns status.  Lock held.
 * A record of a buffered channel bigger than hard_span is taken only if the
 * room of every message still allowed by the capacity (hard_span each, plus
 * one PAD) stays free after it; otherwise ST_NOSPACE and the sender puts the
 * payload out of band.  So capacity always counts messages. */
static int put_record(ChanObject *c, const char *data, uint64_t len, uint32_t flags,
                      uint64_t token, uint32_t blob, uint64_t *ticket) {
    hdr_t *h = c->h;
    uint64_t need = ALIGN8(REC + len);
    if (need > h->ring_size) return ST_NOSPACE;
    uint64_t used = h->tail - h->head;
    uint64_t freeb = h->ring_size - used;
    uint64_t t = h->tail;
    uint64_t off = t % h->ring_size;
    uint64_t contig = h->ring_size - off;
    if (h->capacity && need > hard_span(h)) {
        uint64_t cost = need + (contig < need ? contig : 0);
        uint64_t keep = (h->capacity - h->count) * hard_span(h);
        if (freeb < cost || freeb - cost < keep) return ST_NOSPACE;
    }
    if (contig < need) {
        if (freeb < contig + need) return ST_NOSPACE;
        if (contig >= REC) {
            rec_t *pr = (rec_t *)(c->ring + off);
            pr->len = (uint32_t)(contig - REC);
            pr->flags = F_PAD;
            pr->blob = NOBLOB;
        }
        t += contig;
        off = 0;
    } else if (freeb < need) {
        return ST_NOSPACE;
    }
    rec_t *r = (rec_t *)(c->ring + off);
    r->len = (uint32_t)len;
    r->flags = flags & F_USER;
    r->ticket = h->next_ticket++;
    /* Only a staged (unbuffered) record keeps its select's token: a buffered
     * record is sent once it is in the ring, and the select that sent it may
     * receive it later like anyone else. */
    r->token = h->capacity ? 0 : token;
    r->blob = blob;
    r->pad = 0;
    if (len) memcpy(c->ring + off + REC, data, len);
    if (blob != NOBLOB && blob < MAXB) h->blobs[blob].owner = 0;
    __atomic_store_n(&h->tail, t + need, __ATOMIC_RELEASE); /* commit */
    h->count++;
    h->sent++;
    *ticket = r->ticket;
    return ST_OK;
}

static int can_send(hdr_t *h, uint64_t token, int opflags) {
    if (h->capacity) return h->count < h->capacity;
    if (opflags & OP_NEED_RECEIVER) return free_receivers(h, token) > h->count;
    return 1;
}

/* send(data, tag, token, blob, opflags, reg_key) -> (status, ticket, wakes)
 * Unbuffered (capacity 0): the record is staged and the caller waits until
 * it is consumed; with reg_key the caller is registered (atomically with the
 * staging) to be woken when its ticket is taken. */
static PyObject *Chan_send(ChanObject *c, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(c);
    EXPECT_ARGS(nargs == 6, "send takes 6 arguments");
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    unsigned long tag = PyLong_AsUnsignedLong(args[1]);
    unsigned long long token = PyLong_AsUnsignedLongLong(args[2]);
    unsigned long blob = PyLong_AsUnsignedLong(args[3]);
    long opflags = PyLong_AsLong(args[4]);
    unsigned long long reg = PyLong_AsUnsignedLongLong(args[5]);
    if (PyErr_Occurred()) {
        PyBuffer_Release(&view);
        return NULL;
    }
    wakes_t wk = {0};
    uint64_t ticket = 0;
    int st;
    if (chan_lock(c) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    hdr_t *h = c->h;
    if (h->closed) {
        st = ST_CLOSED;
    } else if (!can_send(h, token, (int)opflags)) {
        st = ST_FULL;
    } else {
        st = put_record(c, view.buf, (uint64_t)view.len, (uint32_t)tag, token, (uint32_t)blob,
                        &ticket);
    }
    if (st == ST_OK) {
        wake_kind(h, W_RECV, &wk);
        if (reg && h->capacity == 0 && add_waiter(h, reg, W_SEND | ((opflags & OP_SELECT) ? W_SELECT : 0), token, ticket) < 0)
            st = ST_OK; /* table full: caller polls */
    } else if (reg && (st == ST_FULL || st == ST_NOSPACE)) {
        add_waiter(h, reg, W_SEND | ((opflags & OP_SELECT) ? W_SELECT : 0), token, 0);
    }
    chan_unlock(c);
    PyBuffer_Release(&view);
    PyObject *w = wakes_tuple(&wk);
    if (!w) return NULL;
    return Py_BuildValue("(iKN)", st, (unsigned long long)ticket, w);
}

/* send_many(list_of_bytes, tag, start) -> (n_sent, status, wakes)
 * Sends items[start:] in order until the channel is full. */
static PyObject *Chan_send_many(ChanObject *c, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(c);
    EXPECT_ARGS(nargs == 3 && PyList_Check(args[0]), "send_many(list, tag, start)");
    PyObject *lst = args[0];
    unsigned long tag = PyLong_AsUnsignedLong(args[1]);
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(lst);
    for (Py_ssize_t i = start; i < n; i++) {
        if (!PyBytes_Check(PyList_GET_ITEM(lst, i))) {
            PyErr_SetString(PyExc_TypeError, "send_many items must be bytes");
            return NULL;
        }
    }
    wakes_t wk = {0};
    int st = ST_OK;
    Py_ssize_t i = start;
    uint64_t ticket;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    if (h->closed) {
        st = ST_CLOSED;
    } else {
        for (; i < n; i++) {
            if (h->capacity && h->count >= h->capacity) {
                st = ST_FULL;
                break;
            }
            PyObject *b = PyList_GET_ITEM(lst, i);
            st = put_record(c, PyBytes_AS_STRING(b), (uint64_t)PyBytes_GET_SIZE(b),
                            (uint32_t)tag, 0, NOBLOB, &ticket);
            if (st != ST_OK) break;
        }
        if (i > start) wake_kind(h, W_RECV, &wk);
    }
    chan_unlock(c);
    PyObject *w = wakes_tuple(&wk);
    if (!w) return NULL;
    return Py_BuildValue("(niN)", i - start, st, w);
}

/* Find the first live record not staged by `token`. Lock held. */
static int find_live(ChanObject *c, uint64_t token, uint64_t *pos) {
    hdr_t *h = c->h;
    uint64_t p = h->head;
    while (p < h->tail) {
        p = rec_pos(h, p);
        if (p >= h->tail) break;
        rec_t *r = rec_at(c, p);
        if (!(r->flags & (F_PAD | F_DEAD)) && (token == 0 || r->token != token)) {
            *pos = p;
            return 1;
        }
        p += rec_span(r);
    }
    return 0;
}

/* Mark the record at p consumed, wake whoever waits for its space/ticket. */
static void take_record(ChanObject *c, uint64_t p, wakes_t *wk, uint32_t me) {
    hdr_t *h = c->h;
    rec_t *r = rec_at(c, p);
    r->flags |= F_DEAD;
    if (r->blob != NOBLOB && r->blob < MAXB) h->blobs[r->blob].owner = me;
    h->count--;
    h->received++;
    if (h->capacity == 0)
        wake_ticket(h, r->ticket, wk);
    else
        wake_kind(h, W_SEND, wk);
    advance_head(c);
}

/* recv(token, opflags, reg_key) -> (status, data, tag, blob, wakes) */
static PyObject *Chan_recv(ChanObject *c, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(c);
    EXPECT_ARGS(nargs == 3, "recv takes 3 arguments");
    unsigned long long token = PyLong_AsUnsignedLongLong(args[0]);
    long opflags = PyLong_AsLong(args[1]);
    unsigned long long reg = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    uint32_t me = (uint32_t)getpid();
    wakes_t wk = {0};
    int st;
    PyObject *data = NULL;
    uint32_t tag = 0, blob = NOBLOB;
    uint64_t p;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    if (find_live(c, token, &p)) {
        rec_t *r = rec_at(c, p);
        /* bytes are not tracked by the GC: safe to allocate under the lock */
        data = PyBytes_FromStringAndSize(c->ring + (p % h->ring_size) + REC, r->len);
        if (data == NULL) {
            chan_unlock(c);
            return NULL;
        }
        tag = r->flags & F_USER;
        blob = r->blob;
        take_record(c, p, &wk, me);
        st = ST_OK;
    } else if (h->closed) {
        st = ST_CLOSED;
    } else {
        st = ST_EMPTY;
        if (reg) {
            add_waiter(h, reg, W_RECV | ((opflags & OP_SELECT) ? W_SELECT : 0), token, 0);
            wake_select_senders(h, &wk);
        }
    }
    chan_unlock(c);
    PyObject *w = wakes_tuple(&wk);
    if (!w) {
        Py_XDECREF(data);
        return NULL;
    }
    if (data == NULL) {
        data = Py_None;
        Py_INCREF(data);
    }
    return Py_BuildValue("(iNIkN)", st, data, tag, (unsigned long)blob, w);
}

/* recv_many(max) -> (status, [(data, tag, blob), ...], wakes) */
static PyObject *Chan_recv_many(ChanObject *c, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(c);
    EXPECT_ARGS(nargs == 1, "recv_many(max)");
    Py_ssize_t maxn = PyLong_AsSsize_t(args[0]);
    if (maxn == -1 && PyErr_Occurred()) return NULL;
    if (maxn < 1) maxn = 1;
    uint32_t me = (uint32_t)getpid();
    wakes_t wk = {0};
    int st = ST_OK;
    char *buf = NULL;
    size_t blen = 0;
    Py_ssize_t got = 0;
    uint64_t p;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    /* copy the records out under the lock into one malloc'd buffer; build
     * the Python objects after unlocking */
    size_t cap = (size_t)(h->tail - h->head) + 64;
    buf = (char *)malloc(cap);
    if (!buf) {
        chan_unlock(c);
        return PyErr_NoMemory();
    }
    while (got < maxn && find_live(c, 0, &p)) {
        rec_t *r = rec_at(c, p);
        size_t span = (size_t)rec_span(r);
        if (blen + span > cap) break;
        memcpy(buf + blen, r, REC + r->len);
        blen += span;
        got++;
        /* inline take_record without per-record wakes of buffered senders */
        r->flags |= F_DEAD;
        if (r->blob != NOBLOB && r->blob < MAXB) h->blobs[r->blob].owner = me;
        h->count--;
        h->received++;
        if (h->capacity == 0) wake_ticket(h, r->ticket, &wk);
        advance_head(c);
    }
    if (got) {
        if (h->capacity) wake_kind(h, W_SEND, &wk);
    } else {
        st = h->closed ? ST_CLOSED : ST_EMPTY;
    }
    chan_unlock(c);
    PyObject *lst = PyList_New(got);
    if (!lst) {
        free(buf);
        return NULL;
    }
    size_t off = 0;
    for (Py_ssize_t i = 0; i < got; i++) {
        rec_t *r = (rec_t *)(buf + off);
        PyObject *item = Py_BuildValue("(y#Ik)", buf + off + REC, (Py_ssize_t)r->len,
                                       r->flags & F_USER, (unsigned long)r->blob);
        if (!item) {
            free(buf);
            Py_DECREF(lst);
            return NULL;
        }
        PyList_SET_ITEM(lst, i, item);
        off += (size_t)rec_span(r);
    }
    free(buf);
    PyObject *w = wakes_tuple(&wk);
    if (!w) {
        Py_DECREF(lst);
        return NULL;
    }
    return Py_BuildValue("(iNN)", st, lst, w);
}

/* retract(ticket) -> (consumed: bool, blob) -- an unbuffered sender gives up */
static PyObject *Chan_retract(ChanObject *c, PyObject *arg) {
    CHECK_OPEN(c);
    unsigned long long ticket = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    int consumed = 1;
    uint32_t blob = NOBLOB;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    uint64_t p = h->head;
    while (p < h->tail) {
        p = rec_pos(h, p);
        if (p >= h->tail) break;
        rec_t *r = rec_at(c, p);
        if (!(r->flags & (F_PAD | F_DEAD)) && r->ticket == ticket) {
            r->flags |= F_DEAD;
            blob = r->blob;
            if (blob != NOBLOB && blob < MAXB) h->blobs[blob].owner = (uint32_t)getpid();
            h->count--;
            h->sent--;
            consumed = 0;
            advance_head(c);
            break;
        }
        p += rec_span(r);
    }
    chan_unlock(c);
    return Py_BuildValue("(Ok)", consumed ? Py_True : Py_False, (unsigned long)blob);
}

/* consumed(ticket) -> bool */
static PyObject *Chan_consumed(ChanObject *c, PyObject *arg) {
    CHECK_OPEN(c);
    unsigned long long ticket = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    int consumed = 1;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    uint64_t p = h->head;
    while (p < h->tail) {
        p = rec_pos(h, p);
        if (p >= h->tail) break;
        rec_t *r = rec_at(c, p);
        if (!(r->flags & (F_PAD | F_DEAD)) && r->ticket == ticket) {
            consumed = 0;
            break;
        }
        p += rec_span(r);
    }
    chan_unlock(c);
    return PyBool_FromLong(consumed);
}

/* register(key, kind, token, ticket) -> wakes (a full table registers nothing:
 * callers park in bounded slices and re-check) */
static PyObject *Chan_register(ChanObject *c, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(c);
    EXPECT_ARGS(nargs == 4, "register(key, kind, token, ticket)");
    unsigned long long key = PyLong_AsUnsignedLongLong(args[0]);
    long kind = PyLong_AsLong(args[1]);
    unsigned long long token = PyLong_AsUnsignedLongLong(args[2]);
    unsigned long long ticket = PyLong_AsUnsignedLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    wakes_t wk = {0};
    if (chan_lock(c) < 0) return NULL;
    add_waiter(c->h, key, (int)kind, token, ticket);
    if (kind & W_RECV) wake_select_senders(c->h, &wk);
    chan_unlock(c);
    return wakes_tuple(&wk);
}

static PyObject *Chan_unregister(ChanObject *c, PyObject *arg) {
    CHECK_OPEN(c);
    unsigned long long key = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (c->h->nwaiters == 0) Py_RETURN_NONE; /* racy read: an entry of ours
        can only be added by us, so 0 means ours is not there */
    if (chan_lock(c) < 0) return NULL;
    remove_waiter(c->h, key);
    chan_unlock(c);
    Py_RETURN_NONE;
}

/* wake_one(kind) -> wakes: pass a wake-up on that a leaving waiter got. */
static PyObject *Chan_wake_one(ChanObject *c, PyObject *arg) {
    CHECK_OPEN(c);
    long kind = PyLong_AsLong(arg);
    if (PyErr_Occurred()) return NULL;
    wakes_t wk = {0};
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    int ready = (kind & W_RECV) ? (h->count > 0 || h->closed)
                                : (h->closed || (h->capacity && h->count < h->capacity));
    if (ready) wake_kind(h, (int)kind, &wk);
    chan_unlock(c);
    return wakes_tuple(&wk);
}

static PyObject *Chan_close(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    wakes_t wk = {0};
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    int was = h->closed;
    h->closed = 1;
    for (uint32_t i = 0; i < h->whi; i++) {
        waiter_t *w = &h->waiters[i];
        if (w->key) wake_add(&wk, w);
    }
    chan_unlock(c);
    PyObject *w = wakes_tuple(&wk);
    if (!w) return NULL;
    return Py_BuildValue("(ON)", was ? Py_True : Py_False, w);
}

/* Readiness without taking anything (select's first look). */
static PyObject *Chan_ready(ChanObject *c, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(c);
    EXPECT_ARGS(nargs == 2, "ready(kind, token)");
    long kind = PyLong_AsLong(args[0]);
    unsigned long long token = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    hdr_t *h = c->h;
    uint64_t p;
    int ready;
    if (chan_lock(c) < 0) return NULL;
    if (kind & W_RECV)
        ready = h->closed || find_live(c, token, &p);
    else
        ready = h->closed || can_send(h, token, OP_NEED_RECEIVER);
    chan_unlock(c);
    return PyBool_FromLong(ready);
}

/* counter_add(delta) -> (value, wakes): WaitGroup.  A result below zero is
 * refused (ValueError) and leaves the counter unchanged; reaching zero wakes
 * every receiver-kind waiter. */
static PyObject *Chan_counter_add(ChanObject *c, PyObject *arg) {
    CHECK_OPEN(c);
    long long d = PyLong_AsLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    wakes_t wk = {0};
    int neg = 0;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    int64_t v = h->counter + d;
    if (v < 0) {
        neg = 1;
        v = h->counter;
    } else {
        h->counter = v;
        if (v == 0) {
            for (uint32_t i = 0; i < h->whi; i++) {
                waiter_t *w = &h->waiters[i];
                if (w->key && (w->kind & W_RECV)) wake_add(&wk, w);
            }
        }
    }
    chan_unlock(c);
    if (neg) {
        PyErr_SetString(PyExc_ValueError, "negative WaitGroup counter");
        return NULL;
    }
    PyObject *w = wakes_tuple(&wk);
    if (!w) return NULL;
    return Py_BuildValue("(LN)", (long long)v, w);
}

/* counter_wait(reg_key) -> value; registers reg_key (receiver kind) while
 * the counter is not zero. */
static PyObject *Chan_counter_wait(ChanObject *c, PyObject *arg) {
    CHECK_OPEN(c);
    unsigned long long reg = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    int64_t v = h->counter;
    if (v != 0 && reg) add_waiter(h, reg, W_RECV, 0, 0);
    chan_unlock(c);
    return PyLong_FromLongLong(v);
}

/* peek() -> bytes | None: the first live record, not consumed (context cause) */
static PyObject *Chan_peek(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    PyObject *data = NULL;
    uint64_t p;
    if (chan_lock(c) < 0) return NULL;
    if (find_live(c, 0, &p)) {
        rec_t *r = rec_at(c, p);
        data = PyBytes_FromStringAndSize(c->ring + (p % c->h->ring_size) + REC, r->len);
        if (!data) {
            chan_unlock(c);
            return NULL;
        }
    }
    chan_unlock(c);
    if (!data) Py_RETURN_NONE;
    return data;
}

/* set_flag() -> (was_set, wakes): set the counter to 1 once and wake every
 * waiter (a context's drain request). */
static PyObject *Chan_set_flag(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    wakes_t wk = {0};
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    int was = h->counter != 0;
    h->counter = 1;
    for (uint32_t i = 0; i < h->whi; i++) {
        waiter_t *w = &h->waiters[i];
        if (w->key) wake_add(&wk, w);
    }
    chan_unlock(c);
    PyObject *w = wakes_tuple(&wk);
    if (!w) return NULL;
    return Py_BuildValue("(ON)", was ? Py_True : Py_False, w);
}

static PyObject *Chan_flag(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    return PyBool_FromLong(__atomic_load_n(&c->h->counter, __ATOMIC_ACQUIRE) != 0);
}

static PyObject *Chan_stats(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    uint64_t bs = 0, br = 0;
    for (uint32_t i = 0; i < h->whi; i++) {
        waiter_t *w = &h->waiters[i];
        if (!w->key) continue;
        if (w->kind & W_SEND) bs++;
        if (w->kind & W_RECV) br++;
    }
    uint64_t count = h->count, cap = h->capacity, sent = h->sent, recvd = h->received;
    uint32_t closed = h->closed, rec = h->recoveries;
    chan_unlock(c);
    return Py_BuildValue("(KKKKKKII)", (unsigned long long)count, (unsigned long long)cap,
                         (unsigned long long)sent, (unsigned long long)recvd,
                         (unsigned long long)bs, (unsigned long long)br, closed, rec);
}

static PyObject *Chan_len(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    /* a single aligned load; racy by nature, like len() of any queue */
    uint64_t n = __atomic_load_n(&c->h->count, __ATOMIC_RELAXED);
    if (c->h->capacity == 0) n = 0; /* staged rendezvous values are not buffered */
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *Chan_closed(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    return PyBool_FromLong(__atomic_load_n(&c->h->closed, __ATOMIC_ACQUIRE) != 0);
}

static PyObject *Chan_capacity(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    return PyLong_FromUnsignedLongLong(c->h->capacity);
}

static PyObject *Chan_ring_size(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    return PyLong_FromUnsignedLongLong(c->h->ring_size);
}

/* ---------------------------------------------------------------- holders */

static void purge_holders(hdr_t *h) {
    for (int i = 0; i < MAXH; i++)
        if (h->holders[i].pid && !pid_alive(h->holders[i].pid)) h->holders[i].pid = 0;
}

/* attach(pid) -> bool (False: table full, holder not tracked) */
static PyObject *Chan_attach(ChanObject *c, PyObject *arg) {
    CHECK_OPEN(c);
    unsigned long pid = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred()) return NULL;
    int ok = 0;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    for (int pass = 0; pass < 2 && !ok; pass++) {
        int freei = -1;
        for (int i = 0; i < MAXH; i++) {
            if (h->holders[i].pid == pid) {
                h->holders[i].refs++;
                ok = 1;
                break;
            }
            if (freei < 0 && h->holders[i].pid == 0) freei = i;
        }
        if (!ok && freei >= 0) {
            h->holders[freei].pid = (uint32_t)pid;
            h->holders[freei].refs = 1;
            ok = 1;
        }
        if (!ok) purge_holders(h);
    }
    chan_unlock(c);
    return PyBool_FromLong(ok);
}

/* detach(pid) -> number of live holders left (transit handles count too) */
static PyObject *Chan_detach(ChanObject *c, PyObject *arg) {
    CHECK_OPEN(c);
    unsigned long pid = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred()) return NULL;
    long live = 0;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    for (int i = 0; i < MAXH; i++) {
        if (h->holders[i].pid == pid) {
            if (h->holders[i].refs > 0) h->holders[i].refs--;
            if (h->holders[i].refs == 0) h->holders[i].pid = 0;
            break;
        }
    }
    purge_holders(h);
    for (int i = 0; i < MAXH; i++)
        if (h->holders[i].pid) live++;
    live += (long)h->transit;
    chan_unlock(c);
    return PyLong_FromLong(live);
}

/* live_holders() -> int (purges dead ones; transit handles count) */
static PyObject *Chan_live_holders(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    long live = 0;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    purge_holders(h);
    for (int i = 0; i < MAXH; i++)
        if (h->holders[i].pid) live++;
    live += (long)h->transit;
    chan_unlock(c);
    return PyLong_FromLong(live);
}

static PyObject *Chan_transit(ChanObject *c, PyObject *arg) {
    CHECK_OPEN(c);
    long d = PyLong_AsLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    if (d < 0 && (uint64_t)(-d) > h->transit)
        h->transit = 0;
    else
        h->transit += (uint64_t)d;
    uint64_t v = h->transit;
    chan_unlock(c);
    return PyLong_FromUnsignedLongLong(v);
}

/* ---------------------------------------------------------------- blobs */

/* blob_acquire(size, may_wait) -> (slot, gen, slot_size, old_gen)
 * slot -1: no slot, use a one-off segment.  slot -2 (only with may_wait):
 * nothing free fits, but a slot that fits is being copied out by a live
 * receiver right now (or holds the message a parked receiver is about to
 * take) -- it will be free in a moment, far sooner than a new one could be
 * made; the caller retries.  slot_size 0: the caller must
 * (re)create the segment of generation `gen` with at least `size` bytes,
 * unlink generation old_gen if it is not 0, and call blob_set. */
static PyObject *Chan_blob_acquire(ChanObject *c, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(c);
    EXPECT_ARGS(nargs == 2, "blob_acquire(size, may_wait)");
    unsigned long long size = PyLong_AsUnsignedLongLong(args[0]);
    int may_wait = PyObject_IsTrue(args[1]);
    if (PyErr_Occurred()) return NULL;
    uint32_t me = (uint32_t)getpid();
    int slot = -1;
    uint64_t gen = 0, ssize = 0, old = 0;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    for (int i = 0; i < MAXB; i++) {
        blob_t *b = &h->blobs[i];
        if (b->state == B_BUSY && b->owner && !pid_alive(b->owner)) {
            b->state = B_FREE;
            b->owner = 0;
        }
    }
    int best = -1, empty = -1, largest = -1;
    for (int i = 0; i < MAXB; i++) {
        blob_t *b = &h->blobs[i];
        if (b->state == B_FREE) {
            if (b->size >= size && (best < 0 || b->size < h->blobs[best].size)) best = i;
            if (largest < 0 || b->size > h->blobs[largest].size) largest = i;
        } else if (b->state == B_EMPTY && empty < 0) {
            empty = i;
        }
    }
    /* a fitting slot that a live receiver copies out of now, or whose
     * message a parked receiver is about to take */
    int copying = -1;
    if (best < 0 && may_wait) {
        int parked = free_receivers(h, 0) > 0;
        for (int i = 0; i < MAXB; i++) {
            blob_t *b = &h->blobs[i];
            if (b->state != B_BUSY || b->size < size) continue;
            if ((b->owner && b->owner != me) || (b->owner == 0 && parked)) copying = i;
        }
    }
    if (best >= 0) {
        slot = best;
    } else if (copying >= 0) {
        slot = -2;
    } else if (empty >= 0 || largest >= 0) {
        slot = empty >= 0 ? empty : largest;
        blob_t *b = &h->blobs[slot];
        old = b->state == B_EMPTY ? 0 : b->gen;
        b->gen++;
        b->size = 0; /* caller creates and calls blob_set */
    }
    if (slot >= 0) {
        blob_t *b = &h->blobs[slot];
        b->state = B_BUSY;
        b->owner = me;
        gen = b->gen;
        ssize = b->size;
    }
    chan_unlock(c);
    return Py_BuildValue("(iKKK)", slot, (unsigned long long)gen, (unsigned long long)ssize,
                         (unsigned long long)old);
}

static PyObject *Chan_blob_set(ChanObject *c, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(c);
    EXPECT_ARGS(nargs == 2, "blob_set(slot, size)");
    long slot = PyLong_AsLong(args[0]);
    unsigned long long size = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (slot < 0 || slot >= MAXB) {
        PyErr_SetString(PyExc_ValueError, "bad blob slot");
        return NULL;
    }
    if (chan_lock(c) < 0) return NULL;
    c->h->blobs[slot].size = size;
    chan_unlock(c);
    Py_RETURN_NONE;
}

/* blob_release(slot, drop): the slot is free again (drop: its segment is gone) */
static PyObject *Chan_blob_release(ChanObject *c, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(c);
    EXPECT_ARGS(nargs == 2, "blob_release(slot, drop)");
    long slot = PyLong_AsLong(args[0]);
    int drop = PyObject_IsTrue(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (slot < 0 || slot >= MAXB) Py_RETURN_NONE;
    if (chan_lock(c) < 0) return NULL;
    blob_t *b = &c->h->blobs[slot];
    b->owner = 0;
    b->state = drop ? B_EMPTY : B_FREE;
    if (drop) b->size = 0;
    chan_unlock(c);
    Py_RETURN_NONE;
}

/* blobs() -> [(slot, gen)] of slots that have a segment */
static PyObject *Chan_blobs(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    uint64_t gens[MAXB];
    uint32_t states[MAXB];
    if (chan_lock(c) < 0) return NULL;
    for (int i = 0; i < MAXB; i++) {
        gens[i] = c->h->blobs[i].gen;
        states[i] = c->h->blobs[i].state;
    }
    chan_unlock(c);
    PyObject *l = PyList_New(0);
    if (!l) return NULL;
    for (int i = 0; i < MAXB; i++) {
        if (states[i] == B_EMPTY) continue;
        PyObject *t = Py_BuildValue("(iK)", i, (unsigned long long)gens[i]);
        if (!t || PyList_Append(l, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(l);
            return NULL;
        }
        Py_DECREF(t);
    }
    return l;
}

/* waiter_table() -> [(key, kind, token, ticket, pid, notified)] (for tests) */
static PyObject *Chan_waiters(ChanObject *c, PyObject *Py_UNUSED(a)) {
    CHECK_OPEN(c);
    waiter_t copy[MAXW];
    uint32_t n;
    if (chan_lock(c) < 0) return NULL;
    n = c->h->whi;
    memcpy(copy, c->h->waiters, sizeof(waiter_t) * n);
    chan_unlock(c);
    PyObject *l = PyList_New(0);
    if (!l) return NULL;
    for (uint32_t i = 0; i < n; i++) {
        waiter_t *w = &copy[i];
        if (!w->key) continue;
        PyObject *t = Py_BuildValue("(KiKKIi)", (unsigned long long)w->key, (int)w->kind,
                                    (unsigned long long)w->token, (unsigned long long)w->ticket,
                                    (unsigned int)w->pid, (int)w->notified);
        if (!t || PyList_Append(l, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(l);
            return NULL;
        }
        Py_DECREF(t);
    }
    return l;
}


/* _die_locked(mode): test hook -- take the lock and _exit(9) holding it.
 * mode 1: first write half a record at the tail (never committed);
 * mode 2: first write a whole record at the tail, but do not commit it. */
static PyObject *Chan_die_locked(ChanObject *c, PyObject *arg) {
    CHECK_OPEN(c);
    long mode = PyLong_AsLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (chan_lock(c) < 0) return NULL;
    hdr_t *h = c->h;
    uint64_t off = h->tail % h->ring_size;
    if (mode && h->ring_size - off >= REC + 64) {
        rec_t *r = (rec_t *)(c->ring + off);
        r->len = mode == 1 ? 4096 : 64;
        r->flags = 0;
        r->ticket = h->next_ticket;
        r->token = 0;
        r->blob = NOBLOB;
        memset(c->ring + off + REC, 0xAB, 64);
    }
    _exit(9);
    Py_RETURN_NONE;
}

static PyMethodDef Chan_methods[] = {
    {"unmap", (PyCFunction)Chan_unmap, METH_NOARGS, "Unmap the segment (idempotent)."},
    {"send", (PyCFunction)(void (*)(void))Chan_send, METH_FASTCALL, "Append one record."},
    {"send_many", (PyCFunction)(void (*)(void))Chan_send_many, METH_FASTCALL,
     "Append records until full."},
    {"recv", (PyCFunction)(void (*)(void))Chan_recv, METH_FASTCALL, "Take one record."},
    {"recv_many", (PyCFunction)(void (*)(void))Chan_recv_many, METH_FASTCALL,
     "Take up to n records."},
    {"retract", (PyCFunction)Chan_retract, METH_O, "Withdraw a staged record."},
    {"consumed", (PyCFunction)Chan_consumed, METH_O, "Was the ticket taken?"},
    {"register", (PyCFunction)(void (*)(void))Chan_register, METH_FASTCALL, "Park a waiter."},
    {"unregister", (PyCFunction)Chan_unregister, METH_O, "Remove a waiter."},
    {"wake_one", (PyCFunction)Chan_wake_one, METH_O, "Pass a wake-up on."},
    {"close", (PyCFunction)Chan_close, METH_NOARGS, "Close; returns (was_closed, wakes)."},
    {"ready", (PyCFunction)(void (*)(void))Chan_ready, METH_FASTCALL, "Readiness."},
    {"stats", (PyCFunction)Chan_stats, METH_NOARGS, "Counters."},
    {"peek", (PyCFunction)Chan_peek, METH_NOARGS, "First live record."},
    {"set_flag", (PyCFunction)Chan_set_flag, METH_NOARGS, "Set flag, wake all."},
    {"flag", (PyCFunction)Chan_flag, METH_NOARGS, "Flag value."},
    {"counter_add", (PyCFunction)Chan_counter_add, METH_O, "WaitGroup add."},
    {"counter_wait", (PyCFunction)Chan_counter_wait, METH_O, "WaitGroup check+park."},
    {"length", (PyCFunction)Chan_len, METH_NOARGS, "Buffered messages."},
    {"is_closed", (PyCFunction)Chan_closed, METH_NOARGS, "Closed flag."},
    {"capacity", (PyCFunction)Chan_capacity, METH_NOARGS, "Capacity."},
    {"ring_size", (PyCFunction)Chan_ring_size, METH_NOARGS, "Ring bytes."},
    {"attach", (PyCFunction)Chan_attach, METH_O, "Count a holder process."},
    {"detach", (PyCFunction)Chan_detach, METH_O, "Uncount a holder; live holders left."},
    {"live_holders", (PyCFunction)Chan_live_holders, METH_NOARGS, "Live holders."},
    {"transit", (PyCFunction)Chan_transit, METH_O, "Adjust pickled-handle count."},
    {"blob_acquire", (PyCFunction)(void (*)(void))Chan_blob_acquire, METH_FASTCALL,
     "Reserve a blob slot."},
    {"blob_set", (PyCFunction)(void (*)(void))Chan_blob_set, METH_FASTCALL, "Set slot size."},
    {"blob_release", (PyCFunction)(void (*)(void))Chan_blob_release, METH_FASTCALL,
     "Free a slot."},
    {"blobs", (PyCFunction)Chan_blobs, METH_NOARGS, "Slots with a segment."},
    {"waiters", (PyCFunction)Chan_waiters, METH_NOARGS, "Waiter table (tests)."},
    {"_die_locked", (PyCFunction)Chan_die_locked, METH_O, "Test hook: die holding the lock."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ChanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mpchan._core.Chan",
    .tp_basicsize = sizeof(ChanObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Chan_init,
    .tp_dealloc = (destructor)Chan_dealloc,
    .tp_methods = Chan_methods,
    .tp_doc = "A mapped channel segment.",
};

/* ---------------------------------------------------------------- ChunkIter
 * ChunkIter(chunks, hint): the items of the lists that the iterator
 * ``chunks`` yields, one by one -- what itertools.chain.from_iterable does,
 * with one call per item instead of two (list() of a pool's map spends much
 * of its time there), and with ``__length_hint__`` (``hint`` items in all,
 * -1: unknown) so that list() allocates once.  ``close()`` closes ``chunks``
 * (a generator) and drops the current list.  The lists are consumed: each
 * item's slot is set to None as the item is handed out, so a map keeps no
 * result it has yielded (the lists must be the iterator's own). */

typedef struct {
    PyObject_HEAD
    PyObject *chunks; /* iterator of lists; NULL once exhausted or closed */
    PyObject *cur;    /* the list being handed out, or NULL */
    Py_ssize_t pos;
    Py_ssize_t left;  /* items still to come, or -1 */
} ChunkIterObject;

static PyObject *ChunkIter_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *chunks;
    Py_ssize_t hint = -1;
    static char *kwlist[] = {"chunks", "hint", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|n", kwlist, &chunks, &hint)) return NULL;
    PyObject *it = PyObject_GetIter(chunks);
    if (!it) return NULL;
    ChunkIterObject *self = (ChunkIterObject *)type->tp_alloc(type, 0);
    if (!self) {
        Py_DECREF(it);
        return NULL;
    }
    self->chunks = it;
    self->cur = NULL;
    self->pos = 0;
    self->left = hint < 0 ? -1 : hint;
    return (PyObject *)self;
}

static int ChunkIter_traverse(ChunkIterObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->chunks);
    Py_VISIT(self->cur);
    return 0;
}

static int ChunkIter_clear(ChunkIterObject *self) {
    Py_CLEAR(self->chunks);
    Py_CLEAR(self->cur);
    return 0;
}

static void ChunkIter_dealloc(ChunkIterObject *self) {
    PyObject_GC_UnTrack(self);
    ChunkIter_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *ChunkIter_next(ChunkIterObject *self) {
    for (;;) {
        PyObject *cur = self->cur;
        if (cur != NULL) {
            if (self->pos < PyList_GET_SIZE(cur)) {
                /* The list's reference passes to the caller, and its slot
                 * holds None: an item handed out is not kept alive here
                 * while the rest of its chunk is read. */
                PyObject *item = PyList_GET_ITEM(cur, self->pos);
                PyList_SET_ITEM(cur, self->pos, Py_NewRef(Py_None));
                self->pos++;
                if (self->left > 0) self->left--;
                return item;
            }
            Py_CLEAR(self->cur);
        }
        if (self->chunks == NULL) return NULL;
        PyObject *next = PyIter_Next(self->chunks);
        if (next == NULL) {
            /* exhausted, or it raised (a task's exception): either way it is done */
            Py_CLEAR(self->chunks);
            self->left = 0;
            return NULL;
        }
        if (!PyList_CheckExact(next)) {
            PyObject *as_list = PySequence_List(next);
            Py_DECREF(next);
            if (as_list == NULL) return NULL;
            next = as_list;
        }
        self->cur = next;
        self->pos = 0;
    }
}

static PyObject *ChunkIter_length_hint(ChunkIterObject *self, PyObject *Py_UNUSED(a)) {
    if (self->left < 0) Py_RETURN_NOTIMPLEMENTED;
    return PyLong_FromSsize_t(self->left);
}

static PyObject *ChunkIter_close(ChunkIterObject *self, PyObject *Py_UNUSED(a)) {
    PyObject *chunks = self->chunks;
    self->chunks = NULL;
    Py_CLEAR(self->cur);
    self->left = 0;
    if (chunks == NULL) Py_RETURN_NONE;
    PyObject *r = NULL;
    PyObject *close = PyObject_GetAttrString(chunks, "close");
    if (close == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            r = Py_NewRef(Py_None);
        }
    } else {
        r = PyObject_CallNoArgs(close);
        Py_DECREF(close);
    }
    Py_DECREF(chunks);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyMethodDef ChunkIter_methods[] = {
    {"__length_hint__", (PyCFunction)ChunkIter_length_hint, METH_NOARGS,
     "Items still to come (NotImplemented when unknown)."},
    {"close", (PyCFunction)ChunkIter_close, METH_NOARGS,
     "Close the chunk iterator and stop. Never blocks."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ChunkIterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mpchan._core.ChunkIter",
    .tp_basicsize = sizeof(ChunkIterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = ChunkIter_new,
    .tp_dealloc = (destructor)ChunkIter_dealloc,
    .tp_traverse = (traverseproc)ChunkIter_traverse,
    .tp_clear = (inquiry)ChunkIter_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)ChunkIter_next,
    .tp_methods = ChunkIter_methods,
    .tp_doc = "ChunkIter(chunks, hint=-1): the items of the lists ``chunks`` yields.",
};

/* dgram_wake(fd, addr) -> errno (0: sent)
 * One byte to a Unix datagram address, MSG_DONTWAIT, *keeping* the GIL: the
 * call never blocks, and giving the GIL up here would let a busy thread of
 * this process keep it for a whole switch interval (5 ms) before this one
 * runs again.  ``addr`` is the address as bytes (a leading NUL: abstract). */
static PyObject *core_dgram_wake(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs) {
    EXPECT_ARGS(nargs == 2, "dgram_wake(fd, addr)");
    int fd = (int)PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    char *a;
    Py_ssize_t alen;
    if (PyBytes_AsStringAndSize(args[1], &a, &alen) < 0) return NULL;
    struct sockaddr_un sa;
    if (alen <= 0 || (size_t)alen > sizeof(sa.sun_path)) {
        PyErr_SetString(PyExc_ValueError, "bad socket address");
        return NULL;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, a, (size_t)alen);
    socklen_t sl = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (size_t)alen);
    if (a[0] != 0) sl += 1; /* a path: include its terminating NUL */
    char one = 1;
    ssize_t r;
    do {
        r = sendto(fd, &one, 1, MSG_DONTWAIT, (struct sockaddr *)&sa, sl);
    } while (r < 0 && errno == EINTR);
    return PyLong_FromLong(r < 0 ? errno : 0);
}

/* dgram_drain(fd) -> how many datagrams were read
 * Read every pending datagram of a non-blocking socket, keeping the GIL (as
 * dgram_wake: socket.recv would give it up, and a woken thread would then
 * wait a switch interval for it once more per call). */
static PyObject *core_dgram_drain(PyObject *Py_UNUSED(m), PyObject *arg) {
    int fd = (int)PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    char buf[64];
    long n = 0;
    for (;;) {
        ssize_t r = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (r >= 0) {
            n++;
            continue;
        }
        if (errno == EINTR) continue;
        break; /* EAGAIN: drained; anything else: nothing to read either */
    }
    return PyLong_FromLong(n);
}

static PyMethodDef core_functions[] = {
    {"dgram_drain", (PyCFunction)core_dgram_drain, METH_O,
     "Read every pending datagram of a non-blocking socket; return the count."},
    {"dgram_wake", (PyCFunction)(void (*)(void))core_dgram_wake, METH_FASTCALL,
     "Send one byte to a Unix datagram address without blocking; return errno."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef coremodule = {
    PyModuleDef_HEAD_INIT, "mpchan._core", "Shared-memory ring and robust lock.", -1,
    core_functions,
};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&ChanType) < 0) return NULL;
    if (PyType_Ready(&ChunkIterType) < 0) return NULL;
    PyObject *m = PyModule_Create(&coremodule);
    if (!m) return NULL;
    Py_INCREF(&ChanType);
    if (PyModule_AddObject(m, "Chan", (PyObject *)&ChanType) < 0) {
        Py_DECREF(&ChanType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ChunkIterType);
    if (PyModule_AddObject(m, "ChunkIter", (PyObject *)&ChunkIterType) < 0) {
        Py_DECREF(&ChunkIterType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "HDR_SIZE", HDR_SIZE);
    PyModule_AddIntConstant(m, "REC_SIZE", (long)REC);
    PyModule_AddIntConstant(m, "MAXB", MAXB);
    PyModule_AddIntConstant(m, "NOBLOB", (long)NOBLOB);
    PyModule_AddIntConstant(m, "OK", ST_OK);
    PyModule_AddIntConstant(m, "FULL", ST_FULL);
    PyModule_AddIntConstant(m, "CLOSED", ST_CLOSED);
    PyModule_AddIntConstant(m, "NOSPACE", ST_NOSPACE);
    PyModule_AddIntConstant(m, "EMPTY", ST_EMPTY);
    PyModule_AddIntConstant(m, "W_RECV", W_RECV);
    PyModule_AddIntConstant(m, "W_SEND", W_SEND);
    PyModule_AddIntConstant(m, "W_SELECT", W_SELECT);
    PyModule_AddIntConstant(m, "OP_NEED_RECEIVER", OP_NEED_RECEIVER);
    PyModule_AddIntConstant(m, "OP_SELECT", OP_SELECT);
    return m;
}
