/* CUDA twin of kernels/step_host.c, compiled at run time with NVRTC (engine/gpu/nvrtc.py; options
 * --fmad=false -I<this folder>), so self-contained: no system headers. Every kernel takes the one params
 * struct of kernels/step.h. One thread per quad of 4 elements of one image, grid-stride; rows, noise
 * counters and guidance are per image and live on the device, so one CUDA graph replays every step.
 * Per element the same expressions as the C kernel (kernels/step.h, kernels/philox.h); a multistep row runs the
 * shape the C kernel picks (dd_step_shape), its terms chosen at run time here, by template in the C kernel.
 */
#include "step.h"

/* The quad (img, q) of each thread, grid-stride: FILL writes x_T (Philox domain 1, step 0), else one fused step
 * for image img with its own row, noise counter, guidance and unconditional row. */
template <int FILL> __device__ void dd_quads(dd_step_args a)
{
    const dd_i64 quads = (a.per_image + 3) / 4;
    const dd_i64 total = quads * a.batch;
    const dd_i64 stride = (dd_i64)gridDim.x * blockDim.x;
    for (dd_i64 t = (dd_i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        const dd_i64 img = t / quads, q = t - img * quads;
        dd_image *im = a.images + img;
        float *xi = a.x + img * a.per_image;
        float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (FILL) {
            dd_normals4(im->seed, (dd_u64)q, 0u, DD_DOMAIN_INIT, z);
            for (int k = 0; k < 4 && 4 * q + k < a.per_image; k++)
                xi[4 * q + k] = z[k] * im->noise_scale;
            continue;
        }
        const float *row = a.table + (dd_i64)DD_NUM_COLUMNS * im->row;
        const int noisy = row[DD_SIGMA] != 0.0f, use_clip = row[DD_CLIP] > 0.0f;
        const int multi = a.slots != 0 && dd_is_multistep(row);
        float *sl = multi ? a.slots + img * DD_SLOTS * a.per_image : 0;
        float *x0o = a.x0_out ? a.x0_out + img * a.per_image : 0;
        dd_shape shape; /* the terms of a multistep row's body, as the C kernel picks them (kernels/step.h) */
        if (multi)
            dd_step_shape(row, x0o != 0, &shape);
        if (noisy)
            dd_normals4(im->seed, (dd_u64)q, im->step, DD_DOMAIN_STEP, z);
        const float *c = a.model_out + img * a.per_image;
        const float *u = im->uncond >= 0 ? a.model_out + (dd_i64)im->uncond * a.per_image : 0;
        dd_u32 bad = 0;
        for (int k = 0; k < 4 && 4 * q + k < a.per_image; k++) {
            const dd_i64 e = 4 * q + k;
            const float m = u ? dd_guide(u[e], c[e], im->guidance) : c[e];
            const float x0 = dd_x0(xi[e], m, row, use_clip);
            float y = multi ? dd_step_slots(xi[e], m, x0, row, &shape, &sl[e], &sl[a.per_image + e],
                                            &sl[2 * a.per_image + e], &sl[3 * a.per_image + e])
                            : dd_step_mean(xi[e], m, x0, row);
            if (noisy)
                y = y + row[DD_SIGMA] * z[k];
            if (x0o)
                x0o[e] = x0;
            bad |= dd_nonfinite(c[e]) | (u ? dd_nonfinite(u[e]) : 0u) | dd_nonfinite(y);
            xi[e] = y;
        }
        if (bad)
            atomicCAS(&im->nonfinite_step, -1, (dd_i32)im->step); /* the first failing step wins */
    }
}

/* x <- step(x, model_out) for every image j with its own row, noise counter, guidance and uncond row. */
extern "C" __global__ void ddstep_step(dd_step_args a) { dd_quads<0>(a); }

/* x <- the initial noise x_T of each image's seed, as ddengine.kernels._step.fill_noise. */
extern "C" __global__ void ddstep_fill_noise(dd_step_args a) { dd_quads<1>(a); }

/* The model's timestep input for the current step: t_out[j] and t_out[uncond] <- t_table[images[j].row]. */
extern "C" __global__ void ddstep_set_timesteps_i64(dd_i64 *t_out, const dd_i64 *t_table, const dd_image *images,
                                                    int batch)
{
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < batch; j += gridDim.x * blockDim.x) {
        const dd_i64 t = t_table[images[j].row];
        t_out[j] = t;
        if (images[j].uncond >= 0)
            t_out[images[j].uncond] = t;
    }
}

/* The same for float32 timestep inputs. */
extern "C" __global__ void ddstep_set_timesteps_f32(float *t_out, const dd_i64 *t_table, const dd_image *images,
                                                    int batch)
{
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < batch; j += gridDim.x * blockDim.x) {
        const float t = (float)t_table[images[j].row];
        t_out[j] = t;
        if (images[j].uncond >= 0)
            t_out[images[j].uncond] = t;
    }
}

/* Every image moves to its next row and noise counter: the last node of a step's graph. */
extern "C" __global__ void ddstep_advance(dd_image *images, int batch)
{
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < batch; j += gridDim.x * blockDim.x) {
        images[j].row += 1;
        images[j].step += 1;
    }
}
