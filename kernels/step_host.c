/* ddengine.kernels._step: the fused sampler step (kernels/step.h) and Philox noise (kernels/philox.h) for CPU.
 * Work is split into (image, block of DD_BLOCK elements) items whose boundaries do not depend on the thread
 * count, and every element is a pure function of its inputs, so results are bit-identical for any batch
 * size, thread count and ISA clone (no FP contraction: -ffp-contract=off). A multistep row runs the body of its
 * shape (kernels/step.h dd_shape); -DDD_GENERAL_BODY builds the general body instead (the tests' oracle).
 */
#define _GNU_SOURCE 1 /* sched_getaffinity */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "step.h"

#define DD_BLOCK 2048                 /* elements per work item; a multiple of 4 (one Philox quad) */
#define DD_MIN_PARALLEL (1 << 16)     /* below this many elements threads cost more than they save */
#define DD_MAX_THREADS 256

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(DD_NO_CLONES)
#define DD_CLONES_ON 1
#define DD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DD_CLONES
#endif

/* ---------------------------------------------------------------- the kernels */

/* Philox outputs of quads q0..q0+nq-1 as four arrays (word k of quad q0+j in r[k][j]). */
static void philox_scalar(dd_u64 seed, dd_u64 q0, int j, int nq, dd_u32 step, dd_u32 domain, dd_u32 *r[4])
{
    for (; j < nq; j++) {
        dd_u64 q = q0 + (dd_u64)j;
        dd_u32 c[4] = {(dd_u32)q, (dd_u32)(q >> 32), step, domain};
        dd_philox4x32_10(c, (dd_u32)seed, (dd_u32)(seed >> 32));
        for (int k = 0; k < 4; k++)
            r[k][j] = c[k];
    }
}

#if defined(DD_CLONES_ON)
#include <immintrin.h>

/* W quads per vector, one per 64-bit lane: the 32x32->64 multiply (vpmuludq) reads only the low half of a
 * lane, so the high halves may hold garbage until the outputs are truncated to 32 bits. Integer arithmetic,
 * so bit-identical to dd_philox4x32_10. */
#define DD_PHILOX_SIMD(NAME, TARGET, W, V, SET1_64, SET1_32, IOTA, ADD64, XOR, MUL, SRLI, STORE_LO32)        \
    __attribute__((target(TARGET))) static void NAME(dd_u64 seed, dd_u64 q0, int nq, dd_u32 step,            \
                                                     dd_u32 domain, dd_u32 *r[4])                            \
    {                                                                                                        \
        const V m0 = SET1_64((long long)DD_PHILOX_M0), m1 = SET1_64((long long)DD_PHILOX_M1);                \
        V keys[10][2];                                                                                       \
        dd_u32 k0 = (dd_u32)seed, k1 = (dd_u32)(seed >> 32);                                                 \
        for (int round = 0; round < 10; round++, k0 += DD_PHILOX_W0, k1 += DD_PHILOX_W1) {                   \
            keys[round][0] = SET1_32((int)k0);                                                               \
            keys[round][1] = SET1_32((int)k1);                                                               \
        }                                                                                                    \
        int j = 0;                                                                                           \
        for (; j + 2 * W <= nq; j += 2 * W) { /* two independent vectors: the rounds are latency-bound */     \
            V qa = ADD64(SET1_64((long long)(q0 + (dd_u64)j)), IOTA);                                        \
            V qb = ADD64(SET1_64((long long)(q0 + (dd_u64)j + W)), IOTA);                                    \
            V a0 = qa, a1 = SRLI(qa, 32), a2 = SET1_64((long long)step), a3 = SET1_64((long long)domain);    \
            V b0 = qb, b1 = SRLI(qb, 32), b2 = a2, b3 = a3;                                                  \
            for (int round = 0; round < 10; round++) {                                                       \
                V pa0 = MUL(a0, m0), pa1 = MUL(a2, m1), pb0 = MUL(b0, m0), pb1 = MUL(b2, m1);                \
                a0 = XOR(XOR(SRLI(pa1, 32), a1), keys[round][0]);                                            \
                b0 = XOR(XOR(SRLI(pb1, 32), b1), keys[round][0]);                                            \
                a2 = XOR(XOR(SRLI(pa0, 32), a3), keys[round][1]);                                            \
                b2 = XOR(XOR(SRLI(pb0, 32), b3), keys[round][1]);                                            \
                a1 = pa1, b1 = pb1, a3 = pa0, b3 = pb0;                                                      \
            }                                                                                                \
            STORE_LO32(r[0] + j, a0), STORE_LO32(r[0] + j + W, b0);                                          \
            STORE_LO32(r[1] + j, a1), STORE_LO32(r[1] + j + W, b1);                                          \
            STORE_LO32(r[2] + j, a2), STORE_LO32(r[2] + j + W, b2);                                          \
            STORE_LO32(r[3] + j, a3), STORE_LO32(r[3] + j + W, b3);                                          \
        }                                                                                                    \
        philox_scalar(seed, q0, j, nq, step, domain, r);                                                     \
    }

