"""Admission policies as pure functions: a queue view and a batch view in, a Decision out, checked against each
policy's definition by hand; the default (Fifo) admits exactly what the StepBatcher admitted before policies."""

import numpy as np
import pytest

from ddengine.runtime.sampler import Sampler
from ddengine.serving.batcher import StepBatcher
from ddengine.serving.policies import (
    BatchView,
    Decision,
    Fifo,
    Gang,
    InFlight,
    OneAtATime,
    PolicyError,
    QueuedJob,
    RequestLevel,
    ShortestRemainingFirst,
    check,
)


def job(arrival, images, steps=10, admitted=0, running=0, waited=0.0, guided=False):
    """A QueuedJob with defaults for what a policy under test does not read."""
    return QueuedJob(arrival, images, admitted, steps, running, waited, (steps, "ddim", 0.0, "leading"), guided)


def batch(capacity, *remaining, arrival=99, steps=0, age=0.0):
    """A BatchView of `capacity` holding one image per `remaining` (all of request `arrival`)."""
    return BatchView(capacity, tuple(InFlight(arrival, r) for r in remaining), steps, age)


def test_a_queued_job_counts_its_remaining_model_evaluations():
    assert job(1, 3, steps=20, running=7).evaluations == 3 * 20 + 7
    assert batch(8, 5, 5, 1).free == 5


# --- Fifo ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "queue, view, admit",
    [
        ([job(1, 3), job(2, 4), job(3, 2)], batch(8), ((1, 3), (2, 4), (3, 1))),  # the third straddles
        ([job(1, 3), job(2, 4)], batch(8, 1, 1, 1, 1, 1, 1), ((1, 2),)),  # only two slots free
        ([job(1, 5, steps=50), job(2, 1, steps=1)], batch(4), ((1, 4),)),  # first come, however long
        ([job(1, 2, admitted=6)], batch(4, 3), ((1, 2),)),  # the rest of a request already partly in
    ],
)
def test_fifo_admits_the_oldest_images_first_as_many_as_fit(queue, view, admit):
    assert Fifo().admit(tuple(queue), view) == Decision(admit, 0.0)


# --- ShortestRemainingFirst ----------------------------------------------------------------------------------------
def test_srf_admits_the_fewest_remaining_evaluations_first():
    long, short, middle = job(1, 4, steps=50), job(2, 1, steps=10), job(3, 2, steps=20)  # 200, 10, 40 evaluations
    assert ShortestRemainingFirst().admit((long, short, middle), batch(4)).admit == ((2, 1), (3, 2), (1, 1))


def test_srf_counts_the_evaluations_a_request_has_in_flight():
    started = job(1, 1, steps=50, admitted=3, running=3 * 40)  # 50 + 120 = 170 left
    fresh = job(2, 4, steps=20)  # 80 left
    assert ShortestRemainingFirst().admit((started, fresh), batch(4, 40, 40, 40, arrival=1)).admit == ((2, 1),)


def test_srf_breaks_ties_by_arrival():
    assert ShortestRemainingFirst().admit((job(1, 2, steps=10), job(2, 1, steps=20)), batch(2)).admit == ((1, 2),)
    assert ShortestRemainingFirst().admit((job(2, 1, steps=20), job(1, 2, steps=10)), batch(2)).admit == ((1, 2),)


def test_srf_aging_puts_a_request_waited_past_the_bound_first():
    long, short = job(1, 4, steps=50, waited=5.0), job(2, 1, steps=10, waited=0.1)
    policy = ShortestRemainingFirst(age_bound=5.0)
    assert policy.admit((long, short), batch(4)).admit == ((1, 4),)  # waited == bound: aged
    assert policy.admit((long._replace(waited=4.9), short), batch(4)).admit == ((2, 1), (1, 3))


def test_srf_serves_the_aged_in_arrival_order_then_the_young_shortest_first():
    queue = (job(1, 2, steps=50, waited=9.0), job(2, 2, steps=20, waited=6.0), job(3, 2, steps=30, waited=1.0))
    queue += (job(4, 1, steps=10, waited=0.5),)
    assert ShortestRemainingFirst(age_bound=5.0).order(queue) == [queue[0], queue[1], queue[3], queue[2]]
    assert ShortestRemainingFirst(age_bound=5.0).admit(queue, batch(6)).admit == ((1, 2), (2, 2), (4, 1), (3, 1))


