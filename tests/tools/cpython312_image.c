/*
 * A process whose memory holds a CPython 3.12 interpreter's structures: no
 * Debian suite ships 3.12, so pyebpf's 3.12 layout is tested against this
 * image, sampled live by the real BPF walker.
 *
 * Every structure pyebpf reads is declared below, transcribed field by field
 * (types and order) from the CPython 3.12 headers named above each one, so
 * that the compiler, not a table, computes the offsets. Only _PyRuntimeState
 * is too large to transcribe; its two fields are given as numbers (see
 * RUNTIME_INTERPRETERS_HEAD).
 *
 * Build: cc -O0 -pthread -rdynamic -o cpython312_image cpython312_image.c
 *   (-rdynamic exports _PyRuntime, Py_Version and PyCode_Type in .dynsym, as
 *   a static CPython build linked with -export-dynamic does; PIE by default.)
 *
 * Usage: cpython312_image [MODE]
 *   bound    (default) each thread state is bound to its thread through the
 *            pthread key in _PyRuntime.autoTSSkey, as PyGILState does
 *   unbound  the key exists but its slots are left empty
 *   offsets  print "NAME VALUE" lines: the offsets the compiler computed
 *            from the declarations below, then exit
 *
 * Prints "ready MAIN_TSTATE WORKER_TSTATE" (decimal addresses) once both
 * threads are set up, then both burn CPU in C until killed.
 *
 * The program it lays out, /pyebpf-fake/app312.py (never read; its lines are
 * what the location tables below say):
 *
 *    1  import threading
 *    2  import sys
 *    3
 *    4  def main():
 *    5      worker = Worker()
 *    6      worker.handle()
 *    7  class Worker:
 *    8      def handle(self):
 *    9          items = list(range(100))
 *   10          sorted(items, key=hot)          # hot runs under C: entry frame
 *   11
 *   12
 *   13
 *   14  def hot(item):
 *   15      total = 0
 *   16      while True:
 *   17          total += item
 *   18
 *   19
 *   20  def gen_body():
 *   21      n = 0
 *   22      while True:
 *   23          n += 1; yield n
 *   24
 *   25
 *   26  def функция():
 *   27      for _ in gen_body():
 *   28          pass
 *   29
 *   30
 *   31  if __name__ == "__main__":
 *   32      threading.Thread(target=функция).start()
 *   33      main()
 *
 * Stacks (leaf first) and the line of each frame:
 *   main thread:   hot:17 <- [entry frame, skipped] <- Worker.handle:10
 *                  <- main:6 <- <module>:33
 *   worker thread: gen_body:23 <- функция:27 <- <module>:32
 * (the worker's chain is kept short: its bottom frame is the module's, at
 * the line that starts the thread). The entry frame's code is 3.12's
 * interpreter trampoline ("<interpreter trampoline>" in "<shim>").
 */
#define _GNU_SOURCE /* syscall() */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

/* ---- Include/pyport.h, Include/pytypedefs.h ---- */
typedef ssize_t Py_ssize_t;
typedef Py_ssize_t Py_hash_t;
typedef struct _typeobject PyTypeObject;
typedef struct _object PyObject;
typedef struct _frame PyFrameObject; /* opaque here */
typedef struct _ts PyThreadState;
typedef struct _is PyInterpreterState;
typedef void *PyThread_type_lock; /* Include/pythread.h */

/* ---- Include/object.h (3.12: the refcount union of PEP 683) ---- */
struct _object {
    union {
        Py_ssize_t ob_refcnt;
        uint32_t ob_refcnt_split[2];
    };
    PyTypeObject *ob_type;
};

typedef struct {
    PyObject ob_base;
    Py_ssize_t ob_size; /* Number of items in variable part */
} PyVarObject;

#define PyObject_HEAD PyObject ob_base;
#define PyObject_VAR_HEAD PyVarObject ob_base;

/* ---- Include/cpython/object.h: the start of struct _typeobject ---- */
struct _typeobject {
    PyObject_VAR_HEAD
    const char *tp_name; /* For printing, in format "<module>.<name>" */
    Py_ssize_t tp_basicsize, tp_itemsize; /* For allocation */
    /* ... the rest (tp_dealloc on) is never read. */
};

/* ---- Include/cpython/code.h (3.12) ---- */
typedef union {
    uint16_t cache;
    struct {
        uint8_t code;
        uint8_t arg;
    } op;
} _Py_CODEUNIT;

typedef struct {
    PyObject *_co_code;
    PyObject *_co_varnames;
    PyObject *_co_cellvars;
    PyObject *_co_freevars;
} _PyCoCached;

typedef struct _PyCoMonitoringData _PyCoMonitoringData; /* only pointed to */

