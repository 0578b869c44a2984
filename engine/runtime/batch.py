"""ImageBatch: images at any step of any plan, denoised together by one forward and one fused step per step.

The forward's rows are engine/core/guidance.py's layout: the images' own rows, then the unconditional rows of the
guided ones. Each image carries its own coefficient row, noise counter and guidance (engine/kernels/host.py), and
its own conditioning inputs (class label, text embedding), so an image's result is a pure function of its seed
and parameters whatever else shares its forward (exact step-level batching). The host loop admits one chunk and
steps it to the end; the step batcher (engine/serving/batcher.py) admits and retires images between steps.
"""

import numpy as np

from ddengine.core.guidance import NO_UNCOND, layout_rows, uncond_rows
from ddengine.core.rows import NUM_COLUMNS, SLOTS
from ddengine.kernels import host as fused
from ddengine.kernels.host import IMAGE_DTYPE
from ddengine.runtime.init_state import Start
from ddengine.runtime.inpainting import Inpainting


class ImageBatch:
    """Up to `capacity` images and the buffers of their forward (capacity x spec.cfg_factor rows)."""

    def __init__(self, backend, spec, capacity, *, threads=0):
        self.backend, self.spec, self.capacity, self.threads = backend, spec, capacity, threads
        rows = capacity * spec.cfg_factor
        self.x_in = np.empty((rows, *spec.image_shape), dtype=np.float32)
        self.out = np.empty_like(self.x_in)
        self.slots = None  # (capacity, SLOTS, *image_shape) once a multistep plan is admitted
        self.x0 = None  # (capacity, *image_shape) once keep_x0() asks for the kernel's x0
        self.inpainting: Inpainting | None = None  # once a masked image is admitted (engine/runtime/inpainting.py)
        self.t_in = np.empty(rows, dtype=np.float64 if np.dtype(spec.io["timestep"].dtype).kind == "f" else np.int64)
        roles = [r for r in spec.roles() if r not in ("sample", "timestep")]  # class_labels, encoder_hidden_states
        self.inputs = {r: np.empty(spec.io[r].at(rows), dtype=spec.io[r].dtype) for r in roles}
        self.own = {r: np.empty(spec.io[r].at(capacity), dtype=spec.io[r].dtype) for r in roles}
        self.uncond = {r: np.empty(spec.io[r].at(capacity), dtype=spec.io[r].dtype) for r in roles}
        self.images = np.empty(capacity, dtype=IMAGE_DTYPE)
        self.remaining = np.zeros(capacity, dtype=np.int64)
        self.tags = [None] * capacity
        self.n = 0
        self.guided = np.empty(0, dtype=np.int64)
        self._plans = {}  # id(plan) -> (plan, its first table row, its number); only plans with images in the batch
        self._next_plan = 0
        self.plan_of = np.empty(capacity, dtype=np.int64)  # each image's plan number
        self.table = np.empty((0, NUM_COLUMNS), dtype=np.float32)
        self.t_table = np.empty(0, dtype=self.t_in.dtype)

    @property
    def rows(self):
        """Rows of the current forward: one per image plus one per guided image."""
        return self.n + len(self.guided)

    @property
    def x(self):
        """The images' latents x_t (a view: the first rows of the forward input)."""
        return self.x_in[: self.n]

    def admit(self, plan, seeds, conditioning, tags, start=None):
        """Add images at step 0 of `plan` with their Conditioning (engine/core/guidance.py): x_T from their seeds, or
        as `start` says (engine/runtime/init_state.py Start): the caller's noise instead of the seeds', an image
        noised to plan.start_abar (image-to-image), a known image and mask to blend after every step (inpainting)."""
        k = len(seeds)
        if self.n + k > self.capacity:
            raise ValueError(f"cannot admit {k} images into a batch of {self.n} with capacity {self.capacity}")
        if not plan.integer_timesteps and self.t_in.dtype.kind != "f":
            raise ValueError(
                f"{plan.method}'s schedule has fractional timesteps (e.g. {plan.timesteps[1]:g}) and this model's "
                "timestep input is an integer: use timestep_spacing 'leading' or 'trailing' (or no Karras sigmas)"
            )
        missing = sorted(set(self.own) - set(conditioning.inputs))
        if missing:
            raise ValueError(f"the model's inputs {missing} need values for the admitted images")
        first, number = self._plan_offset(plan)
        new = slice(self.n, self.n + k)
        seeds = np.ascontiguousarray(seeds, dtype=np.uint64)
        start = start or Start()
        self._start(plan, new, seeds, start.images, start.noise)
        if start.masks is not None and self.inpainting is None:
            self.inpainting = Inpainting(self.capacity, self.spec.image_shape)
        if self.inpainting is not None:
            self.inpainting.admit(plan, new, seeds, start, self.threads)
        if plan.multistep:
            if self.slots is None:
                self.slots = np.empty((self.capacity, SLOTS, *self.spec.image_shape), dtype=np.float32)
            self.slots[new] = 0.0
        guidance = conditioning.guidance
        self.images[new] = fused.image_records(
            seeds, row=first, guidance=0.0 if guidance is None else guidance, noise_scale=plan.init_scale
        )
        self.images["uncond"][new] = 0 if conditioning.guided else NO_UNCOND  # placed by _layout
        for role, (own, uncond) in conditioning.inputs.items():
            self.own[role][new] = own
            self.uncond[role][new] = uncond
        self.remaining[new] = len(plan)
        self.plan_of[new] = number
        self.tags[new] = tags
        self.n += k
        self._layout()
        return new

    def _start(self, plan, new, seeds, images, noise):
        """x of the admitted images: init_scale z, or sqrt(abar) x0 + sqrt(1 - abar) z from an image (z: the seeds'
        normals or the caller's noise)."""
        scale = plan.init_scale if images is None else 1.0
        if noise is None:
            fused.fill_noise(self.x_in[new], seeds, self.threads, scale)
        else:
            np.multiply(noise, np.float32(scale), out=self.x_in[new])
        if images is not None:
            a, b = np.float32(np.sqrt(plan.start_abar)), np.float32(np.sqrt(1.0 - plan.start_abar))
            self.x_in[new] = a * images + b * self.x_in[new]

    def forward(self):
        """The U-Net forward of every row: per-row timesteps and conditioning, guided rows copied from their images."""
        n, g = self.n, len(self.guided)
        if g:
            np.take(self.x_in[:n], self.guided, axis=0, out=self.x_in[n : n + g])
        np.take(self.t_table, self.images["row"][:n], out=self.t_in[:n])
        self.t_in[n : n + g] = self.t_in[self.guided]
        feeds = {"sample": self.x_in[: n + g], "timestep": self.t_in[: n + g]}
        feeds.update({role: values[: n + g] for role, values in self.inputs.items()})
        run_rows(self.backend, self.spec, feeds, self.out[: n + g])
        return self.out[: n + g]

    def keep_x0(self):
        """From now on each update() also writes every image's x0 into self.x0 (the kernel's, for snapshots)."""
        if self.x0 is None:
            self.x0 = np.empty((self.capacity, *self.spec.image_shape), dtype=np.float32)

    def update(self):
        """The fused step of every image (kernels/step.h), then each moves to its next step; returns the finished."""
        n = self.n
        slots = None if self.slots is None else self.slots[:n]
        x0 = None if self.x0 is None else self.x0[:n]
        fused.step(self.x_in[:n], self.out[: self.rows], self.table, self.images[:n], slots, x0, self.threads)
        fused.advance(self.images[:n])
        self.remaining[:n] -= 1
        if self.inpainting is not None:
            self.inpainting.blend(self.x_in[:n], self.remaining[:n])
        return np.flatnonzero(self.remaining[:n] == 0)

    def step(self):
        """forward() then update(): one denoising step of every image."""
        self.forward()
        return self.update()

    def retire(self, slots):
        """Remove images: their (x_0 copies, first non-finite step or -1, tags); the rest keep their order."""
        slots = np.asarray(slots, dtype=np.int64)
        x, bad = self.x_in[slots].copy(), self.images["nonfinite_step"][slots].astype(np.int64)
        tags = [self.tags[s] for s in slots]
        keep = np.setdiff1d(np.arange(self.n), slots)
        m = len(keep)
        self.x_in[:m], self.images[:m], self.remaining[:m] = self.x_in[keep], self.images[keep], self.remaining[keep]
        self.plan_of[:m] = self.plan_of[keep]
        if self.slots is not None:
            self.slots[:m] = self.slots[keep]
        if self.inpainting is not None:
            self.inpainting.keep(keep)
        for store in (self.own, self.uncond):
            for values in store.values():
                values[:m] = values[keep]
        self.tags[:m] = [self.tags[s] for s in keep]
        self.n = m
        self._layout()
        self._drop_drained_plans()
        return x, bad, tags

    def _layout(self):
        """The forward's rows after an admit or a retire: unconditional rows n.. for the guided images, in order."""
        n = self.n
        guided = self.images["uncond"][:n] != NO_UNCOND
        self.guided = np.flatnonzero(guided)
        self.images["uncond"][:n] = uncond_rows(guided)
        for role, values in self.inputs.items():
            layout_rows(self.own[role][:n], self.uncond[role][:n], self.guided, values)

    def _drop_drained_plans(self):
        """Keep only the table rows of plans that still have images, so the tables are bounded by the live plans,
        not by every plan ever admitted; each image's row moves with its plan's rows."""
        live = set(np.unique(self.plan_of[: self.n]).tolist())
        if len(live) == len(self._plans):
            return
        plans: dict = {}
        table: list[np.ndarray] = []
        t_table: list[np.ndarray] = []
        new_first = 0
        for key, (plan, first, number) in sorted(self._plans.items(), key=lambda kv: kv[1][1]):
            if number not in live:
                continue
            length = len(plan.timesteps)
            self.images["row"][: self.n][self.plan_of[: self.n] == number] -= first - new_first
            plans[key] = (plan, new_first, number)
            table.append(self.table[first : first + length])
            t_table.append(self.t_table[first : first + length])
            new_first += length
        self._plans = plans
        self.table = np.concatenate(table) if table else self.table[:0]
        self.t_table = np.concatenate(t_table) if t_table else self.t_table[:0]

    def _plan_offset(self, plan):
        """(first row, number) of `plan` in the batch's coefficient and timestep tables (appended once per plan)."""
        key = id(plan)
        if key not in self._plans:
            self._plans[key] = (plan, len(self.table), self._next_plan)
            self._next_plan += 1
            self.table = np.concatenate([self.table, plan.rows_float32()])
            self.t_table = np.concatenate([self.t_table, plan.timesteps])
        return self._plans[key][1:]


def run_rows(backend, spec, feeds, out):
    """backend.run with per-row timesteps; a model whose timestep input is a scalar runs once per distinct timestep."""
    t = feeds["timestep"]
    if not spec.io["timestep"].scalar or len(t) == 0 or (t == t[0]).all():
        return backend.run(feeds, out)
    for value in np.unique(t):
        rows = np.flatnonzero(t == value)
        part = {role: np.ascontiguousarray(array[rows]) for role, array in feeds.items()}
        sub = np.empty((len(rows), *out.shape[1:]), dtype=out.dtype)
        backend.run(part, sub)
        out[rows] = sub
    return out
