"""Server settings: `quept serve` flags, or environment variables with the `QUEPT_` prefix.

Every field below can be set as `QUEPT_<FIELD>` (e.g. `QUEPT_API_KEY`, `QUEPT_MAX_QUEUE`,
`QUEPT_DRAIN_TIMEOUT_S`); a command-line flag wins over the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BACKENDS = ("auto", "torch", "torch-fp32", "native", "triton")


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "quept"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUEPT_", extra="ignore", frozen=True, use_attribute_docstrings=True)

    checkpoint: Path | None = None
    """Checkpoint directory to serve. Unset: the default model, built on first use into `cache_dir`."""

    calibrate: bool = False
    """With no `checkpoint`: serve the QuEPT-calibrated default model (built once into `cache_dir`: minutes
    instead of about one, from the packaged WikiText-2 valid.txt or $QUEPT_CALIB_FILE). The uncalibrated default serves w8-w4
    close to the source, but its w3 and w2 are not usable."""

    host: str = "127.0.0.1"
    """Address to listen on (`0.0.0.0` for every interface, e.g. in a container)."""

    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on (0: any free port)."""

    api_key: str | None = None
    """When set, `/v1/*` requests (and `/docs`, `/redoc`, `/openapi.json`) need `Authorization: Bearer <api_key>`
    or `X-API-Key: <api_key>` (401 otherwise). A flag shows in `ps`: prefer `api_key_file` or QUEPT_API_KEY."""

    api_key_file: Path | None = None
    """Read the API key from this file (its first line; e.g. a Docker or Kubernetes secret mount)."""

    max_request_bytes: int = Field(4 << 20, ge=1024)
    """Largest request body accepted (bytes); larger ones get 413 before they are read whole."""

    keep_alive_timeout_s: float = Field(5.0, gt=0)
    """Close a connection that has sent no request for this long (new connections included)."""

    header_timeout_s: float = Field(10.0, gt=0)
    """A request's headers must arrive within this long of the connection opening (or of the previous
    response); a client that trickles them is closed."""

    docs: bool = True
    """Serve the OpenAPI schema and its pages (`/openapi.json`, `/docs`, `/redoc`); behind the key when one is set."""

    max_queue: int = Field(64, ge=0)
    """Requests allowed to wait beyond the `max_batch` running ones; more get 429 with Retry-After."""

    max_n: int = Field(16, ge=1)
    """Most completions one request may ask for (`n`, `best_of`); they share the prompt's prefill."""

    max_model_len: int | None = Field(None, ge=1)
    """Context limit for prompt + max_tokens (default: the model's own context)."""

    policy: str = "fixed"
    """Precision policy (controller): `fixed` runs what each request asks for; `load` moves the default plan of
    `auto` requests with the load against the SLOs; `entropy` steps tokens up on high next-token entropy;
    `load+entropy` both."""

    slo_itl_ms: float = Field(100.0, gt=0)
    """load policy: inter-token latency objective (ms); the default is the best plan predicted to meet it at p95."""

    slo_ttft_ms: float | None = Field(None, gt=0)
    """load policy: optional time-to-first-token objective (ms) for the newest waiting request."""

    load_plans: str = ""
    """load policy: candidate plans, e.g. `w8,w6,mixed:5,w4` (empty: stored widths and profiles from `load_floor`
    up to `default_precision`)."""

    load_floor: str = "w4"
    """load policy: the lowest width the default moves to."""

    load_dwell_s: float = Field(2.0, ge=0)
    """load policy: minimum seconds between two changes of the default plan."""

    load_hysteresis: float = Field(0.15, ge=0, lt=1)
    """load policy: a higher plan is taken only when predicted below (1 - this) x SLO."""

    profile_batches: str = ""
    """load policy: batch sizes profiled at start-up, e.g. `1,4,16` (empty: powers of two up to max_batch)."""

    entropy_threshold: float | None = Field(None, ge=0)
    """entropy policies: step up above this next-token entropy (nats). Unset: the checkpoint's calibration
    (elastic.json `entropy_policy`), else a quick calibration on valid.txt at start-up."""

    entropy_low: str = "w4"
    """entropy policies: the plan quiet tokens run at."""

    entropy_high: str = ""
    """entropy policy: the plan uncertain tokens step up to (empty: `default_precision`)."""

    entropy_window: int = Field(4, ge=1)
    """entropy policies: quiet tokens in a row before a sequence steps back down."""

    backend: str = "auto"
    """Elastic-linear backend: auto | torch (fp16 dense) | torch-fp32 (exact reference) | native | triton."""
    device: str = "cpu"
    """Where the model and its KV cache live: cpu, or cuda / cuda:N (auto then picks the triton backend)."""

    drain_timeout_s: float = Field(30.0, ge=0)
    """On SIGTERM: stop admitting, let in-flight requests finish for at most this long, then exit."""

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Where the default checkpoint is built on first use (`<cache_dir>/checkpoints/smollm2-135m-instruct-g<G>`,
    G the group size chosen from the source: 32 for the Q4_1 GGUF)."""

    default_precision: str = "w8"
    """Precision of requests that ask for none (and of `auto` under the fixed policy)."""

    kv_cache_mb: int = Field(512, ge=1)
    """Memory budget of the paged KV cache in MiB (K and V of all layers)."""

    max_batch: int = Field(16, ge=1)
    """Sequences decoding together in one forward."""

    max_batched_tokens: int = Field(512, ge=1)
    """Rows per forward; longer prompts are prefilled in chunks of this size."""

    block_size: int = Field(16, ge=1)
    """Tokens per KV-cache block."""

    prefix_caching: bool = True
    """Reuse the KV blocks of prompt prefixes already computed at the same precision plan (`--no-prefix-caching`: off)."""

    cached_widths: int = Field(0, ge=0)
    """torch backend: dense weights kept per width (0: every stored width, so mixed batches never rebuild)."""

    threads: int = Field(0, ge=0)
    """torch intra-op threads for model work (0: torch's default, one per core; 1 helps on a busy shared machine)."""

    small_batch_rows: int = Field(4, ge=0)
    """Steps of at most this many rows (a few decoding clients) leave one of the `threads` to the HTTP
    loop that streams their tokens (0: every step uses all of them)."""

    gil_switch_ms: float = Field(1.0, gt=0)
    """Python's GIL switch interval (ms; Python's default is 5). The engine thread gives up the GIL in
    every native call and must win it back from the HTTP loop after each: with 5 ms, a 16-client w8
    step took 46.6 ms in the server against 32 in the engine alone; with 1 ms, 38."""

    model_name: str = "smollm2-135m"
    """Name served in `/v1/models`; aliases `<model_name>@wB` select a precision."""

    warmup: bool = True
    """Run one forward at the default precision before reporting ready."""

    log_level: str = "info"
    """Log level of the server and uvicorn (debug, info, warning, error)."""

    @model_validator(mode="before")
    @classmethod
    def _read_api_key_file(cls, data: Any) -> Any:
        path = data.get("api_key_file") if isinstance(data, dict) else None
        if not path:
            return data
        if data.get("api_key"):
            raise ValueError("set api_key or api_key_file, not both")
        try:
            key = Path(path).read_text().splitlines()[0].strip() if Path(path).stat().st_size else ""
        except OSError as err:
            raise ValueError(f"cannot read api_key_file {str(path)!r}: {err.strerror or err}") from None
        if not key:
            raise ValueError(f"api_key_file {str(path)!r} is empty")
        return {**data, "api_key": key}

    def policy_options(self) -> dict[str, Any]:
        """Options for `make_controller` (quept.policies.PolicyConfig); `fixed` takes none."""
        if self.policy == "fixed":
            return {}
        names = ("slo_itl_ms", "slo_ttft_ms", "load_plans", "load_floor", "load_dwell_s", "load_hysteresis",
                 "profile_batches", "entropy_threshold", "entropy_low", "entropy_high", "entropy_window", "max_batch")
        return {n: getattr(self, n) for n in names}

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, v: str) -> str:
        if v not in BACKENDS:
            raise ValueError(f"backend {v!r} is not one of {list(BACKENDS)}")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        try:
            kind = torch.device(v).type
        except RuntimeError:
            raise ValueError(f"device {v!r} is not a torch device (cpu, cuda, cuda:N)") from None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device {v!r}: quept serves on cpu or cuda")
        return v

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, v: str) -> str:
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if v.lower() not in levels:
            raise ValueError(f"log_level {v!r} is not one of {list(levels)}")
        return v.lower()

