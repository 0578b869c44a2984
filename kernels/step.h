/* The per-element sampler step of engine/core/rows.py ("One math", docs/math.md), float32, for C and CUDA.
 *   m = u + g (c - u)   x0 = ax x + am m   x0 = clip(x0, -clip, clip) where clip > 0
 *   eps = bx x + bm m + b0 x0              x' = p0 x0 + px x + pe eps (+ the multistep terms) + sigma z
 *   multistep rows: d = q0 x0 + qe eps, s = sx x + sl L + sd d + sh_k H_k, x' += ps s + pd d + ph_k H_k,
 *   then L <- s (write_s) and H[write_d] <- d, over the image's slots L, H0, H1, H2.
 */
#ifndef DDENGINE_DDSTEP_H
#define DDENGINE_DDSTEP_H

#include "philox.h"

typedef int dd_i32;
typedef long long dd_i64;

/* Column order of a coefficient row (engine/core/rows.py COLUMNS). */
enum {
    DD_AX, DD_AM, DD_BX, DD_BM, DD_B0, DD_P0, DD_PX, DD_PE, DD_SIGMA, DD_CLIP,
    DD_Q0, DD_QE, DD_SX, DD_SL, DD_SD, DD_SH0, DD_SH1, DD_SH2, DD_PS, DD_PD, DD_PH0, DD_PH1, DD_PH2,
    DD_WRITE_D, DD_WRITE_S, DD_NUM_COLUMNS
};
enum { DD_SLOTS = 4 }; /* per image: L, H0, H1, H2 (engine/core/rows.py SLOTS) */

/* Noise domains of the Philox counter's last word. */
enum { DD_DOMAIN_STEP = 0, DD_DOMAIN_INIT = 1 };

/* Classifier-free guidance (Ho & Salimans 2022): u + g (c - u). */
DD_FN float dd_guide(float u, float c, float g) { return u + g * (c - u); }

/* Clamp to [-r, r]; NaN stays NaN (as numpy.clip). */
DD_FN float dd_clip(float v, float r) { return v < -r ? -r : (v > r ? r : v); }

/* Whether a row reads or writes the slots (engine/core/rows.py is_multistep). */
DD_FN int dd_is_multistep(const float *row)
{
    int any = row[DD_WRITE_D] >= 0.0f || row[DD_WRITE_S] != 0.0f;
    for (int k = DD_Q0; k < DD_WRITE_D; k++)
        any |= row[k] != 0.0f;
    return any;
}

/* x0 of model output m (already guided), clipped where the row clips. */
DD_FN float dd_x0(float x, float m, const float *row, int use_clip)
{
    float x0 = row[DD_AX] * x + row[DD_AM] * m;
    return use_clip ? dd_clip(x0, row[DD_CLIP]) : x0;
}

/* x' without the noise term for a single-step row, given x0. */
DD_FN float dd_step_mean(float x, float m, float x0, const float *row)
{
    float eps = row[DD_BX] * x + row[DD_BM] * m + row[DD_B0] * x0;
    return row[DD_P0] * x0 + row[DD_PX] * x + row[DD_PE] * eps;
}

/* x' without the noise term for a multistep row, given x0 and the element's slot values; *d and *s receive the
 * history value and the stage sample that the caller stores (L <- s where write_s, H[write_d] <- d). */
DD_FN float dd_step_terms(float x, float m, float x0, const float *row, float l, float a, float b, float c, float *d,
                          float *s)
{
    float eps = row[DD_BX] * x + row[DD_BM] * m + row[DD_B0] * x0;
    float y = row[DD_P0] * x0 + row[DD_PX] * x + row[DD_PE] * eps;
    *d = row[DD_Q0] * x0 + row[DD_QE] * eps;
    *s = row[DD_SX] * x + row[DD_SL] * l + row[DD_SD] * *d + row[DD_SH0] * a + row[DD_SH1] * b + row[DD_SH2] * c;
    return y + row[DD_PS] * *s + row[DD_PD] * *d + row[DD_PH0] * a + row[DD_PH1] * b + row[DD_PH2] * c;
}

/* The history slot a row writes (0..2), or -1. */
DD_FN int dd_write_slot(const float *row)
{
    const float w = row[DD_WRITE_D];
    return w == 0.0f ? 0 : w == 1.0f ? 1 : w == 2.0f ? 2 : -1;
}

