#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <time.h>

#include "quill.h"

/* The instruction set this build was compiled for (quill.kernels.cpu's variant names). */
const char* quill_isa(void) {
#if defined(QUILL_AVX512_BF16)
    return "avx512bf16";
#elif defined(QUILL_AVX512)
    return "avx512";
#else
    return "avx2";
#endif
}

enum { F32 = QK_F32, BF16 = QK_BF16, F16 = QK_F16, I8 = QK_I8 };
static inline int64_t dsize(int dt) { return dt == F32 ? 4 : dt == I8 ? 1 : 2; }  /* bytes an element */

/* ---- a barrier-free thread pool with owned ranges -------------------------------------------------------
   A job is `ntasks` independent tasks, split into one contiguous range per thread (the caller is thread 0).
   Each thread takes its own range's tasks from the front, so it streams one contiguous stretch of a weight
   matrix that the hardware prefetcher can follow (handing out tasks round-robin interleaves the threads'
   streams, which reads slower: docs/performance.md), then steals from the back
   of the other ranges. Unlike an OpenMP parallel region there is no barrier that waits for every thread
   to *arrive*: on a shared machine the caller takes a descheduled helper's range instead of sleeping until
   its next time slice (under load an OpenMP region can cost a scheduler tick: docs/performance.md).
   Each range is one atomic word, generation | front | back, so a helper that wakes late cannot claim a
   task of a newer job with an older job's function. Helpers spin briefly, then sleep on a futex. One job
   at a time: a second caller (another Python thread) runs its job on its own thread. */
typedef void (*task_fn)(void* ctx, int64_t task);
#define MAX_POOL 64
#define R_BITS 20
#define R_MASK ((1ull << R_BITS) - 1)
#define GEN_MASK ((1ull << (64 - 2 * R_BITS)) - 1)
#define MAX_TASKS ((int64_t)R_MASK)
typedef struct { _Atomic uint64_t w; char pad[56]; } pool_range_t;  /* one cache line per range */
static pool_range_t pool_range[MAX_POOL];
static _Atomic uint64_t pool_job;  /* generation << 8 | threads: published after the ranges */
static _Atomic int64_t pool_done;
static _Atomic(task_fn) pool_fn;
static _Atomic(void*) pool_ctx;
static _Atomic uint32_t pool_wake;
static _Atomic int pool_sleepers;
static int pool_helpers;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

/* One task of range i of job `gen`: its front for the owner, its back for a thief; -1 when none is left. */
static int64_t pool_claim(int i, uint64_t gen, int own) {
    uint64_t r = atomic_load_explicit(&pool_range[i].w, memory_order_acquire);
    for (;;) {
        const uint64_t lo = (r >> R_BITS) & R_MASK, hi = r & R_MASK;
        if ((r >> (2 * R_BITS)) != gen || lo >= hi) return -1;
        if (atomic_compare_exchange_weak_explicit(&pool_range[i].w, &r, own ? r + (1ull << R_BITS) : r - 1,
                                                  memory_order_acq_rel, memory_order_acquire))
            return (int64_t)(own ? lo : hi - 1);
    }
}

/* Thread `me` works on the current job: its own range, then the others'. A claim succeeds only while the
   job that published `fn`/`ctx` still has unclaimed tasks (a job cannot end before that, and the next one
   publishes its function only after this one ended), so a stale helper never runs a wrong task. */
static void pool_work(int me) {
    const uint64_t job = atomic_load_explicit(&pool_job, memory_order_acquire);
    const uint64_t gen = job >> 8;
    const int P = (int)(job & 0xff);
    if (me >= P) return;
    task_fn fn = atomic_load_explicit(&pool_fn, memory_order_relaxed);
    void* ctx = atomic_load_explicit(&pool_ctx, memory_order_relaxed);
    int64_t done = 0;
    for (int v = 0; v < P; v++)
        for (int64_t t; (t = pool_claim((me + v) % P, gen, v == 0)) >= 0; done++) fn(ctx, t);
    if (done) atomic_fetch_add_explicit(&pool_done, done, memory_order_release);
}

static int pool_spin = -1;

static void* pool_helper(void* arg) {
    const int me = (int)(intptr_t)arg;
    uint64_t seen = UINT64_MAX;  /* look at whatever job is current on the first pass */
    for (;;) {
        uint64_t job;
        for (int spins = 0; ((job = atomic_load_explicit(&pool_job, memory_order_acquire)) >> 8) == seen;) {
            if (++spins < pool_spin) { _mm_pause(); continue; }
            const uint32_t w = atomic_load(&pool_wake);
            atomic_fetch_add(&pool_sleepers, 1);
            if ((atomic_load(&pool_job) >> 8) == seen)
                syscall(SYS_futex, &pool_wake, FUTEX_WAIT_PRIVATE, w, NULL, NULL, 0);
            atomic_fetch_sub(&pool_sleepers, 1);
            spins = 0;
        }
        seen = job >> 8;
        pool_work(me);
    }
    return NULL;
}

/* Run fn(ctx, 0..ntasks-1) on up to `nthreads` threads (the caller included); returns when all are done. */
static void pool_run(task_fn fn, void* ctx, int64_t ntasks, int nthreads) {
    if (nthreads <= 1 || ntasks <= 1 || ntasks > MAX_TASKS || pthread_mutex_trylock(&pool_lock) != 0) {
        for (int64_t t = 0; t < ntasks; t++) fn(ctx, t);
        return;
    }
    if (pool_spin < 0) {
        const char* e = getenv("QUILL_SPIN");
        pool_spin = e ? atoi(e) : 2000;
    }
    while (pool_helpers < nthreads - 1 && pool_helpers < MAX_POOL - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, pool_helper, (void*)(intptr_t)(pool_helpers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool_helpers++;
    }
    const int P = nthreads < pool_helpers + 1 ? nthreads : pool_helpers + 1;
    atomic_store_explicit(&pool_fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool_ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&pool_done, 0, memory_order_relaxed);
    const uint64_t gen = ((atomic_load(&pool_job) >> 8) + 1) & GEN_MASK;
    for (int i = 0; i < P; i++)
        atomic_store_explicit(&pool_range[i].w, gen << (2 * R_BITS) | (uint64_t)(ntasks * i / P) << R_BITS |
                                                    (uint64_t)(ntasks * (i + 1) / P), memory_order_release);
    atomic_store_explicit(&pool_job, gen << 8 | (uint64_t)P, memory_order_release);
    atomic_fetch_add(&pool_wake, 1);
    if (atomic_load(&pool_sleepers) > 0)
        syscall(SYS_futex, &pool_wake, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    pool_work(0);
    for (int spins = 0; atomic_load_explicit(&pool_done, memory_order_acquire) < ntasks; spins++) {
        if (spins < 4000) _mm_pause();
        else sched_yield();  /* a helper was descheduled mid-task: let it finish */
    }
    pthread_mutex_unlock(&pool_lock);
}

static inline float bf16_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float ld(const void* p, int dt, int64_t i) {
    switch (dt) {
        case F32: return ((const float*)p)[i];
        case BF16: return bf16_f32(((const uint16_t*)p)[i]);
        case F16: return _cvtsh_ss(((const uint16_t*)p)[i]);
        default: return (float)((const int8_t*)p)[i];
    }
}
static inline void st(void* p, int dt, int64_t i, float v) {
    switch (dt) {
        case F32: ((float*)p)[i] = v; break;
        case BF16: ((uint16_t*)p)[i] = f32_bf16(v); break;
        default: ((uint16_t*)p)[i] = _cvtss_sh(v, 0); break;
    }
}
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Software prefetch of the weight rows PFW (float) / PF (int8) rows ahead into L2/L3 (hint T2): a 4-row
   group of a 768-wide int8 matrix is only 3 KB, too short for the hardware prefetcher to ramp up
   (the gain per weight format is in docs/performance.md). */
#define PFW 16
#define PF 16
#define PFH _MM_HINT_T2
#define VLOAD_F32(p) _mm256_loadu_ps(p)
#define VLOAD_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p))), 16))
#define VLOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p)))
#define VLOAD_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p))))
#define SLOAD_F32(p) (p)[0]
#define SLOAD_BF16(p) bf16_f32((p)[0])
#define SLOAD_F16(p) _cvtsh_ss((p)[0])
#define SLOAD_I8(p) ((float)(p)[0])
static inline __m256 vld(const void* p, int dt, int64_t i) {  /* 8 float-type elements from index i, as fp32 */
    return dt == F32 ? VLOAD_F32((const float*)p + i) : dt == BF16 ? VLOAD_BF16((const uint16_t*)p + i)
                                                         : VLOAD_F16((const uint16_t*)p + i);
}
static inline void widen(float* dst, const void* src, int dt, int64_t i0, int64_t n) {  /* dst[i] = src[i0 + i] as fp32 */
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, vld(src, dt, i0 + i));
    for (; i < n; i++) dst[i] = ld(src, dt, i0 + i);
}
static inline void vst(void* p, int dt, int64_t i, __m256 v) {  /* 8 floats to index i, rounded as st() does */
    if (dt == F32) { _mm256_storeu_ps((float*)p + i, v); return; }
    __m128i h;
    if (dt == F16) h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    else {  /* bf16: round to nearest even; NaN stays a (quiet) NaN */
        const __m256i u = _mm256_castps_si256(v);
        __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                         _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
        r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)),
                               _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        r = _mm256_srli_epi32(r, 16);
        h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    }
    _mm_storeu_si128((__m128i*)((uint16_t*)p + i), h);
}
static inline void narrow(void* dst, int dt, int64_t i0, const float* src, int64_t n) {  /* dst[i0 + i] = src[i], rounded */
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vst(dst, dt, i0 + i, _mm256_loadu_ps(src + i));
    for (; i < n; i++) st(dst, dt, i0 + i, src[i]);
}

/* rows4_bf16 widens 16 weights a step from one 32-byte load: as 8 fp32 lanes, the load's even columns are the
   lanes shifted left by 16, its odd columns the lanes shifted right, then left, by 16 (three instructions for
   16 weights where a load-and-widen of 8 takes two; beside the FMAs of batched bf16 decode that work slows
   it, and it needs no constant register). Its activation rows come split to match (split_pairs): in every
   16-column step the 8 even columns, then the 8 odd ones; columns past the last whole step stay in place. */
static void split_pairs(const float* x, int64_t K, float* xp) {
    const int64_t K16 = K & ~(int64_t)15;
    for (int64_t k = 0; k < K16; k += 16)
        for (int64_t i = 0; i < 8; i++) { xp[k + i] = x[k + 2 * i]; xp[k + 8 + i] = x[k + 2 * i + 1]; }
    for (int64_t k = K16; k < K; k++) xp[k] = x[k];
}
static inline __m256 bf16_half(const uint16_t* p, int odd) {  /* the even (odd = 0) or odd columns of 16 at p */
    __m256i q = _mm256_loadu_si256((const __m256i*)p);
    if (odd) q = _mm256_srli_epi32(q, 16);
    return _mm256_castsi256_ps(_mm256_slli_epi32(q, 16));
}
#define HALF_F32(p, h) VLOAD_F32(p)
#define HALF_F16(p, h) VLOAD_F16(p)
#define HALF_I8(p, h) VLOAD_I8(p)
#define HALF_BF16(p, h) bf16_half(p, h)

/* Activation rows x[M4, K] (M4 a multiple of 4) against weight rows W[n0:n1, K], three weight rows at a time
   against four activation rows: a register block of 12 fp32 accumulators, so each converted weight vector
   feeds four FMAs (batched decode is compute-bound). A step covers 8 * HALVES columns, HALF(w, h) giving
   the weights that meet activation columns [8 h, 8 h + 8) of the step (HALVES = 2: rows4_bf16's split rows;
   its 12 accumulators, 3 weight vectors and an activation fill the 16 registers, so the odd half loads its
   weights again from L1). Every group of four activation rows runs on one block of three weight rows before
   the next block is read, each group prefetching ahead, so the weights stream from memory at an even pace
   while the FMAs run from L1 (one pass per group over the task's rows left memory idle during the later
   passes). From 16 rows on, group g prefetches only every G-th 16-element chunk (the g-th of G groups): each
   line is asked for once and the prefetches still spread over all the passes (every group asking for every
   line spent issue slots on lines in cache; the first group alone, in bursts, fell behind the stream). */
#define DEFINE_ROWS4(SUF, WT, HALF, SLOAD, HALVES)                                                          \
static void rows4_##SUF(const float* x, int64_t M4, int64_t K, const WT* W, int64_t n0, int64_t n1,         \
                        float* acc, int64_t ldacc) {                                                       \
    const int64_t KS = K & ~(int64_t)(8 * HALVES - 1), groups = M4 < 16 ? 1 : M4 / 4;                      \
    int64_t n = n0;                                                                                          \
    for (; n + 3 <= n1; n += 3)                                                                              \
    for (int64_t m = 0; m < M4; m += 4) {                                                                    \
        const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;                               \
        const WT *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K;                                                \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0;                        \
        __m256 c0 = a0, c1 = a0, c2 = a0, d0 = a0, d1 = a0, d2 = a0;                                         \
        int64_t turn = M4 < 16 ? 0 : m / 4;  /* chunks before this group's next prefetch */                  \
        for (int64_t k = 0; k < KS; k += 8 * HALVES) {                                                       \
            if (PFW && (k & 15) == 0 && turn-- == 0) {                                                       \
                turn = groups - 1;                                                                           \
                _mm_prefetch((const char*)(w0 + PFW * K + k), PFH);                                          \
                _mm_prefetch((const char*)(w1 + PFW * K + k), PFH);                                          \
                _mm_prefetch((const char*)(w2 + PFW * K + k), PFH);                                          \
            }                                                                                                \
            for (int h = 0; h < HALVES; h++) {                                                               \
                const __m256 u0 = HALF(w0 + k, h), u1 = HALF(w1 + k, h), u2 = HALF(w2 + k, h);               \
                const int64_t o = k + 8 * h;                                                                 \
                __m256 v = _mm256_loadu_ps(x0 + o);                                                          \
                a0 = _mm256_fmadd_ps(v, u0, a0); a1 = _mm256_fmadd_ps(v, u1, a1); a2 = _mm256_fmadd_ps(v, u2, a2); \
                v = _mm256_loadu_ps(x1 + o);                                                                 \
                b0 = _mm256_fmadd_ps(v, u0, b0); b1 = _mm256_fmadd_ps(v, u1, b1); b2 = _mm256_fmadd_ps(v, u2, b2); \
                v = _mm256_loadu_ps(x2 + o);                                                                 \
                c0 = _mm256_fmadd_ps(v, u0, c0); c1 = _mm256_fmadd_ps(v, u1, c1); c2 = _mm256_fmadd_ps(v, u2, c2); \
                v = _mm256_loadu_ps(x3 + o);                                                                 \
                d0 = _mm256_fmadd_ps(v, u0, d0); d1 = _mm256_fmadd_ps(v, u1, d1); d2 = _mm256_fmadd_ps(v, u2, d2); \
            }                                                                                                \
        }                                                                                                    \
        float s[12] = {hsum(a0), hsum(a1), hsum(a2), hsum(b0), hsum(b1), hsum(b2),                           \
                       hsum(c0), hsum(c1), hsum(c2), hsum(d0), hsum(d1), hsum(d2)};                          \
        for (int64_t k = KS; k < K; k++) {                                                                   \
            const float u0 = SLOAD(w0 + k), u1 = SLOAD(w1 + k), u2 = SLOAD(w2 + k);                          \
            const float xs[4] = {x0[k], x1[k], x2[k], x3[k]};                                                \
            for (int r = 0; r < 4; r++) { s[3 * r] += xs[r] * u0; s[3 * r + 1] += xs[r] * u1; s[3 * r + 2] += xs[r] * u2; } \
        }                                                                                                    \
        for (int r = 0; r < 4; r++)                                                                          \
            for (int j = 0; j < 3; j++) acc[(m + r) * ldacc + n - n0 + j] = s[3 * r + j];                    \
    }                                                                                                        \
    for (; n < n1; n++)                                                                                      \
    for (int64_t m = 0; m < M4; m += 4) {                                                                    \
        const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;                               \
        const WT* w0 = W + n * K;                                                                            \
        __m256 a0 = _mm256_setzero_ps(), b0 = a0, c0 = a0, d0 = a0;                                         \
        for (int64_t k = 0; k < KS; k += 8 * HALVES)                                                         \
            for (int h = 0; h < HALVES; h++) {                                                               \
                const __m256 u0 = HALF(w0 + k, h);                                                           \
                const int64_t o = k + 8 * h;                                                                 \
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + o), u0, a0); b0 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + o), u0, b0); \
                c0 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + o), u0, c0); d0 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + o), u0, d0); \
            }                                                                                                \
        float s[4] = {hsum(a0), hsum(b0), hsum(c0), hsum(d0)};                                               \
        for (int64_t k = KS; k < K; k++) {                                                                   \
            const float u0 = SLOAD(w0 + k);                                                                  \
            s[0] += x0[k] * u0; s[1] += x1[k] * u0; s[2] += x2[k] * u0; s[3] += x3[k] * u0;                  \
        }                                                                                                    \
        for (int r = 0; r < 4; r++) acc[(m + r) * ldacc + n - n0] = s[r];                                    \
    }                                                                                                        \
}

/* Dot products of activation rows x[M, K] (fp32, row stride K) with weight rows W[n0:n1, K], results into
   acc[m * ldacc + (n - n0)]. Weight rows are read once per four activation rows (rows4, on x4: the first
   M & ~3 rows of x as rows4 reads them), then per pair. */
#define DEFINE_ROWS(SUF, WT, VLOAD, SLOAD)                                                                  \
static void rows_##SUF(const float* x, const float* x4, int64_t M, int64_t K, const WT* W, int64_t n0,       \
                       int64_t n1, float* acc, int64_t ldacc) {                                            \
    const int64_t K8 = K & ~(int64_t)7;                                                                        \
    int64_t m = M & ~(int64_t)3;                                                                             \
    if (m) rows4_##SUF(x4, m, K, W, n0, n1, acc, ldacc);                                                     \
    for (; m < M; m += 2) {                                                                                  \
        const float* x0 = x + m * K;                                                                         \
        float* r0 = acc + m * ldacc;                                                                         \
        int64_t n = n0;                                                                                      \
        if (M - m >= 2) {                                                                                    \
            const float* x1 = x0 + K;                                                                        \
            float* r1 = r0 + ldacc;                                                                          \
            for (; n + 4 <= n1; n += 4) {                                                                    \
                const WT *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                          \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0; \
                for (int64_t k = 0; k < K8; k += 8) {                                                        \
                    if (PFW && (k & 15) == 0) {                                                              \
                        _mm_prefetch((const char*)(w0 + PFW * K + k), PFH);                                  \
                        _mm_prefetch((const char*)(w1 + PFW * K + k), PFH);                                  \
                        _mm_prefetch((const char*)(w2 + PFW * K + k), PFH);                                  \
                        _mm_prefetch((const char*)(w3 + PFW * K + k), PFH);                                  \
                    }                                                                                        \
                    __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k);                         \
                    __m256 c0 = VLOAD(w0 + k), c1 = VLOAD(w1 + k), c2 = VLOAD(w2 + k), c3 = VLOAD(w3 + k);    \
                    a0 = _mm256_fmadd_ps(u, c0, a0); a1 = _mm256_fmadd_ps(u, c1, a1);                        \
                    a2 = _mm256_fmadd_ps(u, c2, a2); a3 = _mm256_fmadd_ps(u, c3, a3);                        \
                    b0 = _mm256_fmadd_ps(v, c0, b0); b1 = _mm256_fmadd_ps(v, c1, b1);                        \
                    b2 = _mm256_fmadd_ps(v, c2, b2); b3 = _mm256_fmadd_ps(v, c3, b3);                        \
                }                                                                                            \
                float s[8] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3), hsum(b0), hsum(b1), hsum(b2), hsum(b3)}; \
                for (int64_t k = K8; k < K; k++) {                                                           \
                    float c0 = SLOAD(w0 + k), c1 = SLOAD(w1 + k), c2 = SLOAD(w2 + k), c3 = SLOAD(w3 + k);     \
                    s[0] += x0[k] * c0; s[1] += x0[k] * c1; s[2] += x0[k] * c2; s[3] += x0[k] * c3;          \
                    s[4] += x1[k] * c0; s[5] += x1[k] * c1; s[6] += x1[k] * c2; s[7] += x1[k] * c3;          \
                }                                                                                            \
                for (int j = 0; j < 4; j++) { r0[n - n0 + j] = s[j]; r1[n - n0 + j] = s[4 + j]; }            \
            }                                                                                                \
            for (; n < n1; n++) {                                                                            \
                const WT* w0 = W + n * K;                                                                    \
                __m256 a0 = _mm256_setzero_ps(), b0 = a0;                                                    \
                for (int64_t k = 0; k < K8; k += 8) {                                                        \
                    __m256 c0 = VLOAD(w0 + k);                                                               \
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), c0, a0);                                   \
                    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), c0, b0);                                   \
                }                                                                                            \
                float s0 = hsum(a0), s1 = hsum(b0);                                                          \
                for (int64_t k = K8; k < K; k++) { float c = SLOAD(w0 + k); s0 += x0[k] * c; s1 += x1[k] * c; } \
                r0[n - n0] = s0; r1[n - n0] = s1;                                                            \
            }                                                                                                \
        } else {  /* one activation row: one weight row at a time, so each thread reads one sequential stream\
                     that the hardware prefetcher follows (with 2 MB pages this reads faster than four      \
                     interleaved rows with software prefetch: docs/performance.md) */                        \
            for (; n < n1; n++) {                                                                            \
                const WT* w0 = W + n * K;                                                                    \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                  \
                int64_t k = 0;                                                                               \
                for (; k + 32 <= K; k += 32) {                                                               \
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), VLOAD(w0 + k), a0);                        \
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 8), VLOAD(w0 + k + 8), a1);                \
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 16), VLOAD(w0 + k + 16), a2);              \
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 24), VLOAD(w0 + k + 24), a3);              \
                }                                                                                            \
                for (; k < K8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), VLOAD(w0 + k), a0);     \
                float s0 = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));                \
                for (; k < K; k++) s0 += x0[k] * SLOAD(w0 + k);                                              \
                r0[n - n0] = s0;                                                                             \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
}

