"""Load test of a quept server with locust: streaming chat and completion users, a precision mix.

    locust -f benchmarks/locustfile.py --headless -u 6 -r 1 -t 150s --stop-timeout 60 \\
        --host http://127.0.0.1:8000 --precision-mix w8:0.5,w4:0.3,auto:0.2 --max-tokens 48 \\
        --csv benchmarks/results/locust --only-summary
    python benchmarks/plot_locust.py benchmarks/results/locust

Every request streams (SSE) and asks for the usage chunk. Besides the end-to-end entry per
endpoint (type SSE), each request adds a TTFT entry (time to the first content token) and a TPOT
entry (time per output token after the first) named after its precision spec, so locust's own
tables and CSV files report them. At the end the run writes `<csv prefix>_requests.csv` (one row
per request) and `<csv prefix>_summary.json` (vLLM benchmark_serving style fields, per
precision and per endpoint) and prints the summary. HTTP 429 (queue full, deliberate
back-pressure) counts as a failure of its own kind: the exit code is 1 only for other failures.
Only loopback hosts are accepted unless --allow-remote is given.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# locust first: importing it monkey-patches ssl/socket with gevent, which must precede requests
from locust import User, between, events, task  # isort: skip
import requests  # isort: skip

log = logging.getLogger("quept.locust")

COMPLETION_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three most important ideas in computer science are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Quantization of neural networks means",
    "A recipe for a simple tomato soup:\n1.",
    "The difference between a list and a tuple in Python is",
    "In the year 2050, cities will",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn.",
    "What does an inference server do?",
    "Name two planets and one fact about each.",
    "How do I reverse a string in Python?",
    "Summarize the idea of mixed-precision inference.",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


class RateLimited(Exception):
    """HTTP 429: the server's queue is full (deliberate back-pressure)."""


class BadStream(Exception):
    """Non-200 answer, malformed SSE or a stream that did not end with [DONE]."""


