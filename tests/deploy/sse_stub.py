"""A stand-in OpenAI-style SSE endpoint for testing benchmarks/locustfile.py without the engine.

    python tests/deploy/sse_stub.py PORT     (serves until killed; 127.0.0.1 only)

Every 2nd request with X-Precision: w2 answers 429, to exercise the
locustfile's handling of deliberate back-pressure.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COUNT = {"w2": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, code: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error",
                                       "param": None, "code": None}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        precision = self.headers.get("X-Precision", "w8")
        if precision == "w2":
            COUNT["w2"] += 1
            if COUNT["w2"] % 2 == 0:
                self._json(429, {"error": {"message": "queue full", "type": "rate_limit_error",
                                           "param": None, "code": None}}, {"Retry-After": "0"})
                return
        chat = self.path == "/v1/chat/completions"
        n = int(body.get("max_tokens", 8))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("X-Precision", precision)
        self.send_header("Connection", "close")
        self.end_headers()

        def send(obj: object) -> None:
            self.wfile.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        if chat:
            send({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        for i in range(n):
            time.sleep(0.002)
            piece = {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
            send({"choices": [{"index": 0, **piece, "finish_reason": None}]})
        send({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5}})
        send("[DONE]")
        self.close_connection = True


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