DEFINE_ROWS4(f32, float, HALF_F32, SLOAD_F32, 1)
DEFINE_ROWS4(bf16, uint16_t, HALF_BF16, SLOAD_BF16, 2)
DEFINE_ROWS4(f16, uint16_t, HALF_F16, SLOAD_F16, 1)
DEFINE_ROWS4(i8, int8_t, HALF_I8, SLOAD_I8, 1)
DEFINE_ROWS(f32, float, VLOAD_F32, SLOAD_F32)
DEFINE_ROWS(bf16, uint16_t, VLOAD_BF16, SLOAD_BF16)
DEFINE_ROWS(f16, uint16_t, VLOAD_F16, SLOAD_F16)
DEFINE_ROWS(i8, int8_t, VLOAD_I8, SLOAD_I8)

/* int8 weights against int16-quantised activations: exact integer dot products, flushed to fp32 every 2048
   columns so that no int32 lane overflows (a lane sums at most 256 products: 256 * 32767 * 127 < 2^31). Each
   block's lanes are summed exactly (in int64) and rounded to fp32 once, and both variants cut the columns the
   same way (blocks of 2048 up to the last multiple of 32, then the rest in scalar code), so the AVX2 and the
   AVX-512 builds give the same bits. xq: [M, ldq] int16; results unscaled into acc. Not inlined: inlined into
   linear_task, GCC's code for it runs batched int8 markedly slower (docs/performance.md). */
#define I8Q_BLOCK 2048
#define I8Q_STEP 32
static void rows_i8q_tail(const int16_t* xq, int64_t M, int64_t K, int64_t ldq, const int8_t* W, int64_t n0,
                          int64_t n1, float* acc, int64_t ldacc) {
    const int64_t k0 = K & ~(int64_t)(I8Q_STEP - 1);
    if (k0 == K) return;  /* (GCC's code for the loops below visits every row and column even then) */
    for (int64_t m = 0; m < M; m++)  /* columns beyond the last multiple of I8Q_STEP */
        for (int64_t n = n0; n < n1; n++) {
            int32_t s = 0;
            for (int64_t k = k0; k < K; k++) s += (int32_t)xq[m * ldq + k] * W[n * K + k];
            acc[m * ldacc + n - n0] += (float)s;
        }
}

/* vpmaddwd: 16 int16 x int16 products summed in pairs into 8 int32 lanes per instruction */
static inline __m256i ld_i8x16(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
static inline __m256i widen_i64(__m256i v) {  /* 8 int32 lanes summed pairwise (lanes i and i + 4) into 4 int64 */
    return _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                            _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
}
static inline float hsum_i(__m256i v) {  /* the lanes' exact sum, rounded to fp32 once */
    int64_t l[4];
    _mm256_storeu_si256((__m256i*)l, widen_i64(v));
    return (float)(l[0] + l[1] + l[2] + l[3]);
}
/* hsum_i of four accumulators at once, added to r[0..3]: one transposed int64 reduction shares its shuffles
   among the four. Reduced one at a time, a multi-row register block's sums cost more than half as many
   instructions as its multiplies over a 768-column chunk. The same exact sums, the same bits. */
static inline void hsum4_i(__m256i a0, __m256i a1, __m256i a2, __m256i a3, float* r) {
    const __m256i s0 = widen_i64(a0), s1 = widen_i64(a1), s2 = widen_i64(a2), s3 = widen_i64(a3);
    const __m256i t01 = _mm256_add_epi64(_mm256_unpacklo_epi64(s0, s1), _mm256_unpackhi_epi64(s0, s1));
    const __m256i t23 = _mm256_add_epi64(_mm256_unpacklo_epi64(s2, s3), _mm256_unpackhi_epi64(s2, s3));
    int64_t l[4];
    _mm256_storeu_si256((__m256i*)l, _mm256_add_epi64(_mm256_permute2x128_si256(t01, t23, 0x20),
                                                      _mm256_permute2x128_si256(t01, t23, 0x31)));
    r[0] += (float)l[0]; r[1] += (float)l[1]; r[2] += (float)l[2]; r[3] += (float)l[3];
}
/* One activation row x0 against weight rows [n0, n1), columns [kb, ke), in 256-bit vectors in both variants:
   from memory, one row streams faster this way on Zen 4 than with 512-bit vpdpwssd (docs/performance.md).
   Groups of four weight rows, each group's rows side by side or (AVX2, rows under 2 KB) one after another:
   four interleaved streams of 768 bytes are too short for Zen 3's hardware prefetcher, one stream is not. */
#ifdef QUILL_AVX512
#define I8Q_ONE_SEQUENTIAL(K) 0
#else
#define I8Q_ONE_SEQUENTIAL(K) ((K) < 2048)
#endif
/* One weight row w0 against one activation row x0, columns [kb, ke): the lanes' int32 sums (exact) */
static inline __m256i dot_i8q(const int16_t* x0, const int8_t* w0, int64_t K, int64_t kb, int64_t ke) {
    __m256i p = _mm256_setzero_si256(), q = p;
    int64_t k = kb;
    for (; k + 32 <= ke; k += 32) {
        if (PF && (k & 63) == 0) _mm_prefetch((const char*)(w0 + PF * K + k), PFH);
        p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x0 + k)), ld_i8x16(w0 + k)));
        q = _mm256_add_epi32(q, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x0 + k + 16)), ld_i8x16(w0 + k + 16)));
    }
    for (; k < ke; k += 16)
        p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x0 + k)), ld_i8x16(w0 + k)));
    return _mm256_add_epi32(p, q);
}
static void rows_i8q_one(const int16_t* x0, float* r0, const int8_t* W, int64_t K, int64_t n0, int64_t n1,
                         int64_t kb, int64_t ke) {
    int64_t n = n0;
    if (I8Q_ONE_SEQUENTIAL(K))
        for (; n + 4 <= n1; n += 4) {  /* in the rows' order (as call arguments GCC would read them backwards) */
            const __m256i a0 = dot_i8q(x0, W + n * K, K, kb, ke), a1 = dot_i8q(x0, W + (n + 1) * K, K, kb, ke);
            const __m256i a2 = dot_i8q(x0, W + (n + 2) * K, K, kb, ke), a3 = dot_i8q(x0, W + (n + 3) * K, K, kb, ke);
            hsum4_i(a0, a1, a2, a3, r0 + n - n0);
        }
    for (; n + 4 <= n1; n += 4) {
        const int8_t *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        int64_t k = kb;
        for (; k + 32 <= ke; k += 32) {
            if (PF) { _mm_prefetch((const char*)(w0 + PF * K + k), PFH); _mm_prefetch((const char*)(w1 + PF * K + k), PFH);
                      _mm_prefetch((const char*)(w2 + PF * K + k), PFH); _mm_prefetch((const char*)(w3 + PF * K + k), PFH); }
            __m256i u = _mm256_loadu_si256((const __m256i*)(x0 + k)), v = _mm256_loadu_si256((const __m256i*)(x0 + k + 16));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(u, ld_i8x16(w0 + k))); a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(u, ld_i8x16(w1 + k)));
            a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(u, ld_i8x16(w2 + k))); a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(u, ld_i8x16(w3 + k)));
            b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(v, ld_i8x16(w0 + k + 16))); b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(v, ld_i8x16(w1 + k + 16)));
            b2 = _mm256_add_epi32(b2, _mm256_madd_epi16(v, ld_i8x16(w2 + k + 16))); b3 = _mm256_add_epi32(b3, _mm256_madd_epi16(v, ld_i8x16(w3 + k + 16)));
        }
        for (; k < ke; k += 16) {
            __m256i u = _mm256_loadu_si256((const __m256i*)(x0 + k));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(u, ld_i8x16(w0 + k))); a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(u, ld_i8x16(w1 + k)));
            a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(u, ld_i8x16(w2 + k))); a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(u, ld_i8x16(w3 + k)));
        }
        r0[n - n0] += hsum_i(_mm256_add_epi32(a0, b0)); r0[n - n0 + 1] += hsum_i(_mm256_add_epi32(a1, b1));
        r0[n - n0 + 2] += hsum_i(_mm256_add_epi32(a2, b2)); r0[n - n0 + 3] += hsum_i(_mm256_add_epi32(a3, b3));
    }
    for (; n < n1; n++) r0[n - n0] += hsum_i(dot_i8q(x0, W + n * K, K, kb, ke));
}

#ifdef QUILL_AVX512
#define I8_TASK_UNIT 4  /* weight rows a task holds for int8 against 4+ rows: whole 4-row blocks */
/* Register blocks of __m512i/__m512 accumulators: GCC 12 kept their arrays on the stack as well and copied each
   accumulator there and back every iteration (a third of the inner loop's instructions). Their loops over
   rows and columns carry unroll pragmas, and IN_REGISTER pins each accumulator after an iteration. */
#ifndef IN_REGISTER  /* (tests/avx512_emulated.h, whose vectors live in memory, defines it empty) */
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#endif
/* vpdpwssd: 32 int16 x int16 products summed into 16 int32 lanes per instruction (int8 weights widened to
   int16 in registers). Register blocks of MR activation rows (4 or 2; one row takes rows_i8q_one) against
   four weight rows: with four rows each widened weight vector feeds four vpdpwssd (batched decode is
   compute-bound; 16 accumulators of the 32 registers). */
static inline __m512i ld_i8x32(const int8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
/* a 512-bit accumulator's halves added in int32: a lane then holds at most 256 products, the bound above, and
   hsum_i / hsum4_i finish the exact sum */
static inline __m256i fold_i512(__m512i v) { return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)); }
/* rows m .. m+MR-1 (row stride ldq; results at stride ldacc) against weight rows [n0, n1), columns [kb, ke) */
static inline __attribute__((always_inline)) void i8q_block512(const int16_t* x, int64_t ldq, float* r,
                                                               int64_t ldacc, const int8_t* W, int64_t K, int64_t n0,
                                                               int64_t n1, int64_t kb, int64_t ke, const int MR) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const int8_t* w = W + n * K;
        __m512i a[4][4];
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++)
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) a[i][c] = _mm512_setzero_si512();
        for (int64_t k = kb; k < ke; k += 32) {
            if (PF && (k & 63) == 0)
                _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) _mm_prefetch((const char*)(w + (PF + c) * K + k), PFH);
            __m512i cw[4];
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) cw[c] = ld_i8x32(w + c * K + k);
            _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) {
                const __m512i u = _mm512_loadu_si512((const void*)(x + i * ldq + k));
                _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) a[i][c] = _mm512_dpwssd_epi32(a[i][c], u, cw[c]);
            }
            _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++)
                _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) IN_REGISTER(a[i][c]);
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) hsum4_i(fold_i512(a[i][0]), fold_i512(a[i][1]), fold_i512(a[i][2]), fold_i512(a[i][3]), r + i * ldacc + n - n0);
    }
    for (; n < n1; n++) {
        const int8_t* w0 = W + n * K;
        __m512i a[4];
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) a[i] = _mm512_setzero_si512();
        for (int64_t k = kb; k < ke; k += 32) {
            const __m512i c0 = ld_i8x32(w0 + k);
            _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) a[i] = _mm512_dpwssd_epi32(a[i], _mm512_loadu_si512((const void*)(x + i * ldq + k)), c0);
            _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) IN_REGISTER(a[i]);
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) r[i * ldacc + n - n0] += hsum_i(fold_i512(a[i]));
    }
}
__attribute__((noinline)) static void rows_i8q(const int16_t* xq, int64_t M, int64_t K, int64_t ldq, const int8_t* W,
                                               int64_t n0, int64_t n1, float* acc, int64_t ldacc) {
    const int64_t KV = K & ~(int64_t)(I8Q_STEP - 1);
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) acc[m * ldacc + n - n0] = 0.f;
    for (int64_t kb = 0; kb < KV; kb += I8Q_BLOCK) {
        const int64_t ke = kb + I8Q_BLOCK < KV ? kb + I8Q_BLOCK : KV;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) i8q_block512(xq + m * ldq, ldq, acc + m * ldacc, ldacc, W, K, n0, n1, kb, ke, 4);
        for (; m + 2 <= M; m += 2) i8q_block512(xq + m * ldq, ldq, acc + m * ldacc, ldacc, W, K, n0, n1, kb, ke, 2);
        if (m < M) rows_i8q_one(xq + m * ldq, acc + m * ldacc, W, K, n0, n1, kb, ke);
    }
    rows_i8q_tail(xq, M, K, ldq, W, n0, n1, acc, ldacc);
}

/* One row as u8 with scale s and zero point z: q = clamp(round(x / s) + z, 0, 255), s = (max(x, 0) - min(x, 0)) / 255,
   rounded to nearest even like lrintf. */
static void quantize_u8(const float* r, int64_t K, uint8_t* q, float* scale, int32_t* zp) {
    __m256 vmn = _mm256_setzero_ps(), vmx = vmn;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_loadu_ps(r + k);
        vmn = _mm256_min_ps(vmn, v);
        vmx = _mm256_max_ps(vmx, v);
    }
    float mn[8], mx[8], lo = 0.f, hi = 0.f;
    _mm256_storeu_ps(mn, vmn);
    _mm256_storeu_ps(mx, vmx);
    for (int i = 0; i < 8; i++) { lo = mn[i] < lo ? mn[i] : lo; hi = mx[i] > hi ? mx[i] : hi; }
    for (; k < K; k++) { lo = r[k] < lo ? r[k] : lo; hi = r[k] > hi ? r[k] : hi; }
    const float sc = hi > lo ? (hi - lo) / 255.f : 1.f, inv = 1.f / sc;
    const int32_t z = (int32_t)lrintf(-lo * inv);
    *scale = sc;
    *zp = z;
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i vz = _mm256_set1_epi32(z), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (k = 0; k + 32 <= K; k += 32) {  /* packs/packus saturate to 0..255 and interleave the lanes' groups */
        __m256i a[4];
        for (int i = 0; i < 4; i++)
            a[i] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + k + 8 * i), vinv)), vz);
        const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(a[0], a[1]), _mm256_packs_epi32(a[2], a[3]));
        _mm256_storeu_si256((__m256i*)(q + k), _mm256_permutevar8x32_epi32(b, order));
    }
    for (; k < K; k++) {
        const long v = lrintf(r[k] * inv) + z;
        q[k] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
    }
}

/* int8 weights against u8 activations (quantize_u8: a scale and a zero point a row) with vpdpbusd: 64
   products an instruction, twice vpdpwssd's, and the weights meet the instruction as stored (no widening).
   A weight row's own sum, for the zero point, is the caller's (ws[n], computed once per weight: a vpdpbusd
   against ones here cost one more instruction for every MR). acc = sum_k (q_k - zp) w_k is exact
   (K <= QK_U8_MAX_K) and rounded to fp32 once, so a row gets the same bits whichever rows share its call (a
   decode step's result does not depend on its batch). MR rows (4, 2, 1) against NR weight rows (4 or 1). */
static inline __attribute__((always_inline)) void u8_block(const uint8_t* x, int64_t K, const int32_t* zp,
                                                           const int8_t* W, const int32_t* ws, int64_t n, int64_t n0,
                                                           float* acc, int64_t ldacc, const int MR, const int NR) {
    const int64_t K64 = K & ~(int64_t)63;
    __m512i a[4][4];
    _Pragma("GCC unroll 4") for (int c = 0; c < NR; c++)
        _Pragma("GCC unroll 4") for (int r = 0; r < MR; r++) a[r][c] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K64; k += 64) {
        __m512i w[4];
        _Pragma("GCC unroll 4") for (int c = 0; c < NR; c++) {
            if (PF) _mm_prefetch((const char*)(W + (n + c + PF) * K + k), PFH);
            w[c] = _mm512_loadu_si512((const void*)(W + (n + c) * K + k));
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < MR; r++) {
            const __m512i u = _mm512_loadu_si512((const void*)(x + r * K + k));
            _Pragma("GCC unroll 4") for (int c = 0; c < NR; c++) a[r][c] = _mm512_dpbusd_epi32(a[r][c], u, w[c]);
        }
        _Pragma("GCC unroll 4") for (int c = 0; c < NR; c++)
            _Pragma("GCC unroll 4") for (int r = 0; r < MR; r++) IN_REGISTER(a[r][c]);
    }
    _Pragma("GCC unroll 4") for (int c = 0; c < NR; c++) {
        const int8_t* w = W + (n + c) * K;
        _Pragma("GCC unroll 4") for (int r = 0; r < MR; r++) {
            int64_t d = _mm512_reduce_add_epi32(a[r][c]);
            for (int64_t k = K64; k < K; k++) d += (int32_t)x[r * K + k] * w[k];
            acc[r * ldacc + n - n0 + c] = (float)(d - (int64_t)zp[r] * ws[n + c]);
        }
    }
}
__attribute__((noinline)) static void rows_u8(const uint8_t* xu, const int32_t* zp, int64_t M, int64_t K,
                                              const int8_t* W, const int32_t* ws, int64_t n0, int64_t n1, float* acc,
                                              int64_t ldacc) {
    int64_t m = 0;
#define U8_ROWS(MR)                                                                                          \
    for (; m + MR <= M; m += MR) {                                                                           \
        int64_t n = n0;                                                                                      \
        for (; n + 4 <= n1; n += 4) u8_block(xu + m * K, K, zp + m, W, ws, n, n0, acc + m * ldacc, ldacc, MR, 4); \
        for (; n < n1; n++) u8_block(xu + m * K, K, zp + m, W, ws, n, n0, acc + m * ldacc, ldacc, MR, 1);      \
    }
    U8_ROWS(4) U8_ROWS(2) U8_ROWS(1)
#undef U8_ROWS
}

#else
#define I8_TASK_UNIT 12  /* whole blocks of rows_i8q_4x3 (3 weight rows) and of the 2- and 1-row ones (4) */
/* acc += vpmaddwd(the 16 int16 at p, u), p read by the instruction itself: as an intrinsic GCC would load a row
   vector once into a register for all the weight vectors that meet it */
