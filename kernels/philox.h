/* Philox4x32-10 counter-based generator (Salmon et al., SC'11, "Parallel random numbers: as easy as
 * 1, 2, 3"; Random123) and Box-Muller normals, written once for C and CUDA (NVRTC: no system headers).
 *
 * Noise for element e of an image with 64-bit seed s at step n is a pure function:
 *   key = (s & 0xffffffff, s >> 32), counter = (q & 0xffffffff, q >> 32, n, domain), q = e / 4,
 *   domain 0 = per-step noise, 1 = the initial noise x_T.
 * One Philox call gives r0..r3 -> normals for elements 4q..4q+3 from the Box-Muller pairs (r0, r1), (r2, r3).
 * Uniforms use the top 23 bits: u = ((r >> 9) + 0.5) * 2^-23, exact in float32 (24 significant bits), in
 * [2^-24, 1 - 2^-24], so |z| <= sqrt(24 * 2 ln 2) = 5.77.
 * log, sin and cos are plain float32 polynomials (no libm) so SIMD, scalar and CUDA code agree bit for bit
 * when compiled without FP contraction (C: -ffp-contract=off; NVRTC: --fmad=false).
 */
#ifndef DDENGINE_PHILOX_H
#define DDENGINE_PHILOX_H

#ifdef __CUDACC__
#define DD_FN static __host__ __device__ __forceinline__
#else
#define DD_FN static inline
#endif

typedef unsigned int dd_u32;
typedef unsigned long long dd_u64;

#define DD_PHILOX_M0 0xD2511F53u
#define DD_PHILOX_M1 0xCD9E8D57u
#define DD_PHILOX_W0 0x9E3779B9u
#define DD_PHILOX_W1 0xBB67AE85u

/* One Philox round (Salmon et al. 2011, Fig. 2), then the Weyl key bump. */
#define DD_PHILOX_ROUND(c0, c1, c2, c3, k0, k1)                      \
    do {                                                              \
        dd_u64 p0_ = (dd_u64)DD_PHILOX_M0 * (c0);                     \
        dd_u64 p1_ = (dd_u64)DD_PHILOX_M1 * (c2);                     \
        dd_u32 n0_ = (dd_u32)(p1_ >> 32) ^ (c1) ^ (k0);               \
        dd_u32 n2_ = (dd_u32)(p0_ >> 32) ^ (c3) ^ (k1);               \
        (c1) = (dd_u32)p1_;                                           \
        (c3) = (dd_u32)p0_;                                           \
        (c0) = n0_;                                                   \
        (c2) = n2_;                                                   \
        (k0) += DD_PHILOX_W0;                                         \
        (k1) += DD_PHILOX_W1;                                         \
    } while (0)

/* Philox4x32 with 10 rounds: ctr[4] is replaced by the output block. */
DD_FN void dd_philox4x32_10(dd_u32 ctr[4], dd_u32 k0, dd_u32 k1)
{
    dd_u32 c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    DD_PHILOX_ROUND(c0, c1, c2, c3, k0, k1);
    DD_PHILOX_ROUND(c0, c1, c2, c3, k0, k1);
    DD_PHILOX_ROUND(c0, c1, c2, c3, k0, k1);
    DD_PHILOX_ROUND(c0, c1, c2, c3, k0, k1);
    DD_PHILOX_ROUND(c0, c1, c2, c3, k0, k1);
    DD_PHILOX_ROUND(c0, c1, c2, c3, k0, k1);
    DD_PHILOX_ROUND(c0, c1, c2, c3, k0, k1);
    DD_PHILOX_ROUND(c0, c1, c2, c3, k0, k1);
    DD_PHILOX_ROUND(c0, c1, c2, c3, k0, k1);
    DD_PHILOX_ROUND(c0, c1, c2, c3, k0, k1);
    ctr[0] = c0;
    ctr[1] = c1;
    ctr[2] = c2;
    ctr[3] = c3;
}

/* Bit casts (unions: fine in C and CUDA); IEEE round-to-nearest sqrt and division on both sides. */
DD_FN dd_u32 dd_f2u(float f)
{
    union { float f; dd_u32 u; } v;
    v.f = f;
    return v.u;
}

DD_FN float dd_u2f(dd_u32 u)
{
    union { float f; dd_u32 u; } v;
    v.u = u;
    return v.f;
}