/* Whether a multistep row reads slot L, or H_k (k = 0..2): its coefficients there are non-zero. A slot the row
 * does not read counts as 0 and is never loaded (the C kernel points it at zeros: no memory traffic). */
DD_FN int dd_reads_l(const float *row) { return row[DD_SL] != 0.0f; }
DD_FN int dd_reads_h(const float *row, int k) { return row[DD_SH0 + k] != 0.0f || row[DD_PH0 + k] != 0.0f; }

/* dd_step_terms, then the element's slots l, h[0..2] updated in place. */
DD_FN float dd_step_slots(float x, float m, float x0, const float *row, float *l, float *h0, float *h1, float *h2)
{
    float d, s;
    float y = dd_step_terms(x, m, x0, row, dd_reads_l(row) ? *l : 0.0f, dd_reads_h(row, 0) ? *h0 : 0.0f,
                            dd_reads_h(row, 1) ? *h1 : 0.0f, dd_reads_h(row, 2) ? *h2 : 0.0f, &d, &s);
    if (row[DD_WRITE_S] != 0.0f)
        *l = s;
    const int w = dd_write_slot(row);
    if (w == 0)
        *h0 = d;
    else if (w == 1)
        *h1 = d;
    else if (w == 2)
        *h2 = d;
    return y;
}

/* One image of a step (numpy twin: engine/kernels/host.py IMAGE_DTYPE; 32 bytes). Every image carries its own
 * coefficient row, noise counter and guidance, so images of different requests at different steps share one
 * U-Net forward and one kernel launch, each still a pure function of its own seed and parameters. */
typedef struct {
    dd_u64 seed;    /* Philox key */
    dd_i32 row;     /* coefficient table row of this step */
    dd_u32 step;    /* noise counter of this step */
    dd_i32 uncond;  /* model_out row of the unconditional output; -1: no guidance */
    float guidance; /* guidance scale, read where uncond >= 0 */
    dd_i32 nonfinite_step; /* first step whose inputs or result were non-finite; -1: none (written by the kernel) */
    float noise_scale;     /* x_T = noise_scale z (Euler's init_noise_sigma on the engine's x; 1 for the others) */
} dd_image;

/* Everything one launch needs (flash-attention's one params struct), shared by the C and CUDA kernels. */
typedef struct {
    float *x;               /* (batch, per_image): x_t in, x_{t-1} out (fill_noise: x_T out) */
    const float *model_out; /* rows of per_image floats: row j is image j's (conditional) output */
    const float *table;     /* coefficient rows, DD_NUM_COLUMNS floats each */
    dd_image *images;       /* (batch) */
    float *slots;           /* (batch, DD_SLOTS, per_image): L, H0, H1, H2 of each image; NULL: no multistep rows */
    float *x0_out;          /* (batch, per_image): x0 of this step, where not NULL */
    dd_i64 batch, per_image;
} dd_step_args;

/* The layout the Python side mirrors (engine/kernels/host.py); a compiler that lays the records out otherwise fails here. */
#ifdef __cplusplus
#define DD_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define DD_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif
DD_STATIC_ASSERT(sizeof(dd_image) == 32 && __builtin_offsetof(dd_image, row) == 8
                 && __builtin_offsetof(dd_image, guidance) == 20 && __builtin_offsetof(dd_image, nonfinite_step) == 24
                 && __builtin_offsetof(dd_image, noise_scale) == 28,
                 "dd_image must match engine/kernels/host.py IMAGE_DTYPE");
DD_STATIC_ASSERT(sizeof(dd_step_args) == 64 && __builtin_offsetof(dd_step_args, slots) == 32
                 && __builtin_offsetof(dd_step_args, batch) == 48, "dd_step_args must match engine/kernels/host.py StepArgs");

/* 1 when v is NaN or +-inf (all exponent bits set), by integer test: no libm, vectorizes as an OR reduction. */
DD_FN dd_u32 dd_nonfinite(float v)
{
    union { float f; dd_u32 u; } bits;
    bits.f = v;
    return (bits.u & 0x7f800000u) == 0x7f800000u;
}

#endif /* DDENGINE_DDSTEP_H */
