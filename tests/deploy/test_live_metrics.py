"""Against the real server (`quept serve`, started the way the container starts it: every setting
from QUEPT_* variables) on the tiny random checkpoint: the Grafana dashboard's queries, the
HPA's metric and the smoke test's checks name metrics that /metrics exports; SIGTERM drains
and exits within QUEPT_DRAIN_TIMEOUT_S."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tomllib

from tests.deploy.conftest import DESIGN_METRICS, REPO, SERVER_EXTRA_METRICS
from tests.deploy.test_grafana import METRIC_RE, dashboard, queries

DRAIN_S = 5


def _entry_point() -> tuple[str, str]:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["quept"].partition(":")
    return module, func


def _serve_available() -> bool:
    module, _ = _entry_point()
    if importlib.util.find_spec(module) is None:
        return False
    r = subprocess.run([sys.executable, "-c", f"import sys; from {module} import {_entry_point()[1]} as m; "
                        "sys.argv = ['quept', 'serve', '--help']; sys.exit(m())"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    return r.returncode == 0


def _get(url: str, timeout: float = 30) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _post(url: str, body: dict, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, dict(r.headers), r.read()


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    if not _serve_available():
        pytest.skip("`quept serve` is not available yet")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    module, func = _entry_point()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEPT_")}
    env |= {"QUEPT_CHECKPOINT": str(tiny_ckpt), "QUEPT_HOST": "127.0.0.1", "QUEPT_PORT": str(port),
            "QUEPT_DRAIN_TIMEOUT_S": str(DRAIN_S), "QUEPT_BACKEND": "torch",
            "QUEPT_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    log = tmp_path_factory.mktemp("log") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", f"import sys; from {module} import {func} as m; "
                                 "sys.argv = ['quept', 'serve']; sys.exit(m())"],
                                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()[-3000:]}"
            try:
                if _get(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"/health not 200 in 60 s: {log.read_text()[-3000:]}"
            time.sleep(0.25)
        yield base, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _exposition(base: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """family name -> type, and sample name -> label names seen, from GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = _get(base + "/metrics")
    assert status == 200
    types, labels = {}, {}
    for fam in text_string_to_metric_families(body.decode()):
        types[fam.name] = fam.type
        for s in fam.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    return types, labels


def test_dashboard_queries_match_live_metrics(server) -> None:
    base, _, _ = server
    model = json.loads(_get(base + "/v1/models")[2])["data"][0]["id"]
    status, headers, body = _post(base + "/v1/completions",
                                  {"model": model, "prompt": "hello world", "max_tokens": 4, "temperature": 0},
                                  {"X-Precision": "w4"})
    assert status == 200 and json.loads(body)["choices"][0]["text"] is not None
    assert {k.lower(): v for k, v in headers.items()}["x-precision"].startswith("w4")

    types, labels = _exposition(base)
    for fam, kind in (DESIGN_METRICS | SERVER_EXTRA_METRICS).items():  # docs/architecture.md §5 families and types
        assert types.get(fam) == kind, f"{fam}: {types.get(fam)} on /metrics, docs/architecture.md says {kind}"
    for expr in queries(dashboard()):
        for name in METRIC_RE.findall(expr):
            assert name in labels or (name.endswith("_total") and types.get(name[:-6]) == "counter"), (
                f"dashboard query uses {name}, which /metrics does not export")
            if name in labels:  # a family with samples: the grouping labels must exist
                for group in re.findall(r"by \(([^)]*)\)", expr):
                    wanted = {g.strip() for g in group.split(",")} - {"le", "instance", "job"}
                    assert wanted <= labels[name], f"{expr}: {name} has labels {labels[name]}"
    # what smoke.sh checks after its w4 completion
    assert "precision" in labels["quept:generation_tokens_total"]
    assert "quept:num_requests_waiting" in labels  # the HPA's metric, through the adapter


def test_sigterm_drains_and_exits(server) -> None:
    base, proc, log = server
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(DRAIN_S + 15)
    assert time.monotonic() - t0 < DRAIN_S + 10
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), log.read_text()[-2000:]
