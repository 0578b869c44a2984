"""Malformed and cut-short uploads on a real uvicorn server (both of its HTTP parsers), written as raw bytes to a
socket: each is the client's 400 (code="400" in the metrics), never a 500 with a logged traceback, and the next
well-formed request is served. A broken chunk framing is answered by uvicorn itself (its own plain-text 400, before
the app could answer); a body cut short leaves nobody to answer; a form without its closing boundary is the app's
400 in OpenAI's shape."""

import asyncio
import http.client
import io
import json
import logging
import socket

import httpx
import numpy as np
import pytest
from PIL import Image

from ddengine.runtime.sampler import Sampler
from ddengine.serving.app import INCOMPLETE_BODY, Settings, create_app
from tests.serving.test_app import live_server, metric, wait_until

ROUTES = ("/v1/images", "/v1/images/generations", "/v1/images/edits")
BOUNDARY = "b0undary"
UVICORNS_400 = b"Invalid HTTP request received."  # uvicorn's answer to framing its parser refuses

# (body headers, body bytes, how the client ends: "read" the reply to EOF, "close", or "half-close" and read)
FRAMINGS = {
    "a chunk size that is not hex": ("Transfer-Encoding: chunked", b"zz\r\n{}\r\n0\r\n\r\n", "read"),
    "a chunk longer than its size": ("Transfer-Encoding: chunked", b"2\r\n{}XX\r\n0\r\n\r\n", "read"),
    "a chunk shorter than its size, then close": ("Transfer-Encoding: chunked", b'10\r\n{"n":', "close"),
    "a chunked body cut short, half-closed": ("Transfer-Encoding: chunked", b'3\r\n{"n\r\n', "half-close"),
    "a Content-Length past the body, then close": ("Content-Length: 100", b'{"n": 1', "close"),
    "a Content-Length past the body, half-closed": ("Content-Length: 100", b'{"n": 1', "half-close"),
}


@pytest.fixture(scope="module")
def sampler(cond_model):
    return Sampler(cond_model, backend="ort-cpu", threads=1)


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request, sampler):
    """A live server on uvicorn's httptools parser (what `ddengine serve` gets when it is installed) or on h11."""
    if request.param == "httptools":
        pytest.importorskip("httptools")
    app = create_app(sampler, Settings(max_batch=4, max_queue=8))
    with live_server(app, http=request.param) as url:
        yield url