#define I8Q_MADD(acc, p, u)                                                                                  \
    do {                                                                                                     \
        __m256i t_;                                                                                          \
        __asm__("vpmaddwd %1, %2, %0" : "=x"(t_) : "m"(*(const __m256i*)(p)), "x"(u));                       \
        acc = _mm256_add_epi32(acc, t_);                                                                     \
    } while (0)
/* Four activation rows against weight rows [n0, n1), columns [kb, ke): blocks of 4 rows x 3 weight rows, 12
   accumulators, each widened weight vector meeting four rows whose vectors vpmaddwd reads from L1 (2 x 4
   blocks widen a weight vector per two products); weight rows past the last multiple of 3 one at a time. */
static void rows_i8q_4x3(const int16_t* x, int64_t ldq, float* r, int64_t ldacc, const int8_t* W, int64_t K,
                         int64_t n0, int64_t n1, int64_t kb, int64_t ke) {
    const int16_t *x0 = x, *x1 = x + ldq, *x2 = x1 + ldq, *x3 = x2 + ldq;
    int64_t n = n0;
    for (; n + 3 <= n1; n += 3) {
        const int8_t *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0, c0 = a0, c1 = a0, c2 = a0,
                d0 = a0, d1 = a0, d2 = a0;
        for (int64_t k = kb; k < ke; k += 16) {
            if (PF && (k & 63) == 0) {
                _mm_prefetch((const char*)(w0 + PF * K + k), PFH); _mm_prefetch((const char*)(w1 + PF * K + k), PFH);
                _mm_prefetch((const char*)(w2 + PF * K + k), PFH);
            }
            /* one widened weight vector at a time against the four rows, each row's vector an operand of
               vpmaddwd: 12 accumulators, a weight vector and a product fit the 16 registers (with the three
               weight vectors and a row vector held as well, GCC spilled three accumulators every step) */
            const __m256i u0 = ld_i8x16(w0 + k);
            I8Q_MADD(a0, x0 + k, u0); I8Q_MADD(b0, x1 + k, u0); I8Q_MADD(c0, x2 + k, u0); I8Q_MADD(d0, x3 + k, u0);
            const __m256i u1 = ld_i8x16(w1 + k);
            I8Q_MADD(a1, x0 + k, u1); I8Q_MADD(b1, x1 + k, u1); I8Q_MADD(c1, x2 + k, u1); I8Q_MADD(d1, x3 + k, u1);
            const __m256i u2 = ld_i8x16(w2 + k);
            I8Q_MADD(a2, x0 + k, u2); I8Q_MADD(b2, x1 + k, u2); I8Q_MADD(c2, x2 + k, u2); I8Q_MADD(d2, x3 + k, u2);
            __asm__("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(b0), "+x"(b1), "+x"(b2), "+x"(c0), "+x"(c1), "+x"(c2),
                    "+x"(d0), "+x"(d1), "+x"(d2));
        }
        float s[12] = {0};
        hsum4_i(a0, a1, a2, b0, s); hsum4_i(b1, b2, c0, c1, s + 4); hsum4_i(c2, d0, d1, d2, s + 8);
        for (int i = 0; i < 12; i++) r[i / 3 * ldacc + n - n0 + i % 3] += s[i];
    }
    for (; n < n1; n++) {
        const int8_t* w0 = W + n * K;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = kb; k < ke; k += 16) {
            const __m256i u = ld_i8x16(w0 + k);
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x0 + k)), u));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x1 + k)), u));
            a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x2 + k)), u));
            a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x3 + k)), u));
        }
        float s[4] = {0};
        hsum4_i(a0, a1, a2, a3, s);
        for (int i = 0; i < 4; i++) r[i * ldacc + n - n0] += s[i];
    }
}
__attribute__((noinline)) static void rows_i8q(const int16_t* xq, int64_t M, int64_t K, int64_t ldq, const int8_t* W, int64_t n0, int64_t n1,
                     float* acc, int64_t ldacc) {
    const int64_t KV = K & ~(int64_t)(I8Q_STEP - 1);
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) acc[m * ldacc + n - n0] = 0.f;
    for (int64_t kb = 0; kb < KV; kb += I8Q_BLOCK) {
        const int64_t ke = kb + I8Q_BLOCK < KV ? kb + I8Q_BLOCK : KV;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) rows_i8q_4x3(xq + m * ldq, ldq, acc + m * ldacc, ldacc, W, K, n0, n1, kb, ke);
        for (; m < M; m += 2) {
            const int16_t* x0 = xq + m * ldq;
            float* r0 = acc + m * ldacc;
            int64_t n = n0;
            if (M - m >= 2) {
                const int16_t* x1 = x0 + ldq;
                float* r1 = r0 + ldacc;
                for (; n + 4 <= n1; n += 4) {
                    const int8_t *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
                    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
                    for (int64_t k = kb; k < ke; k += 16) {
                        if (PF && (k & 31) == 0) {
                            _mm_prefetch((const char*)(w0 + PF * K + k), PFH); _mm_prefetch((const char*)(w1 + PF * K + k), PFH);
                            _mm_prefetch((const char*)(w2 + PF * K + k), PFH); _mm_prefetch((const char*)(w3 + PF * K + k), PFH);
                        }
                        const __m256i c0 = ld_i8x16(w0 + k), c1 = ld_i8x16(w1 + k);
                        I8Q_MADD(a0, x0 + k, c0); I8Q_MADD(b0, x1 + k, c0); I8Q_MADD(a1, x0 + k, c1); I8Q_MADD(b1, x1 + k, c1);
                        const __m256i c2 = ld_i8x16(w2 + k), c3 = ld_i8x16(w3 + k);
                        I8Q_MADD(a2, x0 + k, c2); I8Q_MADD(b2, x1 + k, c2); I8Q_MADD(a3, x0 + k, c3); I8Q_MADD(b3, x1 + k, c3);
                    }
                    hsum4_i(a0, a1, a2, a3, r0 + n - n0); hsum4_i(b0, b1, b2, b3, r1 + n - n0);
                }
                for (; n < n1; n++) {
                    const int8_t* w0 = W + n * K;
                    __m256i a0 = _mm256_setzero_si256(), b0 = a0;
                    for (int64_t k = kb; k < ke; k += 16) {
                        __m256i c0 = ld_i8x16(w0 + k);
                        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x0 + k)), c0));
                        b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(x1 + k)), c0));
                    }
                    r0[n - n0] += hsum_i(a0); r1[n - n0] += hsum_i(b0);
                }
            } else {
                rows_i8q_one(x0, r0, W, K, n0, n1, kb, ke);
            }
        }
    }
    rows_i8q_tail(xq, M, K, ldq, W, n0, n1, acc, ldacc);
}
#endif

#ifdef QUILL_AVX512_BF16  /* (an AVX512 build too: IN_REGISTER) */
/* bf16 weights against activations rounded to bf16 with vdpbf16ps: 32 bf16 products summed in pairs into 16
   fp32 lanes per instruction; accumulation in fp32. The rows are a bf16 model's activations (LayerNorm output
   rounded to bf16, as torch's bf16 path rounds it), or fp32 activations of two rows and more (bf16 matrices
   under fp32 activations, GPT.weights_to): rounded to bf16 as a bf16 GEMM rounds its inputs, only here, the
   residual stream stays fp32; one row stays exact (it is bound by reading the weight, not by arithmetic).
   MR activation rows against NR weight rows at a time. */
static inline __m512bh ld_bh(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512((const void*)p); }
static inline __attribute__((always_inline)) void bf16dp_block(const uint16_t* x, int64_t K, const uint16_t* W,
                                                               int64_t n, int64_t n0, float* acc, int64_t ldacc,
                                                               const int MR, const int NR) {
    const int64_t K32 = K & ~(int64_t)31;
    __m512 a[4][4];
    _Pragma("GCC unroll 4") for (int r = 0; r < MR; r++)
        _Pragma("GCC unroll 4") for (int c = 0; c < NR; c++) a[r][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32) {
        __m512bh w[4];
        _Pragma("GCC unroll 4") for (int c = 0; c < NR; c++) {
            if (PFW && (k & 31) == 0) _mm_prefetch((const char*)(W + (n + c + PFW) * K + k), PFH);
            w[c] = ld_bh(W + (n + c) * K + k);
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < MR; r++) {
            const __m512bh u = ld_bh(x + r * K + k);
            _Pragma("GCC unroll 4") for (int c = 0; c < NR; c++) a[r][c] = _mm512_dpbf16_ps(a[r][c], u, w[c]);
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < MR; r++)
            _Pragma("GCC unroll 4") for (int c = 0; c < NR; c++) IN_REGISTER(a[r][c]);
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < MR; r++)
        _Pragma("GCC unroll 4") for (int c = 0; c < NR; c++) {
            float s = _mm512_reduce_add_ps(a[r][c]);
            for (int64_t k = K32; k < K; k++) s += bf16_f32(x[r * K + k]) * bf16_f32(W[(n + c) * K + k]);
            acc[r * ldacc + n - n0 + c] = s;
        }
}
__attribute__((noinline)) static void rows_bf16dp(const uint16_t* x, int64_t M, int64_t K, const uint16_t* W,
                                                  int64_t n0, int64_t n1, float* acc, int64_t ldacc) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) bf16dp_block(x + m * K, K, W, n, n0, acc + m * ldacc, ldacc, 4, 4);
        for (; n < n1; n++) bf16dp_block(x + m * K, K, W, n, n0, acc + m * ldacc, ldacc, 4, 1);
    }
    for (; m + 2 <= M; m += 2) {
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) bf16dp_block(x + m * K, K, W, n, n0, acc + m * ldacc, ldacc, 2, 4);
        for (; n < n1; n++) bf16dp_block(x + m * K, K, W, n, n0, acc + m * ldacc, ldacc, 2, 1);
    }
    for (; m < M; m++)  /* one row: one weight row at a time, a sequential stream for the prefetcher */
        for (int64_t n = n0; n < n1; n++) bf16dp_block(x + m * K, K, W, n, n0, acc + m * ldacc, ldacc, 1, 1);
}

/* fp32 rows to bf16 (round to nearest even, as f32_bf16) for rows_bf16dp */
static void to_bf16(const float* src, int64_t n, uint16_t* dst) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        _mm512_storeu_si512((void*)(dst + i), (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i)));
    for (; i < n; i++) dst[i] = f32_bf16(src[i]);
}
#define HAVE_BF16DP 1
#else
#define HAVE_BF16DP 0
#endif

/* Per-thread buffer, grown on demand and kept. Aligned to a cache line: malloc's 16-byte alignment made every
   512-bit load of an activation row straddle two lines. */
static float* scratch(int64_t n) {
    static __thread float* buf = NULL;
    static __thread int64_t cap = 0;
    if (n > cap) {
        free(buf);
        const size_t bytes = ((size_t)n * sizeof(float) + 63) & ~(size_t)63;
        buf = (float*)aligned_alloc(64, bytes);
        cap = buf ? n : 0;
    }
    return buf;
}

/* exp for x <= 0 (softmax after subtracting the max), Cephes-style: 2^n * p(r), relative error ~2e-7 */
static inline __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* Activations, 8 floats at a time (absolute error ~1e-7 relative to |x|, like torch's vectorised ones). */
enum { ACT_NONE = QK_ACT_NONE, ACT_GELU_TANH = QK_ACT_GELU_TANH, ACT_GELU_ERF = QK_ACT_GELU_ERF, ACT_RELU = QK_ACT_RELU };
static inline __m256 activate8(__m256 x, int act) {
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    if (act == ACT_GELU_TANH) {  /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh|u| = (1-e)/(1+e), e = exp(-2|u|) */
        __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x));
        __m256 au = _mm256_andnot_ps(sign, u);
        __m256 e = exp_neg(_mm256_mul_ps(_mm256_set1_ps(-2.0f), au));
        __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
        t = _mm256_or_ps(t, _mm256_and_ps(sign, u));
        return _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, t));
    }
    if (act == ACT_GELU_ERF) {  /* 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz-Stegun 7.1.26 */
        __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.7071067811865476f));
        __m256 az = _mm256_andnot_ps(sign, z);
        __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), az, one));
        __m256 p = _mm256_set1_ps(1.061405429f);
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
        p = _mm256_mul_ps(p, t);
        __m256 erf = _mm256_sub_ps(one, _mm256_mul_ps(p, exp_neg(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(az, az)))));
        erf = _mm256_or_ps(erf, _mm256_and_ps(sign, z));
        return _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, erf));
    }
    if (act == ACT_RELU) return _mm256_max_ps(x, _mm256_setzero_ps());
    return x;
}

/* act in place on n floats, four vectors a step: each activation is one long chain of dependent operations,
   and four side by side keep the FP pipes busy where one after another left them waiting. The tail runs
   through the same vector code, padded: an element's result does not depend on where a task's stretch of the
   row begins or ends (the fused epilogues cut rows into column blocks). */
static inline __attribute__((always_inline)) void activate_as(float* v, int64_t n, int act) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256 a = activate8(_mm256_loadu_ps(v + i), act), b = activate8(_mm256_loadu_ps(v + i + 8), act);
        const __m256 c = activate8(_mm256_loadu_ps(v + i + 16), act), d = activate8(_mm256_loadu_ps(v + i + 24), act);
        _mm256_storeu_ps(v + i, a); _mm256_storeu_ps(v + i + 8, b);
        _mm256_storeu_ps(v + i + 16, c); _mm256_storeu_ps(v + i + 24, d);
    }
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, activate8(_mm256_loadu_ps(v + i), act));
    if (i < n) {
        float t[8] = {0};
        memcpy(t, v + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(t, activate8(_mm256_loadu_ps(t), act));
        memcpy(v + i, t, (size_t)(n - i) * sizeof(float));
    }
}
static void activate(float* v, int64_t n, int act) {  /* one copy of the loop per activation: constants hoisted */
    switch (act) {
        case ACT_GELU_TANH: activate_as(v, n, ACT_GELU_TANH); break;
        case ACT_GELU_ERF: activate_as(v, n, ACT_GELU_ERF); break;
        case ACT_RELU: activate_as(v, n, ACT_RELU); break;
        default: break;
    }
}

/* act(v) in place on n elements of dtype dt, in 16K-element tasks on the pool (long inputs: prefill's MLP);
   bf16/fp16 tasks widen their stretch to fp32, activate it, and round it back. */
struct act_job { void* v; int64_t n; int dt, act; };
#define ACT_CHUNK 16384
static void act_task(void* ctx, int64_t t) {
    const struct act_job* j = (const struct act_job*)ctx;
    const int64_t i0 = t * ACT_CHUNK, n = j->n - i0 < ACT_CHUNK ? j->n - i0 : ACT_CHUNK;
    if (j->dt == F32) { activate((float*)j->v + i0, n, j->act); return; }
    float buf[ACT_CHUNK];
    widen(buf, j->v, j->dt, i0, n);
    activate(buf, n, j->act);
    narrow(j->v, j->dt, i0, buf, n);
}
void quill_activate(void* v, int64_t n, int dt, int act, int nthreads) {
    struct act_job job = {v, n, dt, act};
    pool_run(act_task, &job, (n + ACT_CHUNK - 1) / ACT_CHUNK, nthreads);
}

/* The end of every product's output row of n sums (scale and bias applied): the activation, then the residual
   (of y's dtype, at y's offset o: it may be y itself, an in-place add), then the store, rounded to y's dtype. */
static void finish_row(float* a, int64_t n, int act, const void* residual, void* y, int ydt, int64_t o) {
    activate(a, n, act);
    if (residual) {
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(a + i, _mm256_add_ps(_mm256_loadu_ps(a + i), vld(residual, ydt, o + i)));
        for (; i < n; i++) a[i] += ld(residual, ydt, o + i);
    }
    if (ydt == F32) memcpy((float*)y + o, a, (size_t)n * sizeof(float));
    else narrow(y, ydt, o, a, n);
}

/* A product's n < nn sums to their values before the epilogue, in this order: a[n] * xs (the row's activation
   scale), * scale[n] (the weights' scale; none for float weights), + bias[n0 + n] (of dtype bdt; or none). */
static void scale_bias(float* a, int64_t nn, float xs, const float* scale, const void* bias, int bdt, int64_t n0) {
    const __m256 vxs = _mm256_set1_ps(xs);
    int64_t n = 0;
    for (; n + 8 <= nn; n += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(a + n), vxs);
        if (scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(scale + n));
        if (bias) v = _mm256_add_ps(v, vld(bias, bdt, n0 + n));
        _mm256_storeu_ps(a + n, v);
    }
    for (; n < nn; n++) {
        float v = a[n] * xs;
        if (scale) v *= scale[n];
        if (bias) v += ld(bias, bdt, n0 + n);
        a[n] = v;
    }
}

struct linear_job {
    const float* x; int64_t M, K; const void* W; int wdt; const float* scale; const void* bias; int bdt;
    const void* residual; void* y; int ydt; int64_t ldy, N, chunk; int act;
    const int16_t* xq; const float* xs;  /* int8 weights: activations as int16 with one scale per row, */
    const uint8_t* xu; const int32_t* zp; /* or (AVX-512 VNNI) as u8 with a scale and a zero point per row, */
    const int32_t* wsum;                  /* against the weight rows' sums */
    const uint16_t* xb;                  /* bf16 weights on AVX-512 BF16 (rows_bf16dp): x rounded to bf16, */
    const float* xp;                     /* or from four rows on (rows4_bf16): x's rows split in pairs */
};

static void linear_task(void* ctx, int64_t t) {
    const struct linear_job* j = (const struct linear_job*)ctx;
    const int64_t N = j->N, K = j->K, n0 = t * j->chunk, n1 = n0 + j->chunk < N ? n0 + j->chunk : N;
    float acc[64 * 32];
    for (int64_t m0 = 0; m0 < j->M; m0 += 32) {
        const int64_t mb = j->M - m0 < 32 ? j->M - m0 : 32;
        const float* xm = j->x + m0 * K;
        switch (j->wdt) {
            case F32: rows_f32(xm, xm, mb, K, (const float*)j->W, n0, n1, acc, 64); break;
            case BF16:
#if HAVE_BF16DP
                if (j->xb) { rows_bf16dp(j->xb + m0 * K, mb, K, (const uint16_t*)j->W, n0, n1, acc, 64); break; }
#endif
                rows_bf16(xm, j->xp ? j->xp + m0 * K : NULL, mb, K, (const uint16_t*)j->W, n0, n1, acc, 64);
                break;
            case F16: rows_f16(xm, xm, mb, K, (const uint16_t*)j->W, n0, n1, acc, 64); break;
            default:
#ifdef QUILL_AVX512
                if (j->xu) { rows_u8(j->xu + m0 * K, j->zp + m0, mb, K, (const int8_t*)j->W, j->wsum, n0, n1, acc, 64); break; }
#endif
                if (j->xq) rows_i8q(j->xq + m0 * K, mb, K, K, (const int8_t*)j->W, n0, n1, acc, 64);
                else rows_i8(xm, xm, mb, K, (const int8_t*)j->W, n0, n1, acc, 64);
                break;
        }
        for (int64_t m = 0; m < mb; m++) {
            float* a = acc + m * 64;
            scale_bias(a, n1 - n0, j->xs ? j->xs[m0 + m] : 1.f, j->scale ? j->scale + n0 : NULL, j->bias, j->bdt, n0);
            finish_row(a, n1 - n0, j->act, j->residual, j->y, j->ydt, (m0 + m) * j->ldy + n0);
        }
    }
}

/* LayerNorm of one fp32 row x into r (r may be x): two passes for the moments (biased variance, as torch),
   then the affine transform (weight lnw, bias lnb or none, dtype lndt); four partial sums a pass, so the
   adds do not wait on each other. Vectorised: before a decode projection it runs on the calling thread. */