def parse_precision_mix(text: str) -> list[tuple[str, float]]:
    """'w8:0.5,w4:0.3,auto:0.2' -> [('w8', 0.5), ...] with weights normalised to sum 1.

    A spec may itself hold ':' (``mixed:3.5``): the weight is what follows the last ':'.
    """
    mix: list[tuple[str, float]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        spec, sep, weight = part.rpartition(":")
        try:
            w = float(weight) if sep else math.nan
        except ValueError:
            w = math.nan
        if not sep or not spec or not (w > 0):
            raise ValueError(f"bad --precision-mix entry {part!r}: expected SPEC:WEIGHT with WEIGHT > 0")
        mix.append((spec, w))
    if not mix:
        raise ValueError("--precision-mix is empty")
    total = sum(w for _, w in mix)
    return [(s, w / total) for s, w in mix]


class PrecisionSchedule:
    """Deterministic weighted interleaving of the mix (smooth weighted round-robin, as nginx does):
    every window of draws holds each spec in proportion to its weight, so a short run sees every
    spec and two runs send the same sequence. A random draw left w4:0.2 unsent in a 4-second run."""

    def __init__(self, mix: list[tuple[str, float]]):
        self.mix = mix
        self.credit = [0.0] * len(mix)

    def next(self) -> str:
        for i, (_, w) in enumerate(self.mix):
            self.credit[i] += w
        best = max(range(len(self.mix)), key=lambda i: self.credit[i])
        self.credit[best] -= 1.0  # weights sum to 1
        return self.mix[best][0]


@dataclass
class Record:
    t_start: float          # seconds since the test started
    endpoint: str
    precision: str          # what the request asked for (X-Precision)
    precision_used: str     # what the server reported in its X-Precision response header
    status: int
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str = ""


@dataclass
class RunState:
    mix: list[tuple[str, float]] = field(default_factory=list)
    schedule: PrecisionSchedule = field(default_factory=lambda: PrecisionSchedule([]))
    model: str = ""
    t0: float = 0.0
    wall_t0: float = 0.0
    records: list[Record] = field(default_factory=list)
    load_start: float = 0.0


STATE = RunState()


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("quept")
    group.add_argument("--precision-mix", type=str, default="w8:0.5,w4:0.3,auto:0.2",
                       help="SPEC:WEIGHT,... precision specs sent as X-Precision, interleaved by weight")
    group.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    group.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    group.add_argument("--model", type=str, default="", help="model id (default: the first of /v1/models)")
    group.add_argument("--api-key", type=str, default=os.environ.get("QUEPT_API_KEY", ""),
                       help="bearer token (default: $QUEPT_API_KEY)")
    group.add_argument("--summary-prefix", type=str, default="",
                       help="where to write _requests.csv and _summary.json (default: the --csv prefix)")
    group.add_argument("--allow-remote", action="store_true", default=False,
                       help="allow a non-loopback --host")


def _headers(opts: Any, precision: str | None = None) -> dict[str, str]:
    h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if opts.api_key:
        h["Authorization"] = f"Bearer {opts.api_key}"
    if precision:
        h["X-Precision"] = precision
    return h


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    """Refuse a non-loopback target before any user starts; check --precision-mix early."""
    opts = environment.parsed_options
    if opts is None:
        return
    host = environment.host or ""
    hostname = urlparse(host).hostname or ""
    if hostname not in LOOPBACK and not hostname.startswith("127.") and not opts.allow_remote:
        log.error("refusing non-loopback host %r (use --allow-remote)", host)
        sys.exit(2)
    try:
        parse_precision_mix(opts.precision_mix)
    except ValueError as e:
        log.error("%s", e)
        sys.exit(2)


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    host = environment.host or ""
    STATE.mix = parse_precision_mix(opts.precision_mix)
    STATE.schedule = PrecisionSchedule(STATE.mix)
    STATE.model = opts.model
    if not STATE.model:
        r = requests.get(host.rstrip("/") + "/v1/models", headers=_headers(opts), timeout=30)
        r.raise_for_status()
        STATE.model = r.json()["data"][0]["id"]
    STATE.t0 = time.perf_counter()
    STATE.wall_t0 = time.time()
    STATE.load_start = round(os.getloadavg()[0], 2)
    STATE.records.clear()
    log.info("model %s, precision mix %s", STATE.model, STATE.mix)


class QueptUser(User):
    """Base: one streaming request per task, TTFT and TPOT reported as their own entries."""

    abstract = True
    wait_time = between(0.2, 1.0)
    endpoint = ""

    def on_start(self) -> None:
        self.session = requests.Session()
        self.base = (self.host or self.environment.host).rstrip("/")
        self.opts = self.environment.parsed_options

    def on_stop(self) -> None:
        self.session.close()

    def body(self) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def token_text(chunk: dict[str, Any]) -> str:
        choice = (chunk.get("choices") or [{}])[0]
        if "delta" in choice:
            return choice["delta"].get("content") or ""
        return choice.get("text") or ""

    def stream_once(self) -> None:
        precision = STATE.schedule.next()
        body = self.body() | {"model": STATE.model, "max_tokens": self.opts.max_tokens,
                              "temperature": self.opts.temperature, "stream": True,
                              "stream_options": {"include_usage": True}}
        fire = self.environment.events.request.fire
        t_rel = time.perf_counter() - STATE.t0
        start = time.perf_counter()
        first = last = None
        n_chunks, usage, status, used, error, exc = 0, {}, 0, "", "", None
        retry_after = 0.0
        try:
            with self.session.post(self.base + self.endpoint, json=body, headers=_headers(self.opts, precision),
                                   stream=True, timeout=(10, 600)) as r:
                status, used = r.status_code, r.headers.get("X-Precision", "")
                if r.status_code == 429:
                    retry_after = float(r.headers.get("Retry-After", "1") or 1)
                    raise RateLimited(f"429 queue full (Retry-After {r.headers.get('Retry-After')})")
                if r.status_code != 200:
                    raise BadStream(f"HTTP {r.status_code}: {r.text[:200]}")
                done = False
                for raw in r.iter_lines(decode_unicode=True):
                    if not raw or not raw.startswith("data:"):
                        continue
                    data = raw[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise BadStream(f"error event: {chunk['error']}")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if self.token_text(chunk):
                        now = time.perf_counter()
                        first = first if first is not None else now
                        last = now
                        n_chunks += 1
                if not done:
                    raise BadStream("stream ended without data: [DONE]")
                if first is None:
                    raise BadStream("no content token in the stream")
        except (RateLimited, BadStream, requests.RequestException, ValueError) as e:
            exc, error = e, f"{type(e).__name__}: {e}"
        end = time.perf_counter()
        e2e_ms = (end - start) * 1000
        n_out = int(usage.get("completion_tokens") or n_chunks)
        ttft_ms = (first - start) * 1000 if first is not None and exc is None else None
        tpot_ms = ((last - first) * 1000 / (n_out - 1)) if exc is None and n_out > 1 else None
        fire(request_type="SSE", name=self.endpoint, response_time=e2e_ms, response_length=n_out,
             exception=exc, context={"precision": precision})
        if ttft_ms is not None:
            fire(request_type="TTFT", name=precision, response_time=ttft_ms, response_length=0, exception=None)
        if tpot_ms is not None:
            fire(request_type="TPOT", name=precision, response_time=tpot_ms, response_length=0, exception=None)
        STATE.records.append(Record(round(t_rel, 4), self.endpoint, precision, used, status,
                                    None if ttft_ms is None else round(ttft_ms, 3),
                                    None if tpot_ms is None else round(tpot_ms, 3), round(e2e_ms, 3),
                                    usage.get("prompt_tokens"), n_out if exc is None else None, error))
        if retry_after:
            time.sleep(min(retry_after, 5.0))


class ChatUser(QueptUser):
    endpoint = "/v1/chat/completions"

    @task
    def chat(self) -> None:
        self.stream_once()

    def body(self) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": random.choice(CHAT_PROMPTS)}]}


class CompletionUser(QueptUser):
    endpoint = "/v1/completions"

    @task
    def complete(self) -> None:
        self.stream_once()

    def body(self) -> dict[str, Any]:
        return {"prompt": random.choice(COMPLETION_PROMPTS)}


# --------------------------------------------------------------------------- summary
def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return round(v[lo] + (v[hi] - v[lo]) * (k - lo), 3)


def _dist(values: list[float]) -> dict[str, float | None]:
    return {"mean": round(sum(values) / len(values), 3) if values else None,
            "p50": _pct(values, 0.5), "p90": _pct(values, 0.9), "p99": _pct(values, 0.99),
            "max": round(max(values), 3) if values else None}


def _group(records: list[Record], duration: float) -> dict[str, Any]:
    ok = [r for r in records if not r.error]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed_429": sum(1 for r in records if r.status == 429),
        "failed_other": sum(1 for r in records if r.error and r.status != 429),
        "request_throughput_rps": round(len(ok) / duration, 4) if duration else None,
        "output_token_throughput_tps": round(tokens / duration, 3) if duration else None,
        "output_tokens": tokens,
        "ttft_ms": _dist([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "tpot_ms": _dist([r.tpot_ms for r in ok if r.tpot_ms is not None]),
        "e2e_ms": _dist([r.e2e_ms for r in ok]),
    }


def summarize(records: list[Record], duration: float, opts: Any, host: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "command": " ".join(["locust", *sys.argv[1:]]),
        "host": host,
        "model": STATE.model,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(STATE.wall_t0)),
        "duration_s": round(duration, 2),
        "users": getattr(opts, "num_users", None),
        "spawn_rate": getattr(opts, "spawn_rate", None),
        "precision_mix": dict(STATE.mix),
        "max_tokens": opts.max_tokens,
        "temperature": opts.temperature,
        # the client runs on the server's machine: its load (other work included) shapes the numbers
        "cpu_count": os.cpu_count(),
        "load_avg_start": STATE.load_start,
        "load_avg_end": round(os.getloadavg()[0], 2),
    }
    out |= _group(records, duration)
    out["by_precision"] = {p: _group([r for r in records if r.precision == p], duration)
                           for p in sorted({r.precision for r in records})}
    out["by_endpoint"] = {e: _group([r for r in records if r.endpoint == e], duration)
                          for e in sorted({r.endpoint for r in records})}
    out["precision_used"] = {u: sum(1 for r in records if r.precision_used == u)
                             for u in sorted({r.precision_used for r in records})}
    return out


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    if not STATE.t0:
        return
    opts = environment.parsed_options
    duration = time.perf_counter() - STATE.t0
    records = list(STATE.records)
    summary = summarize(records, duration, opts, environment.host or "")
    prefix = opts.summary_prefix or getattr(opts, "csv_prefix", None) or ""
    if prefix:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{prefix}_requests.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(Record.__dataclass_fields__))
            w.writeheader()
            for r in records:
                w.writerow(asdict(r))
        Path(f"{prefix}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    s = summary
    lines = [
        f"quept load test: {s['requests']} requests in {s['duration_s']} s, {s['completed']} completed, "
        f"{s['failed_429']} rejected (429), {s['failed_other']} other failures",
        f"  throughput: {s['request_throughput_rps']} req/s, {s['output_token_throughput_tps']} output tok/s",
        f"  TTFT ms: {s['ttft_ms']}",
        f"  TPOT ms: {s['tpot_ms']}",
        f"  E2E  ms: {s['e2e_ms']}",
    ]
    for p, g in s["by_precision"].items():
        lines.append(f"  [{p}] n={g['completed']} TTFT p50={g['ttft_ms']['p50']} p99={g['ttft_ms']['p99']} "
                     f"TPOT p50={g['tpot_ms']['p50']} p99={g['tpot_ms']['p99']} tok/s={g['output_token_throughput_tps']}")
    if prefix:
        lines.append(f"  wrote {prefix}_summary.json and {prefix}_requests.csv")
    print("\n".join(lines), flush=True)
    STATE.t0 = 0.0


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    """Exit code: 0 when every failure is a deliberate 429, 1 for any other failure."""
    other = [r for r in STATE.records if r.error and r.status != 429]
    runner = environment.runner
    crashed = runner is not None and bool(runner.exceptions)
    environment.process_exit_code = 1 if other or crashed else 0