typedef struct PyCodeObject {
    PyObject_VAR_HEAD

    /* The hottest fields (in the eval loop) are grouped here at the top. */
    PyObject *co_consts;         /* list (constants used) */
    PyObject *co_names;          /* list of strings (names used) */
    PyObject *co_exceptiontable; /* Byte string encoding exception handling table */
    int co_flags;                /* CO_..., see below */

    /* The rest are not so impactful on performance. */
    int co_argcount;        /* #arguments, except *args */
    int co_posonlyargcount; /* #positional only arguments */
    int co_kwonlyargcount;  /* #keyword only arguments */
    int co_stacksize;       /* #entries needed for evaluation stack */
    int co_firstlineno;     /* first source line number */

    /* redundant values (derived from co_localsplusnames and
       co_localspluskinds) */
    int co_nlocalsplus;   /* number of local + cell + free variables */
    int co_framesize;     /* Size of frame in words */
    int co_nlocals;       /* number of local variables */
    int co_ncellvars;     /* total number of cell variables */
    int co_nfreevars;     /* number of free variables */
    uint32_t co_version;  /* version number */

    PyObject *co_localsplusnames; /* tuple mapping offsets to names */
    PyObject *co_localspluskinds; /* Bytes mapping to local kinds (one byte
                                     per variable) */
    PyObject *co_filename;    /* unicode (where it was loaded from) */
    PyObject *co_name;        /* unicode (name, for reference) */
    PyObject *co_qualname;    /* unicode (qualname, for reference) */
    PyObject *co_linetable;   /* bytes object that holds location info */
    PyObject *co_weakreflist; /* to support weakrefs to code objects */
    _PyCoCached *_co_cached;  /* cached co_* attributes */
    uint64_t _co_instrumentation_version; /* current instrumentation version */
    _PyCoMonitoringData *_co_monitoring;  /* Monitoring data */
    int _co_firsttraceable;               /* index of first traceable instruction */
    /* Scratch space for extra data relating to the code object. */
    void *co_extra;
    char co_code_adaptive[1];
} PyCodeObject;

#define CO_OPTIMIZED 0x0001
#define CO_NEWLOCALS 0x0002
#define CO_GENERATOR 0x0020

/* Location table entry kinds (Include/cpython/code.h, _PyCodeLocationInfoKind;
   the format is described in Objects/locations.md). */
#define PY_CODE_LOCATION_INFO_ONE_LINE0 10
#define PY_CODE_LOCATION_INFO_NO_COLUMNS 13
#define PY_CODE_LOCATION_INFO_NONE 15

/* ---- Include/cpython/unicodeobject.h (3.12: no wstr) ---- */
typedef struct {
    PyObject_HEAD
    Py_ssize_t length; /* Number of code points in the string */
    Py_hash_t hash;    /* Hash value; -1 if not set */
    struct {
        unsigned int interned:2;
        unsigned int kind:3;
        unsigned int compact:1;
        unsigned int ascii:1;
        unsigned int statically_allocated:1;
        unsigned int :24;
    } state;
} PyASCIIObject;

typedef struct {
    PyASCIIObject _base;
    Py_ssize_t utf8_length; /* Number of bytes in utf8, excluding the
                             * terminating \0. */
    char *utf8;             /* UTF-8 representation (null-terminated) */
} PyCompactUnicodeObject;

/* ---- Include/cpython/bytesobject.h ---- */
typedef struct {
    PyObject_VAR_HEAD
    Py_hash_t ob_shash; /* Py_DEPRECATED(3.11) */
    char ob_sval[1];
} PyBytesObject;

/* ---- Include/cpython/pystate.h (3.12) ---- */
typedef int (*Py_tracefunc)(PyObject *, PyFrameObject *, int, PyObject *);

typedef struct _PyCFrame {
    /* Pointer to the currently executing frame (it can be NULL) */
    struct _PyInterpreterFrame *current_frame;
    struct _PyCFrame *previous;
} _PyCFrame;

typedef struct _err_stackitem {
    PyObject *exc_value;
    struct _err_stackitem *previous_item;
} _PyErr_StackItem;

typedef struct _stack_chunk {
    struct _stack_chunk *previous;
    size_t size;
    size_t top;
    PyObject *data[1]; /* Variable sized */
} _PyStackChunk;

struct _py_trashcan {
    int delete_nesting;
    PyObject *delete_later;
};

struct _ts {
    /* See Python/ceval.c for comments explaining most fields */

    PyThreadState *prev;
    PyThreadState *next;
    PyInterpreterState *interp;

    struct {
        unsigned int initialized:1;
        unsigned int bound:1;
        unsigned int unbound:1;
        unsigned int bound_gilstate:1;
        unsigned int active:1;
        unsigned int finalizing:1;
        unsigned int cleared:1;
        unsigned int finalized:1;
        unsigned int :24;
    } _status;

    int py_recursion_remaining;
    int py_recursion_limit;

    int c_recursion_remaining;
    int recursion_headroom; /* Allow 50 more calls to handle any errors. */

    int tracing;
    int what_event; /* The event currently being monitored, if any. */

    /* Pointer to current _PyCFrame in the C stack frame of the currently,
     * or most recently, executing _PyEval_EvalFrameDefault. */
    _PyCFrame *cframe;

    Py_tracefunc c_profilefunc;
    Py_tracefunc c_tracefunc;
    PyObject *c_profileobj;
    PyObject *c_traceobj;

    /* The exception currently being raised */
    PyObject *current_exception;

    _PyErr_StackItem *exc_info;

    PyObject *dict; /* Stores per-thread state */

    int gilstate_counter;

    PyObject *async_exc;     /* Asynchronous exception to raise */
    unsigned long thread_id; /* Thread id where this tstate was created */

