/* ddengine._kernels: the fused sampler step (kernels/ddstep.h) and Philox noise (kernels/philox.h) for CPU.
 * Work is split into (image, block of DD_BLOCK elements) items whose boundaries do not depend on the thread
 * count, and every element is a pure function of its inputs, so results are bit-identical for any batch
 * size, thread count and ISA clone (no FP contraction: -ffp-contract=off).
 */
#define _GNU_SOURCE 1 /* sched_getaffinity */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "ddstep.h"

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

typedef struct {
    float row[DD_NUM_COLUMNS];
    float guidance, clip;
    int guided, use_clip;
} step_params;

/* x[i] <- step(x[i], m[i]) (+ sigma z[i]) for n elements; specialised by inlining on the constant flags. */
static inline __attribute__((always_inline)) void
step_loop(float *restrict x, const float *restrict u, const float *restrict c, const float *restrict z,
          int n, const step_params *prm, const int guided, const int use_clip, const int noisy)
{
    float row[DD_NUM_COLUMNS];
    memcpy(row, prm->row, sizeof(row));
    const float g = prm->guidance, clip = prm->clip;
    for (int i = 0; i < n; i++) {
        float m = guided ? dd_guide(u[i], c[i], g) : u[i];
        x[i] = noisy ? dd_step_noisy(x[i], m, row, use_clip, clip, z[i]) : dd_step_mean(x[i], m, row, use_clip, clip);
    }
}

DD_CLONES static void step_block(float *restrict x, const float *restrict u, const float *restrict c,
                                 const float *restrict z, int n, const step_params *prm)
{
    int code = (prm->guided ? 4 : 0) | (prm->use_clip ? 2 : 0) | (z ? 1 : 0);
    switch (code) {
    case 0: step_loop(x, u, c, z, n, prm, 0, 0, 0); break;
    case 1: step_loop(x, u, c, z, n, prm, 0, 0, 1); break;
    case 2: step_loop(x, u, c, z, n, prm, 0, 1, 0); break;
    case 3: step_loop(x, u, c, z, n, prm, 0, 1, 1); break;
    case 4: step_loop(x, u, c, z, n, prm, 1, 0, 0); break;
    case 5: step_loop(x, u, c, z, n, prm, 1, 0, 1); break;
    case 6: step_loop(x, u, c, z, n, prm, 1, 1, 0); break;
    default: step_loop(x, u, c, z, n, prm, 1, 1, 1); break;
    }
}

/* ---------------------------------------------------------------- work split and threads */

typedef struct {
    float *x;                 /* step: x (B, per_image); fill_noise: out */
    const float *model_out;   /* step only: (B or 2B, per_image) */
    const dd_u64 *seeds;
    Py_ssize_t batch, per_image, blocks_per_image, items;
    dd_u32 step, domain;
    int fill;                 /* 1: fill_noise, 0: step */
    step_params prm;
    atomic_llong next;
} job_t;

static void run_item(job_t *job, Py_ssize_t item)
{
    float z[DD_BLOCK];
    Py_ssize_t img = item / job->blocks_per_image;
    Py_ssize_t e0 = (item % job->blocks_per_image) * DD_BLOCK;
    Py_ssize_t left = job->per_image - e0;
    int n = left < DD_BLOCK ? (int)left : DD_BLOCK;
    float *x = job->x + img * job->per_image + e0;
    int noisy = job->fill || job->prm.row[DD_SIGMA] != 0.0f;
    if (noisy)
        noise_block(job->seeds[img], (dd_u64)e0 / 4, (n + 3) / 4, job->step, job->domain, z);
    if (job->fill) {
        memcpy(x, z, (size_t)n * sizeof(float));
        return;
    }
    const float *u = job->model_out + img * job->per_image + e0;
    const float *c = job->prm.guided ? u + job->batch * job->per_image : NULL;
    step_block(x, u, c, noisy ? z : NULL, n, &job->prm);
}

static void *worker(void *arg)
{
    job_t *job = (job_t *)arg;
    for (;;) {
        long long item = atomic_fetch_add(&job->next, 1);
        if (item >= job->items)
            return NULL;
        run_item(job, (Py_ssize_t)item);
    }
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
    pthread_t tid[DD_MAX_THREADS];
    Py_ssize_t n = 1;
    if (job->batch * job->per_image >= DD_MIN_PARALLEL) {
        n = threads == 0 ? cpu_count() : threads; /* sysconf costs microseconds: only for large jobs */
        if (n > job->items)
            n = job->items;
        if (n > DD_MAX_THREADS)
            n = DD_MAX_THREADS;
    }
    atomic_init(&job->next, 0);
    Py_ssize_t started = 0;
    for (Py_ssize_t t = 1; t < n; t++) {
        if (pthread_create(&tid[started], NULL, worker, job) != 0)
            break; /* fewer threads, same result */
        started++;
    }
    worker(job);
    for (Py_ssize_t t = 0; t < started; t++)
        pthread_join(tid[t], NULL);
}