#define DD_IOTA_256 _mm256_set_epi64x(3, 2, 1, 0)
#define DD_IOTA_512 _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0)
/* The low 32 bits of each 64-bit lane, stored as W consecutive uint32. */
#define DD_STORE_LO32_256(p, v)                                                                              \
    _mm_storeu_si128((__m128i *)(p), _mm256_castsi256_si128(                                                 \
                                         _mm256_permutevar8x32_epi32((v), _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0))))
#define DD_STORE_LO32_512(p, v) _mm256_storeu_si256((__m256i *)(p), _mm512_cvtepi64_epi32(v))
DD_PHILOX_SIMD(philox_avx2, "avx2", 4, __m256i, _mm256_set1_epi64x, _mm256_set1_epi32, DD_IOTA_256,
               _mm256_add_epi64, _mm256_xor_si256, _mm256_mul_epu32, _mm256_srli_epi64, DD_STORE_LO32_256)
DD_PHILOX_SIMD(philox_avx512, "avx512f", 8, __m512i, _mm512_set1_epi64, _mm512_set1_epi32, DD_IOTA_512,
               _mm512_add_epi64, _mm512_xor_si512, _mm512_mul_epu32, _mm512_srli_epi64, DD_STORE_LO32_512)
#endif

/* Philox outputs of quads q0..q0+nq-1, on the widest integer SIMD this CPU has. */
static void philox_block(dd_u64 seed, dd_u64 q0, int nq, dd_u32 step, dd_u32 domain, dd_u32 *r[4])
{
#if defined(DD_CLONES_ON)
#if !defined(DD_NO_AVX512)
    if (__builtin_cpu_supports("avx512f"))
        philox_avx512(seed, q0, nq, step, domain, r);
    else
#endif
    if (__builtin_cpu_supports("avx2"))
        philox_avx2(seed, q0, nq, step, domain, r);
    else
#endif
        philox_scalar(seed, q0, 0, nq, step, domain, r);
}

/* Box-Muller of each quad's pairs (r0, r1), (r2, r3) into z[4j..4j+3]. */
DD_CLONES static void box_muller_block(const dd_u32 *restrict r0, const dd_u32 *restrict r1,
                                       const dd_u32 *restrict r2, const dd_u32 *restrict r3, int nq,
                                       float *restrict z)
{
    for (int j = 0; j < nq; j++) {
        dd_box_muller(r0[j], r1[j], &z[4 * j], &z[4 * j + 1]);
        dd_box_muller(r2[j], r3[j], &z[4 * j + 2], &z[4 * j + 3]);
    }
}

/* Normals for quads q0..q0+nq-1 (elements 4*q0 ..) into z. */
static void noise_block(dd_u64 seed, dd_u64 q0, int nq, dd_u32 step, dd_u32 domain, float *restrict z)
{
    dd_u32 words[4][DD_BLOCK / 4];
    dd_u32 *r[4] = {words[0], words[1], words[2], words[3]};
    philox_block(seed, q0, nq, step, domain, r);
    box_muller_block(r[0], r[1], r[2], r[3], nq, z);
}

/* The slots (L, H0, H1, H2) of one block of one image, and where its x0 goes. */
typedef struct {
    float *l, *h0, *h1, *h2, *x0;
} block_slots;

/* x[i] <- step(x[i], m[i]) (+ sigma z[i]) for n elements of one image; returns 1 if an input or result is
 * non-finite. Specialised by inlining on the constant flags (c = conditional output, u = unconditional). With
 * `multi`, the general multistep program (dd_step_terms), only built with DD_GENERAL_BODY. */
static inline __attribute__((always_inline)) dd_u32
step_loop(float *restrict x, const float *restrict c, const float *restrict u, const float *restrict z, int n,
          const float *restrict table_row, float g, block_slots sl, const int guided, const int use_clip,
          const int noisy, const int multi, const int keep_x0)
{
    float row[DD_NUM_COLUMNS];
    memcpy(row, table_row, sizeof(row));
    /* the slots are read in the loop and written after it from d_new/s_new: a branch-free, vectorizable body; a
     * slot the row does not read is the zero block (cache-resident), so a 2M row streams one history slot, not four */
    static const float zeros[DD_BLOCK];
    const float *restrict l = multi && dd_reads_l(row) ? sl.l : zeros;
    const float *restrict h0 = multi && dd_reads_h(row, 0) ? sl.h0 : zeros;
    const float *restrict h1 = multi && dd_reads_h(row, 1) ? sl.h1 : zeros;
    const float *restrict h2 = multi && dd_reads_h(row, 2) ? sl.h2 : zeros;
    float *restrict x0o = sl.x0;
    float d_new[multi ? DD_BLOCK : 1], s_new[multi ? DD_BLOCK : 1];
    dd_u32 bad = 0;
    for (int i = 0; i < n; i++) {
        float m = guided ? dd_guide(u[i], c[i], g) : c[i];
        float x0 = dd_x0(x[i], m, row, use_clip);
        float y;
        if (multi) {
            float d, s;
            y = dd_step_terms(x[i], m, x0, row, l[i], h0[i], h1[i], h2[i], &d, &s);
            d_new[i] = d;
            s_new[i] = s;
        } else {
            y = dd_step_mean(x[i], m, x0, row);
        }
        if (noisy)
            y = y + row[DD_SIGMA] * z[i];
        if (keep_x0)
            x0o[i] = x0;
        bad |= dd_nonfinite(c[i]) | (guided ? dd_nonfinite(u[i]) : 0u) | dd_nonfinite(y);
        x[i] = y;
    }
    if (multi) {
        const int w = dd_write_slot(row);
        if (row[DD_WRITE_S] != 0.0f)
            memcpy(sl.l, s_new, (size_t)n * sizeof(float));
        if (w >= 0)
            memcpy(w == 0 ? sl.h0 : w == 1 ? sl.h1 : sl.h2, d_new, (size_t)n * sizeof(float));
    }
    return bad;
}

