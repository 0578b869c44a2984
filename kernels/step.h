/* The per-element sampler step of engine/core/rows.py ("One math", docs/math.md), float32, for C and CUDA.
 *   m = u + g (c - u)   x0 = ax x + am m   x0 = clip(x0, -clip, clip) where clip > 0
 *   eps = bx x + bm m + b0 x0              x' = p0 x0 + px x + pe eps (+ the multistep terms) + sigma z
 *   multistep rows: d = q0 x0 + qe eps, s = sx x + sl L + sd d + sh_k H_k, x' += ps s + pd d + ph_k H_k,
 *   then L <- s (write_s) and H[write_d] <- d, over the image's slots L, H0, H1, H2.
 * Multistep rows run a body specialised to the row's shape (dd_shape: stage term or not, how many H slots read),
 * bit-identical to the general program dd_step_terms wherever x' is finite (docs/math.md "Specialised bodies").
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

/* Clamp to [-r, r]; NaN stays NaN (as numpy.clip): v < -r ? -r : (v > r ? r : v), written as min then max so
 * that x86 compiles it to minps/maxps (their NaN rule is this one: the second operand where a compare is false);
 * the same value for every float v and r > 0. r = +inf: the identity. */
DD_FN float dd_clip(float v, float r)
{
    const float w = r < v ? r : v;
    return -r > w ? -r : w;
}

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

/* 1 when v is +0.0 (all bits clear): the zero whose sum with any zero is +0, by integer test as dd_nonfinite. */
DD_FN int dd_pos_zero(float v)
{
    union { float f; dd_u32 u; } bits;
    bits.f = v;
    return bits.u == 0u;
}

/* What a multistep row's specialised body evaluates (docs/math.md "Specialised bodies"). Always eps and
 * d = q0 x0 + qe eps in full, and pd d; s (in full, unread slots aside) only where has_s; the nh H slots the row
 * reads (slot[0..nh-1], increasing; their sh, ph compacted alongside); of x's own terms p0 x0, px x, pe eps
 * those flagged kp0, kpx, kpe. A dropped term is 0 * (something finite) wherever x' is finite, and the dropped
 * terms of s / of x' sum to a zero whose sign the row fixes: zs / zy, added once (+0.0f turns a -0 sum into +0
 * as a dropped +0 term does; -0.0f is the identity). */
typedef struct {
    float sh[3], ph[3];       /* sh_k, ph_k of the read slots, in slot order */
    float zs, zy;             /* the sum of the dropped terms of s and of x': +0.0f or -0.0f */
    int has_s, nh;            /* s evaluated; number of H slots read */
    int kp0, kpx, kpe;        /* p0 x0, px x, pe eps kept */
    int slot[3];              /* the H slots read */
} dd_shape;

/* The general shape: every term kept, unread slots read as 0.0f (the program dd_step_terms, bit for bit). */
DD_FN void dd_general_shape(const float *row, dd_shape *k)
{
    k->has_s = 1, k->nh = 3, k->kp0 = k->kpx = k->kpe = 1, k->zs = -0.0f, k->zy = -0.0f;
    for (int j = 0; j < 3; j++)
        k->slot[j] = j, k->sh[j] = row[DD_SH0 + j], k->ph[j] = row[DD_PH0 + j];
}

/* The shape of a multistep row (docs/math.md "Specialised bodies"). A dropped zero has a known sign where it is a
 * coefficient of a slot the row does not read (times 0.0f) or, without s, ps s with s a sum of zeros one of which
 * is +0 (sl 0.0f, or an unread sh_k 0.0f); a dropped data term (p0 x0, px x, pe eps with a zero coefficient) has
 * the sign of its data, so it is only dropped beside a known +0, which makes the sum +0 whatever the data. */
