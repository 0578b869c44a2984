"""Exact step-level batching of concurrent requests: `StepBatcher(parts).submit(request) -> Future`.

One worker thread owns one ImageBatch (engine/runtime/batch.py) over a model's Parts (engine/runtime/parts.py).
At every step boundary it retires finished, cancelled and timed-out images, admits queued images as its admission
policy decides (engine/serving/policies.py; Fifo by default) up to `max_batch`, and runs one forward (per-row
timesteps and conditioning; unconditional rows only for guided images) and one fused step with each image's own
coefficient row, noise counter and guidance. An image's result is a pure function of its seed and its own request
whatever shares its forward, so with a batch-invariant backend (ddengine.backends.base.probe_batch_invariance)
every image is bit-identical, whatever the policy, to `Sampler.sample` of its request alone, which runs the same
ImageBatch one chunk at a time (engine/runtime/loop.py).
No web framework here: engine/serving/app.py and engine/serving/ray_serve.py wrap it.
"""

import collections
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ddengine.runtime.batch import ImageBatch
from ddengine.runtime.params import InvalidParameterError, Request, integer, real
from ddengine.runtime.parts import preview_steps
from ddengine.serving.policies import BatchView, Fifo, InFlight, PolicyError, QueuedJob, check


class QueueFull(RuntimeError):
    """The queue holds `max_queue` images: refused at once (HTTP 503); retry_after is a hint in seconds."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class BatcherClosed(RuntimeError):
    """The batcher no longer takes requests (it is draining or closed)."""


class StepStuck(RuntimeError):
    """A step ran past the watchdog's limit: its requests failed and the core restarted with a new worker."""


@dataclass(frozen=True)
class Result:
    """A finished request: uint8 (n, H, W, C) images and one record per image (Sampler's records)."""

    images: np.ndarray
    records: list


class _Job:
    """One submitted request while its images are queued, active or done."""

    def __init__(self, request, plan, conditioning, deadline, submitted, previews=0, on_preview=None, on_progress=None):
        self.request, self.plan, self.conditioning = request, plan, conditioning
        self.arrival = 0  # its number in submit order, set when queued (what a policy's Decision names it by)
        self.deadline, self.submitted = deadline, submitted
        self.future = Future()
        self.admitted = 0  # images handed to the batch so far (in index order)
        self.nonfinite_step = np.full(request.n, -1, dtype=np.int64)
        self.finished = {}  # index -> x_0
        self.on_preview, self.on_progress = on_preview, on_progress
        self.evaluations = 0  # (image, step) model evaluations done, for on_progress
        self.preview_at = preview_steps(len(plan), previews)  # steps done -> preview number
        self.previews = collections.defaultdict(dict)  # preview number -> {index: the kernel's x0 then}


