"""Life cycle: client disconnect frees KV blocks, the bounded queue answers 429, 503 while loading,
SIGTERM drains in-flight requests and exits (through the real `quept serve` command)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from quept.server import state as state_mod
from tests.server.conftest import API_KEY, MODEL, LiveServer
from tests.server.test_openai_api import metric

AUTH = {"Authorization": f"Bearer {API_KEY}"}
REPO = Path(__file__).resolve().parents[2]


def stream_request(max_tokens: int = 200, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello world", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, **extra}


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_disconnect_mid_stream_frees_kv_blocks_and_counts_abort(server: LiveServer, slow_steps) -> None:
    idle = metric(server, "quept:kv_cache_usage_perc")
    aborted = metric(server, "quept:request_success_total", finished_reason="abort")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=stream_request(), headers=AUTH) as r:
            assert r.status_code == 200
            chunks = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                if chunks == 3:
                    assert metric(server, "quept:kv_cache_usage_perc") > idle  # blocks held mid-generation
                    break  # leaving the block closes the connection mid-generation
    assert wait_for(lambda: metric(server, "quept:kv_cache_usage_perc") == idle)
    assert metric(server, "quept:request_success_total", finished_reason="abort") == aborted + 1
    assert metric(server, "quept:num_requests_running") == 0
    assert server.engine.blocks.num_free_blocks == server.engine.blocks.num_blocks


def test_disconnect_of_non_streaming_request_aborts(server: LiveServer, slow_steps) -> None:
    aborted = metric(server, "quept:request_success_total", finished_reason="abort")
    body = {**stream_request(), "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=0.3)
    assert wait_for(lambda: metric(server, "quept:request_success_total", finished_reason="abort") == aborted + 1)
    assert wait_for(lambda: server.engine.blocks.num_free_blocks == server.engine.blocks.num_blocks)


def test_full_queue_answers_429_with_retry_after(make_server) -> None:
    srv = make_server(max_batch=1, max_queue=1)
    engine = srv.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.005), step())[1]
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=stream_request()) as first, \
                 http.stream("POST", "/v1/completions", json=stream_request()) as second:
                assert first.status_code == 200 and second.status_code == 200  # running + queued
                r = http.post("/v1/completions", json={**stream_request(), "stream": False})
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
                assert metric(srv, "quept:num_requests_waiting") == 1
                assert metric(srv, "quept:request_rejected_total", reason="queue_full") == 1
        assert wait_for(lambda: srv.state.engine.num_unfinished == 0)
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200
    finally:
        del engine.step


def test_503_while_loading_then_ready(make_server, monkeypatch, tiny_loaded) -> None:
    release = threading.Event()

    def slow_load(settings: Any) -> Any:
        release.wait(30)
        return tiny_loaded

    monkeypatch.setattr(state_mod, "load_for_serving", slow_load)
    srv = make_server(wait_ready=False, loaded=None)
    health = httpx.get(srv.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "loading"
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    release.set()
    assert wait_for(lambda: httpx.get(srv.url + "/health").status_code == 200, 30)
    assert httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def serve_process(tiny_ckpt: Path, log: Path, *args: str, **env_extra: str) -> subprocess.Popen:
    """`quept serve` configured from QUEPT_* variables, its output in `log`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEPT_")}
    env |= {"QUEPT_CHECKPOINT": str(tiny_ckpt), "QUEPT_PORT": "0", "QUEPT_BACKEND": "torch", "QUEPT_KV_CACHE_MB": "4",
            "QUEPT_DRAIN_TIMEOUT_S": "20", "QUEPT_MODEL_NAME": MODEL, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO), **env_extra}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "quept.cli", "serve", "--host", "127.0.0.1", *args], env=env,
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def burn_cpu(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time\nt = time.time() + {seconds}\nwhile time.time() < t: pass"])


@pytest.mark.parametrize("burners", [0, 2], ids=["quiet", "two-cpu-burners"])
def test_sigterm_drains_in_flight_then_exits_0(tiny_ckpt: Path, tmp_path: Path, burners: int) -> None:
    """8 streams in flight, SIGTERM: /health 503 and new requests 503 while they finish, every stream
    ends with its last chunk and [DONE], exit status 0; the same beside processes that burn the CPUs."""
    log = tmp_path / "serve.log"
    proc = serve_process(tiny_ckpt, log, QUEPT_MAX_BATCH="8")
    hogs: list[subprocess.Popen] = []
    try:
        def port() -> int | None:
            for line in log.read_text().splitlines():
                if "listening on http://" in line:
                    return int(line.rsplit(":", 1)[1].split()[0])
            return None

        assert wait_for(lambda: port() is not None or proc.poll() is not None, 90), log.read_text()
        base = f"http://127.0.0.1:{port()}"
        assert wait_for(lambda: httpx.get(base + "/health").status_code == 200, 60), log.read_text()
        hogs = [burn_cpu(60) for _ in range(burners)]
        events: list[list[str]] = [[] for _ in range(8)]
        first = threading.Barrier(9)

        def one(i: int) -> None:
            with httpx.stream("POST", base + "/v1/completions", json=stream_request(200), timeout=90) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events[i].append(line[6:])
                        if len(events[i]) == 1:
                            first.wait(30)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        first.wait(60)  # every stream has its first chunk
        proc.send_signal(signal.SIGTERM)
        # the tiny model may finish the 8 streams before a probe gets in; whatever answers must say 503
        # (the strict 503 window is checked in process with slowed steps: tests/server/test_hardening.py)
        seen = []
        for _ in range(5):
            try:
                seen.append(httpx.get(base + "/health").status_code)
                seen.append(httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                                        "max_tokens": 1}).status_code)
            except httpx.ConnectError:
                break
        assert set(seen) <= {503}, seen
        for t in threads:
            t.join(90)
        for ev in events:
            assert ev[-1] == "[DONE]", log.read_text()[-3000:]
            assert json.loads(ev[-2])["choices"][0]["finish_reason"] == "length", ev[-2]
        code = proc.wait(30)
        assert code == 0, log.read_text()[-3000:]
        assert "draining" in log.read_text() and "Traceback" not in log.read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health")
    finally:
        for h in hogs:
            h.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_busy_port_exits_1_at_once_without_loading(tiny_ckpt: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        log = tmp_path / "serve.log"
        proc = serve_process(tiny_ckpt, log, QUEPT_PORT=str(taken.getsockname()[1]))
        code = proc.wait(60)
    text = log.read_text()
    assert code == 1, text
    assert "already in use" in text and "loaded" not in text and "Traceback" not in text, text


def test_broken_checkpoint_exits_1(tiny_ckpt: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    tensors = next(p for p in broken.iterdir() if p.name.startswith("elastic") and p.suffix == ".safetensors")
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])  # truncated
    log = tmp_path / "serve.log"
    proc = serve_process(broken, log)
    try:
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1, log.read_text()
    assert "loading failed" in log.read_text()