DD_FN void dd_row_shape(const float *row, dd_shape *k)
{
    int has_s = row[DD_WRITE_S] != 0.0f || row[DD_PS] != 0.0f;
    for (int c = DD_SX; c <= DD_SH2; c++)
        has_s |= row[c] != 0.0f;
    int nh = 0, unread_sh_pos = 0, unread_ph_pos = 0;
    for (int j = 0; j < 3; j++) {
        if (dd_reads_h(row, j)) {
            k->slot[nh] = j, k->sh[nh] = row[DD_SH0 + j], k->ph[nh] = row[DD_PH0 + j], nh++;
        } else {
            unread_sh_pos |= dd_pos_zero(row[DD_SH0 + j]);
            unread_ph_pos |= dd_pos_zero(row[DD_PH0 + j]);
        }
    }
    for (int j = nh; j < 3; j++)
        k->slot[j] = 0, k->sh[j] = 0.0f, k->ph[j] = 0.0f;
    const int y_zero = row[DD_P0] == 0.0f && row[DD_PX] == 0.0f && row[DD_PE] == 0.0f;
    const int s_pos = dd_pos_zero(row[DD_SL]) || unread_sh_pos; /* without s: s sums to +0 */
    const int no_s_pos = unread_ph_pos || (s_pos && dd_pos_zero(row[DD_PS]));
    k->nh = nh, k->zs = unread_sh_pos ? 0.0f : -0.0f;
    if (!has_s && row[DD_PE] == 0.0f && no_s_pos) { /* DPM-Solver++, PLMS: no s; pe eps (and p0 x0 if p0 = 0) dropped */
        k->has_s = 0, k->kp0 = row[DD_P0] != 0.0f, k->kpx = 1, k->kpe = 0, k->zy = 0.0f;
        return;
    }
    /* with s (a row without s whose dropped sum is not provably signed computes its s of zeros) */
    k->has_s = 1, k->kp0 = k->kpx = k->kpe = !(y_zero && unread_ph_pos); /* UniPC: x' = ps s + pd d + ph H */
    k->zy = unread_ph_pos ? 0.0f : -0.0f;
}

/* The shape a row's step runs: its own, or the general one where the row is noisy or the step keeps x0 (no solver
 * row is noisy, and x0_out serves previews: it saves the C kernel the bodies). Shared by the C and CUDA kernels,
 * so that both evaluate the same terms. */
DD_FN void dd_step_shape(const float *row, int keep_x0, dd_shape *k)
{
    if (row[DD_SIGMA] != 0.0f || keep_x0)
        dd_general_shape(row, k);
    else
        dd_row_shape(row, k);
}

/* x' without the noise term for a multistep row of shape k (has_s, kp0, kpx, kpe, nh: k's, constants where the
 * C kernel inlines them): the general program's terms (dd_step_terms) in its order, less the dropped ones, whose
 * sum zs / zy stands for. l: L (0.0f where the row does not read it); h0..h2: the read slots k->slot[0..nh-1]
 * (0.0f where not read: the general shape). *d, *s: the history value and stage sample to store. */
DD_FN float dd_step_shaped(float x, float m, float x0, const float *row, const dd_shape *k, int has_s, int kp0,
                           int kpx, int kpe, int nh, float l, float h0, float h1, float h2, float *d, float *s)
{
    const float eps = row[DD_BX] * x + row[DD_BM] * m + row[DD_B0] * x0;
    const float dv = row[DD_Q0] * x0 + row[DD_QE] * eps;
    float y = -0.0f; /* the empty sum: -0 + t is t for every t, so x' starts at its first kept term */
    if (kp0)
        y = y + row[DD_P0] * x0;
    if (kpx)
        y = y + row[DD_PX] * x;
    if (kpe)
        y = y + row[DD_PE] * eps;
    if (has_s) {
        float sv = row[DD_SX] * x + row[DD_SL] * l + row[DD_SD] * dv;
        if (nh > 0)
            sv = sv + k->sh[0] * h0;
        if (nh > 1)
            sv = sv + k->sh[1] * h1;
        if (nh > 2)
            sv = sv + k->sh[2] * h2;
        sv = sv + k->zs;
        *s = sv;
        y = y + row[DD_PS] * sv;
    }
    y = y + row[DD_PD] * dv;
    if (nh > 0)
        y = y + k->ph[0] * h0;
    if (nh > 1)
        y = y + k->ph[1] * h1;
    if (nh > 2)
        y = y + k->ph[2] * h2;
    *d = dv;
    return y + k->zy;
}

/* dd_step_shaped on the element's slots l, h[0..2] (the CUDA kernel's), then L <- s where write_s and
 * H[write_d] <- d. The slots the shape does not read are 0.0f, as the C kernel's zero block. */
DD_FN float dd_step_slots(float x, float m, float x0, const float *row, const dd_shape *k, float *l, float *h0,
                          float *h1, float *h2)
{
    float *h[3] = {h0, h1, h2};
    float v[3] = {0.0f, 0.0f, 0.0f};
    for (int j = 0; j < k->nh; j++)
        v[j] = dd_reads_h(row, k->slot[j]) ? *h[k->slot[j]] : 0.0f;
    float d, s;
    const float y = dd_step_shaped(x, m, x0, row, k, k->has_s, k->kp0, k->kpx, k->kpe, k->nh,
                                   k->has_s && dd_reads_l(row) ? *l : 0.0f, v[0], v[1], v[2], &d, &s);
    if (row[DD_WRITE_S] != 0.0f) /* write_s makes has_s */
        *l = s;
    const int w = dd_write_slot(row);
    if (w >= 0)
        *h[w] = d;
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