static void layer_norm_row(const float* x, float* r, int64_t K, const void* lnw, const void* lnb, int lndt,
                           float eps) {
    const int64_t K8 = K & ~(int64_t)7, K32 = K & ~(int64_t)31;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t k = 0;
    for (; k < K32; k += 32) {
        s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + k)); s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + k + 8));
        s2 = _mm256_add_ps(s2, _mm256_loadu_ps(x + k + 16)); s3 = _mm256_add_ps(s3, _mm256_loadu_ps(x + k + 24));
    }
    for (; k < K8; k += 8) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + k));
    double sum = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; k < K; k++) sum += x[k];
    const float mu = (float)(sum / (double)K);
    const __m256 vmu = _mm256_set1_ps(mu);
    s0 = s1 = s2 = s3 = _mm256_setzero_ps();
    for (k = 0; k < K32; k += 32) {
        const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + k), vmu), d1 = _mm256_sub_ps(_mm256_loadu_ps(x + k + 8), vmu);
        const __m256 d2 = _mm256_sub_ps(_mm256_loadu_ps(x + k + 16), vmu), d3 = _mm256_sub_ps(_mm256_loadu_ps(x + k + 24), vmu);
        s0 = _mm256_fmadd_ps(d0, d0, s0); s1 = _mm256_fmadd_ps(d1, d1, s1);
        s2 = _mm256_fmadd_ps(d2, d2, s2); s3 = _mm256_fmadd_ps(d3, d3, s3);
    }
    for (; k < K8; k += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + k), vmu);
        s0 = _mm256_fmadd_ps(d, d, s0);
    }
    double var = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; k < K; k++) { const double d = x[k] - mu; var += d * d; }
    const float rstd = (float)(1.0 / sqrt(var / (double)K + (double)eps));
    const __m256 vr = _mm256_set1_ps(rstd);
    for (k = 0; k < K8; k += 8) {
        const __m256 n = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + k), vmu), vr);
        _mm256_storeu_ps(r + k, _mm256_fmadd_ps(n, vld(lnw, lndt, k), lnb ? vld(lnb, lndt, k) : _mm256_setzero_ps()));
    }
    for (; k < K; k++) r[k] = (x[k] - mu) * rstd * ld(lnw, lndt, k) + (lnb ? ld(lnb, lndt, k) : 0.f);
}

/* Activation rows as fp32 (row stride K), LayerNorm'ed when lnw is given; NULL when out of memory. */
static const float* prepare_x(const void* x, int xdt, int64_t M, int64_t ldx, int64_t K,
                              const void* lnw, const void* lnb, int lndt, float eps, float* buf) {
    if (xdt == F32 && ldx == K && !lnw) return (const float*)x;
    for (int64_t m = 0; m < M; m++) {
        widen(buf + m * K, x, xdt, m * ldx, K);
        if (lnw) layer_norm_row(buf + m * K, buf + m * K, K, lnw, lnb, lndt, eps);
    }
    return buf;
}

/* LayerNorm of M rows (prefill's), LN_ROWS rows a task on the pool: y[m] = ln(x[m]), x and y of dtypes xdt and
   ydt with row strides ldx and ldy (y may be x), computed in fp32 and rounded to ydt. */
struct ln_job { const void* x; int xdt; int64_t ldx; void* y; int ydt; int64_t ldy, M, K; const void *w, *b; int wdt; float eps; _Atomic int err; };
#define LN_ROWS 16
static void ln_task(void* ctx, int64_t t) {
    struct ln_job* j = (struct ln_job*)ctx;
    float* r = scratch(j->K);
    if (!r) { j->err = -1; return; }
    for (int64_t m = t * LN_ROWS; m < (t + 1) * LN_ROWS && m < j->M; m++) {  /* fp32 rows are read and */
        const float* x = r;                                                     /* written where they are */
        if (j->xdt == F32) x = (const float*)j->x + m * j->ldx;
        else widen(r, j->x, j->xdt, m * j->ldx, j->K);
        float* y = j->ydt == F32 ? (float*)j->y + m * j->ldy : r;
        layer_norm_row(x, y, j->K, j->w, j->b, j->wdt, j->eps);
        if (j->ydt != F32) narrow(j->y, j->ydt, m * j->ldy, r, j->K);
    }
}
int quill_layer_norm(const void* x, int xdt, int64_t ldx, void* y, int ydt, int64_t ldy, int64_t M, int64_t K,
                     const void* w, const void* b, int wdt, float eps, int nthreads) {
    struct ln_job job = {x, xdt, ldx, y, ydt, ldy, M, K, w, b, wdt, eps, 0};
    pool_run(ln_task, &job, (M + LN_ROWS - 1) / LN_ROWS, M * K >= (1 << 15) ? nthreads : 1);
    return job.err;
}

/* dst[i0, i1, i2, :] = src[i0, i1, i2, :] for a [n0, n1, n2, n3] view of each (element strides s* and d*, the
   last dim contiguous), converted from sdt to ddt as torch's casts round (the KV cache's writes from the fp32
   qkv projection and their upcasts for the prefill attention); one task per (i0, i1). */
struct convert_job { const void* src; int sdt; void* dst; int ddt; int64_t n1, n2, n3, ss0, ss1, ss2, ds0, ds1, ds2; };
static void convert_task(void* ctx, int64_t t) {
    const struct convert_job* j = (const struct convert_job*)ctx;
    const int64_t i0 = t / j->n1, i1 = t % j->n1, ssz = dsize(j->sdt), dsz = dsize(j->ddt);
    for (int64_t i2 = 0; i2 < j->n2; i2++) {
        const char* s = (const char*)j->src + (i0 * j->ss0 + i1 * j->ss1 + i2 * j->ss2) * ssz;
        char* d = (char*)j->dst + (i0 * j->ds0 + i1 * j->ds1 + i2 * j->ds2) * dsz;
        if (j->sdt == j->ddt) { memcpy(d, s, (size_t)(j->n3 * ssz)); continue; }
        int64_t k = 0;
        for (; k + 8 <= j->n3; k += 8) vst(d, j->ddt, k, vld(s, j->sdt, k));
        for (; k < j->n3; k++) st(d, j->ddt, k, ld(s, j->sdt, k));
    }
}
void quill_convert(const void* src, int sdt, const int64_t* sstride, void* dst, int ddt, const int64_t* dstride,
                   const int64_t* shape, int nthreads) {
    struct convert_job job = {src, sdt, dst, ddt, shape[1], shape[2], shape[3], sstride[0], sstride[1], sstride[2],
                              dstride[0], dstride[1], dstride[2]};
    const int64_t n = shape[0] * shape[1] * shape[2] * shape[3];
    pool_run(convert_task, &job, shape[0] * shape[1], n >= (1 << 16) ? nthreads : 1);
}

/* One activation row as int16 with one symmetric scale (largest |value| -> qmax, at most 32767), rounded to
   nearest even like lrintf; vectorised because it runs on the calling thread before every int8 projection. */
static void quantize_i16(const float* r, int64_t K, int16_t* q, float* scale, float qmax) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmx = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) vmx = _mm256_max_ps(vmx, _mm256_and_ps(_mm256_loadu_ps(r + k), abs_mask));
    float lanes[8], mx = 0.f;
    _mm256_storeu_ps(lanes, vmx);
    for (int i = 0; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
    for (; k < K; k++) mx = fabsf(r[k]) > mx ? fabsf(r[k]) : mx;
    const float sc = mx > 0.f ? mx / qmax : 1.f, inv = 1.f / sc;
    *scale = sc;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (k = 0; k + 16 <= K; k += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + k), vinv));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + k + 8), vinv));
        _mm256_storeu_si256((__m256i*)(q + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    for (; k < K; k++) q[k] = (int16_t)lrintf(r[k] * inv);
}

static int int8_float = -1;  /* QUILL_INT8_FLOAT=1: int8 weights against fp32 activations (slower path) */
static int int8_u8 = -1;     /* QUILL_INT8_U8=0: int8 weights against int16 activations in the AVX-512 builds too */
static int task_bytes = -1;  /* QUILL_TASK_BYTES: weight bytes per pool task */
static void read_switches(void) {  /* the environment's switches above, read once */
    if (int8_float < 0) { const char* e = getenv("QUILL_INT8_FLOAT"); int8_float = e && atoi(e); }
    if (int8_u8 < 0) { const char* e = getenv("QUILL_INT8_U8"); int8_u8 = !(e && strcmp(e, "0") == 0); }
    if (task_bytes < 0) { const char* e = getenv("QUILL_TASK_BYTES"); task_bytes = e ? atoi(e) : 32768; }
}

/* Whether rows of K columns that meet int8 weights are rounded to u8 (rows_u8) where the caller gives the weight
   rows' sums: the AVX-512 VNNI builds, unless QUILL_INT8_U8=0 or QUILL_INT8_FLOAT=1, for K within the exact
   integer sums. */
static int rows_u8_serve(int64_t K) {
#ifdef QUILL_AVX512
    return int8_u8 && !int8_float && K <= QK_U8_MAX_K;
#else
    (void)K;
    return 0;
#endif
}

static int linear_run(const void* x, int xdt, int64_t M, int64_t ldx, const void* W, int wdt, const float* scale,
                      const void* bias, int bdt, const void* residual, void* y, int ydt, int64_t ldy,
                      int64_t N, int64_t K, int nthreads, const void* lnw, const void* lnb, int lndt, float eps,
                      int act, const int32_t* wsum) {
    if (M <= 0 || N <= 0) return 0;
    /* scratch: fp32 rows [M, K], then (int8 weights) int16 rows [M, K] and their scales [M], or u8 rows [M, K],
       their scales [M] and zero points [M], or (bf16 weights on AVX-512 BF16, bf16 activations or two rows and
       more) bf16 rows [M, K], or (other bf16 weights, four rows and more) the first M & ~3 fp32 rows, rows4's,
       split in pairs */
    read_switches();
    const int u8 = wsum && wdt == I8 && rows_u8_serve(K);
    const int bf16dp = HAVE_BF16DP && wdt == BF16 && (xdt == BF16 || M >= 2);
    const int pairs = wdt == BF16 && !bf16dp && M >= 4;
    const int64_t extra = u8 ? (M * K + 3) / 4 + 2 * M : wdt == I8 ? (M * K + 1) / 2 + M : bf16dp ? (M * K + 1) / 2
                        : pairs ? (M & ~(int64_t)3) * K : 0;
    float* buf = scratch(M * K + extra);
    if (!buf) return -1;
    const float* xf = prepare_x(x, xdt, M, ldx, K, lnw, lnb, lndt, eps, buf);
    int16_t* xq = NULL;
    float* xs = NULL;
    uint8_t* xu = NULL;
    int32_t* zp = NULL;
    if (u8) {  /* each activation row to u8 (a scale and a zero point per row) */
        xu = (uint8_t*)(buf + M * K);
        xs = buf + M * K + (M * K + 3) / 4;
        zp = (int32_t*)(xs + M);
#ifdef QUILL_AVX512
        for (int64_t m = 0; m < M; m++) quantize_u8(xf + m * K, K, xu + m * K, xs + m, zp + m);
#endif
    } else if (wdt == I8 && !int8_float) {  /* each activation row to int16 (symmetric, per row) */
        xq = (int16_t*)(buf + M * K);
        xs = buf + M * K + (M * K + 1) / 2;
        for (int64_t m = 0; m < M; m++) quantize_i16(xf + m * K, K, xq + m * K, xs + m, 32767.f);
    }
    uint16_t* xb = NULL;
#if HAVE_BF16DP
    if (bf16dp) {
        xb = (uint16_t*)(buf + M * K);
        to_bf16(xf, M * K, xb);
    }
#endif
    float* xp = NULL;
    if (pairs) {  /* the rows rows4_bf16 takes (those of whole 4-row groups) split to match its widened weights */
        xp = buf + M * K;
        for (int64_t m = 0; m < (M & ~(int64_t)3); m++) split_pairs(xf + m * K, K, xp + m * K);
    }
    const int64_t wsz = dsize(wdt);
    int64_t chunk = (task_bytes / wsz + K - 1) / K;     /* about task_bytes of weights per task */
    /* whole register blocks per task: 4 rows (int8 on AVX-512, and any weights at batch 1 where any count
       serves); 12 against 4+ rows for float weights and AVX2's int8 (rows4's and rows_i8q_4x3's 3-row blocks:
       4 rows a task would send every fourth row of the K=3072 projection through the slow 1-row loop) */
    const int64_t unit = M < 4 ? 4 : wdt == I8 ? I8_TASK_UNIT : 12;
    chunk = chunk < unit ? unit : (chunk + unit - 1) / unit * unit;
    if (chunk > 64) chunk = 64 / unit * unit;           /* acc in linear_task holds 64 columns */
    struct linear_job job = {xf, M, K, W, wdt, scale, bias, bdt, residual, y, ydt, ldy, N, chunk, act, xq, xs, xu, zp,
                             wsum, xb, xp};
    const int64_t tasks = (N + chunk - 1) / chunk;
    pool_run(linear_task, &job, tasks, M * N * K >= (1 << 16) ? nthreads : 1);
    return 0;
}

/* y[m, n] = (residual[m, n] +) act(scale[n] * sum_k ln(x)[m, k] W[n, k] + bias[n])
   x: [M, K] with row stride ldx, dtype xdt; W: [N, K] contiguous, dtype wdt; scale: fp32 [N] or NULL;
   bias: [N] of dtype bdt or NULL; residual and y: [M, N] with row stride ldy, dtype ydt (may alias);
   lnw/lnb: LayerNorm weight/bias (dtype lndt) applied to each row of x first, or NULL; wsum: int8 weights' row
   sums (int32 [N]), given where the rows may be rounded to u8 (rows_u8: AVX-512 VNNI builds, unless
   QUILL_INT8_U8=0), or NULL: int16 rows. */
int quill_linear(const void* x, int xdt, int64_t M, int64_t ldx, const void* W, int wdt, const float* scale,
                 const void* bias, int bdt, const void* residual, void* y, int ydt, int64_t ldy,
                 int64_t N, int64_t K, int nthreads, const void* lnw, const void* lnb, int lndt, float eps, int act,
                 const int32_t* wsum) {
    return linear_run(x, xdt, M, ldx, W, wdt, scale, bias, bdt, residual, y, ydt, ldy, N, K, nthreads,
                      lnw, lnb, lndt, eps, act, wsum);
}

/* Whether quill_linear with row sums rounds rows of K columns that meet int8 weights to u8: the one answer Python's
   choice of paths follows (quill.kernels.u8_rows). */
int quill_rows_u8(int64_t K) {
    read_switches();
    return rows_u8_serve(K);
}

/* One int16 row's pair of columns k, k + 1 (broadcast) against three vectors of int16 pairs u0..u2, summed into
   three int32 accumulators (vpmaddwd, then vpaddd: AVX2 has no fused form). */
#define I16_ROW3(a0, a1, a2, xr)                                                                             \
    do {                                                                                                     \
        int32_t pair_;                                                                                       \
        memcpy(&pair_, (xr) + k, 4);                                                                         \
        const __m256i v_ = _mm256_set1_epi32(pair_);                                                         \
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(v_, u0));                                                \
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(v_, u1));                                                \
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(v_, u2));                                                \
    } while (0)

/* Rows a task of the GEMMs below (int8, u8, bf16) takes: Mp rows (a multiple of the register block's mr) in as
   few tasks of at most `most` rows (a multiple of mr) as will do, as even as whole blocks allow. A task passes
   over its panel group's weights once, so a short last task (513 rows in tasks of 120: four and one of 33) paid
   a whole pass for a few rows. */
static inline int64_t task_rows(int64_t Mp, int64_t mr, int64_t most) {
    const int64_t tasks = (Mp + most - 1) / most, blocks = Mp / mr;
    return (blocks + tasks - 1) / tasks * mr;
}

/* ---- int8 weights against many activation rows (prefill): a register-blocked GEMM ------------------------
   Activations are rounded to int16 with one scale a row (quantize_i16, as the decode path: near exact), the
   weights repacked once (quill.kernels.pack_i8) into panels of I8G_PANEL output columns: panel p holds, for
   each pair of columns k, k+1 of K (zero-padded to a multiple of QK_I8_KSTEP), its columns' two weights next
   to each other, so one int16 pair of an activation row broadcast across the lanes meets the panel's columns
   in one instruction (AVX2: 8 columns a vpmaddwd; AVX-512: 16 a vpdpwssd, the broadcast a plain load). The
   panel width is the variant's (quill.h), so a packed weight serves only the variant it was packed for. A
   register block is I8G_MR rows x I8G_GROUP panels; the weights' columns are walked in chunks of I8G_KC that
   every row block of the task meets in turn. A chunk's lanes sum at most 256 pair products
   (256 * 2 * 32767 * 127 < 2^31), then are rounded to fp32 and added up chunk by chunk in the same order by
   both variants, so they give the same bits. */
#define I8G_KC 512   /* K columns per chunk: 256 pairs */
#define I8G_MB 120   /* activation rows per task at most (a multiple of I8G_MR): its fp32 sums stay in L1/L2 */
#ifdef QUILL_AVX512
#define I8G_PANEL QK_I8_PANEL_AVX512
#define I8G_GROUP QK_I8_GROUP_AVX512
#else
#define I8G_PANEL QK_I8_PANEL_AVX2
#define I8G_GROUP QK_I8_GROUP_AVX2
#endif
#define I8G_NC (I8G_PANEL * I8G_GROUP)
struct gemm_i8_job {
    const float* x; int64_t M, Mp, K, Kp; const int8_t* Wp; const float* scale; const void* bias; int bdt;
    const void* residual; void* y; int ydt; int64_t ldy, N, ngroups, mb; int act; int16_t* xq; float* xs;
};

#ifdef QUILL_AVX512
#define I8G_MR 6  /* rows a register block: 24 accumulators, 4 weight vectors and a broadcast of 32 registers */
#define I8G_ROWS_OUTER 1  /* a chunk's weights (32 KB) would fill L1: each row block walks all of K from L2 */
static inline __attribute__((always_inline)) void i8g_chunk(const int16_t* x, int64_t Kp, const int8_t* w,
                                                            int64_t pstride, int64_t k0, int64_t k1, float* f) {
    _Static_assert(I8G_PANEL == 16, "a vpdpwssd meets 16 columns");
    __m512i a[I8G_MR][I8G_GROUP];
    _Pragma("GCC unroll 8") for (int r = 0; r < I8G_MR; r++)
        _Pragma("GCC unroll 8") for (int c = 0; c < I8G_GROUP; c++) a[r][c] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 2) {
        __m512i u[I8G_GROUP];
        _Pragma("GCC unroll 8") for (int c = 0; c < I8G_GROUP; c++)
            u[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + c * pstride + k * I8G_PANEL)));
        _Pragma("GCC unroll 8") for (int r = 0; r < I8G_MR; r++) {
            int32_t pair;
            memcpy(&pair, x + r * Kp + k, 4);
            const __m512i v = _mm512_set1_epi32(pair);
            _Pragma("GCC unroll 8") for (int c = 0; c < I8G_GROUP; c++) a[r][c] = _mm512_dpwssd_epi32(a[r][c], v, u[c]);
        }
        _Pragma("GCC unroll 8") for (int r = 0; r < I8G_MR; r++)
            _Pragma("GCC unroll 8") for (int c = 0; c < I8G_GROUP; c++) IN_REGISTER(a[r][c]);
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < I8G_MR; r++)
        _Pragma("GCC unroll 8") for (int c = 0; c < I8G_GROUP; c++) {
            float* o = f + r * I8G_NC + c * I8G_PANEL;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_cvtepi32_ps(a[r][c])));
        }
}
#else
#define I8G_MR 3  /* rows a register block: 9 accumulators, 3 weight vectors, a broadcast and vpmaddwd's product
                     in 16 registers (4 rows spilled accumulators: no fused accumulate without VNNI) */