/* Where a multistep block reads and writes: L and the shape's read slots (the zero block where the row does not
 * read one), and where s and d go (L, H[write_d], or a scratch block the row never reads). */
typedef struct {
    const float *l, *h[3];
    float *lw, *hw, *x0;
} multi_io;

/* A multistep row's body of shape (has_s, kp0, kpx, kpe, nh) (kernels/step.h dd_step_shaped) over n elements,
 * slots updated in the loop: an element reads its slots before it writes them and no element touches another's,
 * hence ivdep (the slot pointers may be equal: a PLMS row reads H0 and writes it). A row that does not clip has
 * r = +inf, where dd_clip is the identity (the noisy / keep_x0 bodies clip always). */
static inline __attribute__((always_inline)) dd_u32
shaped_loop(float *restrict x, const float *restrict c, const float *restrict u, const float *restrict z, int n,
            const float *restrict table_row, float g, const dd_shape *shape, multi_io io, const int guided,
            const int use_clip, const int noisy, const int keep_x0, const int has_s, const int kp0, const int kpx,
            const int kpe, const int nh)
{
    float row[DD_NUM_COLUMNS];
    memcpy(row, table_row, sizeof(row));
    row[DD_CLIP] = row[DD_CLIP] > 0.0f ? row[DD_CLIP] : __builtin_inff();
    const dd_shape k = *shape;
    const float *l = io.l, *h0 = io.h[0], *h1 = io.h[1], *h2 = io.h[2];
    float *lw = io.lw, *hw = io.hw, *restrict x0o = io.x0;
    dd_u32 bad = 0;
#pragma GCC ivdep
    for (int i = 0; i < n; i++) {
        float m = guided ? dd_guide(u[i], c[i], g) : c[i];
        float x0 = dd_x0(x[i], m, row, use_clip);
        float d, s;
        float y = dd_step_shaped(x[i], m, x0, row, &k, has_s, kp0, kpx, kpe, nh, has_s ? l[i] : 0.0f,
                                 nh > 0 ? h0[i] : 0.0f, nh > 1 ? h1[i] : 0.0f, nh > 2 ? h2[i] : 0.0f, &d, &s);
        if (noisy)
            y = y + row[DD_SIGMA] * z[i];
        if (keep_x0)
            x0o[i] = x0;
        if (has_s)
            lw[i] = s;
        hw[i] = d;
        bad |= dd_nonfinite(c[i]) | (guided ? dd_nonfinite(u[i]) : 0u) | dd_nonfinite(y);
        x[i] = y;
    }
    return bad;
}

/* The slot pointers of a block of shape k, resolved once. */
static multi_io shaped_io(const float *row, const dd_shape *k, block_slots sl, float *scratch)
{
    static const float zeros[DD_BLOCK];
    float *h[3] = {sl.h0, sl.h1, sl.h2};
    const int w = dd_write_slot(row);
    multi_io io = {dd_reads_l(row) ? sl.l : zeros, {zeros, zeros, zeros}, row[DD_WRITE_S] != 0.0f ? sl.l : scratch,
                   w >= 0 ? h[w] : scratch, sl.x0};
    for (int j = 0; j < k->nh; j++)
        io.h[j] = dd_reads_h(row, k->slot[j]) ? h[k->slot[j]] : zeros;
    return io;
}

/* Body k of the 64 for noiseless steps without x0_out: bit 5 guided, bit 4 clip, bit 3 has_s, bit 2 the variant
 * (with s: x's own terms kept, kp0 = kpx = kpe; without: kp0, and kpx = 1, kpe = 0), bits 0-1 nh. */
#define DD_SHAPED_CASE(k)                                                                                    \
    case k:                                                                                                  \
        return shaped_loop(x, c, u, z, n, row, g, &shape, io, (k) >> 5 & 1, (k) >> 4 & 1, 0, 0, (k) >> 3 & 1,   \
                           (k) >> 2 & 1, (k) >> 3 & 1 ? (k) >> 2 & 1 : 1, (k) >> 3 & 1 ? (k) >> 2 & 1 : 0,   \
                           (k) & 3);
#define DD_SHAPED_CASES8(k)                                                                                  \
    DD_SHAPED_CASE(k) DD_SHAPED_CASE(k + 1) DD_SHAPED_CASE(k + 2) DD_SHAPED_CASE(k + 3) DD_SHAPED_CASE(k + 4)   \
    DD_SHAPED_CASE(k + 5) DD_SHAPED_CASE(k + 6) DD_SHAPED_CASE(k + 7)
/* The general shape of a noisy or x0-keeping step (kernels/step.h dd_step_shape): bit 2 guided, bit 1 noisy,
 * bit 0 keep_x0 (code 0 never comes here). */
