"""Admission policies of the StepBatcher (engine/serving/batcher.py): which queued images join the batch, and when.

A policy is a pure function of an immutable view, `policy.admit(queue, batch) -> Decision`: no side effects, no
access to the batcher. At every step boundary where images are queued and a slot is free, the batcher builds the
view (the queued requests in arrival order, the images in flight), checks the decision and applies it. Retirement is
no policy's business: an image leaves when its plan's last step is done (or its request is cancelled, times out or
fails), and every image keeps its own plan row, seeds and noise counters, so whatever the policy each image is
bit-identical to `Sampler.sample` of its request alone.

    Fifo()                     the default: as many images of the oldest request as fit, then the next
    ShortestRemainingFirst()   fewest model evaluations left first; a request queued past `age_bound` s goes first
    Gang()                     a request's images only all together (oldest first), when they all fit
    OneAtATime()               one request's images form the whole batch until they are done (a baseline)
    RequestLevel()             @serve.batch-style: whole requests into an empty batch for <= `window` s, then run
                               to completion with nothing joining (a baseline)
"""

import math
import numbers
from typing import NamedTuple, Protocol


class QueuedJob(NamedTuple):
    """A request with images not yet admitted, as a policy sees it."""

    arrival: int  # its number in submit order (1, 2, ...): what a Decision names it by
    images: int  # images not yet admitted (they are admitted in index order)
    admitted: int  # images already admitted (a request larger than the free slots is admitted in parts)
    steps: int  # model evaluations per image: its plan's length
    running: int  # evaluations its admitted images still have to do
    waited: float  # seconds since it was submitted (the batcher's clock)
    plan: tuple  # Request.plan_key (steps, method, eta, spacing, ...): requests with the same key share a plan
    guided: bool  # two forward rows per image (conditional and unconditional) instead of one

    @property
    def evaluations(self):
        """Model evaluations the request still needs: its queued images' whole plans and its admitted images' rest."""
        return self.images * self.steps + self.running


class InFlight(NamedTuple):
    """An image in the batch: its request's arrival number and the steps it has left (>= 1)."""

    arrival: int
    remaining: int


class BatchView(NamedTuple):
    """The batch at a step boundary, after retirement."""

    capacity: int  # images it holds (the batcher's max_batch)
    images: tuple = ()  # InFlight of each image in it
    steps: int = 0  # steps run since it was last empty
    age: float = 0.0  # seconds since its first admission since it was last empty (0 while empty)

    @property
    def free(self):
        """Image slots free for admission."""
        return self.capacity - len(self.images)


class Decision(NamedTuple):
    """What joins the batch now: (arrival, images) pairs, admitted in this order; then whether to wait."""

    admit: tuple = ()
    hold: float = 0.0  # seconds to wait for new requests and ask again before the next step (0: step now)


class AdmissionPolicy(Protocol):
    """Decides admissions from the queue (QueuedJob in arrival order, never empty) and the batch (a free slot)."""

    def admit(self, queue: tuple, batch: BatchView) -> Decision: ...


def fill(jobs, free):
    """Greedy admission in the given order: each job as many of its images as still fit, until no slot is free."""
    admit = []
    for job in jobs:
        if not free:
            break
        k = min(job.images, free)
        admit.append((job.arrival, k))
        free -= k
    return Decision(tuple(admit))


class Fifo:
    """First in, first out: as many images of the oldest request as fit, then the next (a request may straddle)."""

    def admit(self, queue, batch):
        return fill(queue, batch.free)

    def __repr__(self):
        return "Fifo()"


