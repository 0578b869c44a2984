/* The per-element sampler step of engine/coeffs.py ("One math", shared/DESIGN.md), float32, for C and CUDA.
 *   m = u + g (c - u)   x0 = ax x + am m   x0 = clip(x0, -r, r)
 *   eps = bx x + bm m + b0 x0              x' = p0 x0 + px x + pe eps + sigma z
 */
#ifndef DDENGINE_DDSTEP_H
#define DDENGINE_DDSTEP_H

#include "philox.h"

/* Column order of a coefficient row (engine/coeffs.py COLUMNS). */
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

#endif /* DDENGINE_DDSTEP_H */