#ifdef __CUDA_ARCH__
DD_FN float dd_sqrtf(float f) { return __fsqrt_rn(f); }
DD_FN float dd_divf(float a, float b) { return __fdiv_rn(a, b); }
#else
DD_FN float dd_sqrtf(float f) { return __builtin_sqrtf(f); }
DD_FN float dd_divf(float a, float b) { return a / b; }
#endif

/* Uniform in (0, 1) from the top 23 bits of r: (1 + k 2^-23) - (1 - 2^-24) = (k + 1/2) 2^-23, exact. */
DD_FN float dd_uniform(dd_u32 r) { return dd_u2f((r >> 9) | 0x3f800000u) - 0.99999994039535522f; }

/* -2 ln(u) for finite u > 0 (normal range): u = 2^e m, m in [sqrt(1/2), sqrt(2)), ln(m) = 2 atanh(s),
 * s = (m - 1) / (m + 1), |s| < 0.1716, odd series to s^9 (error < 1e-9); the factor -2 is folded into
 * the (exactly scaled) coefficients and the split ln 2. */
DD_FN float dd_neg2log(float u)
{
    int i = (int)(dd_f2u(u) - 0x3f3504f3u);
    int e = i >> 23; /* arithmetic shift: floor */
    float m = dd_u2f((dd_u32)(i & 0x007fffff) + 0x3f3504f3u);
    float f = m - 1.0f;
    float s = dd_divf(f, 2.0f + f);
    float s2 = s * s;
    float q = -0.44444444444f;
    q = q * s2 - 0.57142857143f;
    q = q * s2 - 0.8f;
    q = q * s2 - 1.33333333333f;
    q = q * s2 - 4.0f;
    float fe = (float)e;
    return fe * -1.38671875f + (s * q + fe * 4.2438888e-4f);
}

/* cos(2 pi t) and sin(2 pi t) for t in [0, 1]: 4t = k + y exactly with k = rint(4t) (the 1.5 * 2^23 trick,
 * its low bits give k mod 4) and |y| <= 1/2; minimax polynomials in y for cos(pi y / 2), sin(pi y / 2)
 * (Cephes sinf/cosf, Moshier 1989, rescaled from x = pi y / 2; error < 1e-7), then a rotation by k quarter
 * turns. */
DD_FN void dd_sincos2pi(float t, float *c_out, float *s_out)
{
    float t4 = t * 4.0f;
    float big = t4 + 12582912.0f;
    dd_u32 k = dd_f2u(big);
    float y = t4 - (big - 12582912.0f);
    float y2 = y * y;
    float s = -4.604837189e-3f;
    s = s * y2 + 7.968141388e-2f;
    s = s * y2 - 6.459636303e-1f;
    s = s * y2 + 1.570796327f;
    s = y * s;
    float c = 9.056045669e-4f;
    c = c * y2 - 2.086111840e-2f;
    c = c * y2 + 2.536693802e-1f;
    c = c * y2 - 1.233700550f;
    c = 1.0f + y2 * c;
    float cs = (k & 1) ? -s : c; /* quadrant k: (cos, sin) rotated by k * pi/2 */
    float sn = (k & 1) ? c : s;
    *c_out = (k & 2) ? -cs : cs;
    *s_out = (k & 2) ? -sn : sn;
}

/* Box-Muller (1958): two uniforms -> two independent N(0, 1). */
DD_FN void dd_box_muller(dd_u32 ra, dd_u32 rb, float *z0, float *z1)
{
    float radius = dd_sqrtf(dd_neg2log(dd_uniform(ra)));
    float c, s;
    dd_sincos2pi(dd_uniform(rb), &c, &s);
    *z0 = radius * c;
    *z1 = radius * s;
}

/* The four normals for quad q (elements 4q..4q+3) of the image with this seed, at this step and domain. */
DD_FN void dd_normals4(dd_u64 seed, dd_u64 q, dd_u32 step, dd_u32 domain, float z[4])
{
    dd_u32 r[4];
    r[0] = (dd_u32)q;
    r[1] = (dd_u32)(q >> 32);
    r[2] = step;
    r[3] = domain;
    dd_philox4x32_10(r, (dd_u32)seed, (dd_u32)(seed >> 32));
    dd_box_muller(r[0], r[1], &z[0], &z[1]);
    dd_box_muller(r[2], r[3], &z[2], &z[3]);
}

#endif /* DDENGINE_PHILOX_H */