/* ---------------------------------------------------------------- argument validation */

/* numpy-style name of a buffer format ("float32", "uint64", ...). */
static const char *format_name(const char *fmt, Py_ssize_t itemsize)
{
    if (fmt == NULL)
        return "uint8";
    if (*fmt == '>' || *fmt == '!')
        return "a big-endian type"; /* not native on the little-endian hosts this builds for */
    while (*fmt == '@' || *fmt == '=' || *fmt == '<')
        fmt++;
    if (fmt[0] == '\0' || fmt[1] != '\0')
        return "a structured or unknown type";
    switch (fmt[0]) {
    case '?': return "bool";
    case 'b': return "int8";
    case 'B': return "uint8";
    case 'h': return "int16";
    case 'H': return "uint16";
    case 'i': case 'l': case 'q': return itemsize == 8 ? "int64" : itemsize == 4 ? "int32" : "a signed int";
    case 'I': case 'L': case 'Q': return itemsize == 8 ? "uint64" : itemsize == 4 ? "uint32" : "an unsigned int";
    case 'e': return "float16";
    case 'f': return "float32";
    case 'd': return "float64";
    case 'g': return "longdouble";
    case 'Z': return "a complex type";
    default: return "an unknown type";
    }
}

static int is_format(const Py_buffer *v, const char *want)
{
    return strcmp(format_name(v->format, v->itemsize), want) == 0;
}

static void shape_str(const Py_buffer *v, Py_ssize_t first, char *out, size_t size)
{
    size_t len = (size_t)snprintf(out, size, "(");
    for (int d = 0; d < v->ndim && len < size; d++) {
        Py_ssize_t s = d == 0 ? first : v->shape[d];
        len += (size_t)snprintf(out + len, size - len, d == 0 ? "%zd" : ", %zd", s);
    }
    if (len < size)
        snprintf(out + len, size - len, v->ndim == 1 ? ",)" : ")");
}

