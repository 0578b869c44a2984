"""Scale-out on Ray Serve (the `ray` extra): each replica runs the app of engine/serving/app.py, i.e. one Sampler and one
StepBatcher, behind the same HTTP contract (POST /v1/images, /healthz, /metrics), through Serve's FastAPI ingress.

    serve run ddengine.serving.ray_serve:build_app num_replicas=2 max_batch=16          # one machine or a cluster
    serve run ddengine.serving.ray_serve:build_app min_replicas=1 max_replicas=8        # autoscaling
    python: serve.run(deployment(model, num_replicas=2).bind(), route_prefix="/")

Replicas need no @serve.batch: requests join each replica's running batch at the next step. Only this module
imports Ray; the rest of ddengine never imports it. Recipe for several machines: docs/serving.md.
"""

from functools import partial

import ray
from pydantic import BaseModel, ConfigDict
from ray import serve

from ddengine.serving.app import Settings, create_app

DEPLOYMENT = "ddengine"


def open_sampler(model, backend, precision, threads):
    """The replica's Sampler (runs inside the replica, when its app starts)."""
    from ddengine.runtime.sampler import Sampler

    return Sampler(model, backend=backend, precision=precision, threads=threads)


def deployment(
    model=None,
    *,
    backend="auto",
    precision="auto",
    threads=None,
    settings=None,
    num_replicas=1,
    autoscaling_config=None,
    num_cpus=1.0,
    max_ongoing_requests=256,
    max_queued_requests=256,
    graceful_shutdown_timeout_s=60.0,
):
    """A Serve deployment of ddengine: `num_replicas` fixed replicas, or an `autoscaling_config` dict.

    model: a path every node can read (default: the shipped model, inside the installed package). Each replica
    takes `num_cpus` of Ray's CPUs and runs `threads` backend threads. A replica takes up to
    `max_ongoing_requests` at once (they share its batches); past that Serve queues `max_queued_requests` more
    per caller and answers 503 beyond.
    """
    settings = settings or Settings()
    load = partial(open_sampler, None if model is None else str(model), backend, precision, threads)

    def build_app():  # evaluated in each replica: its own state, batcher and metrics registry
        return create_app(load, settings)

    scale = {"autoscaling_config": autoscaling_config} if autoscaling_config else {"num_replicas": num_replicas}

    @serve.deployment(
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
        **scale,
    )
    @serve.ingress(build_app)
    class DDEngine:
        """One replica: the ASGI app of engine/serving/app.py, loaded when the replica starts."""

        def check_health(self):
            """Serve's health check: a replica whose state failed is replaced."""
            state = self.app.state.app_state
            if state.status == "failed":
                raise RuntimeError(state.error)

        def replica_actor(self):
            """This replica's actor handle (for operators and the fault tests: ray.kill(handle))."""
            return ray.get_runtime_context().current_actor

    return DDEngine


class AppArgs(BaseModel):
    """The arguments of `serve run ddengine.serving.ray_serve:build_app key=value ...` or a Serve config file's `args`."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    backend: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    max_batch: int = 16
    max_queue: int = 1024
    timeout: float | None = None
    max_body_bytes: int = 64 * 1024
    num_replicas: int = 1
    min_replicas: int | None = None  # min_replicas / max_replicas: autoscaling instead of num_replicas
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # per replica; requests share batches, so keep it well above 1
    num_cpus: float = 1.0
    max_ongoing_requests: int = 256


def build_app(args: AppArgs):
    """The Serve application for `serve run` / `serve deploy` (Serve validates `args` against AppArgs)."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    return deployment(args.model, **deployment_options(args)).bind()


def deployment_options(args):
    """deployment()'s keyword arguments for AppArgs: min/max_replicas mean autoscaling, else num_replicas."""
    autoscaling = None
    if args.min_replicas is not None or args.max_replicas is not None:
        low = args.min_replicas if args.min_replicas is not None else 1
        autoscaling = {
            "min_replicas": low,
            "max_replicas": max(low, args.max_replicas or low),
            "target_ongoing_requests": args.target_ongoing_requests,
        }
    settings = Settings(
        max_batch=args.max_batch, max_queue=args.max_queue, timeout=args.timeout, max_body_bytes=args.max_body_bytes
    )
    return dict(
        backend=args.backend,
        precision=args.precision,
        threads=args.threads,
        settings=settings,
        num_replicas=args.num_replicas,
        autoscaling_config=autoscaling,
        num_cpus=args.num_cpus,
        max_ongoing_requests=args.max_ongoing_requests,
    )
