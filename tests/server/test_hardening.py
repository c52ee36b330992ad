"""What a client or an operator can throw at the server: bodies past the limit, prompts that take long
to tokenize, text that is not Unicode, idle connections, keys in files, and the drain on SIGTERM
(in process through `handle_exit`, the same code the signal runs)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, LiveServer
from tests.server.test_lifecycle import wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CMPL = "/v1/completions"


def slow(srv: LiveServer, seconds: float) -> None:
    """Every engine step of `srv` takes at least `seconds` (the tiny model is too fast to catch mid-flight)."""
    engine = srv.engine
    step = engine.step

    def slowed() -> Any:
        time.sleep(seconds)
        return step()

    engine.step = slowed


def sse_events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


# ---------------------------------------------------------------------- bounded input


def test_body_over_the_limit_gets_413_before_it_is_read(make_server) -> None:
    srv = make_server(max_request_bytes=64 << 10)
    big = json.dumps({"model": MODEL, "prompt": "x" * (100 << 10), "max_tokens": 1}).encode()
    r = httpx.post(srv.url + CMPL, content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert str(64 << 10) in r.json()["error"]["message"]

    def chunked() -> Any:  # no Content-Length: counted while it arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = httpx.post(srv.url + CMPL, content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    ok = httpx.post(srv.url + CMPL, json={"model": MODEL, "prompt": "hello", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_body_without_json_content_type_is_read_as_json(make_server) -> None:
    srv = make_server()
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 1}).encode()
    for ctype in (None, "application/x-www-form-urlencoded", "text/plain"):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(srv.url + CMPL, content=body, headers=headers)
        assert r.status_code == 200, (ctype, r.text)


def test_tokenization_does_not_block_the_event_loop(make_server) -> None:
    """A prompt that takes long to tokenize (here: made slow) leaves /health answering at once."""
    srv = make_server()
    tok = srv.state.loaded.tokenizer
    started = threading.Event()
    original = type(tok).__call__

    def slow_call(self, *args: Any, **kwargs: Any) -> Any:
        started.set()
        time.sleep(2.0)
        return original(self, *args, **kwargs)

    type(tok).__call__ = slow_call
    try:
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", httpx.post(srv.url + CMPL, json={"model": MODEL, "prompt": "hello", "max_tokens": 1}, timeout=30)))
        t.start()
        assert started.wait(10)
        t0 = time.monotonic()
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        assert time.monotonic() - t0 < 1.0, "the event loop waited for the tokenizer"
        t.join(30)
        assert result["r"].status_code == 200
    finally:
        type(tok).__call__ = original


# ---------------------------------------------------------------------- auth and schema pages


def test_key_from_a_file_and_both_headers(make_server, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    srv = make_server(api_key_file=key_file)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 1}
    assert httpx.post(srv.url + CMPL, json=body).status_code == 401
    assert httpx.post(srv.url + CMPL, json=body, headers={"Authorization": "Bearer from-a-file"}).status_code == 200
    assert httpx.post(srv.url + CMPL, json=body, headers={"X-API-Key": "from-a-file"}).status_code == 200
    assert httpx.post(srv.url + CMPL, json=body, headers={"X-API-Key": "from-a-fil"}).status_code == 401


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_schema_pages_need_the_key_and_can_be_off(make_server, path: str) -> None:
    keyed = make_server(api_key=API_KEY)
    assert httpx.get(keyed.url + path).status_code == 401
    assert httpx.get(keyed.url + path, headers=AUTH).status_code == 200
    assert httpx.get(make_server().url + path).status_code == 200  # no key: open
    assert httpx.get(make_server(docs=False).url + path).status_code == 404


# ---------------------------------------------------------------------- connections


def test_idle_connections_are_closed(make_server) -> None:
    srv = make_server(keep_alive_timeout_s=1)
    port = int(srv.url.rsplit(":", 1)[1])
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        t0 = time.monotonic()
        for s in socks:
            assert s.recv(1) == b"", "an idle connection got data instead of being closed"
        assert time.monotonic() - t0 < 5
    finally:
        for s in socks:
            s.close()
    assert httpx.get(srv.url + "/health").status_code == 200


def test_headers_trickled_byte_by_byte_are_cut_off(make_server) -> None:
    srv = make_server(keep_alive_timeout_s=30, header_timeout_s=1)
    port = int(srv.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - t0 > 3:
                break
        if not closed:
            s.settimeout(5)
            try:
                closed = s.recv(1) == b""
            except ConnectionResetError:
                closed = True
        assert closed and time.monotonic() - t0 < 4, "a slow sender held the connection past the header timeout"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a prompt sender is served
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 200")


# ---------------------------------------------------------------------- drain


def run_streams(srv: LiveServer, n: int, max_tokens: int) -> tuple[list[threading.Thread], list[list[str]]]:
    events: list[list[str]] = [[] for _ in range(n)]

    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": "hello world", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", srv.url + CMPL, json=body, timeout=60) as r:
            events[i].extend(sse_events(r))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, events


def sigterm_mid_flight(make_server, n: int, step_s: float, max_tokens: int, drain_timeout_s: float):
    """A server with `n` streams running (steps slowed to `step_s`), then the drain a SIGTERM starts."""
    srv = make_server(drain_timeout_s=drain_timeout_s, max_batch=n)
    slow(srv, step_s)
    threads, events = run_streams(srv, n, max_tokens)
    assert wait_for(lambda: srv.engine.scheduler.num_running == n, 20)
    srv.server.handle_exit(signal.SIGTERM, None)
    return srv, threads, events


def test_drain_keeps_the_listener_open_and_finishes_every_stream(make_server) -> None:
    srv, threads, events = sigterm_mid_flight(make_server, 8, 0.02, 40, drain_timeout_s=60)
    health = httpx.get(srv.url + "/health")  # the listener is still open: a readiness probe sees 503
    assert health.status_code == 503 and health.json()["status"] == "draining"
    late = httpx.post(srv.url + CMPL, json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
    for t in threads:
        t.join(60)
    for ev in events:
        assert ev[-1] == "[DONE]"
        finals = [json.loads(e)["choices"][0]["finish_reason"] for e in ev[:-1]]
        assert finals[-1] == "length", ev[-3:]
    srv.thread.join(30)
    assert not srv.thread.is_alive(), "the server did not exit after the drain"


def test_drain_timeout_ends_streams_with_an_error_event(make_server) -> None:
    srv, threads, events = sigterm_mid_flight(make_server, 4, 0.2, 200, drain_timeout_s=0.5)
    for t in threads:
        t.join(60)
    for ev in events:
        assert ev[-1] == "[DONE]"
        err = json.loads(ev[-2])["error"]
        assert err["code"] == "drain_timeout" and err["type"] == "service_unavailable", ev[-2]
    srv.thread.join(30)
    assert not srv.thread.is_alive()
