/* CUDA twin of kernels/step_ext.c, compiled at run time with NVRTC (engine/cuda_step.py; options
 * --fmad=false -I<this folder>), so self-contained: no system headers. One thread per quad of 4 elements
 * of one image, grid-stride; the step counter and tables live on the device so one CUDA graph replays
 * every step. Per element the same expressions as the C kernel (kernels/ddstep.h, kernels/philox.h).
 */
#include "ddstep.h"

/* x <- step(x, model_out) with row = coeff_table + 9 * (*step_index) and noise step *step_index. */
extern "C" __global__ void ddstep_step(float *x, const float *model_out, const float *coeff_table,
                                       const int *step_index, const unsigned long long *seeds, int batch,
                                       long long per_image, int use_guidance, float guidance, float clip)
{
    const int n = *step_index;
    float row[DD_NUM_COLUMNS];
    for (int k = 0; k < DD_NUM_COLUMNS; k++)
        row[k] = coeff_table[(long long)DD_NUM_COLUMNS * n + k];
    const int noisy = row[DD_SIGMA] != 0.0f;
    const int use_clip = clip > 0.0f;
    const long long quads = (per_image + 3) / 4;
    const long long total = quads * batch;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        const long long img = t / quads, q = t - img * quads;
        float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (noisy)
            dd_normals4(seeds[img], (dd_u64)q, (dd_u32)n, DD_DOMAIN_STEP, z);
        float *xi = x + img * per_image;
        const float *u = model_out + img * per_image;
        const float *c = u + (long long)batch * per_image;
        for (int k = 0; k < 4; k++) {
            const long long e = 4 * q + k;
            if (e >= per_image)
                break;
            const float m = use_guidance ? dd_guide(u[e], c[e], guidance) : u[e];
            xi[e] = noisy ? dd_step_noisy(xi[e], m, row, use_clip, clip, z[k])
                          : dd_step_mean(xi[e], m, row, use_clip, clip);
        }
    }
}

/* out <- the initial noise x_T (Philox domain 1, step 0), as ddengine._kernels.fill_noise. */
extern "C" __global__ void ddstep_fill_noise(float *out, const unsigned long long *seeds, int batch,
                                             long long per_image)
{
    const long long quads = (per_image + 3) / 4;
    const long long total = quads * batch;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        const long long img = t / quads, q = t - img * quads;
        float z[4];
        dd_normals4(seeds[img], (dd_u64)q, 0u, DD_DOMAIN_INIT, z);
        for (int k = 0; k < 4; k++) {
            const long long e = 4 * q + k;
            if (e >= per_image)
                break;
            out[img * per_image + e] = z[k];
        }
    }
}

/* t_out[0..n) <- t_table[*step_index]: the model's timestep input for the current step (int64). */
extern "C" __global__ void ddstep_set_timesteps_i64(long long *t_out, const long long *t_table,
                                                    const int *step_index, int n)
{
    const long long t = t_table[*step_index];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        t_out[i] = t;
}

/* t_out[0..n) <- (float)t_table[*step_index]: the same for float32 timestep inputs. */
extern "C" __global__ void ddstep_set_timesteps_f32(float *t_out, const long long *t_table,
                                                    const int *step_index, int n)
{
    const float t = (float)t_table[*step_index];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        t_out[i] = t;
}

/* ++*step_index, by a single thread: the last node of a step's graph. */
extern "C" __global__ void ddstep_advance(int *step_index)
{
    if (blockIdx.x == 0 && threadIdx.x == 0)
        *step_index += 1;
}