@pytest.fixture
def server_log():
    """The records uvicorn logs at ERROR and above (an app's exception: "Exception in ASGI application" and its
    traceback) while the test runs."""
    records = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def png(shape=(8, 8, 3)):
    buffer = io.BytesIO()
    Image.fromarray(np.full(shape, 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def content_type(route):
    return f"multipart/form-data; boundary={BOUNDARY}" if route.endswith("/edits") else "application/json"


def exchange(url, route, body_headers, body, end="read"):
    """Send one raw POST; the bytes the server answered until it closed (b"" if it closed without a word)."""
    head = f"POST {route} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type(route)}\r\n{body_headers}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        if end == "close":
            return b""
        if end == "half-close":
            sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def parsed(reply):
    """(status, body bytes) of a raw HTTP/1.1 response."""

    class Replayed:
        def makefile(self, mode):
            return io.BytesIO(reply)

    response = http.client.HTTPResponse(Replayed())
    response.begin()
    return response.status, response.read()


def codes(url):
    """The request metric's count of each code label."""
    text = httpx.get(f"{url}/metrics").text
    return {code: count(text, code) for code in ("400", "500")}


def count(text, code):
    """ddengine_request_seconds_count{code=...} in a /metrics text (0 before the first such request)."""
    try:
        return metric(text, "ddengine_request_seconds_count", {"code": code})
    except KeyError:
        return 0


def well_formed(url, route):
    """A good request to `route` (the server goes on serving)."""
    if route == "/v1/images":
        return httpx.post(f"{url}{route}", json={"n": 1, "steps": 2}, timeout=30)
    if route == "/v1/images/generations":
        return httpx.post(f"{url}{route}", json={"prompt": "2", "steps": 2}, timeout=30)
    files = {"image": ("start.png", png(), "image/png")}
    return httpx.post(f"{url}{route}", data={"prompt": "2", "steps": "2"}, files=files, timeout=30)


def form(*parts, closed=True):
    """A multipart body of (name, value[, filename]) parts, with or without its closing boundary."""
    body = b""
    for name, value, *filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename[0]}"' if filename else "")
        kind = "Content-Type: image/png\r\n" if filename else ""
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + value + b"\r\n"
    return body + (f"--{BOUNDARY}--\r\n".encode() if closed else f"--{BOUNDARY}\r\n".encode())


def openai_error(message):
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


def assert_a_client_400_then_served(url, route, before, server_log):
    """The request metric counted one more 400 and no 500, nothing was logged as an error, and `route` serves."""
    assert wait_until(lambda: codes(url)["400"] == before["400"] + 1), codes(url)
    assert codes(url)["500"] == before["500"]
    served = well_formed(url, route)
    assert served.status_code == 200, served.text
    assert not server_log, [r.getMessage() for r in server_log]  # checked last: an app's traceback is logged by then


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", FRAMINGS)
def test_broken_framing_and_cut_short_bodies_are_400s_without_a_traceback(server, server_log, route, case):
    body_headers, body, end = FRAMINGS[case]
    before = codes(server)
    reply = exchange(server, route, body_headers, body, end)
    if end == "read" and case.startswith("a chunk"):  # uvicorn's parser refuses it and answers before the app
        status, text = parsed(reply)
        assert status == 400 and text == UVICORNS_400
    else:  # the client is gone, or uvicorn closes on its half-close: nobody is left to answer
        assert reply == b""
    assert_a_client_400_then_served(server, route, before, server_log)


def test_a_form_without_its_closing_boundary_is_a_400_even_with_its_image(server, server_log):
    body = form(("prompt", b"2"), ("steps", b"2"), ("image", png(), "start.png"), closed=False)
    before = codes(server)
    headers = f"Content-Length: {len(body)}\r\nConnection: close"
    status, text = parsed(exchange(server, "/v1/images/edits", headers, body))
    assert status == 400 and json.loads(text) == openai_error(
        "the body must be multipart/form-data: it ends before the form's closing boundary"
    )
    assert_a_client_400_then_served(server, "/v1/images/edits", before, server_log)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"hello", "the body must be multipart/form-data: Invalid multipart data."),
        (form(("prompt", b"2"), closed=True), "image is required"),
    ],
)
def test_a_malformed_or_imageless_form_is_a_400(server, server_log, body, message):
    before = codes(server)
    headers = f"Content-Length: {len(body)}\r\nConnection: close"
    status, text = parsed(exchange(server, "/v1/images/edits", headers, body))
    assert status == 400 and json.loads(text)["error"]["message"].startswith(message)
    assert_a_client_400_then_served(server, "/v1/images/edits", before, server_log)


async def asgi_post(app, route, parts):
    """POST `parts` of a chunked body straight to `app` over ASGI, then disconnect: (status, JSON) it answers."""
    headers = [(b"content-type", content_type(route).encode()), (b"transfer-encoding", b"chunked")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http"}
    scope |= {"path": route, "raw_path": route.encode(), "query_string": b"", "root_path": "", "headers": headers}
    incoming = [{"type": "http.request", "body": part, "more_body": True} for part in parts]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


@pytest.mark.parametrize("route", ROUTES)
def test_a_body_that_ends_early_is_answered_in_the_routes_error_shape(sampler, route):
    """What a server that can still answer (uvicorn cannot: its connection is gone) sends the client."""
    app = create_app(sampler, Settings(max_batch=4))
    status, body = asyncio.run(asgi_post(app, route, [b'{"n": ', b"1"]))
    assert status == 400
    assert body == ({"error": INCOMPLETE_BODY} if route == "/v1/images" else openai_error(INCOMPLETE_BODY))
    assert count(app.state.app_state.metrics.render().decode(), "400") == 1
