"""Real uvicorn servers on free 127.0.0.1 ports, in a background thread, over the tiny checkpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from quept.model.loader import load_model
from quept.server.app import create_app
from quept.server.launch import draining_server, uvicorn_config
from quept.server.settings import Settings

API_KEY = "test-key"
MODEL = "tiny"


class LiveServer:
    def __init__(self, settings: Settings, loaded: Any) -> None:
        self.app = create_app(settings, loaded)
        self.state = self.app.state.quept
        # the production configuration (idle timeout, drain on handle_exit), quieter
        config = uvicorn_config(self.app, settings.model_copy(update={"host": "127.0.0.1", "log_level": "warning"}), 0)
        self.server = draining_server(config, self.state, settings.drain_timeout_s)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.url = ""

    def start(self, wait_ready: bool = True) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start in 60 s"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while wait_ready and httpx.get(self.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, f"not ready in 60 s: {self.state.status} {self.state.error}"
            time.sleep(0.05)
        return self

    @property
    def engine(self) -> Any:
        return self.state.engine.engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_ckpt: Path) -> Iterator[Any]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a busy machine: OpenMP threads only add spin time
    # what `auto` serves on a CPU: the native kernels, whose rows are computed independently of the batch
    # (the mixed-batch test needs that); without a compiler the exact fp32 reference. The torch backend's
    # fp16 matmuls round differently at different batch sizes: on the tiny model a near-tie flipped a w4
    # token between a batch and a lone request.
    from quept.kernels.native import find_compiler

    yield load_model(tiny_ckpt, backend="native" if find_compiler() else "torch-fp32")
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def make_server(tiny_ckpt: Path, tiny_loaded: Any) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def make(wait_ready: bool = True, loaded: Any = "shared", **overrides: Any) -> LiveServer:
        fields = {"checkpoint": tiny_ckpt, "model_name": MODEL, "backend": "torch", "kv_cache_mb": 4, **overrides}
        srv = LiveServer(Settings(**fields), tiny_loaded if loaded == "shared" else loaded).start(wait_ready)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def server(make_server: Callable[..., LiveServer]) -> LiveServer:
    """The main test server: API key required, default settings otherwise."""
    return make_server(api_key=API_KEY)


@pytest.fixture()
def slow_steps(server: LiveServer) -> Iterator[None]:
    """Make every engine step take >= 5 ms (the tiny model is too fast to catch mid-generation)."""
    engine = server.engine
    step = engine.step

    def slow() -> Any:
        time.sleep(0.005)
        return step()

    engine.step = slow
    yield
    del engine.step
