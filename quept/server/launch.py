"""Run the HTTP server until it is told to stop: uvicorn with a drain on SIGTERM/SIGINT.

`quept serve` (quept.cli) parses its flags into `Settings` and calls `serve` here.

Exit status: 0 after a clean stop (a signal and a finished drain included), 1 when the listening
address cannot be bound (before anything loads) or the model failed to load;
configuration errors exit 2 in the CLI before this runs.

Drain (the first SIGTERM or SIGINT): the listener stays open, `/health` and new `/v1` requests
answer 503 (a load balancer's readiness probe sees the pod go unready), in-flight requests run to
their end for at most `drain_timeout_s`; what is still running then ends with an error event (a 503
body for non-streaming requests) and `[DONE]`. Then the listener closes and the process exits 0. A
second signal ends the drain at once.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import time
from typing import Any

from quept.errors import QueptError
from quept.server.settings import Settings

log = logging.getLogger("quept.serve")

FLUSH_S = 5  # after the drain: seconds for the last responses to reach their clients before the sockets close


class BindError(QueptError):
    """The listening address cannot be bound."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port), bound before anything else starts, so that a busy port
    fails at once with one line instead of after the model has loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise BindError(f"cannot resolve --host {host!r}: {err.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as err:
        sock.close()
        why = "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err.strerror})"
        raise BindError(f"{host}:{port} {why}; choose another --port or stop what listens there") from None
    sock.set_inheritable(True)
    return sock


def idle_timeout_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with two more deadlines: its keep-alive timer also starts when a
    connection opens (a client that connects and sends nothing is closed after `timeout_keep_alive`;
    uvicorn starts it only after a response), and a request's headers must be complete within
    `header_timeout_s` of the connection opening or of the previous response (a client that trickles
    header bytes, slowloris-style, is closed)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class IdleTimeoutH11Protocol(H11Protocol):
        header_deadline: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
            self._arm_header_deadline()

        def handle_events(self) -> None:
            super().handle_events()
            if self.header_deadline is not None and self.conn.their_state is not h11.IDLE:  # headers are in
                self.header_deadline.cancel()
                self.header_deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
            self.header_deadline = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self.header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return IdleTimeoutH11Protocol


def uvicorn_config(app: Any, settings: Settings, port: int) -> Any:
    """uvicorn's configuration for the app: idle connections timed out, a short flush after the drain."""
    import uvicorn

    level = settings.log_level
    return uvicorn.Config(app, host=settings.host, port=port, log_level=level, http=idle_timeout_protocol(settings.header_timeout_s),
                          timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)), timeout_graceful_shutdown=FLUSH_S)


def draining_server(config: Any, state: Any, drain_timeout_s: float) -> Any:
    """A uvicorn server whose first SIGTERM/SIGINT drains `state` (the module docstring) instead of
    closing the listener; `handle_exit(sig, None)` starts the same drain from code (tests)."""
    import uvicorn

    def cut_streams(why: str) -> None:
        n = state.engine.cut_all(f"the server is shutting down: {why} ended this request")
        if n:
            log.warning("%s: ended %d requests with an error", why, n)

    class DrainingServer(uvicorn.Server):
        drain_started: float | None = None

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if sockets:  # uvicorn says where it listens only for addresses it bound itself
                host, port = sockets[0].getsockname()[:2]
                log.info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)

        def handle_exit(self, sig: int, frame: Any) -> None:
            # not recorded in uvicorn's captured signals: it would re-raise them at exit (status 143)
            if self.drain_started is None and state.engine is not None and not self.should_exit:
                self.drain_started = time.monotonic()
                state.begin_drain()
                return
            state.begin_drain()
            if self.drain_started is not None and state.engine is not None:
                cut_streams("a second signal")
            self.should_exit = True
            self.force_exit = self.force_exit or (sig == signal.SIGINT and self.drain_started is None)

        async def on_tick(self, counter: int) -> bool:
            if self.drain_started is not None and not self.should_exit:
                engine = state.engine
                if engine is None or engine.num_unfinished == 0:
                    log.info("drain finished in %.1f s", time.monotonic() - self.drain_started)
                    self.should_exit = True
                elif time.monotonic() - self.drain_started >= drain_timeout_s:
                    cut_streams(f"the drain timeout ({drain_timeout_s:g} s)")
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)


def serve(settings: Settings, verbose: bool = False) -> int:
    """Serve until stopped; the exit status (see the module docstring)."""
    from quept.server.app import create_app
    from quept.server.state import Status

    level = "debug" if verbose else settings.log_level
    logging.basicConfig(level=level.upper() if level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind_socket(settings.host, settings.port)
    except BindError as err:
        log.error("%s", err)
        return 1
    app = create_app(settings)
    state = app.state.quept
    config = uvicorn_config(app, settings.model_copy(update={"log_level": level}), sock.getsockname()[1])
    server = draining_server(config, state, settings.drain_timeout_s)

    def fatal(message: str) -> None:
        log.error("stopping: %s", message)
        server.should_exit = True

    state.on_fatal = fatal
    server.run(sockets=[sock])
    return 1 if state.status is Status.FAILED else 0
