/* The per-element sampler step of engine/core/rows.py ("One math", docs/math.md), float32, for C and CUDA.
 *   m = u + g (c - u)   x0 = ax x + am m   x0 = clip(x0, -r, r)
 *   eps = bx x + bm m + b0 x0              x' = p0 x0 + px x + pe eps + sigma z
 */
#ifndef DDENGINE_DDSTEP_H
#define DDENGINE_DDSTEP_H

#include "philox.h"

typedef int dd_i32;
typedef long long dd_i64;

/* Column order of a coefficient row (engine/core/rows.py COLUMNS). */
enum { DD_AX, DD_AM, DD_BX, DD_BM, DD_B0, DD_P0, DD_PX, DD_PE, DD_SIGMA, DD_NUM_COLUMNS };

/* Noise domains of the Philox counter's last word. */
enum { DD_DOMAIN_STEP = 0, DD_DOMAIN_INIT = 1 };

/* Classifier-free guidance (Ho & Salimans 2022): u + g (c - u). */
DD_FN float dd_guide(float u, float c, float g) { return u + g * (c - u); }

/* Clamp to [-r, r]; NaN stays NaN (as numpy.clip). */
DD_FN float dd_clip(float v, float r) { return v < -r ? -r : (v > r ? r : v); }

/* x' without the noise term, for model output m (already guided); use_clip selects the clamp. */
DD_FN float dd_step_mean(float x, float m, const float *row, int use_clip, float clip)
{
    float x0 = row[DD_AX] * x + row[DD_AM] * m;
    if (use_clip)
        x0 = dd_clip(x0, clip);
    float eps = row[DD_BX] * x + row[DD_BM] * m + row[DD_B0] * x0;
    return row[DD_P0] * x0 + row[DD_PX] * x + row[DD_PE] * eps;
}

/* x' = mean + sigma z. */
DD_FN float dd_step_noisy(float x, float m, const float *row, int use_clip, float clip, float z)
{
    return dd_step_mean(x, m, row, use_clip, clip) + row[DD_SIGMA] * z;
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
    dd_i32 unused;  /* pads the record to 32 bytes */
} dd_image;

/* Everything one launch needs (flash-attention's one params struct), shared by the C and CUDA kernels. */
typedef struct {
    float *x;               /* (batch, per_image): x_t in, x_{t-1} out (fill_noise: x_T out) */
    const float *model_out; /* rows of per_image floats: row j is image j's (conditional) output */
    const float *table;     /* coefficient rows, DD_NUM_COLUMNS floats each */
    dd_image *images;       /* (batch) */
    dd_i64 batch, per_image;
    float clip;             /* > 0: clip x0 to [-clip, clip]; 0: no clipping */
    dd_i32 unused;          /* explicit tail padding: the same 56 bytes under every compiler */
} dd_step_args;

/* The layout the Python side mirrors (engine/kernels/host.py); a compiler that lays the records out otherwise fails here. */
#ifdef __cplusplus
#define DD_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define DD_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif
DD_STATIC_ASSERT(sizeof(dd_image) == 32 && __builtin_offsetof(dd_image, row) == 8
                 && __builtin_offsetof(dd_image, guidance) == 20 && __builtin_offsetof(dd_image, nonfinite_step) == 24,
                 "dd_image must match engine/kernels/host.py IMAGE_DTYPE");
DD_STATIC_ASSERT(sizeof(dd_step_args) == 56 && __builtin_offsetof(dd_step_args, batch) == 32
                 && __builtin_offsetof(dd_step_args, clip) == 48, "dd_step_args must match engine/kernels/host.py StepArgs");

/* 1 when v is NaN or +-inf (all exponent bits set), by integer test: no libm, vectorizes as an OR reduction. */
DD_FN dd_u32 dd_nonfinite(float v)
{
    union { float f; dd_u32 u; } bits;
    bits.f = v;
    return (bits.u & 0x7f800000u) == 0x7f800000u;
}

#endif /* DDENGINE_DDSTEP_H */