@pytest.mark.parametrize("bound", [-1, float("nan"), float("inf"), "5"])
def test_srf_refuses_an_aging_bound_that_is_not_a_finite_time(bound):
    with pytest.raises(ValueError, match="age_bound must be a finite number of seconds >= 0"):
        ShortestRemainingFirst(age_bound=bound)


# --- Gang ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "queue, view, admit",
    [
        ([job(1, 4), job(2, 2)], batch(8, 9, 9, 9), ((1, 4),)),  # 5 free: the first fits whole, the second not
        ([job(1, 4), job(2, 1)], batch(8, 9, 9, 9, 9, 9), ()),  # 3 free: the first waits, nobody overtakes it
        ([job(1, 2), job(2, 3), job(3, 1)], batch(6), ((1, 2), (2, 3), (3, 1))),
        ([job(1, 10)], batch(4), ((1, 4),)),  # larger than the batch: an empty batch's worth at a time
        ([job(1, 10)], batch(4, 2), ()),
        ([job(1, 2, admitted=8)], batch(4, 1), ((1, 2),)),  # the last part of a large request, whole
    ],
)
def test_gang_admits_a_requests_images_only_all_together(queue, view, admit):
    assert Gang().admit(tuple(queue), view) == Decision(admit, 0.0)


# --- the baselines -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "queue, view, admit",
    [
        ([job(1, 3), job(2, 1)], batch(8), ((1, 3),)),  # only the oldest, though there is room
        ([job(1, 10)], batch(4), ((1, 4),)),
        ([job(1, 1)], batch(8, 5), ()),  # never into a running batch
    ],
)
def test_one_at_a_time_admits_one_request_into_an_empty_batch(queue, view, admit):
    assert OneAtATime().admit(tuple(queue), view) == Decision(admit, 0.0)


@pytest.mark.parametrize(
    "queue, view, decision",
    [
        # into an empty batch: whole requests while they fit; the first that does not ends the batch
        ([job(1, 3), job(2, 4), job(3, 2)], batch(8), Decision(((1, 3), (2, 4)), 0.0)),
        ([job(1, 10), job(2, 1)], batch(4), Decision(((1, 4),), 0.0)),  # full: no wait
        ([job(1, 3), job(2, 2)], batch(8), Decision(((1, 3), (2, 2)), 0.010)),  # room left: wait the window
        # a batch being formed (no step yet) takes whole requests until the window is over
        ([job(3, 2)], batch(8, 9, 9, 9, steps=0, age=0.004), Decision(((3, 2),), 0.006)),
        ([job(3, 2)], batch(8, 9, 9, 9, steps=0, age=0.020), Decision(((3, 2),), 0.0)),
        ([job(3, 6)], batch(8, 9, 9, 9, steps=0, age=0.004), Decision((), 0.0)),  # 6 > 5 free: formed
        ([job(3, 1)], batch(8, 9, 9, 9, steps=1, age=0.004), Decision((), 0.0)),  # running: nothing joins
    ],
)
def test_request_level_forms_a_batch_of_whole_requests_then_runs_it(queue, view, decision):
    got = RequestLevel(window=0.010).admit(tuple(queue), view)
    assert got.admit == decision.admit and got.hold == pytest.approx(decision.hold)


# --- what the batcher accepts --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "decision, message",
    [
        (((1, 2),), "a policy returns a Decision, got tuple"),
        (Decision(((7, 1),)), "admits request 7, which is not queued or is named twice"),
        (Decision(((1, 1), (1, 1))), "admits request 1, which is not queued or is named twice"),
        (Decision(((1, 0),)), "request 1 has 2 images queued; the decision admits 0"),
        (Decision(((1, 3),)), "request 1 has 2 images queued; the decision admits 3"),
        (Decision(((1, True),)), "request 1 has 2 images queued; the decision admits True"),
        (Decision(((1, 2), (2, 2))), "admits 4 images into 3 free slots"),
        (Decision(((1, 1),), -1.0), "hold must be a finite number of seconds >= 0, got -1.0"),
        (Decision(((1, 1),), float("nan")), "hold must be a finite number"),
        (Decision(), "into an empty batch a decision admits an image or holds"),
    ],
)
def test_check_refuses_a_decision_the_batcher_cannot_apply(decision, message):
    with pytest.raises(PolicyError, match=message.replace("(", r"\(")):
        check(decision, (job(1, 2), job(2, 2)), batch(3))


