"""The OpenAI error answer: `APIError` carries status, message, type, param and code."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from quept.engine.async_engine import EngineFailedError
from quept.server import protocol as P


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(P.error_body(self.message, self.type, self.param, self.code), self.status, self.headers)


def failed(err: EngineFailedError) -> APIError:
    """500 when the engine failed the request; 503 when the server cut it short (a drain ran out); 400
    when the request's grammar failed mid-way (too complex for the grammar engine's limits)."""
    if err.code == "grammar_error":
        return APIError(400, str(err), param=err.param, code=err.code)
    if err.code == "drain_timeout":
        return APIError(503, str(err), "service_unavailable", None, err.code)
    return APIError(500, str(err), "server_error", None, err.code)