    unsigned long native_thread_id;

    struct _py_trashcan trash;

    void (*on_delete)(void *);
    void *on_delete_data;

    int coroutine_origin_tracking_depth;

    PyObject *async_gen_firstiter;
    PyObject *async_gen_finalizer;

    PyObject *context;
    uint64_t context_ver;

    /* Unique thread state id. */
    uint64_t id;

    _PyStackChunk *datastack_chunk;
    PyObject **datastack_top;
    PyObject **datastack_limit;

    /* The thread's exception stack entry.  (Always the last entry.) */
    _PyErr_StackItem exc_state;

    /* The bottom-most frame on the stack. */
    _PyCFrame root_cframe;
};

/* ---- Include/internal/pycore_interp.h (3.12): the start of struct _is ---- */
struct _is {
    PyInterpreterState *next;

    int64_t id;
    int64_t id_refcount;
    int requires_idref;
    PyThread_type_lock id_mutex;

    int _initialized;
    int finalizing;

    uint64_t monitoring_version;
    uint64_t last_restart_version;
    struct pythreads {
        uint64_t next_unique_id;
        /* The linked list of threads, newest first. */
        PyThreadState *head;
        /* Used in Modules/_threadmodule.c. */
        long count;
        size_t stacksize;
    } threads;
    /* ... the rest (runtime, _finalizing, gc, ...) is never read. */
};

/* ---- Include/internal/pycore_frame.h (3.12) ---- */
enum _frameowner {
    FRAME_OWNED_BY_THREAD = 0,
    FRAME_OWNED_BY_GENERATOR = 1,
    FRAME_OWNED_BY_FRAME_OBJECT = 2,
    FRAME_OWNED_BY_CSTACK = 3,
};

typedef struct _PyInterpreterFrame {
    PyCodeObject *f_code; /* Strong reference */
    struct _PyInterpreterFrame *previous;
    PyObject *f_funcobj;      /* Strong reference. Only valid if not on C stack */
    PyObject *f_globals;      /* Borrowed reference. Only valid if not on C stack */
    PyObject *f_builtins;     /* Borrowed reference. Only valid if not on C stack */
    PyObject *f_locals;       /* Strong reference, may be NULL. Only valid if not on C stack */
    PyFrameObject *frame_obj; /* Strong reference, may be NULL. Only valid if not on C stack */
    _Py_CODEUNIT *prev_instr;
    int stacktop; /* Offset of TOS from localsplus  */
    uint16_t return_offset;
    char owner;
    /* Locals and stack */
    PyObject *localsplus[1];
} _PyInterpreterFrame;

#define FRAME_SPECIALS_SIZE ((int)((sizeof(_PyInterpreterFrame) - 1) / sizeof(PyObject *)))

/* ---- Include/cpython/genobject.h (3.11, 3.12) ---- */
typedef struct {
    PyObject_HEAD
    PyObject *gi_weakreflist;
    PyObject *gi_name;
    PyObject *gi_qualname;
    _PyErr_StackItem gi_exc_state;
    PyObject *gi_origin_or_finalizer;
    char gi_hooks_inited;
    char gi_closed;
    char gi_running_async;
    /* The frame */
    int8_t gi_frame_state;
    PyObject *gi_iframe[1];
} PyGenObject;

#define FRAME_EXECUTING 0 /* enum _framestate, pycore_frame.h */

/* ---- Include/cpython/pythread.h ---- */
typedef struct _Py_tss_t {
    int _is_initialized;
    pthread_key_t _key;
} Py_tss_t;

/* ---- _PyRuntimeState (Include/internal/pycore_runtime.h) ----
 * Too large to transcribe (allocators, obmalloc, signals, ... come before
 * autoTSSkey). The two offsets below are those of 3.12.0's struct
 * pyruntimestate on x86-64 according to py-spy's bindgen output of the
 * 3.12.0 headers (src/python_bindings/v3_12_0.rs: interpreters.head and
 * autoTSSkey) and to Pyroscope's table generated from the DWARF of real
 * builds (grafana/pyroscope ebpf/python/python_offsets_gen_amd64.go:
 * PyRuntimeState_autoTSSkey 1544 for 3.12.0-3.12.2).
 */
#define RUNTIME_INTERPRETERS_HEAD 40 /* interpreters.head */
#define RUNTIME_AUTOTSSKEY 1544      /* Py_tss_t autoTSSkey */

/* ---- The exported symbols pyebpf looks up ---- */
_Alignas(64) unsigned char _PyRuntime[4096];
const unsigned long Py_Version = 0x030c04f0UL; /* 3.12.4 final */
PyTypeObject PyCode_Type = {
    .ob_base = {.ob_base = {.ob_refcnt = 1}, .ob_size = 0},
    .tp_name = "code",
    .tp_basicsize = offsetof(PyCodeObject, co_code_adaptive),
    .tp_itemsize = sizeof(_Py_CODEUNIT),
};

/* Types of the other objects built here; only their addresses matter. */
static PyTypeObject PyUnicode_Type = {.tp_name = "str", .tp_basicsize = sizeof(PyASCIIObject)};
static PyTypeObject PyBytes_Type = {.tp_name = "bytes",
                                    .tp_basicsize = offsetof(PyBytesObject, ob_sval)};