#define I8G_ROWS_OUTER 0  /* a chunk's weights (12 KB) stay in L1 while every row block of the task meets them */
static inline __attribute__((always_inline)) void i8g_chunk(const int16_t* x, int64_t Kp, const int8_t* w,
                                                            int64_t pstride, int64_t k0, int64_t k1, float* f) {
    _Static_assert(I8G_GROUP == 3 && I8G_PANEL == 8, "the AVX2 block names three panels of 8 columns");
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0, c0 = a0, c1 = a0, c2 = a0;
    const int8_t *w0 = w, *w1 = w + pstride, *w2 = w + 2 * pstride;
    const int16_t *x0 = x, *x1 = x + Kp, *x2 = x + 2 * Kp;
    for (int64_t k = k0; k < k1; k += 2) {
        const __m256i u0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w0 + k * I8G_PANEL)));
        const __m256i u1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w1 + k * I8G_PANEL)));
        const __m256i u2 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w2 + k * I8G_PANEL)));
        I16_ROW3(a0, a1, a2, x0);
        I16_ROW3(b0, b1, b2, x1);
        I16_ROW3(c0, c1, c2, x2);
        /* the accumulators stay in registers (without it GCC spilled three and copied the rest each pair) */
        __asm__("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(b0), "+x"(b1), "+x"(b2), "+x"(c0), "+x"(c1), "+x"(c2));
    }
    const __m256i acc[9] = {a0, a1, a2, b0, b1, b2, c0, c1, c2};
    for (int r = 0; r < I8G_MR; r++)
        for (int c = 0; c < I8G_GROUP; c++) {
            float* o = f + r * I8G_NC + c * I8G_PANEL;
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_cvtepi32_ps(acc[3 * r + c])));
        }
}
#endif

/* Rows [8t, 8t + 8) of the activations to int16 (rows past M, the block's padding, are zeros). */
static void gemm_i8_quant_task(void* ctx, int64_t t) {
    const struct gemm_i8_job* j = (const struct gemm_i8_job*)ctx;
    for (int64_t m = 8 * t; m < 8 * t + 8 && m < j->Mp; m++) {
        int16_t* q = j->xq + m * j->Kp;
        if (m < j->M) quantize_i16(j->x + m * j->K, j->K, q, j->xs + m, 32767.f);
        else { memset(q, 0, (size_t)j->K * sizeof(int16_t)); j->xs[m] = 0.f; }
        memset(q + j->K, 0, (size_t)(j->Kp - j->K) * sizeof(int16_t));
    }
}

/* Task t: rows [mb * (t / ngroups), +mb) against the panel group t % ngroups. */
static void gemm_i8_task(void* ctx, int64_t t) {
    const struct gemm_i8_job* j = (const struct gemm_i8_job*)ctx;
    const int64_t g = t % j->ngroups, m0 = t / j->ngroups * j->mb;
    const int64_t mb = j->Mp - m0 < j->mb ? j->Mp - m0 : j->mb, Kp = j->Kp, pstride = Kp * I8G_PANEL;
    const int8_t* w = j->Wp + g * I8G_GROUP * pstride;
    float f[I8G_MB * I8G_NC];
    memset(f, 0, (size_t)mb * I8G_NC * sizeof(float));
    const int64_t nchunks = (Kp + I8G_KC - 1) / I8G_KC, nblocks = mb / I8G_MR;
    for (int64_t i = 0; i < nchunks * nblocks; i++) {  /* each block's chunks in K's order either way */
        const int64_t m = (I8G_ROWS_OUTER ? i / nchunks : i % nblocks) * I8G_MR;
        const int64_t k0 = (I8G_ROWS_OUTER ? i % nchunks : i / nblocks) * I8G_KC, k1 = k0 + I8G_KC < Kp ? k0 + I8G_KC : Kp;
        i8g_chunk(j->xq + (m0 + m) * Kp, Kp, w, pstride, k0, k1, f + m * I8G_NC);
    }
    const int64_t n0 = g * I8G_NC, nn = j->N - n0 < I8G_NC ? j->N - n0 : I8G_NC;
    for (int64_t m = 0; m < mb && m0 + m < j->M; m++) {
        float* a = f + m * I8G_NC;
        scale_bias(a, nn, j->xs[m0 + m], j->scale + n0, j->bias, j->bdt, n0);
        finish_row(a, nn, j->act, j->residual, j->y, j->ydt, (m0 + m) * j->ldy + n0);
    }
}

/* y[m, n] = (residual[m, n] +) act(scale[n] * sum_k x[m, k] W[n, k] + bias[n]), x: [M, K] (row stride ldx, dtype
   xdt) rounded to int16 per row; Wp: W [N, K] int8 packed as above (N padded to a multiple of I8G_PANEL *
   I8G_GROUP, K to QK_I8_KSTEP, zeros); y and residual: [M, N], row stride ldy, dtype ydt. Returns -1 when out
   of memory. */
int quill_gemm_i8(const void* x, int xdt, int64_t M, int64_t ldx, const int8_t* Wp, const float* scale,
                  const void* bias, int bdt, const void* residual, void* y, int ydt, int64_t ldy, int64_t N,
                  int64_t K, int act, int nthreads) {
    if (M <= 0 || N <= 0) return 0;
    const int64_t Mp = (M + I8G_MR - 1) / I8G_MR * I8G_MR, Kp = (K + QK_I8_KSTEP - 1) / QK_I8_KSTEP * QK_I8_KSTEP;
    float* buf = scratch(M * K + (Mp * Kp + 1) / 2 + Mp);
    if (!buf) return -1;
    const float* xf = prepare_x(x, xdt, M, ldx, K, NULL, NULL, 0, 0.f, buf);
    struct gemm_i8_job job = {xf, M, Mp, K, Kp, Wp, scale, bias, bdt, residual, y, ydt, ldy, N,
                              (N + I8G_NC - 1) / I8G_NC, task_rows(Mp, I8G_MR, I8G_MB), act, (int16_t*)(buf + M * K),
                              buf + M * K + (Mp * Kp + 1) / 2};
    pool_run(gemm_i8_quant_task, &job, (Mp + 7) / 8, nthreads);
    pool_run(gemm_i8_task, &job, (Mp + job.mb - 1) / job.mb * job.ngroups, nthreads);
    return 0;
}

/* ---- int8 weights against u8 activations (prefill on AVX-512 VNNI): vpdpbusd, twice vpdpwssd's products ---
   Each activation row is rounded to 8 bits with a scale and a zero point (quantize_u8: 256 levels spanning the
   row's range and 0), 8 bits as the int8 peers' GEMMs round theirs; this rounds more than the int16
   rows of quill_gemm_i8 (docs/performance.md, "Quality"), so the path tuner lets it serve only where it is
   clearly faster. The weights are packed once (quill.kernels.pack_u8i8) into panels of QK_U8_PANEL output
   columns holding each column's QK_U8_KSTEP consecutive K values side by side: a row's four bytes broadcast
   across the lanes meet the panel's 16 columns in one vpdpbusd (64 products). The sums are exact integers: a
   lane starts at -zp * (the column's weight sum) and adds K products of at most 255 * 127, within int32 for
   K <= QK_U8_MAX_K, so y = s_row * scale[n] * sum + bias[n] with one rounding to fp32. */
#define UG_MR 6    /* rows a register block: 24 accumulators, 4 weight vectors and a broadcast of 32 registers */
#define UG_MB 120  /* activation rows per task at most (a multiple of UG_MR) */
#define UG_NC (QK_U8_PANEL * QK_U8_GROUP)

#ifdef QUILL_AVX512
struct gemm_u8_job {
    const float* x; int64_t M, Mp, K, Kp; const int8_t* Wp; const int32_t* colsum; const float* scale;
    const void* bias; int bdt; const void* residual; void* y; int ydt; int64_t ldy, N, ngroups, mb; int act;
    uint8_t* xq; float* xs; int32_t* zp;
};

/* Rows [8t, 8t + 8) of the activations to u8 (rows past M, the block's padding, are zeros). */
static void gemm_u8_quant_task(void* ctx, int64_t t) {
    const struct gemm_u8_job* j = (const struct gemm_u8_job*)ctx;
    for (int64_t m = 8 * t; m < 8 * t + 8 && m < j->Mp; m++) {
        uint8_t* q = j->xq + m * j->Kp;
        if (m < j->M) quantize_u8(j->x + m * j->K, j->K, q, j->xs + m, j->zp + m);
        else { memset(q, 0, (size_t)j->K); j->xs[m] = 0.f; j->zp[m] = 0; }
        memset(q + j->K, 0, (size_t)(j->Kp - j->K));
    }
}

/* Task t: rows [mb * (t / ngroups), +mb) against the panel group t % ngroups, all of K in registers. */
static void gemm_u8_task(void* ctx, int64_t t) {
    const struct gemm_u8_job* j = (const struct gemm_u8_job*)ctx;
    const int64_t g = t % j->ngroups, m0 = t / j->ngroups * j->mb, Kp = j->Kp, pstride = Kp * QK_U8_PANEL;
    const int64_t mb = j->Mp - m0 < j->mb ? j->Mp - m0 : j->mb;
    const int64_t n0 = g * UG_NC, nn = j->N - n0 < UG_NC ? j->N - n0 : UG_NC;
    const int8_t* w = j->Wp + g * QK_U8_GROUP * pstride;
    __m512i cs[QK_U8_GROUP];
    _Pragma("GCC unroll 4") for (int c = 0; c < QK_U8_GROUP; c++) cs[c] = _mm512_loadu_si512((const void*)(j->colsum + n0 + c * QK_U8_PANEL));
    for (int64_t m = 0; m < mb; m += UG_MR) {
        const uint8_t* x = j->xq + (m0 + m) * Kp;
        __m512i a[UG_MR][QK_U8_GROUP];
        _Pragma("GCC unroll 8") for (int r = 0; r < UG_MR; r++) {
            const __m512i nz = _mm512_set1_epi32(-j->zp[m0 + m + r]);
            _Pragma("GCC unroll 4") for (int c = 0; c < QK_U8_GROUP; c++) a[r][c] = _mm512_mullo_epi32(nz, cs[c]);
        }
        for (int64_t k = 0; k < Kp; k += QK_U8_KSTEP) {
            __m512i u[QK_U8_GROUP];
            _Pragma("GCC unroll 4") for (int c = 0; c < QK_U8_GROUP; c++) u[c] = _mm512_loadu_si512((const void*)(w + c * pstride + k * QK_U8_PANEL));
            _Pragma("GCC unroll 8") for (int r = 0; r < UG_MR; r++) {
                int32_t quad;
                memcpy(&quad, x + r * Kp + k, 4);
                const __m512i v = _mm512_set1_epi32(quad);
                _Pragma("GCC unroll 4") for (int c = 0; c < QK_U8_GROUP; c++) a[r][c] = _mm512_dpbusd_epi32(a[r][c], v, u[c]);
            }
            _Pragma("GCC unroll 8") for (int r = 0; r < UG_MR; r++)
                _Pragma("GCC unroll 4") for (int c = 0; c < QK_U8_GROUP; c++) IN_REGISTER(a[r][c]);
        }
        float f[UG_MR][UG_NC];  /* every accumulator stored by a constant index: a row loop bounded by M over
                                   a[r] would keep the whole block in memory, and the k loop with it */
        _Pragma("GCC unroll 8") for (int r = 0; r < UG_MR; r++)
            _Pragma("GCC unroll 4") for (int c = 0; c < QK_U8_GROUP; c++) _mm512_storeu_ps(f[r] + c * QK_U8_PANEL, _mm512_cvtepi32_ps(a[r][c]));
        for (int r = 0; r < UG_MR && m0 + m + r < j->M; r++) {
            const int64_t row = m0 + m + r;
            scale_bias(f[r], nn, j->xs[row], j->scale + n0, j->bias, j->bdt, n0);
            finish_row(f[r], nn, j->act, j->residual, j->y, j->ydt, row * j->ldy + n0);
        }
    }
}
#endif

/* y[m, n] = (residual[m, n] +) act(scale[n] * sum_k x[m, k] W[n, k] + bias[n]), x: [M, K] (row stride ldx, dtype
   xdt) rounded to u8 per row (quantize_u8); Wp: W [N, K] int8 packed as above (N padded to a multiple of
   QK_U8_PANEL * QK_U8_GROUP, K to QK_U8_KSTEP, zeros), colsum: int32 [N padded] the sums of W's rows; y and
   residual: [M, N], row stride ldy, dtype ydt. Returns -1 when out of memory, -2 where this variant has no
   vpdpbusd, -3 when K is too long for exact int32 sums. */
int quill_gemm_u8i8(const void* x, int xdt, int64_t M, int64_t ldx, const int8_t* Wp, const int32_t* colsum,
                    const float* scale, const void* bias, int bdt, const void* residual, void* y, int ydt, int64_t ldy,
                    int64_t N, int64_t K, int act, int nthreads) {
#ifdef QUILL_AVX512
    if (M <= 0 || N <= 0) return 0;
    if (K > QK_U8_MAX_K) return -3;
    const int64_t Mp = (M + UG_MR - 1) / UG_MR * UG_MR, Kp = (K + QK_U8_KSTEP - 1) / QK_U8_KSTEP * QK_U8_KSTEP;
    float* buf = scratch(M * K + (Mp * Kp + 3) / 4 + 2 * Mp);
    if (!buf) return -1;
    const float* xf = prepare_x(x, xdt, M, ldx, K, NULL, NULL, 0, 0.f, buf);
    float* xs = buf + M * K + (Mp * Kp + 3) / 4;
    struct gemm_u8_job job = {xf, M, Mp, K, Kp, Wp, colsum, scale, bias, bdt, residual, y, ydt, ldy, N,
                              (N + UG_NC - 1) / UG_NC, task_rows(Mp, UG_MR, UG_MB), act, (uint8_t*)(buf + M * K), xs,
                              (int32_t*)(xs + Mp)};
    pool_run(gemm_u8_quant_task, &job, (Mp + 7) / 8, nthreads);
    pool_run(gemm_u8_task, &job, (Mp + job.mb - 1) / job.mb * job.ngroups, nthreads);
    return 0;
#else
    (void)x; (void)xdt; (void)M; (void)ldx; (void)Wp; (void)colsum; (void)scale; (void)bias; (void)bdt;
    (void)residual; (void)y; (void)ydt; (void)ldy; (void)N; (void)K; (void)act; (void)nthreads;
    return -2;
#endif
}

int quill_has_gemm_u8i8(void) {
#ifdef QUILL_AVX512
    return 1;
#else
    return 0;
#endif
}

/* ---- bf16 weights against many activation rows (prefill, batched rows; AVX-512 BF16): a register-blocked GEMM
   The rows are rounded to bf16 once (as rows_bf16dp rounds them), the sums and the output stay fp32. The
   weights are repacked once (quill.kernels.pack_bf16) into panels of QK_BF16_PANEL output columns: for each
   pair of K's columns, the panel's 16 columns' two weights side by side (one vector), so an activation pair
   broadcast across the lanes meets 16 output columns in one vdpbf16ps. A register block is BG_MR rows x
   QK_BF16_GROUP panels (24 accumulators), summed over the whole of K in registers: the panel group (K x 64
   columns, 96 KB at K = 768) stays in L2 while every row block of the task passes over it, and the rows'
   16 horizontal sums per block that rows_bf16dp pays are gone. */
#if HAVE_BF16DP
#define BG_MR 6    /* rows a register block: 24 accumulators, 4 weight vectors and a broadcast of 32 registers */
#define BG_MB 120  /* activation rows per task at most (a multiple of BG_MR): their bf16 copy stays in L2 */
#define BG_NC (QK_BF16_PANEL * QK_BF16_GROUP)
struct gemm_bf16_job {
    const void* x; int xdt; int64_t M, Mp, ldx, K, Kp; const uint16_t* Wp; const void* bias; int bdt;
    const void* residual; void* y; int ydt; int64_t ldy, N, ngroups, mb; int act; uint16_t* xb;
};

/* Rows [8t, 8t + 8) of the activations to bf16, K zero-padded to Kp (rows past M, the block's padding, zeros). */
static void gemm_bf16_round_task(void* ctx, int64_t t) {
    const struct gemm_bf16_job* j = (const struct gemm_bf16_job*)ctx;
    for (int64_t m = 8 * t; m < 8 * t + 8 && m < j->Mp; m++) {
        uint16_t* b = j->xb + m * j->Kp;
        if (m >= j->M) memset(b, 0, (size_t)j->K * sizeof(uint16_t));
        else if (j->xdt == BF16) memcpy(b, (const uint16_t*)j->x + m * j->ldx, (size_t)j->K * sizeof(uint16_t));
        else if (j->xdt == F32) to_bf16((const float*)j->x + m * j->ldx, j->K, b);
        else for (int64_t k = 0; k < j->K; k++) b[k] = f32_bf16(ld(j->x, j->xdt, m * j->ldx + k));
        memset(b + j->K, 0, (size_t)(j->Kp - j->K) * sizeof(uint16_t));
    }
}

/* Task t: rows [mb * (t / ngroups), +mb) against the panel group t % ngroups. */
static void gemm_bf16_task(void* ctx, int64_t t) {
    const struct gemm_bf16_job* j = (const struct gemm_bf16_job*)ctx;
    const int64_t g = t % j->ngroups, m0 = t / j->ngroups * j->mb, Kp = j->Kp, pstride = Kp * QK_BF16_PANEL;
    const int64_t mb = j->Mp - m0 < j->mb ? j->Mp - m0 : j->mb;
    const int64_t n0 = g * BG_NC, nn = j->N - n0 < BG_NC ? j->N - n0 : BG_NC;
    const uint16_t* w = j->Wp + g * QK_BF16_GROUP * pstride;
    for (int64_t m = 0; m < mb; m += BG_MR) {
        const uint16_t* x = j->xb + (m0 + m) * Kp;
        __m512 a[BG_MR][QK_BF16_GROUP];
        for (int r = 0; r < BG_MR; r++)
            for (int c = 0; c < QK_BF16_GROUP; c++) a[r][c] = _mm512_setzero_ps();
        for (int64_t k = 0; k < Kp; k += 2) {
            __m512bh u[QK_BF16_GROUP];
            for (int c = 0; c < QK_BF16_GROUP; c++) u[c] = ld_bh(w + c * pstride + k * QK_BF16_PANEL);
            for (int r = 0; r < BG_MR; r++) {
                int32_t pair;
                memcpy(&pair, x + r * Kp + k, 4);
                const __m512bh v = (__m512bh)_mm512_set1_epi32(pair);
                for (int c = 0; c < QK_BF16_GROUP; c++) a[r][c] = _mm512_dpbf16_ps(a[r][c], v, u[c]);
            }
        }
        for (int r = 0; r < BG_MR && m0 + m + r < j->M; r++) {
            float f[BG_NC];
            for (int c = 0; c < QK_BF16_GROUP; c++) _mm512_storeu_ps(f + c * QK_BF16_PANEL, a[r][c]);
            scale_bias(f, nn, 1.f, NULL, j->bias, j->bdt, n0);
            finish_row(f, nn, j->act, j->residual, j->y, j->ydt, (m0 + m + r) * j->ldy + n0);
        }
    }
}
#endif

/* y[m, n] = (residual[m, n] +) act(sum_k x[m, k] W[n, k] + bias[n]) with x: [M, K] (row stride ldx, dtype xdt)
   rounded to bf16; Wp: W [N, K] bf16 packed as above (N padded to a multiple of QK_BF16_PANEL * QK_BF16_GROUP,
   K to QK_BF16_KSTEP, zeros); y and residual: [M, N], row stride ldy, dtype ydt. Returns -1 when out of
   memory, -2 where this variant has no vdpbf16ps (quill_has_gemm_bf16 says which). */
int quill_gemm_bf16(const void* x, int xdt, int64_t M, int64_t ldx, const uint16_t* Wp, const void* bias, int bdt,
                    const void* residual, void* y, int ydt, int64_t ldy, int64_t N, int64_t K, int act,
                    int nthreads) {
#if HAVE_BF16DP
    if (M <= 0 || N <= 0) return 0;
    const int64_t Mp = (M + BG_MR - 1) / BG_MR * BG_MR, Kp = (K + QK_BF16_KSTEP - 1) / QK_BF16_KSTEP * QK_BF16_KSTEP;
    float* buf = scratch((Mp * Kp + 1) / 2);
    if (!buf) return -1;
    struct gemm_bf16_job job = {x, xdt, M, Mp, ldx, K, Kp, Wp, bias, bdt, residual, y, ydt, ldy, N,
                                (N + BG_NC - 1) / BG_NC, task_rows(Mp, BG_MR, BG_MB), act, (uint16_t*)buf};
    pool_run(gemm_bf16_round_task, &job, (Mp + 7) / 8, nthreads);
    pool_run(gemm_bf16_task, &job, (Mp + job.mb - 1) / job.mb * job.ngroups, nthreads);
    return 0;
#else
    (void)x; (void)xdt; (void)M; (void)ldx; (void)Wp; (void)bias; (void)bdt; (void)residual; (void)y; (void)ydt;
    (void)ldy; (void)N; (void)K; (void)act; (void)nthreads;
    return -2;
#endif
}