def test_check_accepts_admitting_nothing_into_a_running_batch_and_holding_an_empty_one():
    check(Decision(), (job(1, 2),), batch(3, 5))
    check(Decision((), 0.01), (job(1, 2),), batch(3))
    check(Decision(((1, np.int64(2)),)), (job(1, 2),), batch(3))


# --- the default is the StepBatcher's FIFO from before policies ------------------------------------------------------
def legacy_fifo(requests, capacity):
    """The pre-policy StepBatcher's admission loop (as in git before policies.py), simulated on (n, steps) requests
    all queued at the start: at every boundary with a queued image and a free slot, (batch, queue, admitted)."""
    queue = [[arrival, n, steps] for arrival, (n, steps) in enumerate(requests, 1)]
    images, log = [], []  # images: [arrival, steps remaining] in slot order
    while queue or images:
        if queue and len(images) < capacity:
            before = (tuple(map(tuple, images)), tuple((a, n) for a, n, _ in queue))
            admitted = []
            while queue:  # head after head, until one takes no image
                arrival, n, steps = queue[0]
                k = min(capacity - len(images), n)
                if not k:
                    break
                images += [[arrival, steps] for _ in range(k)]
                admitted.append((arrival, k))
                queue[0][1] -= k
                if not queue[0][1]:
                    queue.pop(0)
            log.append((*before, tuple(admitted)))
        for image in images:  # one step, then the finished retire (the rest keep their order)
            image[1] -= 1
        images = [image for image in images if image[1]]
    return log


def simulate(policy, requests, capacity):
    """The same boundaries with `policy` deciding from the views the StepBatcher builds."""
    queue = {arrival: [n, steps, 0] for arrival, (n, steps) in enumerate(requests, 1)}
    images, log = [], []
    while queue or images:
        if queue and len(images) < capacity:
            jobs = tuple(
                job(a, n, steps, admitted=done, running=sum(r for b, r in images if b == a))
                for a, (n, steps, done) in queue.items()
            )
            decision = policy.admit(jobs, BatchView(capacity, tuple(InFlight(a, r) for a, r in images)))
            check(decision, jobs, BatchView(capacity, tuple(InFlight(a, r) for a, r in images)))
            log.append((tuple(map(tuple, images)), tuple((j.arrival, j.images) for j in jobs), decision.admit))
            for arrival, k in decision.admit:
                images += [[arrival, queue[arrival][1]] for _ in range(k)]
                queue[arrival][0] -= k
                queue[arrival][2] += k
                if not queue[arrival][0]:
                    del queue[arrival]
        for image in images:
            image[1] -= 1
        images = [image for image in images if image[1]]
    return log


@pytest.mark.parametrize("seed", range(20))
def test_fifo_makes_the_legacy_admission_sequence(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(1, 17))
    requests = [(int(rng.integers(1, 12)), int(rng.choice([1, 3, 10, 20]))) for _ in range(int(rng.integers(1, 15)))]
    assert simulate(Fifo(), requests, capacity) == legacy_fifo(requests, capacity)


class Recording:
    """Wraps a policy and records (batch images, queue, admitted) at every decision (composition, no subclassing)."""

    def __init__(self, policy):
        self.policy, self.log = policy, []

    def admit(self, queue, batch):
        decision = self.policy.admit(queue, batch)
        self.log.append((tuple(map(tuple, batch.images)), tuple((j.arrival, j.images) for j in queue), decision.admit))
        return decision


@pytest.fixture(scope="module")
def ort(cond_model):
    return Sampler(cond_model, backend="ort-cpu", threads=1)


def test_the_default_policy_admits_what_the_step_batcher_admitted_before_policies(ort):
    assert isinstance(StepBatcher(ort.parts).policy, Fifo)
    params = [dict(n=3, steps=5, seed=1), dict(n=6, steps=3), dict(n=1, steps=8, guidance=2.0, classes=1)]
    params += [dict(n=2, steps=2, method="ddpm"), dict(n=5, steps=4)]
    recorder = Recording(Fifo())
    batcher = StepBatcher(ort.parts, max_batch=4, policy=recorder)
    with batcher.paused():  # all queued before the first boundary: the sequence is determined
        futures = [batcher.submit(ort.request(**p)) for p in params]
    for f in futures:
        f.result(timeout=60)
    batcher.close()
    requests = [(p["n"], len(ort.parts.plan(ort.request(**p)))) for p in params]
    assert recorder.log == legacy_fifo(requests, 4)