static PyTypeObject PyGen_Type = {.tp_name = "generator",
                                  .tp_basicsize = offsetof(PyGenObject, gi_iframe)};
static PyTypeObject PyTuple_Type = {.tp_name = "tuple", .tp_basicsize = sizeof(PyVarObject)};
static PyTypeObject PyDict_Type = {.tp_name = "dict", .tp_basicsize = sizeof(PyObject)};
static PyTypeObject PyFunction_Type = {.tp_name = "function", .tp_basicsize = sizeof(PyObject)};

static PyVarObject empty_tuple = {.ob_base = {.ob_refcnt = 1, .ob_type = &PyTuple_Type},
                                  .ob_size = 0};
static PyObject globals_dict = {.ob_refcnt = 1, .ob_type = &PyDict_Type};
static PyObject builtins_dict = {.ob_refcnt = 1, .ob_type = &PyDict_Type};
static PyObject a_function = {.ob_refcnt = 1, .ob_type = &PyFunction_Type};
static PyObject *empty_bytes;

static void *xcalloc(size_t size) {
    void *p = calloc(1, size);
    if (p == NULL) {
        perror("calloc");
        exit(1);
    }
    return p;
}

/* A compact ASCII str: PyASCIIObject, then the characters. */
static PyObject *ascii_str(const char *s) {
    size_t n = strlen(s);
    PyASCIIObject *o = xcalloc(sizeof(PyASCIIObject) + n + 1);
    o->ob_base.ob_refcnt = 1;
    o->ob_base.ob_type = &PyUnicode_Type;
    o->length = (Py_ssize_t)n;
    o->hash = -1;
    o->state.kind = 1; /* PyUnicode_1BYTE_KIND */
    o->state.compact = 1;
    o->state.ascii = 1;
    memcpy(o + 1, s, n + 1);
    return (PyObject *)o;
}

/* A compact UCS-2 str: PyCompactUnicodeObject, then the code units (its
 * UTF-8 form is not cached, as in a fresh CPython string). */
static PyObject *ucs2_str(const uint16_t *units, size_t n) {
    PyCompactUnicodeObject *o = xcalloc(sizeof(PyCompactUnicodeObject) + 2 * (n + 1));
    o->_base.ob_base.ob_refcnt = 1;
    o->_base.ob_base.ob_type = &PyUnicode_Type;
    o->_base.length = (Py_ssize_t)n;
    o->_base.hash = -1;
    o->_base.state.kind = 2; /* PyUnicode_2BYTE_KIND */
    o->_base.state.compact = 1;
    o->_base.state.ascii = 0;
    memcpy(o + 1, units, 2 * n);
    return (PyObject *)o;
}

static PyObject *bytes_obj(const uint8_t *data, size_t n) {
    PyBytesObject *b = xcalloc(sizeof(PyBytesObject) + n);
    b->ob_base.ob_base.ob_refcnt = 1;
    b->ob_base.ob_base.ob_type = &PyBytes_Type;
    b->ob_base.ob_size = (Py_ssize_t)n;
    b->ob_shash = -1;
    memcpy(b->ob_sval, data, n);
    return (PyObject *)b;
}

/* ---- co_linetable (Objects/locations.md, 3.11 and 3.12) ----
 * Entries of a header byte `1 cccc lll` (code c, l + 1 code units) then
 * data; varints are 6-bit groups, least significant first, bit 6 set on all
 * but the last; a signed varint is (v << 1) or ((-v) << 1 | 1). */
static size_t put_varint(uint8_t *p, unsigned v) {
    size_t n = 0;
    while (v >= 64) {
        p[n++] = 64 | (v & 63);
        v >>= 6;
    }
    p[n++] = (uint8_t)v;
    return n;
}

static size_t put_svarint(uint8_t *p, int v) {
    return put_varint(p, v < 0 ? ((0u - (unsigned)v) << 1) | 1 : (unsigned)v << 1);
}

/* `units` code units on source line `line` (NO_LINE: no location). */
struct span {
    int units;
    int line;
};
#define NO_LINE (-1)

/* Line deltas of 0 to 2 use the ONE_LINE forms (two column bytes follow),
 * others NO_COLUMNS (a signed varint line delta); spans longer than 8 units
 * continue with ONE_LINE0 entries, as CPython writes them. */
static PyObject *location_table(int firstlineno, const struct span *spans, size_t n) {
    uint8_t buf[512];
    size_t len = 0;
    int line = firstlineno;
    for (size_t i = 0; i < n; i++) {
        int left = spans[i].units;
        int delta = spans[i].line == NO_LINE ? 0 : spans[i].line - line;
        if (spans[i].line != NO_LINE)
            line = spans[i].line;
        while (left > 0) {
            int l = left > 8 ? 8 : left;
            left -= l;
            if (len + 8 > sizeof buf) {
                fprintf(stderr, "location table too long\n");
                exit(1);
            }
            if (spans[i].line == NO_LINE) {
                buf[len++] = 0x80 | (PY_CODE_LOCATION_INFO_NONE << 3) | (l - 1);
            } else if (delta >= 0 && delta <= 2) {
                buf[len++] = 0x80 | ((PY_CODE_LOCATION_INFO_ONE_LINE0 + delta) << 3) | (l - 1);
                buf[len++] = 4;  /* start column */
                buf[len++] = 24; /* end column */
            } else {
                buf[len++] = 0x80 | (PY_CODE_LOCATION_INFO_NO_COLUMNS << 3) | (l - 1);
                len += put_svarint(buf + len, delta);
            }
            delta = 0;
        }
    }
    return bytes_obj(buf, len);
}