#define DD_GENERAL_CASE(k)                                                                                   \
    case k:                                                                                                  \
        return shaped_loop(x, c, u, z, n, row, g, &shape, io, (k) >> 2 & 1, 1, (k) >> 1 & 1, (k) & 1, 1, 1, 1, 1, 3);

/* A multistep block on the body of its step's shape: 64 shaped bodies and 6 general ones. */
static inline __attribute__((always_inline)) dd_u32
shaped_block(float *restrict x, const float *restrict c, const float *restrict u, const float *restrict z, int n,
             const float *row, float g, block_slots sl)
{
    float scratch[DD_BLOCK];
    dd_shape shape;
    dd_step_shape(row, sl.x0 != NULL, &shape);
    const multi_io io = shaped_io(row, &shape, sl, scratch);
    if (z || sl.x0) {
        switch ((u ? 4 : 0) | (z ? 2 : 0) | (sl.x0 ? 1 : 0)) {
            DD_GENERAL_CASE(1) DD_GENERAL_CASE(2) DD_GENERAL_CASE(3)
            DD_GENERAL_CASE(5) DD_GENERAL_CASE(6) DD_GENERAL_CASE(7)
        }
    }
    int code = (u ? 32 : 0) | (row[DD_CLIP] > 0.0f ? 16 : 0) | (shape.has_s ? 8 : 0) | (shape.kp0 ? 4 : 0) | shape.nh;
    switch (code) {
        DD_SHAPED_CASES8(0) DD_SHAPED_CASES8(8) DD_SHAPED_CASES8(16) DD_SHAPED_CASES8(24)
        DD_SHAPED_CASES8(32) DD_SHAPED_CASES8(40) DD_SHAPED_CASES8(48) DD_SHAPED_CASES8(56)
    }
    return 0;
}

#define DD_STEP_CASE(k)                                                                                      \
    case k:                                                                                                  \
        return step_loop(x, c, u, z, n, row, g, sl, (k) >> 4 & 1, (k) >> 3 & 1, (k) >> 2 & 1, (k) >> 1 & 1, (k) & 1);
#define DD_STEP_CASES4(k) DD_STEP_CASE(k) DD_STEP_CASE(k + 1) DD_STEP_CASE(k + 2) DD_STEP_CASE(k + 3)
/* single-step rows: codes with bit 1 (multi) clear; the general multistep body only in the oracle build */
#if defined(DD_GENERAL_BODY)
#define DD_STEP_CASES8(k) DD_STEP_CASES4(k) DD_STEP_CASES4(k + 4)
#else
#define DD_STEP_CASES8(k) DD_STEP_CASE(k) DD_STEP_CASE(k + 1) DD_STEP_CASE(k + 4) DD_STEP_CASE(k + 5)
#endif

DD_CLONES static dd_u32 step_block(float *restrict x, const float *restrict c, const float *restrict u,
                                   const float *restrict z, int n, const float *row, float g, block_slots sl)
{
    int multi = sl.l != NULL && dd_is_multistep(row);
#if !defined(DD_GENERAL_BODY)
    if (multi)
        return shaped_block(x, c, u, z, n, row, g, sl);
#endif
    int code = (u ? 16 : 0) | (row[DD_CLIP] > 0.0f ? 8 : 0) | (z ? 4 : 0) | (multi ? 2 : 0) | (sl.x0 ? 1 : 0);
    switch (code) {
        DD_STEP_CASES8(0) DD_STEP_CASES8(8) DD_STEP_CASES8(16) DD_STEP_CASES8(24)
    }
    return 0;
}

/* ---------------------------------------------------------------- work items */

typedef struct {
    dd_step_args a;
    const dd_u64 *seeds;      /* fill_noise only */
    Py_ssize_t blocks_per_image, items;
    int fill;                 /* 1: fill_noise (x_T into a.x), 0: step */
    atomic_llong next;
} job_t;