def test_loading_sets_the_gil_switch_interval(make_server) -> None:
    """The engine thread wins the GIL back from the HTTP loop after every native call: the server
    shortens Python's switch interval (5 ms) to `gil_switch_ms`, process-wide."""
    before = sys.getswitchinterval()
    try:
        srv = make_server(gil_switch_ms=0.7)
        assert sys.getswitchinterval() == pytest.approx(0.0007)
        srv.stop()
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize("value", [0, -1])
def test_gil_switch_interval_must_be_positive(value: float) -> None:
    from pydantic import ValidationError

    from quept.server.settings import Settings

    with pytest.raises(ValidationError, match="gil_switch_ms"):
        Settings(gil_switch_ms=value)


def test_model_work_runs_on_a_loader_thread_that_exits(make_server, monkeypatch) -> None:
    """Loading, the controller, the engine (its KV cache's zero fill) and the warm-up run on one loader thread,
    never on the event loop's, and that thread is gone once the server is ready. Every thread that runs a
    parallel torch op keeps an OpenMP team while it lives; beside a second team libgomp stops spinning and
    the engine's worker sleeps at every barrier (a 16-row w4 forward took 26-28 ms instead of 19 on 2 cores)."""
    seen: dict[str, threading.Thread] = {}

    def spy(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            seen[name] = threading.current_thread()
            return fn(*args, **kwargs)
        return wrapped

    for name in ("load_for_serving", "make_controller", "warm_up"):
        monkeypatch.setattr(state_mod, name, spy(name, getattr(state_mod, name)))
    real_engine = state_mod.LLMEngine

    class SpiedEngine(real_engine):  # type: ignore[misc, valid-type]
        @classmethod
        def from_loaded(cls, *args: Any, **kwargs: Any) -> Any:
            seen["from_loaded"] = threading.current_thread()
            return real_engine.from_loaded(*args, **kwargs)

    monkeypatch.setattr(state_mod, "LLMEngine", SpiedEngine)
    srv = make_server(loaded=None, warmup=True)
    assert set(seen) == {"load_for_serving", "make_controller", "from_loaded", "warm_up"}
    loaders = set(seen.values())
    assert len(loaders) == 1, loaders
    (loader,) = loaders
    assert loader is not srv.thread and loader.name.startswith("quept-load")
    assert wait_for(lambda: not loader.is_alive(), 5), "the loader thread outlived loading"
    assert httpx.get(srv.url + "/health").status_code == 200
    srv.stop()
