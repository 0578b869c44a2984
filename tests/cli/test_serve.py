"""`ddengine serve` end to end: usage errors (exit 2, no traceback), a real server process, and SIGTERM during load:
every request the server accepted gets its images or an error response; none is lost (the counts must agree)."""

import importlib.util
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from ddengine.cli import main
from tests.serving.test_app import decode

SERVE = [sys.executable, "-c", "from ddengine.cli import main; main()", "serve"]
STATS = re.compile(r"requests accepted (\d+), completed (\d+), failed (\d+) \(timed out (\d+)\), cancelled (\d+)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args, stdout=None):
    """A `ddengine serve` subprocess (the shipped model on the exact CPU path); returns (process, base URL)."""
    port = free_port()
    process = subprocess.Popen(
        [
            *SERVE,
            "--backend",
            "ort-cpu",
            "--threads",
            "1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *map(str, args),
        ],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    pytest.fail(f"the server did not come up: {process.communicate()[1]}")


def stop(process, signum=signal.SIGTERM, timeout=60):
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return stderr


def server_counts(stderr):
    match = STATS.search(stderr)
    assert match, stderr
    return dict(zip(("accepted", "completed", "failed", "timed_out", "cancelled"), map(int, match.groups())))


def test_a_missing_serve_extra_is_a_usage_error_naming_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "needs uvicorn (the serve extra): pip install 'ddengine[serve]'" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "missing.onnx"], "missing.onnx"),
        (["--max-batch", "0"], "Invalid value for '--max-batch'"),
        (["--timeout", "-1"], "Invalid value for '--timeout'"),
        (["--timeout", "nan"], "Invalid value for '--timeout': expected a finite number of seconds, got nan"),
        (
            ["--drain-timeout", "inf"],
            "Invalid value for '--drain-timeout': expected a finite number of seconds, got inf",
        ),
        (["--backend", "nope"], "nope"),
    ],
)
def test_bad_options_exit_2_without_a_traceback(args, message):
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_port_in_use_exits_1_with_the_reason(cond_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*SERVE, "--model", str(cond_model), "--backend", "ort-cpu", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1 and "address already in use" in result.stderr.lower()


class Load:
    """Worker threads posting mixed requests, each on a new connection, until the server stops answering."""

    def __init__(self, url, workers=6, seconds=30):
        self.url, self.deadline, self.lock = url, time.monotonic() + seconds, threading.Lock()
        self.outcomes = []  # (kind, started, ended, detail); kind: ok, error, refused, dropped
        self.threads = [threading.Thread(target=self.work, args=(i,), daemon=True) for i in range(workers)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def work(self, worker):
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.url, timeout=60, limits=limits) as http:
            for i in range(10_000):
                if time.monotonic() > self.deadline:
                    return
                body = {
                    "n": 1 + (worker + i) % 4,
                    "steps": (10, 20)[i % 2],
                    "seed": worker * 1000 + i,
                    "classes": [worker % 10],
                    "method": ("ddim", "ddpm")[worker % 2],
                }
                kind, detail, started = self.post(http, body)
                with self.lock:
                    self.outcomes.append((kind, started, time.monotonic(), detail))
                if kind == "refused":
                    return

    @staticmethod
    def post(http, body):
        started = time.monotonic()
        try:
            response = http.post("/v1/images", json=body)
        except httpx.ConnectError as err:
            return "refused", str(err), started
        except httpx.TransportError as err:
            return "dropped", repr(err), started
        if response.status_code == 200 and len(response.json()["images"]) == body["n"]:
            return "ok", 200, started
        return "error", (response.status_code, response.json()["error"]), started

    def count(self, kind):
        return sum(1 for o in self.outcomes if o[0] == kind)

    def __exit__(self, *exc):
        for t in self.threads:
            t.join(90)


def test_sigterm_during_load_finishes_every_accepted_request():
    process, url = start_server("--max-batch", "8")
    with Load(url) as load:
        while load.count("ok") < 6 and time.monotonic() < load.deadline:
            time.sleep(0.02)
        signalled = time.monotonic()
        stderr = stop(process)
    assert process.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM) and "Traceback" not in stderr
    server = server_counts(stderr)
    ok, errors = load.count("ok"), [o for o in load.outcomes if o[0] == "error"]
    lost = server["accepted"] - ok - len(errors)
    print(
        f"accepted {server['accepted']}, completed {ok}, failed with an error {len(errors)}, lost {lost}, "
        f"refused after SIGTERM {load.count('refused')}, dropped before acceptance {load.count('dropped')}"
    )
    assert lost == 0 and errors == [] and server["completed"] == ok and server["failed"] == 0
    assert any(o[0] == "ok" and o[1] < signalled < o[2] for o in load.outcomes)  # in flight at SIGTERM, then done
    assert load.count("refused") == len(load.threads)  # afterwards no new connection is taken