static void run_item(job_t *job, Py_ssize_t item)
{
    float z[DD_BLOCK];
    const dd_step_args *a = &job->a;
    Py_ssize_t img = item / job->blocks_per_image;
    Py_ssize_t e0 = (item % job->blocks_per_image) * DD_BLOCK;
    Py_ssize_t left = a->per_image - e0;
    int n = left < DD_BLOCK ? (int)left : DD_BLOCK;
    float *x = a->x + img * a->per_image + e0;
    if (job->fill) {
        noise_block(job->seeds[img], (dd_u64)e0 / 4, (n + 3) / 4, 0u, DD_DOMAIN_INIT, z);
        memcpy(x, z, (size_t)n * sizeof(float));
        return;
    }
    dd_image *im = &a->images[img];
    const float *row = a->table + (Py_ssize_t)DD_NUM_COLUMNS * im->row;
    int noisy = row[DD_SIGMA] != 0.0f;
    if (noisy)
        noise_block(im->seed, (dd_u64)e0 / 4, (n + 3) / 4, im->step, DD_DOMAIN_STEP, z);
    const float *c = a->model_out + img * a->per_image + e0;
    const float *u = im->uncond >= 0 ? a->model_out + (Py_ssize_t)im->uncond * a->per_image + e0 : NULL;
    block_slots sl = {NULL, NULL, NULL, NULL, a->x0_out ? a->x0_out + img * a->per_image + e0 : NULL};
    if (a->slots) {
        float *base = a->slots + img * DD_SLOTS * a->per_image + e0;
        sl.l = base, sl.h0 = base + a->per_image, sl.h1 = base + 2 * a->per_image, sl.h2 = base + 3 * a->per_image;
    }
    if (step_block(x, c, u, noisy ? z : NULL, n, row, im->guidance, sl)) {
        dd_i32 none = -1; /* the first failing step wins; threads of one step store the same value */
        __atomic_compare_exchange_n(&im->nonfinite_step, &none, (dd_i32)im->step, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    }
}

static void worker(job_t *job)
{
    for (;;) {
        long long item = atomic_fetch_add(&job->next, 1);
        if (item >= job->items)
            return;
        run_item(job, (Py_ssize_t)item);
    }
}

/* ---------------------------------------------------------------- the persistent thread pool */

/* Helper threads started once and parked on a condition variable between jobs: a call costs a wake-up, not a
 * pthread_create. One job at a time runs on the pool; a caller that finds it busy runs its job alone (same
 * result: items are independent of the thread count). */
static struct {
    pthread_mutex_t busy;     /* held by the caller whose job is on the pool */
    pthread_mutex_t mu;       /* guards the fields below */
    pthread_cond_t wake, idle;
    job_t *job;
    unsigned long generation; /* bumped per job: helpers 0..wanted-1 take part */
    int size, wanted, running;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          NULL, 0, 0, 0, 0};

static void *pool_thread(void *arg)
{
    int id = (int)(intptr_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.generation == seen)
            pthread_cond_wait(&pool.wake, &pool.mu);
        seen = pool.generation;
        if (id >= pool.wanted)
            continue;
        job_t *job = pool.job;
        pthread_mutex_unlock(&pool.mu);
        worker(job);
        pthread_mutex_lock(&pool.mu);
        if (--pool.running == 0)
            pthread_cond_signal(&pool.idle);
    }
    return NULL;
}

/* Start helpers until there are `n` (fewer if the system refuses threads). Called with pool.busy held. */
static void pool_grow(int n)
{
    while (pool.size < n) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&tid, &attr, pool_thread, (void *)(intptr_t)pool.size);
        pthread_attr_destroy(&attr);
        if (failed)
            return;
        pthread_mutex_lock(&pool.mu);
        pool.size++;
        pthread_mutex_unlock(&pool.mu);
    }
}

static void pool_prepare_fork(void)
{
    pthread_mutex_lock(&pool.busy);
    pthread_mutex_lock(&pool.mu);
}

static void pool_parent_after_fork(void)
{
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.busy);
}

/* A forked child has none of the helpers: start from an empty pool. */
static void pool_child_after_fork(void)
{
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.idle, NULL);
    pool.job = NULL;
    pool.size = pool.wanted = pool.running = 0;
}

/* Cores this process may run on (its affinity mask), else the online count. */
static int cpu_count(void)
{
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (int)n;
}

/* Runs all items on up to `threads` threads (0 = all cores); the caller has released the GIL. */
static void run_job(job_t *job, Py_ssize_t threads)
{
    atomic_init(&job->next, 0);
    Py_ssize_t n = 1;
    if (job->a.batch * job->a.per_image >= DD_MIN_PARALLEL) {
        n = threads == 0 ? cpu_count() : threads; /* sysconf costs microseconds: only for large jobs */
        n = n > job->items ? job->items : n;
        n = n > DD_MAX_THREADS ? DD_MAX_THREADS : n;
    }
    if (n <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        worker(job);
        return;
    }
    pool_grow((int)n - 1);
    pthread_mutex_lock(&pool.mu);
    pool.job = job;
    pool.wanted = pool.running = pool.size < n - 1 ? pool.size : (int)n - 1;
    pool.generation++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    worker(job);
    pthread_mutex_lock(&pool.mu);
    while (pool.running > 0)
        pthread_cond_wait(&pool.idle, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.busy);
}

/* Splits job->a into (image, block) items and runs them with the GIL released. */
static void run_without_gil(job_t *job, Py_ssize_t threads)
{
    job->blocks_per_image = (job->a.per_image + DD_BLOCK - 1) / DD_BLOCK;
    job->items = job->a.batch * job->blocks_per_image;
    if (job->items > 0) {
        Py_BEGIN_ALLOW_THREADS
        run_job(job, threads);
        Py_END_ALLOW_THREADS
    }
}

/* ---------------------------------------------------------------- arguments: memory safety only */

/* A C-contiguous buffer of items of `itemsize` bytes (kind: 'f' float, 'u' unsigned, 0 = any record). The rest
 * of the contract (finite rows, guidance, clip) is validated once at the Python boundary (engine/kernels/host.py). */
