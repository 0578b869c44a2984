"""Independent float64 oracles for the kernel tests: Philox4x32-10 (Salmon et al. 2011) and Box-Muller noise."""

import numpy as np

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers (Salmon et al. 2011, Table 2)
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments: golden ratio and sqrt(3) - 1
MASK = 0xFFFFFFFF


def philox_py(ctr, key, rounds=10):
    """Philox4x32-R on Python ints, key bumped before every round but the first (Random123's order)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
    return c0, c1, c2, c3


def philox_np(c0, c1, c2, c3, k0, k1, rounds=10):
    """Philox4x32-R vectorized over uint64 arrays holding uint32 values; returns four uint64 arrays."""
    c0, c1, c2, c3, k0, k1 = (np.asarray(v, dtype=np.uint64) & np.uint64(MASK) for v in (c0, c1, c2, c3, k0, k1))
    mask, shift = np.uint64(MASK), np.uint64(32)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + np.uint64(W0)) & mask, (k1 + np.uint64(W1)) & mask
        p0, p1 = np.uint64(M0) * c0, np.uint64(M1) * c2
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
    return c0, c1, c2, c3


def uniform(r):
    """Top 23 bits to (0, 1): ((r >> 9) + 0.5) * 2**-23 (kernels/philox.h)."""
    return ((r >> np.uint64(9)).astype(np.float64) + 0.5) * 2.0**-23


def box_muller(ra, rb):
    """Box & Muller (1958): sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2), in float64."""
    radius = np.sqrt(-2.0 * np.log(uniform(ra)))
    angle = 2.0 * np.pi * uniform(rb)
    return radius * np.cos(angle), radius * np.sin(angle)


def noise(seed, n, step, domain):
    """The n normals of one image: key = seed halves, counter = (quad lo, quad hi, step, domain)."""
    q = np.arange((n + 3) // 4, dtype=np.uint64)
    seed = int(seed)
    r0, r1, r2, r3 = philox_np(q & np.uint64(MASK), q >> np.uint64(32), step, domain, seed & MASK, seed >> 32)
    z = np.empty((q.size, 4))
    z[:, 0], z[:, 1] = box_muller(r0, r1)
    z[:, 2], z[:, 3] = box_muller(r2, r3)
    return z.reshape(-1)[:n]


def batch_noise(seeds, shape, step, domain):
    """noise() for every image of a batch of the given shape (B, ...)."""
    per_image = int(np.prod(shape[1:], dtype=np.int64))
    return np.stack([noise(s, per_image, step, domain) for s in seeds]).reshape(shape)


def rel_err(got, ref):
    """Norm-wise relative error max|got - ref| / max|ref|."""
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


def single_step_rows(rows, clip=0.0):
    """Coefficient rows (n, NUM_COLUMNS) float32 from their first nine columns (ax .. sigma): no slots, clip `clip`."""
    from ddengine.core.rows import CLIP, NUM_COLUMNS, WRITE_D

    rows = np.asarray(rows, dtype=np.float32)
    table = np.zeros((len(rows), NUM_COLUMNS), dtype=np.float32)
    table[:, : rows.shape[1]] = rows
    table[:, CLIP], table[:, WRITE_D] = clip, -1.0
    return table


def random_step_case(rng, batch, shape, guided_share=0.5, tables=3, sigma=0.7, clip=0.0, multistep=False):
    """x, model_out, a coefficient table and per-image records with different rows, steps and guidance.

    Images 0..B-1 own model_out rows 0..B-1; guided images get unconditional rows B.. in order. With `multistep`,
    rows read and write the slots (random multistep columns; every row writes some slot or L) and slots are returned
    as a fifth value (B, 4, *shape).
    """
    from ddengine.core.rows import CLIP, MULTISTEP, NUM_COLUMNS, SIGMA, SLOTS, WRITE_D, WRITE_S
    from ddengine.kernels.host import NO_UNCOND, image_records

    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    guided = rng.random(batch) < guided_share
    model_out = rng.standard_normal((batch + int(guided.sum()),) + shape).astype(np.float32)
    table = np.zeros((tables, NUM_COLUMNS), dtype=np.float32)
    table[:, :SIGMA] = rng.uniform(-1.5, 1.5, (tables, SIGMA))
    table[:, SIGMA] = sigma
    table[0, SIGMA] = 0.0  # one row without noise
    table[:, CLIP] = clip
    table[:, WRITE_D] = -1.0
    if multistep:
        table[:, MULTISTEP] = rng.uniform(-1.0, 1.0, (tables, MULTISTEP.stop - MULTISTEP.start))
        table[:, WRITE_D] = np.arange(tables) % 4 - 1  # -1 (none), 0, 1, 2
        table[:, WRITE_S] = np.arange(tables) % 2
    images = image_records(rng.integers(0, 2**64, batch, dtype=np.uint64))
    images["row"] = rng.integers(0, tables, batch)
    images["step"] = rng.integers(0, 2**32, batch, dtype=np.uint64).astype(np.uint32)
    images["uncond"] = np.where(guided, batch + np.cumsum(guided) - 1, NO_UNCOND)
    images["guidance"] = np.where(guided, rng.uniform(0.5, 8.0, batch), 0.0)
    if multistep:
        return x, model_out, table, images, rng.standard_normal((batch, SLOTS) + shape).astype(np.float32)
    return x, model_out, table, images


def oracle_step(x, model_out, table, images, slots=None):
    """Each image stepped alone in float64 (engine/core/reference.py) with its own row, noise step and guidance;
    returns x' and the slots after the step (float64 copies)."""
    from ddengine.core.reference import reference_step

    out = np.empty(x.shape, dtype=np.float64)
    after = None if slots is None else slots.astype(np.float64)
    for j, im in enumerate(images):
        z = noise(im["seed"], x[j].size, int(im["step"]), 0).reshape(x[j].shape)
        uncond = model_out[im["uncond"]] if im["uncond"] >= 0 else None
        out[j] = reference_step(
            x[j],
            model_out[j],
            table[im["row"]].astype(np.float64),
            z,
            uncond=uncond,
            guidance=float(im["guidance"]) if uncond is not None else None,
            slots=None if after is None else after[j],
        )
    return out if slots is None else (out, after)