def test_sigterm_with_a_drain_timeout_answers_the_unfinished_with_an_error():
    process, url = start_server("--max-batch", "4", "--drain-timeout", "0.5")
    results = []

    def post(seed):
        try:
            r = httpx.post(f"{url}/v1/images", json={"n": 4, "steps": 800, "seed": seed}, timeout=120)
            results.append((r.status_code, r.json().get("error")))
        except httpx.TransportError as err:
            results.append(("lost", repr(err)))

    threads = [threading.Thread(target=post, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline
        and 'requests_total{outcome="submitted"} 3.0' not in httpx.get(f"{url}/metrics", timeout=5).text
    ):
        time.sleep(0.02)
    start = time.monotonic()
    stderr = stop(process)
    for t in threads:
        t.join(60)
    assert time.monotonic() - start < 20
    assert sorted(results) == [(503, "the batcher was closed before this request finished")] * 3, results
    assert server_counts(stderr) | {"timed_out": 0} == {
        "accepted": 3,
        "completed": 0,
        "failed": 3,
        "timed_out": 0,
        "cancelled": 0,
    }


def test_serve_answers_a_request_like_the_api(cond_model):
    from ddengine.runtime.sampler import Sampler

    process, url = start_server("--model", cond_model, "--max-batch", "2")
    try:
        response = httpx.post(f"{url}/v1/images", json={"n": 3, "steps": 5, "classes": "all", "seed": 2}, timeout=60)
        health = httpx.get(f"{url}/healthz", timeout=5).json()
    finally:
        stop(process)
    sampler = Sampler(cond_model, backend="ort-cpu")
    assert response.status_code == 200 and health["model"] == sampler.model.sha256 and health["batch_invariant"]
    images, records = sampler.sample(3, steps=5, classes="all", seed=2)
    body = response.json()
    assert [(i["seed"], i["class"]) for i in body["images"]] == [(r["seed"], r["class"]) for r in records]
    assert np.array_equal(np.stack([decode(i["png"]) for i in body["images"]]), images)


def test_log_level_info_writes_one_access_log_line_per_request(cond_model):
    process, url = start_server("--model", cond_model, "--log-level", "info", stdout=subprocess.PIPE)
    try:
        for seed in (1, 2):
            assert (
                httpx.post(f"{url}/v1/images", json={"n": 1, "steps": 2, "seed": seed}, timeout=60).status_code == 200
            )
        assert httpx.post(f"{url}/v1/images", json={"n": 0}, timeout=60).status_code == 422
    finally:
        process.send_signal(signal.SIGTERM)
        log, _ = process.communicate(timeout=60)  # uvicorn writes its access log to stdout
    posts = [line for line in log.splitlines() if '"POST /v1/images HTTP/1.1"' in line]
    assert [line.split('" ')[-1] for line in posts] == ["200 OK", "200 OK", "422 Unprocessable Entity"], log