static int get_buffer(PyObject *obj, const char *name, char kind, Py_ssize_t itemsize, int writable, Py_buffer *v)
{
    if (PyObject_GetBuffer(obj, v, writable ? PyBUF_RECORDS : PyBUF_RECORDS_RO) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a %scontiguous array, got %.100s", name, writable ? "writable " : "",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *fmt = v->format ? v->format : "B";
    while (*fmt == '@' || *fmt == '=' || *fmt == '<')
        fmt++;
    int kind_ok = kind == 0 || (kind == 'f' && fmt[0] == 'f') || (kind == 'u' && strchr("ILQ", fmt[0]) && fmt[0] != 0);
    if (!kind_ok || v->itemsize != itemsize || v->ndim < 1 || !PyBuffer_IsContiguous(v, 'C')) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous array of %zd-byte %s items (ndim >= 1), got format "
                     "%s, itemsize %zd, ndim %d", name, itemsize, kind == 'f' ? "float" : kind == 'u' ? "uint" : "record",
                     v->format ? v->format : "B", v->itemsize, v->ndim);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

static void release(Py_buffer *views, int n)
{
    for (int i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
}

/* Every image's table row and unconditional row must lie inside the buffers the kernel reads, and a multistep row
 * needs the slots. */
static int check_images(const dd_image *images, Py_ssize_t batch, const float *table, Py_ssize_t table_rows,
                        Py_ssize_t out_rows, int have_slots)
{
    for (Py_ssize_t j = 0; j < batch; j++) {
        if (images[j].row < 0 || images[j].row >= table_rows) {
            PyErr_Format(PyExc_IndexError, "images[%zd].row = %d is outside the table's %zd rows", j, images[j].row,
                         table_rows);
            return -1;
        }
        if (images[j].uncond < -1 || images[j].uncond >= out_rows) {
            PyErr_Format(PyExc_IndexError, "images[%zd].uncond = %d is outside model_out's %zd rows (-1: no guidance)",
                         j, images[j].uncond, out_rows);
            return -1;
        }
        const float *row = table + (Py_ssize_t)DD_NUM_COLUMNS * images[j].row;
        if (!have_slots && dd_is_multistep(row)) {
            PyErr_Format(PyExc_ValueError, "images[%zd] steps with multistep row %d, which needs slots", j, images[j].row);
            return -1;
        }
        float w = row[DD_WRITE_D];
        if (w != -1.0f && w != 0.0f && w != 1.0f && w != 2.0f) {
            char shown[32];
            snprintf(shown, sizeof(shown), "%g", (double)w);
            PyErr_Format(PyExc_ValueError, "table row %d writes history slot %s (expected -1, 0, 1 or 2)", images[j].row,
                         shown);
            return -1;
        }
    }
    return 0;
}

/* Whether two buffers overlap. */
static int overlaps(const Py_buffer *a, const Py_buffer *b)
{
    return (const char *)a->buf < (const char *)b->buf + b->len && (const char *)b->buf < (const char *)a->buf + a->len;
}

static int parse_threads(PyObject *obj, Py_ssize_t *out)
{
    *out = obj == NULL ? 0 : PyLong_AsSsize_t(obj);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    if (*out < 0) {
        PyErr_Format(PyExc_ValueError, "threads must be >= 0 (0 = all cores), got %zd", *out);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- Python API */

PyDoc_STRVAR(step_doc,
"step(x, model_out, table, images, *, slots=None, x0_out=None, threads=0) -> None\n\n"
"One fused sampler step (engine/core/rows.py) in place on float32 x of shape (B, ...). Image j steps with\n"
"coefficient row table[images[j].row], noise Philox4x32-10(images[j].seed, element // 4, images[j].step,\n"
"domain 0) where sigma != 0, conditional output model_out[j] and, where images[j].uncond >= 0, guidance\n"
"u + g (c - u) with u = model_out[uncond]; images[j].nonfinite_step records the first non-finite step.\n"
"slots (B, 4, ...) float32 holds each image's L, H0, H1, H2 for multistep rows; x0_out (B, ...) receives x0.\n"
"images is a writable array of engine/kernels/host.py IMAGE_DTYPE records.");

/* The optional float32 buffer `obj` (None: NULL) of exactly `floats` floats, not overlapping x or model_out. */
static int optional_buffer(PyObject *obj, const char *name, Py_ssize_t floats, Py_buffer *v, const Py_buffer *others,
                           int n_others, float **out)
{
    *out = NULL;
    if (obj == NULL || obj == Py_None)
        return 0;
    if (get_buffer(obj, name, 'f', 4, 1, v) != 0)
        return -1;
    const char *err = v->len / 4 != floats ? "has the wrong size" : NULL;
    for (int i = 0; i < n_others && !err; i++)
        if (overlaps(v, &others[i]))
            err = "must not share memory with x, model_out or the other outputs";
    if (err) {
        PyErr_Format(PyExc_ValueError, "%s %s (expected %zd floats, got %zd)", name, err, floats, v->len / 4);
        PyBuffer_Release(v);
        return -1;
    }
    *out = (float *)v->buf;
    return 1;
}

static PyObject *py_step(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", "model_out", "table", "images", "slots", "x0_out", "threads", NULL};
    PyObject *xo, *mo_o, *table_o, *images_o, *slots_o = NULL, *x0_o = NULL, *thr_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|$OOO:step", kwlist, &xo, &mo_o, &table_o, &images_o, &slots_o,
                                     &x0_o, &thr_o))
        return NULL;
    Py_ssize_t threads;
    if (parse_threads(thr_o, &threads) != 0)
        return NULL;
    Py_buffer v[6]; /* x, model_out, table, images, slots, x0_out */
    int got = 0;
    if (get_buffer(xo, "x", 'f', 4, 1, &v[got]) == 0 && ++got && get_buffer(mo_o, "model_out", 'f', 4, 0, &v[got]) == 0
        && ++got && get_buffer(table_o, "table", 'f', 4, 0, &v[got]) == 0 && ++got
        && get_buffer(images_o, "images", 0, (Py_ssize_t)sizeof(dd_image), 1, &v[got]) == 0)
        got++;
    if (got < 4) {
        release(v, got);
        return NULL;
    }
    Py_ssize_t batch = v[0].shape[0], elements = v[0].len / 4;
    Py_ssize_t per_image = batch ? elements / batch : 0;
    const char *err = NULL;
    if (v[3].len / (Py_ssize_t)sizeof(dd_image) != batch)
        err = "images must hold one record per image of x";
    else if (per_image > 0 && (v[1].len / 4) % per_image != 0)
        err = "model_out must be whole rows of x's per-image size";
    else if (per_image > 0 && v[1].len / 4 / per_image < batch)
        err = "model_out must have at least as many rows as x (row j: image j's output)";
    else if ((v[2].len / 4) % DD_NUM_COLUMNS != 0)
        err = "table must be rows of 25 coefficients (engine/core/rows.py)";
    else if (overlaps(&v[0], &v[1]))
        err = "model_out must not share memory with x";
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        release(v, 4);
        return NULL;
    }
    float *slots = NULL, *x0_out = NULL;
    int r = optional_buffer(slots_o, "slots", elements * DD_SLOTS, &v[got], v, got, &slots);
    got += r > 0;
    if (r >= 0) {
        r = optional_buffer(x0_o, "x0_out", elements, &v[got], v, got, &x0_out);
        got += r > 0;
    }
    Py_ssize_t out_rows = per_image ? v[1].len / 4 / per_image : 0;
    if (r < 0 || check_images((const dd_image *)v[3].buf, batch, (const float *)v[2].buf, v[2].len / 4 / DD_NUM_COLUMNS,
                              out_rows, slots != NULL) != 0) {
        release(v, got);
        return NULL;
    }
    job_t job;
    memset(&job, 0, sizeof(job));
    job.a = (dd_step_args){(float *)v[0].buf, (const float *)v[1].buf, (const float *)v[2].buf,
                           (dd_image *)v[3].buf, slots, x0_out, batch, per_image};
    run_without_gil(&job, threads);
    release(v, got);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(fill_noise_doc,
"fill_noise(out, seeds, *, threads=0) -> None\n\n"
"Fills float32 out of shape (B, ...) in place with the initial noise x_T: Philox4x32-10(seed, element // 4,\n"
"step 0, domain 1) + Box-Muller.");

static PyObject *py_fill_noise(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"out", "seeds", "threads", NULL};
    PyObject *out_o, *seeds_o, *thr_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$O:fill_noise", kwlist, &out_o, &seeds_o, &thr_o))
        return NULL;
    Py_ssize_t threads;
    if (parse_threads(thr_o, &threads) != 0)
        return NULL;
    Py_buffer v[2];
    int got = 0;
    if (get_buffer(out_o, "out", 'f', 4, 1, &v[got]) == 0 && ++got && get_buffer(seeds_o, "seeds", 'u', 8, 0, &v[got]) == 0)
        got++;
    if (got < 2) {
        release(v, got);
        return NULL;
    }
    Py_ssize_t batch = v[0].shape[0];
    if (v[1].len / 8 != batch) {
        PyErr_Format(PyExc_ValueError, "seeds must have B=%zd entries (one per image), got %zd", batch, v[1].len / 8);
        release(v, 2);
        return NULL;
    }
    job_t job;
    memset(&job, 0, sizeof(job));
    Py_ssize_t per_image = batch ? v[0].len / 4 / batch : 0;
    job.a = (dd_step_args){(float *)v[0].buf, NULL, NULL, NULL, NULL, NULL, batch, per_image};
    job.seeds = (const dd_u64 *)v[1].buf;
    job.fill = 1;
    run_without_gil(&job, threads);
    release(v, 2);
    Py_RETURN_NONE;
}

/* An int in [0, 2**32). */
static int parse_u32(PyObject *obj, const char *name, dd_u32 *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if ((v == (unsigned long long)-1 && PyErr_Occurred()) || v > 0xffffffffULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be an int in [0, 2**32), got %R", name, obj);
        return -1;
    }
    *out = (dd_u32)v;
    return 0;
}

/* A sequence of n ints, each in [0, 2**32). */
static int parse_u32s(PyObject *obj, const char *name, int n, dd_u32 *out)
{
    PyObject *seq = PySequence_Fast(obj, "expected a sequence of ints");
    if (seq == NULL || PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be a sequence of %d ints in [0, 2**32)", name, n);
        Py_XDECREF(seq);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (parse_u32(PySequence_Fast_GET_ITEM(seq, i), name, &out[i]) != 0) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

PyDoc_STRVAR(philox_doc,
"philox4x32_10(counter, key) -> (int, int, int, int)\n\n"
"Philox4x32-10 (Salmon et al. 2011) of counter = 4 uint32 under key = 2 uint32.");

static PyObject *py_philox(PyObject *self, PyObject *args)
{
    PyObject *ctr_o, *key_o;
    dd_u32 ctr[4], key[2];
    if (!PyArg_ParseTuple(args, "OO:philox4x32_10", &ctr_o, &key_o) || parse_u32s(ctr_o, "counter", 4, ctr) != 0
        || parse_u32s(key_o, "key", 2, key) != 0)
        return NULL;
    dd_philox4x32_10(ctr, key[0], key[1]);
    return Py_BuildValue("(kkkk)", (unsigned long)ctr[0], (unsigned long)ctr[1], (unsigned long)ctr[2],
                         (unsigned long)ctr[3]);
}

PyDoc_STRVAR(row_shape_doc,
"row_shape(row, *, keep_x0=False) -> dict or None\n\n"
"The body a multistep coefficient row (25 float32) runs (kernels/step.h dd_step_shape, docs/math.md \"Specialised\n"
"bodies\"): has_s, kp0, kpx, kpe, nh, slots (the H slots read), zs and zy (the sign bits of the zeros standing for\n"
"the dropped terms of s and x': 0 for +0.0, 1 for -0.0), general_body (1 in the oracle build, -DDD_GENERAL_BODY,\n"
"whose multistep rows all run the general program); None for a single-step row.");

static PyObject *py_row_shape(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"row", "keep_x0", NULL};
    PyObject *row_o;
    int keep_x0 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$p:row_shape", kwlist, &row_o, &keep_x0))
        return NULL;
    Py_buffer v;
    if (get_buffer(row_o, "row", 'f', 4, 0, &v) != 0)
        return NULL;
    if (v.len / 4 != DD_NUM_COLUMNS) {
        PyErr_Format(PyExc_ValueError, "row must hold %d coefficients, got %zd", DD_NUM_COLUMNS, v.len / 4);
        PyBuffer_Release(&v);
        return NULL;
    }
    float row[DD_NUM_COLUMNS];
    memcpy(row, v.buf, sizeof(row));
    PyBuffer_Release(&v);
    if (!dd_is_multistep(row))
        Py_RETURN_NONE;
    dd_shape k;
    dd_step_shape(row, keep_x0, &k);
#if defined(DD_GENERAL_BODY)
    const int general_body = 1;
#else
    const int general_body = 0;
#endif
    PyObject *slots = PyTuple_New(k.nh);
    for (int j = 0; slots && j < k.nh; j++)
        PyTuple_SET_ITEM(slots, j, PyLong_FromLong(k.slot[j]));
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:N,s:i,s:i,s:i}", "has_s", k.has_s, "kp0", k.kp0, "kpx", k.kpx, "kpe",
                         k.kpe, "nh", k.nh, "slots", slots, "zs", !dd_pos_zero(k.zs), "zy", !dd_pos_zero(k.zy),
                         "general_body", general_body);
}

