"""A stand-in for llama.cpp's `llama-server` and `llama-quantize`, for rehearsing
benchmarks/llama_server_compare.py without building llama.cpp.

    python llama_server_stub.py server -m MODEL --port PORT [llama-server flags]   (127.0.0.1 only)
    python llama_server_stub.py quantize [--allow-requantize] IN OUT TYPE          (copies IN to OUT)

The server answers /health and streams `max_tokens` one-token chunks for /v1/completions, then a
usage chunk when `stream_options.include_usage` asks for it, as llama-server does.
"""

from __future__ import annotations

import json
import shutil
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for i in range(req["max_tokens"]):
            chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if (req.get("stream_options") or {}).get("include_usage"):
            usage = {"choices": [], "usage": {"prompt_tokens": len(req["prompt"]), "completion_tokens": req["max_tokens"]}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


def main(argv: list[str]) -> None:
    if argv[0] == "quantize":
        src, dst, _type = [a for a in argv[1:] if not a.startswith("--")]
        shutil.copyfile(src, dst)
        return
    port = int(argv[argv.index("--port") + 1])
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
