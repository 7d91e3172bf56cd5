/*
 * A process that looks like a CPython 3.11 to pyebpf's process inspector
 * (3.11's offsets, any version number), for the tests of its error paths and
 * of TLS detection on keys CPython never gets.
 *
 * Build: cc -O0 -pthread -rdynamic -o fake_python fake_python.c
 *   (-rdynamic exports _PyRuntime, Py_Version and PyCode_Type in .dynsym, as
 *   a static CPython build does.)
 *
 * Usage: fake_python [VERSION_HEX [MODE [EXTRA_KEYS]]]
 *   VERSION_HEX  value of Py_Version (default 0x031000f0, i.e. 3.16.0)
 *   MODE         uninit   autoTSSkey not initialised (default)
 *                threads  initialised; two thread states (main + one thread),
 *                         each bound to its thread through the pthread key
 *                unbound  like threads, but the key's slots are left empty
 *                freethreaded  _PyRuntime starts with a _Py_DebugOffsets
 *                         header (cookie, version) saying free-threaded
 *                published  the same header, not free-threaded, and no
 *                         offsets (all zero)
 *   EXTRA_KEYS   pthread keys created before CPython's (default 0): 32 or
 *                more puts the key in glibc's second-level blocks
 *
 * Prints "ready KEY RUNTIME_ADDR" and sleeps until killed.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Offsets the inspector reads (CPython 3.11). */
#define RUNTIME_INTERPRETERS_HEAD 40
#define RUNTIME_TSS_INITIALIZED 592
#define RUNTIME_TSS_KEY 596
#define INTERP_THREADS_HEAD 16
#define TSTATE_NEXT 8
#define TSTATE_THREAD_ID 152
#define TYPE_BASICSIZE 32

/* -DRUNTIME_SECTION puts it in the `.PyRuntime` section, as 3.13+ do (built
 * without -rdynamic and stripped, the section is all that names it). */
#ifdef RUNTIME_SECTION
unsigned char _PyRuntime[4096] __attribute__((section(".PyRuntime"), aligned(64))) = {1};
#else
unsigned char _PyRuntime[4096] __attribute__((aligned(64)));
#endif
unsigned long Py_Version = 0x031000f0UL;
unsigned char PyCode_Type[416] __attribute__((aligned(64)));

static unsigned char interp[256] __attribute__((aligned(64)));
static unsigned char tstate[2][256] __attribute__((aligned(64)));
static pthread_key_t key;
static int bind_key;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int worker_ready;

static void put_u64(unsigned char *base, size_t off, uint64_t v) { memcpy(base + off, &v, 8); }
static void put_u32(unsigned char *base, size_t off, uint32_t v) { memcpy(base + off, &v, 4); }

static void bind_self(int i) {
    put_u64(tstate[i], TSTATE_THREAD_ID, (uint64_t)pthread_self());
    if (bind_key)
        pthread_setspecific(key, tstate[i]);
}

static void *worker(void *arg) {
    (void)arg;
    bind_self(1);
    pthread_mutex_lock(&lock);
    worker_ready = 1;
    pthread_cond_signal(&cond);
    pthread_mutex_unlock(&lock);
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = argc > 2 ? argv[2] : "uninit";
    int extra = argc > 3 ? atoi(argv[3]) : 0;
    if (argc > 1)
        Py_Version = strtoul(argv[1], NULL, 0);

    for (int i = 0; i < extra; i++) {
        pthread_key_t dummy;
        if (pthread_key_create(&dummy, NULL) != 0) {
            perror("pthread_key_create");
            return 1;
        }
    }
    if (pthread_key_create(&key, NULL) != 0) {
        perror("pthread_key_create");
        return 1;
    }
    put_u64(PyCode_Type, TYPE_BASICSIZE, 184);

    if (strcmp(mode, "freethreaded") == 0 || strcmp(mode, "published") == 0) {
        memset(_PyRuntime, 0, sizeof _PyRuntime);
        memcpy(_PyRuntime, "xdebugpy", 8);
        put_u64(_PyRuntime, 8, Py_Version);
        put_u64(_PyRuntime, 16, strcmp(mode, "freethreaded") == 0);
    } else if (strcmp(mode, "uninit") != 0) {
        bind_key = strcmp(mode, "threads") == 0;
        put_u64(_PyRuntime, RUNTIME_INTERPRETERS_HEAD, (uint64_t)(uintptr_t)interp);
        put_u64(interp, INTERP_THREADS_HEAD, (uint64_t)(uintptr_t)tstate[0]);
        put_u64(tstate[0], TSTATE_NEXT, (uint64_t)(uintptr_t)tstate[1]);
        bind_self(0);
        pthread_t t;
        if (pthread_create(&t, NULL, worker, NULL) != 0) {
            perror("pthread_create");
            return 1;
        }
        pthread_mutex_lock(&lock);
        while (!worker_ready)
            pthread_cond_wait(&cond, &lock);
        pthread_mutex_unlock(&lock);
        put_u32(_PyRuntime, RUNTIME_TSS_KEY, (uint32_t)key);
        put_u32(_PyRuntime, RUNTIME_TSS_INITIALIZED, 1);
    }

    printf("ready %u %lu\n", (unsigned)key, (unsigned long)(uintptr_t)_PyRuntime);
    fflush(stdout);
    for (;;)
        pause();
}