int quill_has_gemm_bf16(void) { return HAVE_BF16DP; }

/* ---- float weights against many fp32 activation rows (prefill, batched rows): a register-blocked GEMM ------
   BLIS's loop order on nn.Linear's layout. A task owns up to FG_MAX_PANELS panels of FG_NR output columns for
   every row (fewer where that leaves under FG_TASKS_A_THREAD tasks a thread) and walks K in chunks of FG_KC.
   It widens each chunk of its weight rows into a k-major copy of its own (column k's FG_NR weights side by
   side: two vectors meet one broadcast activation value), so the model keeps one copy of its weights and the
   activation rows are read in place. A panel's chunk stays in L1 while the blocks of FG_MR rows of a group
   of FG_MC rows (their chunk in L2) meet it in turn, each block summing the chunk in registers from zero and
   adding them to the rows' sums (a chain of FG_KC + K / FG_KC additions a sum instead of K). Every output sums
   its chunks in K's order whatever the task split, so the thread count never changes a bit. The epilogue runs
   once all of K is in. */
#ifdef QUILL_AVX512
#define FG_MR 8   /* rows a register block: 16 accumulators, 2 weight vectors and a broadcast of 32 registers */
#define FG_LANES 16
#define FG_KC 128 /* K columns a chunk: a panel's chunk is 16 KB */
typedef __m512 fgvec;
#define FG_LOAD _mm512_loadu_ps
#define FG_STORE _mm512_storeu_ps
#define FG_SET1 _mm512_set1_ps
#define FG_FMA _mm512_fmadd_ps
#define FG_ADD _mm512_add_ps
#define FG_ZERO _mm512_setzero_ps
#else
#define FG_MR 6   /* rows a register block: 12 accumulators, 2 weight vectors and a broadcast of 16 registers */
#define FG_LANES 8
#define FG_KC 256 /* K columns a chunk: a panel's chunk is 16 KB */
typedef __m256 fgvec;
#define FG_LOAD _mm256_loadu_ps
#define FG_STORE _mm256_storeu_ps
#define FG_SET1 _mm256_set1_ps
#define FG_FMA _mm256_fmadd_ps
#define FG_ADD _mm256_add_ps
#define FG_ZERO _mm256_setzero_ps
#endif
#define FG_NR (2 * FG_LANES)  /* output columns a panel: two vectors */
#define FG_MC 96  /* rows a pass over a panel's chunk: their chunk of K stays in L2 */
#define FG_MAX_PANELS 4
#define FG_TASKS_A_THREAD 8
struct gemm_f32_job {
    const float* x; int64_t M, ldx, K; const void* W; int wdt; const void* bias; int bdt; const void* residual;
    void* y; int ydt; int64_t ldy, N, nc; int act; _Atomic int err;
};

/* The eight vectors r[0..7] transposed in place (r[i] lane j <- r[j] lane i). */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++)
        for (int h = 0; h < 2; h++) {
            const __m256 a = t[4 * i + h], b = t[4 * i + 2 + h];
            u[4 * i + h] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0));
            u[4 * i + 2 + h] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2));
        }
    /* u[0..3]: lanes 0-3 of columns 0, 1 (rows 0-3), u[4..7] rows 4-7: halves joined across the two groups */
    const int order[4] = {0, 2, 1, 3};
    for (int i = 0; i < 4; i++) {
        r[order[i]] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
        r[order[i] + 4] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
}

/* panel[k * FG_NR + i] = W[n0 + i, k0 + k] as fp32 for k < kc and the panel's rows (rows past N: zeros), eight
   rows by eight columns a transpose. */
static void fg_pack(const void* W, int wdt, int64_t K, int64_t N, int64_t n0, int64_t k0, int64_t kc, float* panel) {
    for (int64_t i0 = 0; i0 < FG_NR; i0 += 8) {
        const int64_t rows = N - n0 - i0 < 8 ? N - n0 - i0 : 8, row0 = (n0 + i0) * K + k0;
        int64_t k = 0;
        if (rows == 8)
            for (; k + 8 <= kc; k += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = vld(W, wdt, row0 + i * K + k);
                transpose8(r);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(panel + (k + i) * FG_NR + i0, r[i]);
            }
        for (; k < kc; k++)
            for (int64_t i = 0; i < 8; i++) panel[k * FG_NR + i0 + i] = i < rows ? ld(W, wdt, row0 + i * K + k) : 0.f;
    }
}

/* mr (1..FG_MR) rows at x (row stride ldx) against the panel chunk p of kc columns, added to (first: stored
   in) the rows' sums acc[r * lda + c]. */
static inline __attribute__((always_inline)) void fg_block(const float* x, int64_t ldx, const float* p, int64_t kc,
                                                           int mr, float* acc, int64_t lda, int first) {
    fgvec a[FG_MR][2];
    for (int r = 0; r < mr; r++) a[r][0] = a[r][1] = FG_ZERO();
    for (int64_t k = 0; k < kc; k++) {
        const fgvec w0 = FG_LOAD(p + k * FG_NR), w1 = FG_LOAD(p + k * FG_NR + FG_LANES);
        for (int r = 0; r < mr; r++) {
            const fgvec v = FG_SET1(x[r * ldx + k]);
            a[r][0] = FG_FMA(v, w0, a[r][0]);
            a[r][1] = FG_FMA(v, w1, a[r][1]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int h = 0; h < 2; h++) {
            float* o = acc + r * lda + FG_LANES * h;
            FG_STORE(o, first ? a[r][h] : FG_ADD(FG_LOAD(o), a[r][h]));
        }
}

/* Task t: output columns [nc t, +nc) for every row. */
static void gemm_f32_task(void* ctx, int64_t t) {
    struct gemm_f32_job* j = (struct gemm_f32_job*)ctx;
    const int64_t K = j->K, M = j->M, c0 = t * j->nc, nn = j->N - c0 < j->nc ? j->N - c0 : j->nc;
    const int64_t np = (nn + FG_NR - 1) / FG_NR, lda = np * FG_NR;
    float* panels = scratch(np * FG_KC * FG_NR + M * lda);
    if (!panels) { j->err = 1; return; }
    float* acc = panels + np * FG_KC * FG_NR;
    for (int64_t k0 = 0; k0 < K; k0 += FG_KC) {
        const int64_t kc = K - k0 < FG_KC ? K - k0 : FG_KC;
        for (int64_t p = 0; p < np; p++)
            fg_pack(j->W, j->wdt, K, j->N, c0 + p * FG_NR, k0, kc, panels + p * FG_KC * FG_NR);
        for (int64_t m0 = 0; m0 < M; m0 += FG_MC) {
            const int64_t m1 = M - m0 < FG_MC ? M : m0 + FG_MC;
            for (int64_t p = 0; p < np; p++) {
                const float* chunk = panels + p * FG_KC * FG_NR;
                for (int64_t m = m0; m < m1; m += FG_MR) {
                    const float* x = j->x + m * j->ldx + k0;
                    float* a = acc + m * lda + p * FG_NR;
                    switch (m1 - m < FG_MR ? m1 - m : FG_MR) {  /* a copy of the block per row count */
#if FG_MR == 8
                        case 8: fg_block(x, j->ldx, chunk, kc, 8, a, lda, k0 == 0); break;
                        case 7: fg_block(x, j->ldx, chunk, kc, 7, a, lda, k0 == 0); break;
#endif
                        case 6: fg_block(x, j->ldx, chunk, kc, 6, a, lda, k0 == 0); break;
                        case 5: fg_block(x, j->ldx, chunk, kc, 5, a, lda, k0 == 0); break;
                        case 4: fg_block(x, j->ldx, chunk, kc, 4, a, lda, k0 == 0); break;
                        case 3: fg_block(x, j->ldx, chunk, kc, 3, a, lda, k0 == 0); break;
                        case 2: fg_block(x, j->ldx, chunk, kc, 2, a, lda, k0 == 0); break;
                        default: fg_block(x, j->ldx, chunk, kc, 1, a, lda, k0 == 0); break;
                    }
                }
            }
        }
    }
    for (int64_t m = 0; m < M; m++) {
        scale_bias(acc + m * lda, nn, 1.f, NULL, j->bias, j->bdt, c0);
        finish_row(acc + m * lda, nn, j->act, j->residual, j->y, j->ydt, m * j->ldy + c0);
    }
}

/* y[m, n] = (residual[m, n] +) act(sum_k x[m, k] W[n, k] + bias[n]) with x: [M, K] fp32 (row stride ldx), W:
   [N, K] fp32, bf16 or fp16 (wdt) as nn.Linear keeps it, y and residual: [M, N], row stride ldy, dtype ydt.
   Returns -1 when out of memory, -3 for activations that are not fp32. */
int quill_gemm_f32(const void* x, int xdt, int64_t M, int64_t ldx, const void* W, int wdt, const void* bias,
                   int bdt, const void* residual, void* y, int ydt, int64_t ldy, int64_t N, int64_t K, int act,
                   int nthreads) {
    if (xdt != F32) return -3;
    if (M <= 0 || N <= 0) return 0;
    int64_t np = N / (FG_NR * FG_TASKS_A_THREAD * (nthreads > 0 ? nthreads : 1));
    np = np < 1 ? 1 : np > FG_MAX_PANELS ? FG_MAX_PANELS : np;
    struct gemm_f32_job job = {(const float*)x, M, ldx, K, W, wdt, bias, bdt, residual, y, ydt, ldy, N, np * FG_NR, act, 0};
    pool_run(gemm_f32_task, &job, (N + job.nc - 1) / job.nc, nthreads);
    return job.err ? -1 : 0;
}

struct attn_job {
    const void* qkv; int dt; int64_t H, D, ldq; void *kc, *vc; int cdt; int64_t sb, sh, sl; const int64_t* pos;
    int64_t pos0; float scale; void* out; int64_t ldo; _Atomic int err;
};

static inline float dot_row(const float* q, const void* kl, int dt, int64_t D) {
    __m256 a = _mm256_setzero_ps();
    int64_t d = 0;
    if (dt == F32) for (; d + 8 <= D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), VLOAD_F32((const float*)kl + d), a);
    else if (dt == BF16) for (; d + 8 <= D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), VLOAD_BF16((const uint16_t*)kl + d), a);
    else for (; d + 8 <= D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), VLOAD_F16((const uint16_t*)kl + d), a);
    float acc = hsum(a);
    for (; d < D; d++) acc += q[d] * ld(kl, dt, d);
    return acc;
}

/* The sums of eight vectors' lanes as one vector: lane j = the sum of a_j's lanes. */
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* One query (fp32, pre-scaled) against keys and values 0..L-1 of one head (element d of position l at
   byte offset l * sl + d * size of cdt): s gets the softmax weights, out[o0 + d] the output, rounded to dt.
   Eight positions' scores at a time, each its own accumulator (one FMA chain over a position's dims waits
   on the FMA's latency at every step); the output 64 dims at a time in eight accumulators over the
   positions. Inlined with cdt a constant, so vld's dtype choice leaves the loops. */
static inline __attribute__((always_inline)) void attend(const float* q, const char* kb, const char* vb, int64_t sl,
                                                         int cdt, int64_t L, int64_t D, float* s, void* out,
                                                         int dt, int64_t o0) {
    const int64_t D8 = D & ~(int64_t)7;
    int64_t l = 0;
    for (; l + 8 <= L; l += 8) {
        const char* k = kb + l * sl;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t d = 0; d < D8; d += 8) {
            const __m256 u = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(u, vld(k, cdt, d), a0); a1 = _mm256_fmadd_ps(u, vld(k + sl, cdt, d), a1);
            a2 = _mm256_fmadd_ps(u, vld(k + 2 * sl, cdt, d), a2); a3 = _mm256_fmadd_ps(u, vld(k + 3 * sl, cdt, d), a3);
            a4 = _mm256_fmadd_ps(u, vld(k + 4 * sl, cdt, d), a4); a5 = _mm256_fmadd_ps(u, vld(k + 5 * sl, cdt, d), a5);
            a6 = _mm256_fmadd_ps(u, vld(k + 6 * sl, cdt, d), a6); a7 = _mm256_fmadd_ps(u, vld(k + 7 * sl, cdt, d), a7);
        }
        _mm256_storeu_ps(s + l, hsum8(a0, a1, a2, a3, a4, a5, a6, a7));
        for (int64_t d = D8; d < D; d++)
            for (int i = 0; i < 8; i++) s[l + i] += q[d] * ld(k + i * sl, cdt, d);
    }
    for (; l < L; l++) s[l] = dot_row(q, kb + l * sl, cdt, D);
    float mx = -INFINITY;
    for (l = 0; l < L; l++) mx = s[l] > mx ? s[l] : mx;
    __m256 vs = _mm256_setzero_ps(), vm = _mm256_set1_ps(mx);
    for (l = 0; l + 8 <= L; l += 8) {
        __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + l), vm));
        _mm256_storeu_ps(s + l, e);
        vs = _mm256_add_ps(vs, e);
    }
    float sum = hsum(vs);
    for (; l < L; l++) { s[l] = expf(s[l] - mx); sum += s[l]; }
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (l = 0; l < L; l++) {
            const char* v = vb + l * sl;
            const __m256 w = _mm256_broadcast_ss(s + l);
            a0 = _mm256_fmadd_ps(w, vld(v, cdt, d), a0); a1 = _mm256_fmadd_ps(w, vld(v, cdt, d + 8), a1);
            a2 = _mm256_fmadd_ps(w, vld(v, cdt, d + 16), a2); a3 = _mm256_fmadd_ps(w, vld(v, cdt, d + 24), a3);
            a4 = _mm256_fmadd_ps(w, vld(v, cdt, d + 32), a4); a5 = _mm256_fmadd_ps(w, vld(v, cdt, d + 40), a5);
            a6 = _mm256_fmadd_ps(w, vld(v, cdt, d + 48), a6); a7 = _mm256_fmadd_ps(w, vld(v, cdt, d + 56), a7);
        }
        vst(out, dt, o0 + d, _mm256_mul_ps(a0, inv)); vst(out, dt, o0 + d + 8, _mm256_mul_ps(a1, inv));
        vst(out, dt, o0 + d + 16, _mm256_mul_ps(a2, inv)); vst(out, dt, o0 + d + 24, _mm256_mul_ps(a3, inv));
        vst(out, dt, o0 + d + 32, _mm256_mul_ps(a4, inv)); vst(out, dt, o0 + d + 40, _mm256_mul_ps(a5, inv));
        vst(out, dt, o0 + d + 48, _mm256_mul_ps(a6, inv)); vst(out, dt, o0 + d + 56, _mm256_mul_ps(a7, inv));
    }
    for (; d + 8 <= D; d += 8) {
        __m256 a = _mm256_setzero_ps();
        for (l = 0; l < L; l++) a = _mm256_fmadd_ps(_mm256_broadcast_ss(s + l), vld(vb + l * sl, cdt, d), a);
        vst(out, dt, o0 + d, _mm256_mul_ps(a, inv));
    }
    for (; d < D; d++) {
        float a = 0.f;
        for (l = 0; l < L; l++) a += s[l] * ld(vb + l * sl, cdt, d);
        st(out, dt, o0 + d, a * _mm256_cvtss_f32(inv));
    }
}

static void attn_task(void* ctx, int64_t t) {
    struct attn_job* j = (struct attn_job*)ctx;
    const int dt = j->dt, cdt = j->cdt;
    const int64_t H = j->H, D = j->D, C = H * D, esz = dsize(dt), csz = dsize(cdt);
    const int64_t b = t / H, h = t % H, p = j->pos ? j->pos[b] : j->pos0, L = p + 1;
    const char* row = (const char*)j->qkv + (b * j->ldq) * esz;
    char* kbase = (char*)j->kc + (b * j->sb + h * j->sh) * csz;
    char* vbase = (char*)j->vc + (b * j->sb + h * j->sh) * csz;
    const int64_t sl = j->sl * csz;
    float* buf = scratch(D + L);
    if (!buf) { j->err = -1; return; }
    float *q = buf, *s = buf + D;
    if (cdt == dt) {
        memcpy(kbase + p * sl, row + (C + h * D) * esz, D * esz);
        memcpy(vbase + p * sl, row + (2 * C + h * D) * esz, D * esz);
    } else {  /* a cache of its own dtype (bf16 for an fp32-activation int8 model): round on the way in */
        widen(q, row, dt, C + h * D, D);  /* (q as the staging row: it is filled below) */
        narrow(kbase + p * sl, cdt, 0, q, D);
        widen(q, row, dt, 2 * C + h * D, D);
        narrow(vbase + p * sl, cdt, 0, q, D);
    }
    for (int64_t d = 0; d < D; d++) q[d] = ld(row, dt, h * D + d) * j->scale;
    const int64_t o0 = b * j->ldo + h * D;
    switch (cdt) {
        case F32: attend(q, kbase, vbase, sl, F32, L, D, s, j->out, dt, o0); break;
        case BF16: attend(q, kbase, vbase, sl, BF16, L, D, s, j->out, dt, o0); break;
        default: attend(q, kbase, vbase, sl, F16, L, D, s, j->out, dt, o0); break;
    }
}

/* One new token per row: write its key and value at position pos[b] (or pos0) of the cache, then attend
   over positions 0..pos. qkv: [B, 3*H*D] (q | k | v) with row stride ldq; caches: element (b, h, l, d) at
   b*sb + h*sh + l*sl + d, dtype cdt; out: [B, H*D] with row stride ldo. qkv and out in dtype dt; arithmetic
   in fp32. */
int quill_attn_decode(const void* qkv, int dt, int64_t B, int64_t H, int64_t D, int64_t ldq,
                      void* kc, void* vc, int cdt, int64_t sb, int64_t sh, int64_t sl,
                      const int64_t* pos, int64_t pos0, float scale, void* out, int64_t ldo, int nthreads);
static int attn_run(const void* qkv, int dt, int64_t B, int64_t H, int64_t D, int64_t ldq,
                    void* kc, void* vc, int cdt, int64_t sb, int64_t sh, int64_t sl,
                    const int64_t* pos, int64_t pos0, float scale, void* out, int64_t ldo, int nthreads) {
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) work += (pos ? pos[b] : pos0) + 1;
    struct attn_job job = {qkv, dt, H, D, ldq, kc, vc, cdt, sb, sh, sl, pos, pos0, scale, out, ldo, 0};
    pool_run(attn_task, &job, B * H, work * H * D >= (1 << 15) ? nthreads : 1);
    return job.err;
}

int quill_attn_decode(const void* qkv, int dt, int64_t B, int64_t H, int64_t D, int64_t ldq,
                      void* kc, void* vc, int cdt, int64_t sb, int64_t sh, int64_t sl,
                      const int64_t* pos, int64_t pos0, float scale, void* out, int64_t ldo, int nthreads) {
    return attn_run(qkv, dt, B, H, D, ldq, kc, vc, cdt, sb, sh, sl, pos, pos0, scale, out, ldo, nthreads);
}

/* ---- causal attention over a prompt (prefill) -------------------------------------------------------------
   One task per (batch row, head, block of PQ queries). The block's scores against every key it may see are
   computed as a matrix [L, PQ] (keys down, queries across: each key element is broadcast against PQ queries
   in three vectors, 12 accumulators), softmaxed down the columns in vectors, then multiplied into V six query
   rows by 16 dims at a time. Two passes over an exact score block instead of an online softmax: a block is at
   most 1024 keys (96 KB), which stays in L2. It replaces torch's flash kernel for causal prompts, which is
   slower on these CPUs (docs/performance.md). */