static uint32_t next_code_version = 1;

static PyCodeObject *make_code(PyObject *filename, PyObject *name, PyObject *qualname,
                               int firstlineno, int flags, int nlocals, int stacksize,
                               int firsttraceable, const struct span *spans, size_t nspans) {
    int units = 0;
    for (size_t i = 0; i < nspans; i++)
        units += spans[i].units;
    size_t size = offsetof(PyCodeObject, co_code_adaptive) + (size_t)units * sizeof(_Py_CODEUNIT);
    if (size < sizeof(PyCodeObject))
        size = sizeof(PyCodeObject);
    PyCodeObject *co = xcalloc(size);
    co->ob_base.ob_base.ob_refcnt = 1;
    co->ob_base.ob_base.ob_type = &PyCode_Type;
    co->ob_base.ob_size = units;
    co->co_consts = (PyObject *)&empty_tuple;
    co->co_names = (PyObject *)&empty_tuple;
    co->co_exceptiontable = empty_bytes;
    co->co_flags = flags;
    co->co_stacksize = stacksize;
    co->co_firstlineno = firstlineno;
    co->co_nlocalsplus = nlocals;
    co->co_nlocals = nlocals;
    co->co_framesize = nlocals + stacksize + FRAME_SPECIALS_SIZE;
    co->co_version = next_code_version++;
    co->co_localsplusnames = (PyObject *)&empty_tuple;
    co->co_localspluskinds = empty_bytes;
    co->co_filename = filename;
    co->co_name = name;
    co->co_qualname = qualname;
    co->co_linetable = location_table(firstlineno, spans, nspans);
    co->_co_firsttraceable = firsttraceable;
    _Py_CODEUNIT *code = (_Py_CODEUNIT *)co->co_code_adaptive;
    for (int i = 0; i < units; i++)
        code[i].op.code = 9; /* NOP: the instructions are never read */
    return co;
}

/* A span array and its length, as make_code takes them. */
#define SPANS(...)                                                                             \
    (const struct span[]){__VA_ARGS__},                                                        \
        sizeof((const struct span[]){__VA_ARGS__}) / sizeof(struct span)

/* Instruction indexes the frames stop at, and the lines they map to. */
#define MODULE_MAIN_CALL 28    /* line 33: main() */
#define MODULE_THREAD_START 22 /* line 32: threading.Thread(...).start() */
#define MAIN_CALL 10           /* line 6 */
#define HANDLE_CALL 14         /* line 10 */
#define HOT_INSTR 6            /* line 17 */
#define GEN_INSTR 9            /* line 23 */
#define FUNKTSIYA_FOR_ITER 5   /* line 27 */

static PyCodeObject *module_code, *main_code, *handle_code, *hot_code, *gen_code, *funktsiya_code,
    *trampoline_code;

static void build_code(void) {
    uint8_t nothing = 0;
    empty_bytes = bytes_obj(&nothing, 0);
    PyObject *file = ascii_str("/pyebpf-fake/app312.py");
    const int fn = CO_OPTIMIZED | CO_NEWLOCALS;

    module_code = make_code(file, ascii_str("<module>"), ascii_str("<module>"), 1, 0, 0, 4, 0,
                            SPANS({2, 1}, {4, 2}, {4, 4}, {2, 7}, {2, 14}, {2, 20}, {2, 26},
                                  {2, 31}, {6, 32}, {6, 33}));
    main_code = make_code(file, ascii_str("main"), ascii_str("main"), 4, fn, 1, 3, 0,
                          SPANS({1, 4}, {4, 5}, {9, 6}));
    PyObject *handle = ascii_str("handle");
    handle_code = make_code(file, handle, ascii_str("Worker.handle"), 8, fn, 2, 5, 0,
                            SPANS({1, 8}, {6, 9}, {12, 10}));
    PyObject *hot = ascii_str("hot");
    hot_code = make_code(file, hot, hot, 14, fn, 2, 2, 0,
                         SPANS({1, 14}, {2, 15}, {3, 16}, {4, 17}, {2, 16}));
    PyObject *gen = ascii_str("gen_body");
    gen_code = make_code(file, gen, gen, 20, fn | CO_GENERATOR, 1, 2, 2,
                         SPANS({3, 20}, {2, 21}, {2, 22}, {8, 23}, {2, 22}));
    /* функция: U+0444 U+0443 U+043D U+043A U+0446 U+0438 U+044F */
    static const uint16_t funktsiya[] = {0x0444, 0x0443, 0x043d, 0x043a, 0x0446, 0x0438, 0x044f};
    PyObject *f = ucs2_str(funktsiya, sizeof funktsiya / sizeof funktsiya[0]);
    funktsiya_code = make_code(file, f, f, 26, fn, 1, 2, 0,
                               SPANS({1, 26}, {6, 27}, {2, 28}, {4, 27}));
    /* 3.12's interp->interpreter_trampoline, as _Py_MakeShimCode
     * (Objects/codeobject.c) builds it: file "<shim>", name and qualname
     * "<interpreter trampoline>", CO_NEWLOCALS | CO_OPTIMIZED, first line 1,
     * a location table of NONE entries (its few instructions are never
     * read). */
    PyObject *tramp = ascii_str("<interpreter trampoline>");
    trampoline_code = make_code(ascii_str("<shim>"), tramp, tramp, 1, fn, 0, 1, 0,
                                SPANS({3, NO_LINE}));
}

