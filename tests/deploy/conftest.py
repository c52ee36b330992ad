from __future__ import annotations

from pathlib import Path

import pytest

from quept.server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# The QUEPT_* variables of `quept serve`: one per settings field.
SERVE_ENV = {f"QUEPT_{name.upper()}" for name in Settings.model_fields}  # what `quept serve` reads

# Metric families of docs/architecture.md §5 (with the `quept:` prefix, counters without `_total`).
DESIGN_METRICS = {
    "quept:num_requests_running": "gauge",
    "quept:num_requests_waiting": "gauge",
    "quept:kv_cache_usage_perc": "gauge",
    "quept:prompt_tokens": "counter",
    "quept:generation_tokens": "counter",
    "quept:time_to_first_token_seconds": "histogram",
    "quept:inter_token_latency_seconds": "histogram",
    "quept:e2e_request_latency_seconds": "histogram",
    "quept:request_success": "counter",
    "quept:precision_switches": "counter",
    "quept:requests_by_precision": "counter",
}
# Exported beyond docs/architecture.md §5 (documented in quept/server/metrics.py).
SERVER_EXTRA_METRICS = {
    "quept:num_preemptions": "counter",
    "quept:request_queue_time_seconds": "histogram",
    "quept:request_rejected": "counter",
    "quept:default_precision_bits": "gauge",
    "quept:predicted_inter_token_latency_seconds": "gauge",
    "quept:generation_tokens_by_width": "counter",
}


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def load_yaml_docs(path: Path) -> list[dict]:
    yaml = pytest.importorskip("yaml")
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]