/* Gets a buffer of dtype `want`, C-contiguous, ndim >= min_ndim, writable if asked; clear errors otherwise. */
static int get_array(PyObject *obj, const char *name, const char *want, int writable, int min_ndim, Py_buffer *v)
{
    if (PyObject_GetBuffer(obj, v, PyBUF_RECORDS_RO) != 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a %s array (buffer protocol), got %.100s",
                     name, want, Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *err = NULL;
    PyObject *exc = PyExc_ValueError;
    if (!is_format(v, want)) {
        PyErr_Format(PyExc_TypeError, "%s must be %s, got %s", name, want, format_name(v->format, v->itemsize));
        PyBuffer_Release(v);
        return -1;
    }
    if (v->ndim < min_ndim)
        err = "an array with ndim >= 1, got a 0-d array";
    else if (!PyBuffer_IsContiguous(v, 'C'))
        err = "C-contiguous, got a non-contiguous array (use numpy.ascontiguousarray)";
    else if (writable && v->readonly)
        err = "writable, got a read-only array";
    if (err) {
        PyErr_Format(exc, "%s must be %s", name, err);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* seeds: uint64, 1-d, contiguous, exactly `batch` entries. */
static int get_seeds(PyObject *obj, Py_ssize_t batch, Py_buffer *v)
{
    if (get_array(obj, "seeds", "uint64", 0, 1, v) != 0)
        return -1;
    if (v->ndim != 1 || v->shape[0] != batch) {
        PyErr_Format(PyExc_ValueError, "seeds must have B=%zd entries (one per image), got %s%zd", batch,
                     v->ndim != 1 ? "an array of ndim != 1 with size " : "", v->len / 8);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* model_out: same shape as x, first axis B (2B = [unconditional; conditional] with guidance). */
static int check_model_out(const Py_buffer *x, const Py_buffer *mo, int guided)
{
    int ok = mo->ndim == x->ndim && mo->shape[0] == (guided ? 2 : 1) * x->shape[0];
    for (int d = 1; ok && d < x->ndim; d++)
        ok = mo->shape[d] == x->shape[d];
    if (ok)
        return 0;
    char want[256], got[256];
    shape_str(x, (guided ? 2 : 1) * x->shape[0], want, sizeof(want));
    shape_str(mo, mo->shape[0], got, sizeof(got));
    PyErr_Format(PyExc_ValueError, "model_out must have shape %s (%s), got %s", want,
                 guided ? "2B = [unconditional; conditional] with guidance" : "same as x without guidance", got);
    return -1;
}

/* The kernel reads model_out while it writes x: they must be distinct memory. */
static int check_no_overlap(const Py_buffer *x, const Py_buffer *mo)
{
    const char *xb = (const char *)x->buf, *mb = (const char *)mo->buf;
    if (x->len == 0 || mo->len == 0 || xb + x->len <= mb || mb + mo->len <= xb)
        return 0;
    PyErr_SetString(PyExc_ValueError, "model_out must not share memory with x, got overlapping buffers");
    return -1;
}

static int finite_f32(double v)
{
    float f = (float)v;
    return f == f && f - f == 0.0f;
}

/* row: a sequence or float32/float64 buffer of the 9 coefficients of engine/coeffs.py, all finite. */
static int parse_row(PyObject *obj, float out[DD_NUM_COLUMNS])
{
    double vals[DD_NUM_COLUMNS];
    Py_ssize_t n;
    Py_buffer v;
    if (PyObject_CheckBuffer(obj) && PyObject_GetBuffer(obj, &v, PyBUF_RECORDS_RO) == 0) {
        int f32 = is_format(&v, "float32"), f64 = is_format(&v, "float64");
        n = v.ndim == 1 ? v.shape[0] : -1;
        if ((!f32 && !f64) || !PyBuffer_IsContiguous(&v, 'C') || n != DD_NUM_COLUMNS) {
            PyErr_Format(PyExc_ValueError, "row must be 9 float32/float64 values (engine/coeffs.py), got a %s "
                         "buffer of ndim %d and %zd items", format_name(v.format, v.itemsize), v.ndim,
                         v.itemsize ? v.len / v.itemsize : 0);
            PyBuffer_Release(&v);
            return -1;
        }
        for (int i = 0; i < DD_NUM_COLUMNS; i++)
            vals[i] = f32 ? ((const float *)v.buf)[i] : ((const double *)v.buf)[i];
        PyBuffer_Release(&v);
    } else {
        PyErr_Clear();
        PyObject *seq = PySequence_Fast(obj, "row must be a sequence of 9 floats (engine/coeffs.py)");
        if (seq == NULL)
            return -1;
        n = PySequence_Fast_GET_SIZE(seq);
        if (n != DD_NUM_COLUMNS) {
            PyErr_Format(PyExc_ValueError, "row must have 9 values (engine/coeffs.py), got %zd", n);
            Py_DECREF(seq);
            return -1;
        }
        for (int i = 0; i < DD_NUM_COLUMNS; i++) {
            vals[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
            if (vals[i] == -1.0 && PyErr_Occurred()) {
                PyErr_Format(PyExc_TypeError, "row[%d] must be a float, got %.100s", i,
                             Py_TYPE(PySequence_Fast_GET_ITEM(seq, i))->tp_name);
                Py_DECREF(seq);
                return -1;
            }
        }
        Py_DECREF(seq);
    }
    for (int i = 0; i < DD_NUM_COLUMNS; i++) {
        if (!finite_f32(vals[i])) {
            PyObject *got = PyFloat_FromDouble(vals[i]);
            if (got != NULL) {
                PyErr_Format(PyExc_ValueError, "row[%d] must be finite in float32, got %R", i, got);
                Py_DECREF(got);
            }
            return -1;
        }
        out[i] = (float)vals[i];
    }
    return 0;
}

/* None -> *present = 0; a finite float (and > 0 when positive) -> its float32 value. */
static int parse_opt_float(PyObject *obj, const char *name, int positive, int *present, float *out)
{
    *present = 0;
    if (obj == NULL || obj == Py_None)
        return 0;
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "%s must be a float or None, got %.100s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (!finite_f32(v) || (positive && !((float)v > 0.0f))) {
        PyErr_Format(PyExc_ValueError, "%s must be a finite float%s or None, got %R", name, positive ? " > 0" : "",
                     obj);
        return -1;
    }
    *present = 1;
    *out = (float)v;
    return 0;
}

/* An int in [0, limit); `what` names the range in the error. */
static int parse_uint(PyObject *obj, const char *name, long long limit, const char *what, long long *out)
{
    PyObject *idx = PyNumber_Index(obj);
    if (idx == NULL) {
        PyErr_Format(PyExc_TypeError, "%s must be an int %s, got %.100s", name, what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
    Py_DECREF(idx);
    if (overflow || v < 0 || v >= limit) {
        PyErr_Format(PyExc_ValueError, "%s must be an int %s, got %R", name, what, obj);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_threads(PyObject *obj, Py_ssize_t *out)
{
    long long v = 0;
    if (obj != NULL && parse_uint(obj, "threads", (long long)1 << 31, "in [0, 2**31) (0 = all cores)", &v) != 0)
        return -1;
    *out = (Py_ssize_t)v;
    return 0;
}

/* ---------------------------------------------------------------- Python API */

PyDoc_STRVAR(step_doc,
"step(x, model_out, row, seeds, step_index, *, guidance=None, clip=None, threads=0) -> None\n\n"
"One fused sampler step (engine/coeffs.py) in place on float32 x of shape (B, ...); model_out is (B, ...)\n"
"or, with guidance, (2B, ...) = [unconditional; conditional]; row = 9 coefficients; seeds = uint64[B];\n"
"noise z = Philox4x32-10(seed, element // 4, step_index, domain 0), added only when sigma != 0.");

static PyObject *py_step(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", "model_out", "row", "seeds", "step_index", "guidance", "clip", "threads", NULL};
    PyObject *xo, *mo_o, *row_o, *seeds_o, *step_o, *guid_o = NULL, *clip_o = NULL, *thr_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|$OOO:step", kwlist, &xo, &mo_o, &row_o, &seeds_o,
                                     &step_o, &guid_o, &clip_o, &thr_o))
        return NULL;
    job_t job;
    memset(&job, 0, sizeof(job));
    long long step_index;
    Py_ssize_t threads;
    if (parse_row(row_o, job.prm.row) != 0
        || parse_opt_float(guid_o, "guidance", 0, &job.prm.guided, &job.prm.guidance) != 0
        || parse_opt_float(clip_o, "clip", 1, &job.prm.use_clip, &job.prm.clip) != 0
        || parse_uint(step_o, "step_index", (long long)1 << 32, "in [0, 2**32)", &step_index) != 0
        || parse_threads(thr_o, &threads) != 0)
        return NULL;
    Py_buffer x, mo, seeds;
    if (get_array(xo, "x", "float32", 1, 1, &x) != 0)
        return NULL;
    if (get_array(mo_o, "model_out", "float32", 0, 1, &mo) != 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    if (check_model_out(&x, &mo, job.prm.guided) != 0 || check_no_overlap(&x, &mo) != 0
        || get_seeds(seeds_o, x.shape[0], &seeds) != 0) {
        PyBuffer_Release(&mo);
        PyBuffer_Release(&x);
        return NULL;
    }
    job.x = (float *)x.buf;
    job.model_out = (const float *)mo.buf;
    job.seeds = (const dd_u64 *)seeds.buf;
    job.batch = x.shape[0];
    job.per_image = job.batch ? x.len / 4 / job.batch : 0;
    job.blocks_per_image = (job.per_image + DD_BLOCK - 1) / DD_BLOCK;
    job.items = job.batch * job.blocks_per_image;
    job.step = (dd_u32)step_index;
    job.domain = DD_DOMAIN_STEP;
    if (job.items > 0) {
        Py_BEGIN_ALLOW_THREADS
        run_job(&job, threads);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&seeds);
    PyBuffer_Release(&mo);
    PyBuffer_Release(&x);
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
    Py_buffer out, seeds;
    if (get_array(out_o, "out", "float32", 1, 1, &out) != 0)
        return NULL;
    if (get_seeds(seeds_o, out.shape[0], &seeds) != 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    job_t job;
    memset(&job, 0, sizeof(job));
    job.x = (float *)out.buf;
    job.seeds = (const dd_u64 *)seeds.buf;
    job.batch = out.shape[0];
    job.per_image = job.batch ? out.len / 4 / job.batch : 0;
    job.blocks_per_image = (job.per_image + DD_BLOCK - 1) / DD_BLOCK;
    job.items = job.batch * job.blocks_per_image;
    job.step = 0;
    job.domain = DD_DOMAIN_INIT;
    job.fill = 1;
    if (job.items > 0) {
        Py_BEGIN_ALLOW_THREADS
        run_job(&job, threads);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&seeds);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* A sequence of n ints, each in [0, 2**32). */
static int parse_u32s(PyObject *obj, const char *name, int n, dd_u32 *out)
{
    PyObject *seq = PySequence_Fast(obj, "expected a sequence of ints");
    if (seq == NULL || PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_Format(PyExc_ValueError, "%s must be a sequence of %d ints in [0, 2**32)", name, n);
        Py_XDECREF(seq);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        long long v;
        if (parse_uint(PySequence_Fast_GET_ITEM(seq, i), name, (long long)1 << 32, "in [0, 2**32)", &v) != 0) {
            Py_DECREF(seq);
            return -1;
        }
        out[i] = (dd_u32)v;
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

static PyMethodDef methods[] = {
    {"step", (PyCFunction)(void (*)(void))py_step, METH_VARARGS | METH_KEYWORDS, step_doc},
    {"fill_noise", (PyCFunction)(void (*)(void))py_fill_noise, METH_VARARGS | METH_KEYWORDS, fill_noise_doc},
    {"philox4x32_10", py_philox, METH_VARARGS, philox_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ddengine._kernels",
    "Fused DDPM/DDIM step and Philox4x32-10 noise on CPU (kernels/ddstep.h, kernels/philox.h).", -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void)
{
    return PyModule_Create(&module);
}