/* ---- Threads and frames ---- */
static PyInterpreterState *interp;
static pthread_key_t key;
static int bind_key = 1;

struct py_thread {
    PyThreadState *ts;
    /* current_frame of the innermost _PyCFrame (the leaf frame), and of the
     * one outside it if the leaf runs in a nested _PyEval_EvalFrameDefault. */
    _PyInterpreterFrame *leaf;
    _PyInterpreterFrame *outer;
};
static struct py_thread main_thread, worker_thread;

static PyThreadState *new_thread_state(uint64_t id) {
    PyThreadState *ts = xcalloc(sizeof(PyThreadState));
    ts->interp = interp;
    ts->_status.initialized = 1;
    ts->_status.bound = 1;
    ts->_status.bound_gilstate = 1;
    ts->py_recursion_limit = 1000;
    ts->py_recursion_remaining = 1000;
    ts->c_recursion_remaining = 1500;
    ts->exc_info = &ts->exc_state;
    ts->gilstate_counter = 1;
    ts->id = id;
    ts->cframe = &ts->root_cframe;
    /* The root data stack chunk; its data[0] is skipped, as push_chunk
     * (Python/pystate.c) does. */
    size_t chunk_size = 16 << 10;
    _PyStackChunk *chunk = xcalloc(chunk_size);
    chunk->size = chunk_size;
    ts->datastack_chunk = chunk;
    ts->datastack_top = &chunk->data[1];
    ts->datastack_limit = (PyObject **)((char *)chunk + chunk_size);
    /* Linked newest first, as new_threadstate() does. */
    ts->next = interp->threads.head;
    if (ts->next != NULL)
        ts->next->prev = ts;
    interp->threads.head = ts;
    return ts;
}

static void init_frame(_PyInterpreterFrame *f, PyCodeObject *co, _PyInterpreterFrame *previous,
                       int instr, char owner) {
    f->f_code = co;
    f->previous = previous;
    f->f_funcobj = &a_function;
    f->f_globals = &globals_dict;
    f->f_builtins = &builtins_dict;
    f->f_locals = co == module_code ? &globals_dict : NULL;
    f->frame_obj = NULL;
    f->prev_instr = (_Py_CODEUNIT *)co->co_code_adaptive + instr;
    f->stacktop = co->co_nlocalsplus;
    f->return_offset = 0;
    f->owner = owner;
}

/* Push a frame of `co` on the thread's data stack, next to the previous one,
 * as _PyThreadState_PushFrame does. */
static _PyInterpreterFrame *push_frame(PyThreadState *ts, PyCodeObject *co,
                                       _PyInterpreterFrame *previous, int instr) {
    _PyInterpreterFrame *f = (_PyInterpreterFrame *)ts->datastack_top;
    ts->datastack_top += co->co_framesize;
    init_frame(f, co, previous, instr, FRAME_OWNED_BY_THREAD);
    return f;
}

static void build_threads(void) {
    interp = xcalloc(sizeof(struct _is) + 4096);
    interp->_initialized = 1;
    interp->threads.next_unique_id = 1;

    /* Main thread: <module> -> main -> Worker.handle -> (C: sorted) -> hot. */
    PyThreadState *ts = new_thread_state(interp->threads.next_unique_id++);
    _PyInterpreterFrame *module = push_frame(ts, module_code, NULL, MODULE_MAIN_CALL);
    _PyInterpreterFrame *main_f = push_frame(ts, main_code, module, MAIN_CALL);
    _PyInterpreterFrame *handle = push_frame(ts, handle_code, main_f, HANDLE_CALL);
    /* The entry frame of the nested _PyEval_EvalFrameDefault (which CPython
     * keeps on the C stack; here it stays in the data stack, between its
     * neighbours), set up as that function does. */
    _PyInterpreterFrame *entry = (_PyInterpreterFrame *)ts->datastack_top;
    ts->datastack_top += sizeof(_PyInterpreterFrame) / sizeof(PyObject *);
    entry->f_code = trampoline_code;
    entry->prev_instr = (_Py_CODEUNIT *)trampoline_code->co_code_adaptive;
    entry->stacktop = 0;
    entry->owner = FRAME_OWNED_BY_CSTACK;
    entry->return_offset = 0;
    entry->previous = handle;
    _PyInterpreterFrame *hot = push_frame(ts, hot_code, entry, HOT_INSTR);
    main_thread = (struct py_thread){.ts = ts, .leaf = hot, .outer = handle};

    /* Worker thread: <module> -> функция -> gen_body, whose frame lives in
     * its generator object, in a block of its own far from the data stack
     * (1 MiB: glibc's malloc maps it apart from the heap). */
    ts = new_thread_state(interp->threads.next_unique_id++);
    interp->threads.count = 1;
    module = push_frame(ts, module_code, NULL, MODULE_THREAD_START);
    _PyInterpreterFrame *funktsiya = push_frame(ts, funktsiya_code, module, FUNKTSIYA_FOR_ITER);
    size_t block_size = 1 << 20;
    char *block = xcalloc(block_size);
    PyGenObject *gen = (PyGenObject *)(block + block_size / 2);
    gen->ob_base.ob_refcnt = 1;
    gen->ob_base.ob_type = &PyGen_Type;
    gen->gi_name = gen_code->co_name;
    gen->gi_qualname = gen_code->co_qualname;
    gen->gi_frame_state = FRAME_EXECUTING;
    _PyInterpreterFrame *gen_frame = (_PyInterpreterFrame *)gen->gi_iframe;
    init_frame(gen_frame, gen_code, funktsiya, GEN_INSTR, FRAME_OWNED_BY_GENERATOR);
    worker_thread = (struct py_thread){.ts = ts, .leaf = gen_frame, .outer = NULL};
}

