"""`ddengine serve`: the HTTP API of engine/serving/app.py on uvicorn, exact step-level batching of every request.

SIGTERM or Ctrl-C drains: no new connections, /healthz and new requests answer 503, every accepted request still
gets its images (or, past --drain-timeout, an error response); then the counts are printed on stderr and the
process ends by that signal (exit 128 + N: 143 for SIGTERM, 130 for Ctrl-C), as uvicorn does.
Needs the `serve` extra (pip install 'ddengine[serve]'); Ray Serve: see docs/serving.md (engine/serving/ray_serve.py).
"""

import importlib.util
import sys
import threading

import click

from ddengine.cli.common import EXIT_FAILED, finite_seconds, model_options, open_sampler

SERVE_EXTRA = "pip install 'ddengine[serve]'"
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def check_serve_extra():
    """A usage error (exit 2) naming the install command when a package of the serve extra is missing."""
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise click.UsageError(f"`ddengine serve` needs {', '.join(missing)} (the serve extra): {SERVE_EXTRA}")


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Images denoised together per forward (the batch's slots); past 16 a CPU step only gets slower "
    "(docs/serving.md).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Images waiting for a slot; past it requests get 503 + Retry-After (also the largest n).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    callback=finite_seconds,
    default=None,
    help="Seconds a request may take from acceptance to its last image (504 past it; default: none).",
)
@click.option(
    "--step-timeout",
    type=click.FloatRange(min=0, min_open=True),
    callback=finite_seconds,
    default=300.0,
    show_default=True,
    help="Seconds one batched step may take; past it the watchdog fails that batch's requests (500) and restarts "
    "the core.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=64),
    default=64 * 1024,
    show_default=True,
    help="Largest request body (413 past it).",
)
@click.option(
    "--limit-concurrency",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Connections and requests at once; past it uvicorn answers 503.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    callback=finite_seconds,
    default=None,
    help="On SIGTERM, fail what still runs after this many seconds with an error response (default: "
    "finish everything accepted).",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
def serve(
    model,
    scheduler_config,
    backend,
    precision,
    threads,
    host,
    port,
    max_batch,
    max_queue,
    timeout,
    step_timeout,
    max_body_bytes,
    limit_concurrency,
    drain_timeout,
    log_level,
):
    """Serve POST /v1/images, OpenAI's POST /v1/images/generations, GET /healthz and /metrics (the serve extra)."""
    check_serve_extra()
    import uvicorn

    from ddengine.serving.app import Settings, create_app

    sampler = open_sampler(model, scheduler_config, backend, threads, precision)
    settings = Settings(
        max_batch=max_batch,
        max_queue=max_queue,
        timeout=timeout,
        max_body_bytes=max_body_bytes,
        step_timeout=step_timeout,
    )
    app = create_app(sampler, settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        limit_concurrency=limit_concurrency,
        log_level=log_level,
        timeout_graceful_shutdown=None,
        access_log=log_level in ("info", "debug"),  # one line per request, as uvicorn's own default
    )
    server = draining_server()(config, app.state.app_state, drain_timeout)
    try:
        server.run()
    except SystemExit as err:  # uvicorn exits 3 when it cannot start (it logged why, e.g. the port is in use)
        if err.code not in (0, None):
            click.echo(f"Error: the server could not start on {host}:{port} (see the message above)", err=True)
            sys.exit(EXIT_FAILED)
        raise
    finally:
        sampler.close()


def report(state):
    """The batcher's final counts on stderr: how every accepted request ended."""
    if state.batcher is None:
        return
    s = state.batcher.stats
    click.echo(
        f"ddengine serve: stopped; requests accepted {s['submitted']}, completed {s['completed']}, failed "
        f"{s['failed']} (timed out {s['timed_out']}), cancelled {s['cancelled']}, refused (queue full) "
        f"{s['rejected']}; images {s['images']}",
        err=True,
    )


def draining_server():
    """uvicorn.Server that drains the app on SIGTERM (a factory: uvicorn is imported only when serving)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's graceful shutdown, told to the app first (503 for new work) and bounded by drain_timeout."""

        def __init__(self, config, state, drain_timeout):
            super().__init__(config)
            self.app_state, self.drain_timeout, self.timer = state, drain_timeout, None

        def handle_exit(self, sig, frame):
            self.app_state.begin_drain()
            if self.drain_timeout is not None and self.timer is None:
                self.timer = threading.Timer(self.drain_timeout, self.app_state.stop, kwargs={"drain": False})
                self.timer.daemon = True
                self.timer.start()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)  # waits for the open requests, then the lifespan closes the batcher
            report(self.app_state)  # before uvicorn re-raises the signal (exit 128 + N)

    return DrainingServer