class StepBatcher:
    """Runs many requests' images through shared forwards; thread-safe `submit`, one worker thread."""

    def __init__(
        self,
        parts,
        max_batch=16,
        max_queue=1024,
        on_step=None,
        clock=time.monotonic,
        step_timeout=None,
        policy=None,
        inline_output=False,
    ):
        """clock: seconds for request timeouts and the policy's view (a test's clock can stand in for time.monotonic).

        policy: an AdmissionPolicy (engine/serving/policies.py) deciding which queued images join at each step;
        Fifo() when None.

        inline_output: run the output stage (decode, uint8, records, previews) on the worker between steps, as
        before it had its own thread (bench/bench_output_stage.py measures the difference).

        step_timeout: seconds one step may take; past it a watchdog fails the requests in that batch (StepStuck),
        keeps the queued ones and starts a new worker on a new batch (the stuck thread's result is discarded).
        """
        max_batch, max_queue = integer("max_batch", max_batch, 1), integer("max_queue", max_queue, 1)
        self.step_timeout = None if step_timeout is None else real("step_timeout", step_timeout)
        self.parts, self.spec, self.max_batch, self.max_queue = parts, parts.spec, max_batch, max_queue
        self.on_step = on_step  # on_step(rows, seconds) after every step (metrics)
        self.clock = clock
        self.policy = Fifo() if policy is None else policy
        self.inline_output = bool(inline_output)
        self._batch = None
        self._arrivals = 0  # requests queued so far: the next one's arrival number - 1
        self._formed_at, self._formed_steps = None, 0  # the batch's first admission and steps since it was empty
        self._queue = collections.deque()  # jobs with images not yet admitted
        self._jobs = set()  # jobs not yet finished
        self._queued_images = 0
        self._cv = threading.Condition()
        self._closing = self._abort = False
        self.stats = (
            collections.Counter()
        )  # submitted, rejected, completed, failed, cancelled, timed_out, images, steps
        self._step_seconds = 0.0
        self._generation = 0  # bumped by a restart: a worker of an older generation stops touching the state
        self._step_started = None  # time.monotonic() of the running step's start
        self.last_failure = None  # {"time": unix seconds, "error": message} of the last failed request
        self.restarts = 0
        self._outputs = queue.Queue()  # (work, job) for the output stage, in order: a job's previews, then its result
        self._ready = collections.deque()  # (work, job) of this step, handed off once the lock is released
        self._failed_outside = set()  # jobs the output stage failed: the worker takes their images out
        self._output_thread = threading.Thread(target=self._output_stage, name="ddengine-output", daemon=True)
        self._output_thread.start()
        self._start_worker()
        if self.step_timeout is not None:
            threading.Thread(target=self._watch, name="ddengine-watchdog", daemon=True).start()

    def _start_worker(self):
        self._worker = threading.Thread(
            target=self._run, args=(self._generation,), name="ddengine-batcher", daemon=True
        )
        self._worker.start()

    @property
    def worker_alive(self):
        """Whether the worker thread runs (it only ends on close)."""
        return self._worker.is_alive()

    # --- the caller's side -------------------------------------------------------------------------------
    def submit(self, request, timeout=None, previews=0, on_preview=None, on_progress=None):
        """Queue a validated Request (Sampler.request); returns a Future of Result.

        previews: that many previews spread over the steps, each `on_preview(k, images)` (uint8, decoded from the
        kernel's x0 of every image of the request; called on the output-stage thread, before the result);
        on_progress(done, total) after every step with the request's model evaluations done and in all.
        Raises QueueFull (over max_queue), BatcherClosed (draining or closed) or InvalidParameterError (not a
        Request, a timeout that is not a finite number >= 0, trajectory snapshots).
        """
        if not isinstance(request, Request):
            raise InvalidParameterError(f"submit takes a Request (Sampler.request(...)), got {type(request).__name__}")
        if timeout is not None:
            timeout = real("timeout", timeout)
        if request.trajectory:
            raise InvalidParameterError("trajectory snapshots are not served by the batcher; use Sampler.sample")
        plan, conditioning = self.parts.plan(request), self.parts.conditioner.condition(request)
        now = self.clock()
        previews = integer("previews", previews, 0)
        deadline = None if timeout is None else now + timeout
        job = _Job(request, plan, conditioning, deadline, now, previews, on_preview, on_progress)
        with self._cv:
            if self._closing:
                raise BatcherClosed("the batcher is shutting down and takes no new requests")
            if self._queued_images + request.n > self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(
                    f"the queue holds {self._queued_images} images (limit {self.max_queue}); "
                    f"{request.n} more do not fit",
                    self.retry_after(),
                )
            self._arrivals += 1
            job.arrival = self._arrivals
            self._queue.append(job)
            self._jobs.add(job)
            self._queued_images += request.n
            self.stats["submitted"] += 1
            self._cv.notify()
        return job.future

    def retry_after(self):
        """Seconds until the queue has room, from the measured step time (at least 1)."""
        steps = max(self.stats["steps"], 1)
        per_step = self._step_seconds / steps if self.stats["steps"] else 0.05
        return max(1, int(np.ceil(per_step * 50 * max(1, self._queued_images / self.max_batch))))

    @property
    def queued_images(self):
        return self._queued_images

    @property
    def active_images(self):
        return 0 if self._batch is None else self._batch.n

    def occupancy(self):
        """Forward rows in use / rows the batch can hold."""
        return 0.0 if self._batch is None else self._batch.rows / (self.max_batch * self.spec.cfg_factor)

    @contextmanager
    def paused(self):
        """Within the block the worker admits and steps nothing (requests submitted in it start together)."""
        with self._cv:
            yield self

    def close(self, drain=True, timeout=None):
        """Stop taking requests; with `drain`, finish what was accepted, else fail it. Waits for the worker, then
        for the output stage to deliver what the worker handed it."""
        with self._cv:
            self._closing, self._abort = True, not drain
            self._cv.notify()
        self._worker.join(timeout)
        if not self._worker.is_alive():
            self._outputs.put(None)
            self._output_thread.join(timeout)

    # --- the worker's side -------------------------------------------------------------------------------
    def _watch(self):
        """The watchdog: a step running past step_timeout restarts the core (called on its own thread)."""
        period = min(1.0, self.step_timeout / 4)
        while True:
            time.sleep(period)
            with self._cv:
                if self._closing and not self._worker.is_alive():
                    return
                started = self._step_started
                if started is not None and time.monotonic() - started > self.step_timeout:
                    self._restart(f"a step ran past the watchdog's {self.step_timeout:g} s; the core was restarted")

    def _restart(self, message, error=StepStuck):
        """Abandon the worker and its batch: fail the requests in it (`error`), keep the queue, start a new worker."""
        self._generation += 1
        self._step_started = None
        stuck, self._batch = self._batch, None
        for job in {tag[0] for tag in (stuck.tags[: stuck.n] if stuck is not None else [])}:
            self._fail(job, error(message))
        for job in [j for j in self._queue if j.admitted]:  # partly admitted: its first images were in the batch
            self._fail(job, error(message))
        self.restarts += 1
        self._start_worker()

    def _run(self, generation):
        while True:
            with self._cv:
                if generation != self._generation:
                    return
                while not self._queue and not self.active_images and not self._closing:
                    self._cv.wait()
                if generation != self._generation:
                    return
                if self._abort:
                    for job in list(self._jobs):
                        self._fail(job, BatcherClosed("the batcher was closed before this request finished"))
                if self._closing and not self._queue and not self.active_images:
                    return
                self._drop_abandoned()
                hold = self._admit()
                if hold:  # the policy waits for more requests before this step (submit() notifies)
                    self._cv.wait(hold)
                    continue
            if self.active_images:
                try:
                    self._step(generation)
                except Exception as err:  # a fault of the worker's own: the batch's requests fail, the worker goes on
                    with self._cv:
                        if generation == self._generation:
                            message = f"the step failed ({type(err).__name__}: {err}); the core was restarted"
                            self._restart(message, RuntimeError)

    def _admit(self):
        """Ask the policy which queued images join, check and apply its decision; returns its hold (lock held)."""
        if not self.active_images:
            self._formed_at, self._formed_steps = None, 0
        free = self.max_batch - self.active_images
        if not self._queue or not free:
            return 0.0
        queue, batch = self._views()
        try:
            decision = self.policy.admit(queue, batch)
            check(decision, queue, batch)
        except Exception as err:  # a faulty policy fails the queued requests, not the worker (the batch runs on)
            error = err if isinstance(err, PolicyError) else PolicyError(f"the admission policy failed: {err!r}")
            for job in list(self._queue):
                self._fail(job, error)
            return 0.0
        jobs = {job.arrival: job for job in self._queue}
        for arrival, k in decision.admit:
            if not self._admit_job(jobs[arrival], int(k)):
                return 0.0  # its request failed; the policy decides again at the next boundary
        return float(decision.hold)

    def _views(self):
        """The policy's immutable view: (QueuedJob of each queued request in arrival order, BatchView)."""
        batch, now = self._batch, self.clock()
        images = () if batch is None else tuple(InFlight(job.arrival, int(r)) for (job, _), r in self._in_flight())
        running = collections.Counter()
        for image in images:
            running[image.arrival] += image.remaining
        queue = tuple(
            QueuedJob(
                job.arrival,
                job.request.n - job.admitted,
                job.admitted,
                len(job.plan),
                running[job.arrival],
                now - job.submitted,
                job.request.plan_key,
                bool(job.conditioning.guided),
            )
            for job in self._queue
        )
        age = 0.0 if self._formed_at is None else now - self._formed_at
        return queue, BatchView(self.max_batch, images, self._formed_steps, age)

    def _in_flight(self):
        """(tag, steps remaining) of each image in the batch."""
        batch = self._batch
        return zip(batch.tags[: batch.n], batch.remaining[: batch.n].tolist())

    def _admit_job(self, job, k):
        """Admit the next `k` images of a queued job; False if that failed its request (called with the lock held)."""
        batch = self._batch_for(job.plan)
        part = slice(job.admitted, job.admitted + k)
        if job.preview_at:
            batch.keep_x0()
        try:
            batch.admit(
                job.plan,
                job.request.seeds[part],
                job.conditioning.part(part),
                [(job, i) for i in range(part.start, part.stop)],
                None if job.request.init is None else job.request.init.part(part),
            )
        except Exception as err:  # the request fails, the worker goes on
            self._fail(job, err)
            return False
        if self._formed_at is None:
            self._formed_at = self.clock()
        job.admitted += k
        self._queued_images -= k
        if job.admitted == job.request.n:
            self._queue.remove(job)
        return True

    def _batch_for(self, plan):
        if self._batch is None:
            self._batch = ImageBatch(self.parts.backend, self.spec, self.max_batch, threads=self.parts.threads)
        return self._batch

    def _step(self, generation):
        batch, start = self._batch, time.perf_counter()
        rows = batch.rows
        self._step_started = time.monotonic()
        try:
            finished = batch.step()
        except Exception as err:  # a backend failure fails the images in flight, not the server
            with self._cv:
                if generation == self._generation:
                    self._step_started = None
                    for job in {tag[0] for tag in batch.tags[: batch.n]}:
                        self._fail(job, err)
            return
        with self._cv:
            if generation != self._generation:  # the watchdog gave this step up: its batch is gone
                return
            self._step_started = None
        seconds = time.perf_counter() - start
        self.stats["steps"] += 1
        self._formed_steps += 1
        self._step_seconds += seconds
        if self.on_step is not None:
            self.on_step(rows, seconds)
        self._progress(batch)
        if batch.x0 is not None:
            self._previews(batch)
        if len(finished):
            x, nonfinite_step, tags = batch.retire(finished)
            with self._cv:
                for j, (job, index) in enumerate(tags):
                    self._collect(job, index, x[j], nonfinite_step[j])
        while self._ready:
            self._hand_off(*self._ready.popleft())

    def _progress(self, batch):
        """Tell each request in the step how far it is (its images' evaluations so far, of n x the plan's)."""
        counts = collections.Counter(job for job, _ in batch.tags[: batch.n] if job.on_progress is not None)
        for job, k in counts.items():
            job.evaluations += k
            total = job.request.n * len(job.plan)
            self._contained(job, lambda job=job, total=total: job.on_progress(job.evaluations, total))

    def _previews(self, batch):
        """Keep the kernel's x0 of images at a preview step; a request's preview is sent once all its images have it."""
        ready = []
        for s in range(batch.n):
            job, index = batch.tags[s]
            k = job.preview_at.get(len(job.plan) - int(batch.remaining[s]))
            if k is None or job not in self._jobs:
                continue
            job.previews[k][index] = batch.x0[s].copy()
            if len(job.previews[k]) == job.request.n:
                x0 = job.previews.pop(k)
                ready.append((job, k, np.stack([x0[i] for i in range(job.request.n)])))
        for job, k, x0 in ready:  # decoded and sent by the output stage, before the job's result
            self._ready.append(
                (lambda job=job, k=k, x0=x0: job.on_preview(k, self.parts.preview(job.request, x0)), job)
            )

    def _contained(self, job, work):
        """Run a request's output work; a failure ends that request (500), never the worker."""
        try:
            work()
            return True
        except Exception as err:
            with self._cv:
                self._fail(job, err)
            return False

    def _collect(self, job, index, x0, nonfinite_step):
        if job not in self._jobs:  # failed or cancelled meanwhile
            return
        job.finished[index] = x0
        job.nonfinite_step[index] = nonfinite_step
        if len(job.finished) == job.request.n:
            x = np.stack([job.finished[i] for i in range(job.request.n)])
            self._ready.append((lambda: self._deliver(job, x), job))

    def _deliver(self, job, x):
        """The output stage's end of a request: decode, uint8, records (Parts.finish), then its Future's result."""
        done = self.parts.finish(job.request, slice(0, job.request.n), x, job.nonfinite_step)
        with self._cv:
            if job not in self._jobs:  # failed, cancelled or timed out meanwhile
                return
            self._jobs.discard(job)
            self.stats["completed"] += 1
            self.stats["images"] += job.request.n
            self._cv.notify()  # a draining worker waits for the last result
        if not job.future.cancelled():
            job.future.set_result(Result(done.images, done.records))

    def _hand_off(self, work, job):
        """Queue a request's output work for the output stage, or (inline_output) do it here on the worker."""
        if self.inline_output:
            self._output_work(work, job)
        else:
            self._outputs.put((work, job))

    def _output_stage(self):
        """Decode and deliver off the step loop (its own thread), so the next step does not wait for it; a failure
        ends only its request."""
        while (item := self._outputs.get()) is not None:
            self._output_work(*item)

    def _output_work(self, work, job):
        if job not in self._jobs:
            return
        try:
            work()
        except Exception as err:
            with self._cv:
                if job in self._jobs:
                    self._fail_outside(job, err)

    def _fail_outside(self, job, err):
        """_fail from the output stage: the request ends now, its images leave the batch at the worker's next
        boundary (only the worker touches the batch; called with the lock held)."""
        self.stats["failed"] += 1
        self.last_failure = {"time": time.time(), "error": f"{type(err).__name__}: {err}"}
        self._jobs.discard(job)
        self._failed_outside.add(job)
        if not job.future.done():
            job.future.set_exception(err)
        self._cv.notify()

    def _drop_abandoned(self):
        """Cancelled, timed-out and output-failed jobs leave the queue and the batch (called with the lock held)."""
        for job in self._failed_outside:
            self._remove(job)
        self._failed_outside.clear()
        now = self.clock()
        for job in list(self._jobs):
            if job.future.cancelled():
                self.stats["cancelled"] += 1
                self._remove(job)
            elif job.deadline is not None and now > job.deadline:
                self.stats["timed_out"] += 1
                self._fail(
                    job,
                    TimeoutError(
                        f"the request did not finish within its timeout ({job.deadline - job.submitted:.1f} s)"
                    ),
                )

    def _fail(self, job, err):
        if job in self._jobs:
            self.stats["failed"] += 1
            self.last_failure = {"time": time.time(), "error": f"{type(err).__name__}: {err}"}
        self._remove(job)
        if not job.future.done():
            job.future.set_exception(err)

    def _remove(self, job):
        """Forget a job: its queued images and its slots in the batch."""
        self._jobs.discard(job)
        if job in self._queue:
            self._queue.remove(job)
            self._queued_images -= job.request.n - job.admitted
        if self._batch is not None and self._batch.n:
            slots = [s for s in range(self._batch.n) if self._batch.tags[s][0] is job]
            if slots:
                self._batch.retire(slots)