static void runtime_put(size_t offset, const void *value, size_t len) {
    memcpy(_PyRuntime + offset, value, len);
}

static void burn(void) {
    volatile unsigned long n = 0;
    for (;;)
        n++;
}

/* Bind the thread to its state and burn CPU with the frames in place. The
 * _PyCFrames live on this C stack, as in _PyEval_EvalFrameDefault. */
static void run_thread(struct py_thread *t, void (*then)(void)) {
    PyThreadState *ts = t->ts;
    _PyCFrame outer = {.current_frame = t->outer, .previous = &ts->root_cframe};
    _PyCFrame inner = {.current_frame = t->leaf,
                       .previous = t->outer != NULL ? &outer : &ts->root_cframe};
    ts->thread_id = (unsigned long)pthread_self();
    ts->native_thread_id = (unsigned long)syscall(SYS_gettid);
    ts->cframe = &inner;
    if (bind_key && pthread_setspecific(key, ts) != 0) {
        perror("pthread_setspecific");
        exit(1);
    }
    then();
    burn();
}

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int worker_ready;

static void worker_started(void) {
    pthread_mutex_lock(&lock);
    worker_ready = 1;
    pthread_cond_signal(&cond);
    pthread_mutex_unlock(&lock);
}

static void *worker_main(void *arg) {
    (void)arg;
    run_thread(&worker_thread, worker_started);
    return NULL;
}

/* Everything is in place: publish the key, as PyGILState's init does. */
static void announce(void) {
    Py_tss_t tss = {._is_initialized = 1, ._key = key};
    runtime_put(RUNTIME_AUTOTSSKEY, &tss, sizeof tss);
    printf("ready %lu %lu\n", (unsigned long)(uintptr_t)main_thread.ts,
           (unsigned long)(uintptr_t)worker_thread.ts);
    fflush(stdout);
}

#define OFF(name, type, field) printf("%s.%s %zu\n", name, #field, offsetof(type, field))
#define SIZE(name, type) printf("%s.sizeof %zu\n", name, sizeof(type))

/* The byte of PyASCIIObject.state with every bit of one field set. */
#define STATE_MASK(field)                                                         \
    do {                                                                          \
        PyASCIIObject o;                                                          \
        memset(&o, 0, sizeof o);                                                  \
        o.state.field = 0;                                                        \
        o.state.field--; /* unsigned: wraps to all ones */                       \
        printf("PyASCIIObject.state.%s_mask %u\n", #field,                       \
               (unsigned)((unsigned char *)&o)[offsetof(PyASCIIObject, state)]);  \
    } while (0)