class ShortestRemainingFirst:
    """Fewest model evaluations left (QueuedJob.evaluations) first, ties by arrival, with an aging bound.

    A request queued for `age_bound` seconds or more goes ahead of every younger one, the aged in arrival order, so
    none waits behind a stream of shorter requests for longer than the bound plus the time the older aged ones take.
    """

    def __init__(self, age_bound=5.0):
        if not (isinstance(age_bound, (int, float)) and math.isfinite(age_bound) and age_bound >= 0):
            raise ValueError(f"age_bound must be a finite number of seconds >= 0, got {age_bound!r}")
        self.age_bound = age_bound

    def order(self, queue):
        """The queue in admission order: the aged by arrival, then the rest by (evaluations, arrival)."""
        aged = [job for job in queue if job.waited >= self.age_bound]
        young = sorted((job for job in queue if job.waited < self.age_bound), key=lambda j: (j.evaluations, j.arrival))
        return aged + young

    def admit(self, queue, batch):
        return fill(self.order(queue), batch.free)

    def __repr__(self):
        return f"ShortestRemainingFirst(age_bound={self.age_bound!r})"


class Gang:
    """A request's images join only all together, when they all fit; oldest first, none overtakes a waiting one.

    A request larger than the batch joins an empty batch `capacity` images at a time.
    """

    def admit(self, queue, batch):
        free, admit = batch.free, []
        for job in queue:
            k = min(job.images, batch.capacity)
            if k > free:
                break
            admit.append((job.arrival, k))
            free -= k
        return Decision(tuple(admit))

    def __repr__(self):
        return "Gang()"


class OneAtATime:
    """One request at a time, first in first out: its images form the whole batch until they are all done."""

    def admit(self, queue, batch):
        if batch.images:
            return Decision()
        return Decision(((queue[0].arrival, min(queue[0].images, batch.capacity)),))

    def __repr__(self):
        return "OneAtATime()"


class RequestLevel:
    """Request-level dynamic batching as Ray Serve's @serve.batch does it.

    Only a batch that has not stepped since it was empty takes images: the oldest request (as many images as fit),
    then whole requests in arrival order while they fit, waiting up to `window` seconds from the first admission for
    more; then the batch runs until its last image is done, and nothing joins meanwhile.
    """

    def __init__(self, window=0.010):
        if not (isinstance(window, (int, float)) and math.isfinite(window) and window >= 0):
            raise ValueError(f"window must be a finite number of seconds >= 0, got {window!r}")
        self.window = window

    def admit(self, queue, batch):
        if batch.steps:
            return Decision()
        free, admit = batch.free, []
        for job in queue:
            k = job.images if admit or batch.images else min(job.images, free)
            if k > free:
                return Decision(tuple(admit))  # the next request does not fit whole: the batch is formed
            admit.append((job.arrival, k))
            free -= k
            if not free:
                return Decision(tuple(admit))
        return Decision(tuple(admit), max(0.0, self.window - batch.age))

    def __repr__(self):
        return f"RequestLevel(window={self.window!r})"


class PolicyError(ValueError):
    """A policy's decision the batcher cannot apply (the queued requests fail with it; the batch runs on)."""


def check(decision, queue, batch):
    """Raise PolicyError unless `decision` admits queued images into free slots, each request once, or holds."""
    if not isinstance(decision, Decision):
        raise PolicyError(f"a policy returns a Decision, got {type(decision).__name__}")
    images = {job.arrival: job.images for job in queue}
    seen, total = set(), 0
    for arrival, k in decision.admit:
        if arrival not in images or arrival in seen:
            raise PolicyError(f"the decision admits request {arrival!r}, which is not queued or is named twice")
        if isinstance(k, bool) or not (isinstance(k, numbers.Integral) and 1 <= k <= images[arrival]):
            raise PolicyError(f"request {arrival} has {images[arrival]} images queued; the decision admits {k!r}")
        seen.add(arrival)
        total += k
    if total > batch.free:
        raise PolicyError(f"the decision admits {total} images into {batch.free} free slots")
    hold = decision.hold
    if not (isinstance(hold, (int, float)) and math.isfinite(hold) and hold >= 0):
        raise PolicyError(f"hold must be a finite number of seconds >= 0, got {hold!r}")
    if not batch.images and not total and not hold:
        raise PolicyError("into an empty batch a decision admits an image or holds (else nothing would ever run)")
