"""deploy/grafana: the dashboard JSON loads, its layout is sound, every query names a metric of
docs/architecture.md §5 and parses as PromQL (promtool, when installed). test_live_metrics.py checks the
same queries against a running server's /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, DESIGN_METRICS, SERVER_EXTRA_METRICS

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "quept.json"
METRIC_RE = re.compile(r"\b(quept:[a-zA-Z0-9_:]+)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# what the issue asks the dashboard to show, as the metric families that show it
REQUIRED = {
    "request rate": "quept:request_success",
    "TTFT percentiles": "quept:time_to_first_token_seconds",
    "ITL percentiles": "quept:inter_token_latency_seconds",
    "queue depth": "quept:num_requests_waiting",
    "KV usage": "quept:kv_cache_usage_perc",
    "tokens per width": "quept:generation_tokens",
    "precision switches": "quept:precision_switches",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict) -> list[str]:
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    out += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            for v in dash.get("templating", {}).get("list", []) if v["type"] == "query"]
    return out


def family(name: str) -> tuple[str, str]:
    """quept:x_total -> ('quept:x', 'counter'); the family and type a sample name belongs to."""
    for fam, kind in (DESIGN_METRICS | SERVER_EXTRA_METRICS).items():
        if any(name == fam + s for s in SUFFIXES[kind]):
            return fam, kind
    raise AssertionError(f"{name} is not a sample name of any docs/architecture.md §5 (or quept/server/metrics.py) metric")


def promql(expr: str) -> str:
    """Grafana variables replaced by values Prometheus accepts."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
            .replace('"$job"', '".*"').replace('"$instance"', '".*"'))


def test_dashboard_loads_and_layout_is_sound() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
        assert p["datasource"]["type"] == "prometheus"
    variables = {v["name"] for v in dash["templating"]["list"]}
    used = {m for q in queries(dash) for m in re.findall(r"\$(\w+)", q)} - {"__rate_interval", "__interval"}
    assert used <= variables


def test_queries_name_design_metrics_and_cover_the_issue() -> None:
    names = {m for q in queries(dashboard()) for m in METRIC_RE.findall(q)}
    families = {}
    for n in names:
        fam, kind = family(n)
        families[fam] = kind
        if n.endswith("_bucket"):
            assert kind == "histogram"
    missing = {what: fam for what, fam in REQUIRED.items() if fam not in families}
    assert not missing, f"dashboard does not show: {missing}"
    exprs = queries(dashboard())
    for fam in ("quept:time_to_first_token_seconds", "quept:inter_token_latency_seconds"):
        qs = {re.search(r"histogram_quantile\(([\d.]+),", e).group(1) for e in exprs if fam + "_bucket" in e}
        assert {"0.5", "0.99"} <= qs, f"{fam}: percentiles {qs}"
    assert any("by (precision)" in e and "quept:generation_tokens_total" in e for e in exprs)


def test_queries_parse_as_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    exprs = queries(dashboard())
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"quept_dashboard:q{i}", "expr": promql(e)} for i, e in enumerate(exprs)
        if not e.startswith("label_values(")]}]}
    path = tmp_path / "rules.json"  # JSON is YAML
    path.write_text(json.dumps(rules))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("config", ["compose", "k8s"])
def test_prometheus_configs_pass_promtool(config: str, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    if config == "compose":
        path = DEPLOY / "prometheus" / "prometheus.yml"
    else:
        yaml = pytest.importorskip("yaml")
        cm = yaml.safe_load((DEPLOY / "k8s" / "prometheus-scrape.yaml").read_text())
        path = tmp_path / "prometheus.yml"
        path.write_text(cm["data"]["prometheus.yml"])
    r = subprocess.run([promtool, "check", "config", "--syntax-only", str(path)], capture_output=True, text=True, timeout=60)
    if r.returncode and "kubernetes_sd_configs not found" in r.stdout + r.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's is)")
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_dashboard_script_against_a_stub_prometheus(tmp_path: Path) -> None:
    """deploy/check_dashboard.py substitutes Grafana variables, queries /api/v1/query for every
    target and fails on a panel without data."""
    import http.server
    import threading
    import urllib.parse

    seen: list[str] = []

    class Api(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)["query"][0]
            seen.append(q)
            result = [] if "precision_switches" in q else [{"metric": {"precision": "w4"}, "value": [0, "1.5"]}]
            body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    script = [sys.executable, str(DEPLOY / "check_dashboard.py"), "--prometheus", url]
    try:
        r = subprocess.run(script, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "Precision switches" in r.stderr
        out = tmp_path / "check.json"
        r = subprocess.run(script + ["--allow-empty", "switches", "--json", str(out)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        srv.shutdown()
    assert not any("$" in q for q in seen)
    assert len(json.loads(out.read_text())["results"]) == len([q for q in queries(dashboard())
                                                                if not q.startswith("label_values(")])