/* A query block's causal softmax weights, unnormalised: s holds scores [L keys][W queries] (W a multiple of 8),
   query i at position p0 + i sees keys 0..p0 + i. Each column becomes exp(score - column max), the masked keys
   exactly 0; z (when not NULL) gets the column sums. */
static void causal_exp(float* s, int64_t L, int64_t W, int64_t p0, float* z) {
    for (int64_t l = p0 + 1; l < L; l++)  /* the causal mask: key l is after queries 0..l - p0 - 1 */
        for (int64_t i = 0; i < l - p0; i++) s[l * W + i] = -INFINITY;
    for (int64_t c = 0; c < W; c += 8) {  /* down each column, eight queries at a time */
        __m256 mx = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
        for (int64_t l = 0; l < L; l++) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + l * W + c));
        for (int64_t l = 0; l < L; l++) {
            const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + l * W + c), mx));
            _mm256_storeu_ps(s + l * W + c, e);
            sum = _mm256_add_ps(sum, e);
        }
        if (z) _mm256_storeu_ps(z + c, sum);
    }
    for (int64_t l = p0 + 1; l < L; l++)  /* exp_neg clamps at -87: masked weights to exactly 0 (the sums */
        for (int64_t i = 0; i < l - p0; i++) s[l * W + i] = 0.f;  /* took e^-87 each: below fp32's resolution) */
}

/* The bound of the integer scores' int16 queries and keys for D dims: D products of two values up to it sum
   exactly in int32 (vpmaddwd's pairs, then int32 adds). */
static float attn_qmax(int64_t D) {
    const double m = floor(sqrt(2147483647.0 / (double)D));
    return (float)(m < 32767.0 ? m : 32767.0);
}

/* Keys as int16 for the prefill attention's integer scores: each key of each head (a row of D, any float dtype)
   scaled so that its largest |value| becomes attn_qmax(D), rounded to nearest even. k: element (b, h, l, d) at
   b*ksb + h*ksh + l*ksl + d; kq [B, H, L, D] and ks [B, H, L] contiguous. One task per (b, h). */
struct keys_job { const void* k; int kdt; int64_t ksb, ksh, ksl, H, L, D; int16_t* kq; float* ks; _Atomic int err; };
static void keys_task(void* ctx, int64_t t) {
    struct keys_job* j = (struct keys_job*)ctx;
    float* r = scratch(j->D);
    if (!r) { j->err = -1; return; }
    const int64_t b = t / j->H, h = t % j->H, D = j->D;
    const float qmax = attn_qmax(D);
    for (int64_t l = 0; l < j->L; l++) {
        widen(r, j->k, j->kdt, b * j->ksb + h * j->ksh + l * j->ksl, D);
        quantize_i16(r, D, j->kq + (t * j->L + l) * D, j->ks + t * j->L + l, qmax);
    }
}

#define PQ 24
struct prefill_job {
    const float *q, *k, *v; float* out;
    const int16_t* kq; const float* ks;  /* the keys as int16 (keys_task) where not NULL; else k */
    int64_t H, T, D, start, nqb;
    int64_t qsb, qsh, qst, ksb, ksh, ksl, vsb, vsh, vsl;
    float scale; _Atomic int err;
};

/* A query block's scores s [L keys][PQ queries] in fp32: q^T qt [D, PQ] pre-scaled, keys kb (row stride ksl). */
static void scores_f32(const float* qt, const float* kb, int64_t ksl, int64_t L, int64_t D, float* s) {
    int64_t l = 0;
    for (; l + 4 <= L; l += 4) {
        const float *k0 = kb + l * ksl, *k1 = k0 + ksl, *k2 = k1 + ksl, *k3 = k2 + ksl;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0;
        __m256 c0 = a0, c1 = a0, c2 = a0, e0 = a0, e1 = a0, e2 = a0;
        for (int64_t d = 0; d < D; d++) {
            const float* qd = qt + d * PQ;
            const __m256 u0 = _mm256_loadu_ps(qd), u1 = _mm256_loadu_ps(qd + 8), u2 = _mm256_loadu_ps(qd + 16);
            __m256 c = _mm256_broadcast_ss(k0 + d);
            a0 = _mm256_fmadd_ps(c, u0, a0); a1 = _mm256_fmadd_ps(c, u1, a1); a2 = _mm256_fmadd_ps(c, u2, a2);
            c = _mm256_broadcast_ss(k1 + d);
            b0 = _mm256_fmadd_ps(c, u0, b0); b1 = _mm256_fmadd_ps(c, u1, b1); b2 = _mm256_fmadd_ps(c, u2, b2);
            c = _mm256_broadcast_ss(k2 + d);
            c0 = _mm256_fmadd_ps(c, u0, c0); c1 = _mm256_fmadd_ps(c, u1, c1); c2 = _mm256_fmadd_ps(c, u2, c2);
            c = _mm256_broadcast_ss(k3 + d);
            e0 = _mm256_fmadd_ps(c, u0, e0); e1 = _mm256_fmadd_ps(c, u1, e1); e2 = _mm256_fmadd_ps(c, u2, e2);
        }
        float* r = s + l * PQ;
        _mm256_storeu_ps(r, a0); _mm256_storeu_ps(r + 8, a1); _mm256_storeu_ps(r + 16, a2);
        _mm256_storeu_ps(r + PQ, b0); _mm256_storeu_ps(r + PQ + 8, b1); _mm256_storeu_ps(r + PQ + 16, b2);
        _mm256_storeu_ps(r + 2 * PQ, c0); _mm256_storeu_ps(r + 2 * PQ + 8, c1); _mm256_storeu_ps(r + 2 * PQ + 16, c2);
        _mm256_storeu_ps(r + 3 * PQ, e0); _mm256_storeu_ps(r + 3 * PQ + 8, e1); _mm256_storeu_ps(r + 3 * PQ + 16, e2);
    }
    for (; l < L; l++) {
        const float* k0 = kb + l * ksl;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0;
        for (int64_t d = 0; d < D; d++) {
            const __m256 c = _mm256_broadcast_ss(k0 + d);
            a0 = _mm256_fmadd_ps(c, _mm256_loadu_ps(qt + d * PQ), a0);
            a1 = _mm256_fmadd_ps(c, _mm256_loadu_ps(qt + d * PQ + 8), a1);
            a2 = _mm256_fmadd_ps(c, _mm256_loadu_ps(qt + d * PQ + 16), a2);
        }
        _mm256_storeu_ps(s + l * PQ, a0); _mm256_storeu_ps(s + l * PQ + 8, a1); _mm256_storeu_ps(s + l * PQ + 16, a2);
    }
}

/* The same scores from int16 queries and keys (vpmaddwd: twice the products of an FMA an instruction): qt holds
   the queries' pairs of dims, [D/2][PQ][2], qs their scales times the softmax scale; kq the keys [L][D] with
   their scales ks. Exact integer dot products, then one rounding to fp32. */
static inline __m256 scale_dot(__m256i acc, const float* qs, float ks) {
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(qs)), _mm256_set1_ps(ks));
}
static void scores_i16(const int16_t* qt, const float* qs, const int16_t* kq, const float* ks, int64_t L, int64_t D,
                       float* s) {
    int64_t l = 0;
    for (; l + 3 <= L; l += 3) {  /* three keys against the block's 24 queries: 9 accumulators, as the int8 GEMM */
        const int16_t *x0 = kq + l * D, *x1 = x0 + D, *x2 = x1 + D;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0, c0 = a0, c1 = a0, c2 = a0;
        for (int64_t k = 0; k < D; k += 2) {
            const __m256i* qd = (const __m256i*)(qt + k * PQ);
            const __m256i u0 = _mm256_loadu_si256(qd), u1 = _mm256_loadu_si256(qd + 1), u2 = _mm256_loadu_si256(qd + 2);
            I16_ROW3(a0, a1, a2, x0);
            I16_ROW3(b0, b1, b2, x1);
            I16_ROW3(c0, c1, c2, x2);
            __asm__("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(b0), "+x"(b1), "+x"(b2), "+x"(c0), "+x"(c1), "+x"(c2));
        }
        const __m256i acc[9] = {a0, a1, a2, b0, b1, b2, c0, c1, c2};
        for (int i = 0; i < 9; i++)
            _mm256_storeu_ps(s + (l + i / 3) * PQ + i % 3 * 8, scale_dot(acc[i], qs + i % 3 * 8, ks[l + i / 3]));
    }
    for (; l < L; l++) {
        const int16_t* x0 = kq + l * D;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0;
        for (int64_t k = 0; k < D; k += 2) {
            const __m256i* qd = (const __m256i*)(qt + k * PQ);
            const __m256i u0 = _mm256_loadu_si256(qd), u1 = _mm256_loadu_si256(qd + 1), u2 = _mm256_loadu_si256(qd + 2);
            I16_ROW3(a0, a1, a2, x0);
        }
        const __m256i acc[3] = {a0, a1, a2};
        for (int i = 0; i < 3; i++) _mm256_storeu_ps(s + l * PQ + i * 8, scale_dot(acc[i], qs + i * 8, ks[l]));
    }
}

static void prefill_task(void* ctx, int64_t t) {
    struct prefill_job* j = (struct prefill_job*)ctx;
    const int64_t D = j->D, qb = t % j->nqb, h = t / j->nqb % j->H, b = t / j->nqb / j->H;
    const int64_t i0 = qb * PQ, nq = j->T - i0 < PQ ? j->T - i0 : PQ;
    const int64_t p0 = j->start + i0, L = p0 + nq;  /* query i sits at position p0 + i and sees keys 0..p0 + i */
    /* + PQ: the last six-row group reads past the block's end; + PQ + D: the integer path's scales and row */
    float* buf = scratch(PQ * D + PQ * L + 2 * PQ + D);
    if (!buf) { j->err = -1; return; }
    float *qt = buf, *s = buf + PQ * D;             /* q^T [D, PQ] pre-scaled; scores, then weights [L, PQ] */
    const float* q = j->q + b * j->qsb + h * j->qsh + i0 * j->qst;
    if (j->kq) {  /* q^T as int16 pairs [D/2][PQ][2], one scale a query */
        float* qs = s + PQ * L + PQ;
        int16_t* row = (int16_t*)(qs + PQ);
        int16_t* qt2 = (int16_t*)qt;
        const float qmax = attn_qmax(D);
        for (int64_t i = 0; i < PQ; i++) {
            if (i < nq) {
                quantize_i16(q + i * j->qst, D, row, qs + i, qmax);
                qs[i] *= j->scale;
            } else {
                memset(row, 0, (size_t)D * sizeof(int16_t));
                qs[i] = 0.f;
            }
            for (int64_t d = 0; d < D; d += 2) memcpy(qt2 + d * PQ + 2 * i, row + d, 4);
        }
        scores_i16(qt2, qs, j->kq + (b * j->H + h) * (j->start + j->T) * D, j->ks + (b * j->H + h) * (j->start + j->T),
                   L, D, s);
    } else {
        for (int64_t d = 0; d < D; d++)
            for (int64_t i = 0; i < PQ; i++) qt[d * PQ + i] = i < nq ? q[i * j->qst + d] * j->scale : 0.f;
        scores_f32(qt, j->k + b * j->ksb + h * j->ksh, j->ksl, L, D, s);
    }
    float inv[PQ];
    causal_exp(s, L, PQ, p0, inv);
    for (int i = 0; i < PQ; i++) inv[i] = 1.f / inv[i];
    const float* vb = j->v + b * j->vsb + h * j->vsh;
    const int64_t vsl = j->vsl, ost = j->H * D;
    float* ob = j->out + ((b * j->T + i0) * j->H + h) * D;
    for (int64_t i = 0; i < nq; i += 6) {  /* six query rows x 16 dims: 12 accumulators */
        const int64_t Li = p0 + (i + 6 < nq ? i + 6 : nq);  /* keys the group's last row sees */
        for (int64_t d = 0; d < D; d += 16) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0;
            __m256 e0 = a0, e1 = a0, f0 = a0, f1 = a0, g0 = a0, g1 = a0;
            for (int64_t l = 0; l < Li; l++) {
                const float *vl = vb + l * vsl + d, *p = s + l * PQ + i;
                const __m256 u0 = _mm256_loadu_ps(vl), u1 = _mm256_loadu_ps(vl + 8);
                __m256 c = _mm256_broadcast_ss(p);
                a0 = _mm256_fmadd_ps(c, u0, a0); a1 = _mm256_fmadd_ps(c, u1, a1);
                c = _mm256_broadcast_ss(p + 1); b0 = _mm256_fmadd_ps(c, u0, b0); b1 = _mm256_fmadd_ps(c, u1, b1);
                c = _mm256_broadcast_ss(p + 2); c0 = _mm256_fmadd_ps(c, u0, c0); c1 = _mm256_fmadd_ps(c, u1, c1);
                c = _mm256_broadcast_ss(p + 3); e0 = _mm256_fmadd_ps(c, u0, e0); e1 = _mm256_fmadd_ps(c, u1, e1);
                c = _mm256_broadcast_ss(p + 4); f0 = _mm256_fmadd_ps(c, u0, f0); f1 = _mm256_fmadd_ps(c, u1, f1);
                c = _mm256_broadcast_ss(p + 5); g0 = _mm256_fmadd_ps(c, u0, g0); g1 = _mm256_fmadd_ps(c, u1, g1);
            }
            const __m256 acc[12] = {a0, a1, b0, b1, c0, c1, e0, e1, f0, f1, g0, g1};
            for (int64_t r = 0; r < 6 && i + r < nq; r++) {
                const __m256 w = _mm256_set1_ps(inv[i + r]);
                float* o = ob + (i + r) * ost + d;
                _mm256_storeu_ps(o, _mm256_mul_ps(acc[2 * r], w));
                _mm256_storeu_ps(o + 8, _mm256_mul_ps(acc[2 * r + 1], w));
            }
        }
    }
}

/* Causal attention of T queries at positions start..start+T-1 over keys 0..start+T-1: q and v fp32, k of dtype
   kdt. fp32 keys give fp32 scores; keys of a half dtype (a bf16 or int8 model's cache, already rounded to 8 or
   11 bits) give integer scores from int16 queries and keys, one scale a row (keys_task), at twice
   the FMA's rate. q: element (b, h, t, d) at b*qsb + h*qsh + t*qst + d; k and v likewise with their strides
   (keys l = 0..); out: [B, T, H, D] contiguous. D a multiple of 16. Returns -1 when out of memory. */
int quill_attn_prefill(const float* q, int64_t qsb, int64_t qsh, int64_t qst,
                       const void* k, int kdt, int64_t ksb, int64_t ksh, int64_t ksl,
                       const float* v, int64_t vsb, int64_t vsh, int64_t vsl,
                       int64_t B, int64_t H, int64_t T, int64_t D, int64_t start, float scale, float* out,
                       int nthreads) {
    const int64_t nqb = (T + PQ - 1) / PQ, L = start + T;
    int16_t* kq = NULL;
    float* ks = NULL;
    if (kdt != F32) {
        kq = (int16_t*)malloc((size_t)(B * H * L * D) * sizeof(int16_t));
        ks = (float*)malloc((size_t)(B * H * L) * sizeof(float));
        struct keys_job keys = {k, kdt, ksb, ksh, ksl, H, L, D, kq, ks, 0};
        if (kq && ks) pool_run(keys_task, &keys, B * H, nthreads);
        if (!kq || !ks || keys.err) { free(kq); free(ks); return -1; }
    }
    struct prefill_job job = {q, kq ? NULL : (const float*)k, v, out, kq, ks, H, T, D, start, nqb, qsb, qsh, qst,
                              ksb, ksh, ksl, vsb, vsh, vsl, scale, 0};
    pool_run(prefill_task, &job, B * H * nqb, nthreads);
    free(kq);
    free(ks);
    return job.err;
}

/* ---- a whole decode step --------------------------------------------------------------------------------
   `plan` describes the model as int64 words, laid out as quill.h's QK_PLAN_* / QK_LAYER_* say.
   One call runs embedding, every block and the head for B rows, one token each. */
/* ---- causal attention of many queries on vdpbf16ps (AVX-512 BF16), for bf16 keys and values (a bf16 or int8
   model's cache). The queries are scaled, then rounded to bf16; scores, softmax and output sums are fp32; the
   weights are rounded to bf16 and normalised by the sum of the rounded weights. A task is AB queries of one
   head. Scores: lanes are queries, a key's pair of dims broadcast against the queries' pairs (q^T repacked as
   [D/2][AB][2]). Output: lanes are dims, a query's pair of weights ([keys/2][AB][2]) broadcast against two
   keys' values side by side (V repacked as [keys/2][D][2]), so the rows come out as the output stores them. */
#if HAVE_BF16DP
#define AB 32  /* queries a task: two vectors of 16 */
#define AK 8   /* keys a block of scores: 16 accumulators */
#define AQ 4   /* queries a block of output, against up to AV vectors of 16 dims: 16 accumulators */
#define AV 4
struct attn_bf16_job {
    const void* q; int qdt; const uint16_t *k, *v; void* out; int odt;
    int64_t H, T, D, start, nqb, qsb, qsh, qst, ksb, ksh, ksl, vsb, vsh, vsl;
    float scale; _Atomic int err;
};

static inline __m512bh bcast_pair(const uint16_t* p) { int32_t u; memcpy(&u, p, 4); return (__m512bh)_mm512_set1_epi32(u); }

/* Scores of NK keys (rows of k, stride ksl) against the task's queries: s[r][0..AB) */
static inline __attribute__((always_inline)) void attn_scores(const uint16_t* qt, const uint16_t* k, int64_t ksl,
                                                              int64_t D, float* s, const int NK) {
    __m512 a[AK][2];
    _Pragma("GCC unroll 8") for (int r = 0; r < NK; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 2) {
        const __m512bh u0 = ld_bh(qt + d * AB), u1 = ld_bh(qt + d * AB + 32);
        _Pragma("GCC unroll 8") for (int r = 0; r < NK; r++) {
            const __m512bh c = bcast_pair(k + r * ksl + d);
            a[r][0] = _mm512_dpbf16_ps(a[r][0], c, u0);
            a[r][1] = _mm512_dpbf16_ps(a[r][1], c, u1);
        }
        _Pragma("GCC unroll 8") for (int r = 0; r < NK; r++) { IN_REGISTER(a[r][0]); IN_REGISTER(a[r][1]); }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < NK; r++) {
        _mm512_storeu_ps(s + r * AB, a[r][0]);
        _mm512_storeu_ps(s + r * AB + 16, a[r][1]);
    }
}

/* Output rows of queries i..i+AQ, dims [16 dv, 16 (dv + NV)): sum over key pairs, times zinv; o: [AQ][D] */
static inline __attribute__((always_inline)) void attn_values(const uint16_t* pw, const uint16_t* vp, int64_t L2,
                                                              int64_t D, int64_t i, int64_t dv, const float* zinv,
                                                              float* o, const int NV) {
    __m512 a[AQ][AV];
    _Pragma("GCC unroll 4") for (int r = 0; r < AQ; r++)
        _Pragma("GCC unroll 4") for (int c = 0; c < NV; c++) a[r][c] = _mm512_setzero_ps();
    for (int64_t lp = 0; lp < L2; lp++) {
        __m512bh w[AV];
        _Pragma("GCC unroll 4") for (int c = 0; c < NV; c++) w[c] = ld_bh(vp + (lp * D + 16 * (dv + c)) * 2);
        _Pragma("GCC unroll 4") for (int r = 0; r < AQ; r++) {
            const __m512bh p = bcast_pair(pw + (lp * AB + i + r) * 2);
            _Pragma("GCC unroll 4") for (int c = 0; c < NV; c++) a[r][c] = _mm512_dpbf16_ps(a[r][c], p, w[c]);
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < AQ; r++)
            _Pragma("GCC unroll 4") for (int c = 0; c < NV; c++) IN_REGISTER(a[r][c]);
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < AQ; r++)
        _Pragma("GCC unroll 4") for (int c = 0; c < NV; c++)
            _mm512_storeu_ps(o + r * D + 16 * (dv + c), _mm512_mul_ps(a[r][c], _mm512_set1_ps(zinv[i + r])));
}

