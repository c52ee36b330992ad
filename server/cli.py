"""The `quept` console script: the runtime commands (build, generate, eval) plus `serve`.

`quept serve` flags mirror the settings in `server/settings.py`; each can also come from a
`QUEPT_<NAME>` environment variable, and a flag wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

log = logging.getLogger("quept.serve")


def _flag_type(annotation: Any) -> Any:
    """argparse type of a settings field (`int | None` -> int)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args and (typing.get_origin(annotation) in (typing.Union, types.UnionType)) else annotation
    return base if base in (int, float, Path) else str


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    from server.settings import Settings

    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                       description="Serve a checkpoint (default: SmolLM2-135M-Instruct, built on first use) over an "
                                   "OpenAI-compatible HTTP API. Every flag can also be set as QUEPT_<NAME>.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"QUEPT_{name.upper()}"
        doc = (field.description or "").replace("%", "%%")
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{doc} [{env}]")
        else:
            p.add_argument(flag, type=_flag_type(field.annotation), default=argparse.SUPPRESS, metavar=name.upper(),
                           help=f"{doc} [{env}]")
    return p


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from server.app import create_app
    from server.settings import Settings
    from server.state import Status

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
    try:
        settings = Settings(**overrides)
    except ValidationError as err:
        for e in err.errors():
            print(f"error: {'.'.join(str(x) for x in e['loc'])}: {e['msg']}", file=sys.stderr)
        return 2
    level = "debug" if getattr(args, "verbose", False) else settings.log_level
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `quept` console script."""
    from quept_runtime.cli import build_parser, run

    parser, sub = build_parser()
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