static void print_offsets(void) {
    OFF("PyObject", PyObject, ob_refcnt);
    OFF("PyObject", PyObject, ob_type);
    OFF("PyVarObject", PyVarObject, ob_size);
    OFF("PyTypeObject", PyTypeObject, tp_name);
    OFF("PyTypeObject", PyTypeObject, tp_basicsize);
    OFF("PyTypeObject", PyTypeObject, tp_itemsize);
    OFF("PyCodeObject", PyCodeObject, co_consts);
    OFF("PyCodeObject", PyCodeObject, co_names);
    OFF("PyCodeObject", PyCodeObject, co_exceptiontable);
    OFF("PyCodeObject", PyCodeObject, co_flags);
    OFF("PyCodeObject", PyCodeObject, co_argcount);
    OFF("PyCodeObject", PyCodeObject, co_stacksize);
    OFF("PyCodeObject", PyCodeObject, co_firstlineno);
    OFF("PyCodeObject", PyCodeObject, co_nlocalsplus);
    OFF("PyCodeObject", PyCodeObject, co_framesize);
    OFF("PyCodeObject", PyCodeObject, co_version);
    OFF("PyCodeObject", PyCodeObject, co_localsplusnames);
    OFF("PyCodeObject", PyCodeObject, co_filename);
    OFF("PyCodeObject", PyCodeObject, co_name);
    OFF("PyCodeObject", PyCodeObject, co_qualname);
    OFF("PyCodeObject", PyCodeObject, co_linetable);
    OFF("PyCodeObject", PyCodeObject, co_weakreflist);
    OFF("PyCodeObject", PyCodeObject, _co_cached);
    OFF("PyCodeObject", PyCodeObject, _co_instrumentation_version);
    OFF("PyCodeObject", PyCodeObject, _co_monitoring);
    OFF("PyCodeObject", PyCodeObject, _co_firsttraceable);
    OFF("PyCodeObject", PyCodeObject, co_extra);
    OFF("PyCodeObject", PyCodeObject, co_code_adaptive);
    OFF("PyASCIIObject", PyASCIIObject, length);
    OFF("PyASCIIObject", PyASCIIObject, hash);
    OFF("PyASCIIObject", PyASCIIObject, state);
    SIZE("PyASCIIObject", PyASCIIObject);
    STATE_MASK(interned);
    STATE_MASK(kind);
    STATE_MASK(compact);
    STATE_MASK(ascii);
    STATE_MASK(statically_allocated);
    OFF("PyCompactUnicodeObject", PyCompactUnicodeObject, utf8_length);
    OFF("PyCompactUnicodeObject", PyCompactUnicodeObject, utf8);
    SIZE("PyCompactUnicodeObject", PyCompactUnicodeObject);
    OFF("PyBytesObject", PyBytesObject, ob_base.ob_size);
    OFF("PyBytesObject", PyBytesObject, ob_shash);
    OFF("PyBytesObject", PyBytesObject, ob_sval);
    OFF("_PyCFrame", _PyCFrame, current_frame);
    OFF("_PyCFrame", _PyCFrame, previous);
    OFF("PyThreadState", PyThreadState, prev);
    OFF("PyThreadState", PyThreadState, next);
    OFF("PyThreadState", PyThreadState, interp);
    OFF("PyThreadState", PyThreadState, cframe);
    OFF("PyThreadState", PyThreadState, thread_id);
    OFF("PyThreadState", PyThreadState, native_thread_id);
    OFF("PyThreadState", PyThreadState, id);
    OFF("PyThreadState", PyThreadState, datastack_chunk);
    OFF("PyThreadState", PyThreadState, root_cframe);
    SIZE("PyThreadState", PyThreadState);
    OFF("PyInterpreterState", PyInterpreterState, next);
    OFF("PyInterpreterState", PyInterpreterState, threads.head);
    OFF("_PyInterpreterFrame", _PyInterpreterFrame, f_code);
    OFF("_PyInterpreterFrame", _PyInterpreterFrame, previous);
    OFF("_PyInterpreterFrame", _PyInterpreterFrame, f_funcobj);
    OFF("_PyInterpreterFrame", _PyInterpreterFrame, frame_obj);
    OFF("_PyInterpreterFrame", _PyInterpreterFrame, prev_instr);
    OFF("_PyInterpreterFrame", _PyInterpreterFrame, stacktop);
    OFF("_PyInterpreterFrame", _PyInterpreterFrame, return_offset);
    OFF("_PyInterpreterFrame", _PyInterpreterFrame, owner);
    OFF("_PyInterpreterFrame", _PyInterpreterFrame, localsplus);
    SIZE("_PyInterpreterFrame", _PyInterpreterFrame);
    OFF("PyGenObject", PyGenObject, gi_frame_state);
    OFF("PyGenObject", PyGenObject, gi_iframe);
    OFF("Py_tss_t", Py_tss_t, _is_initialized);
    OFF("Py_tss_t", Py_tss_t, _key);
    printf("_PyRuntimeState.interpreters.head %d\n", RUNTIME_INTERPRETERS_HEAD);
    printf("_PyRuntimeState.autoTSSkey %d\n", RUNTIME_AUTOTSSKEY);
    printf("FRAME_OWNED_BY_THREAD %d\n", FRAME_OWNED_BY_THREAD);
    printf("FRAME_OWNED_BY_GENERATOR %d\n", FRAME_OWNED_BY_GENERATOR);
    printf("FRAME_OWNED_BY_FRAME_OBJECT %d\n", FRAME_OWNED_BY_FRAME_OBJECT);
    printf("FRAME_OWNED_BY_CSTACK %d\n", FRAME_OWNED_BY_CSTACK);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "bound";
    if (strcmp(mode, "offsets") == 0) {
        print_offsets();
        return 0;
    }
    if (strcmp(mode, "unbound") == 0) {
        bind_key = 0;
    } else if (strcmp(mode, "bound") != 0) {
        fprintf(stderr, "usage: %s [bound|unbound|offsets]\n", argv[0]);
        return 2;
    }
    if (pthread_key_create(&key, NULL) != 0) {
        perror("pthread_key_create");
        return 1;
    }
    build_code();
    build_threads();
    uint64_t head = (uint64_t)(uintptr_t)interp;
    runtime_put(RUNTIME_INTERPRETERS_HEAD, &head, sizeof head);

    pthread_t worker;
    if (pthread_create(&worker, NULL, worker_main, NULL) != 0) {
        perror("pthread_create");
        return 1;
    }
    pthread_mutex_lock(&lock);
    while (!worker_ready)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    run_thread(&main_thread, announce);
    return 0;
}