static void attn_bf16_task(void* ctx, int64_t t) {
    struct attn_bf16_job* j = (struct attn_bf16_job*)ctx;
    const int64_t D = j->D, qb = t % j->nqb, h = t / j->nqb % j->H, b = t / j->nqb / j->H;
    const int64_t i0 = qb * AB, nq = j->T - i0 < AB ? j->T - i0 : AB;
    const int64_t p0 = j->start + i0, L = p0 + nq, L2 = (L + 1) / 2;  /* query i sees keys 0..p0 + i */
    float* buf = scratch(AB * L + AQ * D + AB + (D * AB + 2 * L2 * AB + 2 * L2 * D + D) / 2);
    if (!buf) { j->err = -1; return; }
    /* fp32: scores, then weights [L][AB]; AQ output rows; 1 / the weights' sums. bf16: q^T pairs, weight pairs,
       V pairs, one query row */
    float *s = buf, *o = s + AB * L, *zinv = o + AQ * D;
    uint16_t *qt = (uint16_t*)(zinv + AB), *pw = qt + D * AB, *vp = pw + 2 * L2 * AB, *qrow = vp + 2 * L2 * D;
    for (int64_t i = 0; i < AB; i++) {  /* q^T pairs, scaled and rounded; queries past T are zeros */
        if (i < nq) {
            widen(o, j->q, j->qdt, b * j->qsb + h * j->qsh + (i0 + i) * j->qst, D);
            for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), _mm256_set1_ps(j->scale)));
            to_bf16(o, D, qrow);
        }
        for (int64_t d = 0; d < D; d += 2) memcpy(qt + (d / 2 * AB + i) * 2, i < nq ? qrow + d : (const uint16_t[2]){0, 0}, 4);
    }
    const uint16_t* kb = j->k + b * j->ksb + h * j->ksh;
    int64_t l = 0;
    for (; l + AK <= L; l += AK) attn_scores(qt, kb + l * j->ksl, j->ksl, D, s + l * AB, AK);
    for (; l < L; l++) attn_scores(qt, kb + l * j->ksl, j->ksl, D, s + l * AB, 1);
    causal_exp(s, L, AB, p0, NULL);
    /* weights to bf16, two keys side by side per query ([L2][AB][2], an odd last key paired with a zero), and
       the sums of the rounded weights */
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512 z[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t lp = 0; lp < L2; lp++)
        for (int c = 0; c < 2; c++) {
            const float* e = s + 2 * lp * AB + 16 * c;
            const __m512 e0 = _mm512_loadu_ps(e), e1 = 2 * lp + 1 < L ? _mm512_loadu_ps(e + AB) : _mm512_setzero_ps();
            const __m512i w = _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            _mm512_storeu_si512((void*)(pw + (lp * AB + 16 * c) * 2), w);
            z[c] = _mm512_add_ps(z[c], _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)),
                                                     _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u)))));
        }
    _mm512_storeu_ps(zinv, _mm512_div_ps(_mm512_set1_ps(1.f), z[0]));
    _mm512_storeu_ps(zinv + 16, _mm512_div_ps(_mm512_set1_ps(1.f), z[1]));
    const uint16_t* vb = j->v + b * j->vsb + h * j->vsh;
    const __m512i rows = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                          39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    for (int64_t lp = 0; lp < L2; lp++)  /* V pairs: keys 2lp and 2lp + 1 side by side per dim, 16 dims a vector */
        for (int64_t d = 0; d < D; d += 16) {
            const __m512i r0 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(vb + 2 * lp * j->vsl + d)));
            const __m512i r1 = 2 * lp + 1 < L ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(vb + (2 * lp + 1) * j->vsl + d)))
                                              : _mm512_setzero_si512();
            _mm512_storeu_si512((void*)(vp + (lp * D + d) * 2), _mm512_permutex2var_epi16(r0, rows, r1));
        }
    for (int64_t i = 0; i < nq; i += AQ) {
        int64_t dv = 0;
        for (; dv + AV <= D / 16; dv += AV) attn_values(pw, vp, L2, D, i, dv, zinv, o, AV);
        for (; dv < D / 16; dv++) attn_values(pw, vp, L2, D, i, dv, zinv, o, 1);
        for (int64_t r = 0; r < AQ && i + r < nq; r++)
            narrow(j->out, j->odt, ((b * j->T + i0 + i + r) * j->H + h) * D, o + r * D, D);
    }
}
#endif

/* quill_attn_prefill on vdpbf16ps, for bf16 k and v (q of any float dtype): out [B, T, H, D] contiguous of dtype
   odt. D a multiple of 16. Returns -1 when out of memory, -2 where this variant has no vdpbf16ps. */
int quill_attn_prefill_bf16(const void* q, int qdt, int64_t qsb, int64_t qsh, int64_t qst,
                            const uint16_t* k, int64_t ksb, int64_t ksh, int64_t ksl,
                            const uint16_t* v, int64_t vsb, int64_t vsh, int64_t vsl,
                            int64_t B, int64_t H, int64_t T, int64_t D, int64_t start, float scale, void* out, int odt,
                            int nthreads) {
#if HAVE_BF16DP
    const int64_t nqb = (T + AB - 1) / AB;
    struct attn_bf16_job job = {q, qdt, k, v, out, odt, H, T, D, start, nqb, qsb, qsh, qst, ksb, ksh, ksl,
                                vsb, vsh, vsl, scale, 0};
    pool_run(attn_bf16_task, &job, B * H * nqb, nthreads);
    return job.err;
#else
    (void)q; (void)qdt; (void)qsb; (void)qsh; (void)qst; (void)k; (void)ksb; (void)ksh; (void)ksl; (void)v;
    (void)vsb; (void)vsh; (void)vsl; (void)B; (void)H; (void)T; (void)D; (void)start; (void)scale; (void)out;
    (void)odt; (void)nthreads;
    return -2;
#endif
}

static inline float f32_bits(int64_t w) { uint32_t u = (uint32_t)w; float f; memcpy(&f, &u, 4); return f; }

static int lin(const void* x, int xdt, int64_t M, const int64_t* l, const void* res, void* y, int ydt,
               int64_t N, int64_t K, int nt, const int64_t* ln, float eps, int act) {
    return linear_run(x, xdt, M, K, (const void*)l[QK_LIN_WEIGHT], (int)l[QK_LIN_DTYPE], (const float*)l[QK_LIN_SCALE],
                      (const void*)l[QK_LIN_BIAS], (int)l[QK_LIN_BIAS_DTYPE], res, y, ydt, N, N, K, nt,
                      ln ? (const void*)ln[QK_NORM_WEIGHT] : NULL, ln ? (const void*)ln[QK_NORM_BIAS] : NULL,
                      ln ? (int)ln[QK_NORM_DTYPE] : 0, eps, act, (const int32_t*)l[QK_LIN_SUMS]);
}

/* Per-part wall time of decode steps (ns), summed while QUILL_PROFILE=1: embed, qkv, attention, attention
   projection, MLP up, MLP down, head; read and reset with quill_step_profile. */
static int prof_on = -1;
static int64_t prof_ns[8];
static inline int64_t now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
#define PROF(i, stmt) do { if (prof_on) { int64_t t0_ = now_ns(); stmt; prof_ns[i] += now_ns() - t0_; } else { stmt; } } while (0)
void quill_step_profile(int64_t* out) { for (int i = 0; i < 8; i++) { out[i] = prof_ns[i]; prof_ns[i] = 0; } }

int quill_decode_step(const int64_t* plan, int64_t B, const int64_t* tokens, const int64_t* pos, int64_t pos0,
                      char* kbase, char* vbase, int cdt, int64_t layer_stride, int64_t sb, int64_t sh, int64_t sl,
                      void* x, void* qkv, void* att, void* hidden, void* logits, int logits_dt, int nt) {
    if (prof_on < 0) { const char* e = getenv("QUILL_PROFILE"); prof_on = e && atoi(e); }
    const int64_t t_embed = prof_on ? now_ns() : 0;
    const int64_t L = plan[QK_PLAN_N_LAYER], C = plan[QK_PLAN_C], H = plan[QK_PLAN_H], I = plan[QK_PLAN_INNER];
    const int64_t V = plan[QK_PLAN_V];
    const int act = (int)plan[QK_PLAN_ACT], adt = (int)plan[QK_PLAN_DTYPE];
    const float eps = f32_bits(plan[QK_PLAN_EPS]);
    const void *wte = (const void*)plan[QK_PLAN_WTE], *wpe = (const void*)plan[QK_PLAN_WPE];
    const int wte_dt = (int)plan[QK_PLAN_WTE_DTYPE], wpe_dt = (int)plan[QK_PLAN_WPE_DTYPE];
    const int64_t csz = dsize(cdt);
    /* embedding: x = wte[token] + wpe[pos] */
    for (int64_t b = 0; b < B; b++) {
        const int64_t t = tokens[b], p = pos ? pos[b] : pos0;
        for (int64_t c = 0; c < C; c++)
            st(x, adt, b * C + c, ld(wte, wte_dt, t * C + c) + ld(wpe, wpe_dt, p * C + c));
    }
    if (prof_on) prof_ns[0] += now_ns() - t_embed;
    int rc = 0;
    for (int64_t i = 0; i < L && !rc; i++) {
        const int64_t* l = plan + QK_PLAN_HEADER + i * QK_PLAN_LAYER;
        PROF(1, rc |= lin(x, adt, B, l + QK_LAYER_QKV, NULL, qkv, adt, 3 * C, C, nt, l + QK_LAYER_LN_1, eps, ACT_NONE));
        PROF(2, rc |= attn_run(qkv, adt, B, H, C / H, 3 * C, kbase + i * layer_stride * csz,
                               vbase + i * layer_stride * csz, cdt, sb, sh, sl, pos, pos0, f32_bits(l[QK_LAYER_ATTN_SCALE]), att, C, nt));
        PROF(3, rc |= lin(att, adt, B, l + QK_LAYER_ATTN_PROJ, x, x, adt, C, C, nt, NULL, eps, ACT_NONE));
        PROF(4, rc |= lin(x, adt, B, l + QK_LAYER_FC, NULL, hidden, adt, I, C, nt, l + QK_LAYER_LN_2, eps, act));
        PROF(5, rc |= lin(hidden, adt, B, l + QK_LAYER_MLP_PROJ, x, x, adt, C, I, nt, NULL, eps, ACT_NONE));
    }
    if (!rc) PROF(6, rc = lin(x, adt, B, plan + QK_PLAN_LM_HEAD, NULL, logits, logits_dt, V, C, nt,
                                   plan + QK_PLAN_LN_F, eps, ACT_NONE));
    return rc;
}

/* Index of the largest value of each row of x [M, N] (row stride ldx): the first one on ties, as torch.argmax;
   NaN counts as the largest. Single-threaded on purpose: one vocabulary-wide row costs less than waking
   threads (torch's argmax runs it on OpenMP threads, which then spin and steal the core from the next step;
   docs/performance.md, "Everything around the kernels"). */
void quill_argmax(const void* x, int dt, int64_t M, int64_t N, int64_t ldx, int64_t* out) {
    for (int64_t m = 0; m < M; m++) {
        const int64_t o = m * ldx;
        int64_t best = 0, n = 1;
        float bv = ld(x, dt, o);
        if (bv != bv) { out[m] = 0; continue; }
        for (; n + 8 <= N; n += 8) {  /* skip blocks with nothing larger (bf16/fp16 widened to fp32 8 at a time) */
            __m256 v = vld(x, dt, o + n);
            __m256 gt = _mm256_or_ps(_mm256_cmp_ps(v, _mm256_set1_ps(bv), _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            if (_mm256_movemask_ps(gt)) {
                for (int64_t i = n; i < n + 8; i++) {
                    const float r = ld(x, dt, o + i);
                    if (r != r) { best = i; goto done; }
                    if (r > bv) { bv = r; best = i; }
                }
            }
        }
        for (; n < N; n++) {
            const float r = ld(x, dt, o + n);
            if (r != r) { best = n; goto done; }
            if (r > bv) { bv = r; best = n; }
        }
    done:
        out[m] = best;
    }
}

/* quill_argmax with banned ids per row (ids ban_ids[ban_off[m]:ban_off[m+1]] of row m): as torch's
   index_fill(-inf) then argmax. The banned entries are set to -inf for the scan and restored bit for bit. */
#define MAX_BANS QK_MAX_BANS
void quill_argmax_banned(void* x, int dt, int64_t M, int64_t N, int64_t ldx, int64_t* out,
                         const int64_t* ban_off, const int64_t* ban_ids) {
    const int64_t esz = dsize(dt);
    for (int64_t m = 0; m < M; m++) {
        const int64_t b0 = ban_off[m], nb = ban_off[m + 1] - b0;
        char* row = (char*)x + m * ldx * esz;
        uint32_t saved[MAX_BANS];
        const int64_t ns = nb < MAX_BANS ? nb : MAX_BANS;  /* more bans than that: the caller uses torch */
        for (int64_t i = 0; i < ns; i++) {
            memcpy(&saved[i], row + ban_ids[b0 + i] * esz, esz);
            st(row, dt, ban_ids[b0 + i], -INFINITY);
        }
        quill_argmax(row, dt, 1, N, ldx, out + m);
        for (int64_t i = ns - 1; i >= 0; i--) memcpy(row + ban_ids[b0 + i] * esz, &saved[i], esz);
    }
}

/* Greedy decoding without returning between steps: each row's next token is the argmax of its logits with
   its banned ids skipped (quill_argmax_banned), fed straight into the next step, up to `steps` steps. The burst
   ends early after a step where a row picked one of its stop ids (stop_ids[stop_off[b]:stop_off[b+1]]), where
   *interrupt is nonzero (another thread asks for the batch), or once CLOCK_MONOTONIC has passed deadline_ns.
   Each step runs the rows in calls of `chunk` rows (the buffers x..hidden hold that many; a batch that
   outgrows the caches runs faster as two halves: quill.kernels.plan). Step s's tokens go to
   out[s * B:(s + 1) * B]. The Python between two steps costs more than its own time: after a step has
   streamed the weights, its every object is cache-cold (docs/performance.md). Returns the steps done, or -1
   when out of memory. */
int64_t quill_decode_greedy(const int64_t* plan, int64_t B, const int64_t* tokens, const int64_t* pos, int64_t pos0,
                            char* kbase, char* vbase, int cdt, int64_t layer_stride, int64_t sb, int64_t sh, int64_t sl,
                            void* x, void* qkv, void* att, void* hidden, void* logits, int logits_dt, int nt,
                            int64_t chunk, const int64_t* ban_off, const int64_t* ban_ids, const int64_t* stop_off,
                            const int64_t* stop_ids, int64_t steps, int64_t deadline_ns, const int* interrupt,
                            int64_t* out) {
    int64_t* state = malloc(2 * B * sizeof(int64_t));  /* the rows' tokens, then their positions */
    if (!state) return -1;
    int64_t *cur = state, *at = pos ? state + B : NULL;
    memcpy(cur, tokens, B * sizeof(int64_t));
    if (at) memcpy(at, pos, B * sizeof(int64_t));
    const int64_t V = plan[QK_PLAN_V], csz = dsize(cdt), lsz = dsize(logits_dt);
    int64_t s = 0;
    for (int stop = 0; s < steps && !stop;) {
        int rc = 0;
        for (int64_t r0 = 0; r0 < B && !rc; r0 += chunk)
            rc = quill_decode_step(plan, B - r0 < chunk ? B - r0 : chunk, cur + r0, at ? at + r0 : NULL, pos0 + s,
                                   kbase + r0 * sb * csz, vbase + r0 * sb * csz, cdt, layer_stride, sb, sh, sl, x,
                                   qkv, att, hidden, (char*)logits + r0 * V * lsz, logits_dt, nt);
        if (rc) { s = -1; break; }
        quill_argmax_banned(logits, logits_dt, B, V, V, out + s * B, ban_off, ban_ids);
        for (int64_t b = 0; b < B; b++) {
            cur[b] = out[s * B + b];
            if (at) at[b]++;
            for (int64_t i = stop_off[b]; i < stop_off[b + 1]; i++) stop |= stop_ids[i] == cur[b];
        }
        s++;
        stop |= (interrupt && __atomic_load_n(interrupt, __ATOMIC_RELAXED)) || now_ns() >= deadline_ns;
    }
    free(state);
    return s;
}

/* dst[i] = src[i] where bit i of `bits` is set (nbits ids, bit i of byte i / 8: a grammar engine's token
   bitmask), else -inf; ids at or past nbits are -inf. For a constrained row's logits [N]: a grammar state
   mostly allows a few tokens, so whole clear (and whole set) 32-id words take the store-only path. */
void quill_mask_bits(const float* src, const uint8_t* bits, int64_t nbits, float* dst, int64_t N) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const int64_t n = nbits < N ? nbits : N;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint32_t w;
        memcpy(&w, bits + i / 8, 4);
        for (int j = 0; j < 4; j++) {
            const uint32_t b = (w >> (8 * j)) & 0xff;
            __m256 v;
            if (b == 0) v = ninf;
            else if (b == 0xff) v = _mm256_loadu_ps(src + i + 8 * j);
            else {  /* lane k keeps src where bit k of b is set */
                const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)b), sel), sel);
                v = _mm256_blendv_ps(ninf, _mm256_loadu_ps(src + i + 8 * j), _mm256_castsi256_ps(keep));
            }
            _mm256_storeu_ps(dst + i + 8 * j, v);
        }
    }
    for (; i < n; i++) dst[i] = (bits[i / 8] >> (i % 8)) & 1 ? src[i] : -INFINITY;
    for (; i < N; i++) dst[i] = -INFINITY;
}

/* quill_argmax over the ids whose bit is set in `bits` (below nbits; bit i of byte i / 8) and not in
   ban[0:nban] (short): the first largest, NaN the largest, as an argmax over the masked row; -1 when no such
   id has a logit above -inf (the masked row's argmax is then no allowed id). 8-id groups with no bit set are
   skipped, whole groups compared 8 at a time. */
int64_t quill_argmax_bits(const float* x, const uint8_t* bits, int64_t nbits, const int64_t* ban, int64_t nban) {
    int64_t best = -1;
    float bv = -INFINITY;
    for (int64_t g = 0; g * 8 < nbits; g++) {
        unsigned b = bits[g];
        if (nbits - g * 8 < 8) b &= (1u << (nbits - g * 8)) - 1;
        if (!b) continue;
        if (b == 0xff && best >= 0) {  /* nothing larger (or NaN) among the 8: skip them */
            const __m256 v = _mm256_loadu_ps(x + g * 8);
            const __m256 gt = _mm256_or_ps(_mm256_cmp_ps(v, _mm256_set1_ps(bv), _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            if (!_mm256_movemask_ps(gt)) continue;
        }
        for (; b; b &= b - 1) {
            const int64_t i = g * 8 + __builtin_ctz(b);
            const float r = x[i];
            if (best >= 0 && !(r > bv) && r == r) continue;
            int banned = 0;
            for (int64_t j = 0; j < nban; j++) banned |= ban[j] == i;
            if (banned) continue;
            if (r != r) return i;
            best = i;
            bv = r;
        }
    }
    return bv > -INFINITY ? best : -1;
}

/* The ids whose bit is set in `bits` (below nbits), ascending, into ids[0:cap]; returns how many are set, which
   may be more than cap (then ids holds the first cap). A grammar state mostly allows a handful of tokens. */
int64_t quill_bits_ids(const uint8_t* bits, int64_t nbits, int64_t* ids, int64_t cap) {
    int64_t count = 0;
    for (int64_t w = 0; w * 64 < nbits; w++) {
        uint64_t word = 0;
        const int64_t nbytes = (nbits - w * 64 + 7) / 8;
        memcpy(&word, bits + w * 8, nbytes < 8 ? nbytes : 8);
        if (nbits - w * 64 < 64) word &= (UINT64_C(1) << (nbits - w * 64)) - 1;
        for (; word; word &= word - 1, count++)
            if (count < cap) ids[count] = w * 64 + __builtin_ctzll(word);
    }
    return count;
}

