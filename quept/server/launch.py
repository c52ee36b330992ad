"""Run the HTTP server until it is told to stop: uvicorn with a drain on SIGTERM/SIGINT.

`quept serve` (quept.cli) parses its flags into `Settings` and calls `serve` here.
"""

from __future__ import annotations

import logging
from typing import Any

from quept.server.settings import Settings

log = logging.getLogger("quept.serve")


def serve(settings: Settings, verbose: bool = False) -> int:
    """Serve until stopped; the exit status (1 when the engine failed)."""
    import uvicorn

    from quept.server.app import create_app
    from quept.server.state import Status

    level = "debug" if verbose else settings.log_level
    logging.basicConfig(level=level.upper() if level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    state = app.state.quept
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=level,
                            timeout_graceful_shutdown=max(1, int(round(settings.drain_timeout_s))))

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: /health turns 503 and no request is admitted; uvicorn then waits for
        in-flight requests up to `drain_timeout_s` before it cancels them and exits."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            state.begin_drain()
            super().handle_exit(sig, frame)

    server = DrainingServer(config)

    def fatal(message: str) -> None:
        log.error("stopping: %s", message)
        server.should_exit = True

    state.on_fatal = fatal
    server.run()
    return 1 if state.status is Status.FAILED else 0