PyDoc_STRVAR(layout_doc, "layout() -> dict: sizes and field offsets of dd_image and dd_step_args, as compiled.");

static PyObject *py_layout(PyObject *self, PyObject *unused)
{
    return Py_BuildValue(
        "{s:{s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n},s:{s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n}}",
        "dd_image", "size", sizeof(dd_image), "seed", offsetof(dd_image, seed), "row", offsetof(dd_image, row),
        "step", offsetof(dd_image, step), "uncond", offsetof(dd_image, uncond), "guidance",
        offsetof(dd_image, guidance), "nonfinite_step", offsetof(dd_image, nonfinite_step), "noise_scale",
        offsetof(dd_image, noise_scale),
        "dd_step_args", "size", sizeof(dd_step_args), "x", offsetof(dd_step_args, x), "model_out",
        offsetof(dd_step_args, model_out), "table", offsetof(dd_step_args, table), "images",
        offsetof(dd_step_args, images), "slots", offsetof(dd_step_args, slots), "x0_out",
        offsetof(dd_step_args, x0_out), "batch", offsetof(dd_step_args, batch), "per_image",
        offsetof(dd_step_args, per_image));
}

static PyMethodDef methods[] = {
    {"step", (PyCFunction)(void (*)(void))py_step, METH_VARARGS | METH_KEYWORDS, step_doc},
    {"fill_noise", (PyCFunction)(void (*)(void))py_fill_noise, METH_VARARGS | METH_KEYWORDS, fill_noise_doc},
    {"philox4x32_10", py_philox, METH_VARARGS, philox_doc},
    {"layout", py_layout, METH_NOARGS, layout_doc},
    {"row_shape", (PyCFunction)(void (*)(void))py_row_shape, METH_VARARGS | METH_KEYWORDS, row_shape_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ddengine.kernels._step",
    "Fused DDPM/DDIM step and Philox4x32-10 noise on CPU (kernels/step.h, kernels/philox.h).", -1, methods,
};

PyMODINIT_FUNC PyInit__step(void)
{
    static int registered = 0;
    if (!registered && pthread_atfork(pool_prepare_fork, pool_parent_after_fork, pool_child_after_fork) == 0)
        registered = 1;
    return PyModule_Create(&module);
}
