"""deploy/compose*.yaml validate against the Compose Specification JSON schema (vendored from a
registry package, see schemas/README.md) and wire quept, Prometheus and Grafana together."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, REPO, SERVE_ENV, load_yaml_docs

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "compose-spec.json").read_text())
COMPOSE_FILES = sorted(DEPLOY.glob("compose*.yaml"))


def _validator():
    # the schema names draft 2019-09 (with a trailing '#' that jsonschema does not look up)
    jsonschema.Draft201909Validator.check_schema(SCHEMA)
    return jsonschema.Draft201909Validator(SCHEMA)


def _compose(name: str = "compose.yaml") -> dict:
    return load_yaml_docs(DEPLOY / name)[0]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_matches_schema(path: Path) -> None:
    errors = sorted(_validator().iter_errors(load_yaml_docs(path)[0]), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_rejects_mistakes() -> None:
    bad = copy.deepcopy(_compose())
    bad["services"]["quept"]["healthcheck"]["intervall"] = "5s"
    assert list(_validator().iter_errors(bad))
    bad = copy.deepcopy(_compose())
    bad["services"]["quept"]["ports"] = "8000:8000"
    assert list(_validator().iter_errors(bad))


def test_gpu_override_only_extends_quept() -> None:
    assert set(_compose("compose.gpu.yaml")["services"]) == {"quept"}


def test_build_and_bind_mounts_exist() -> None:
    compose = _compose()
    build = compose["services"]["quept"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).is_file()
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"bind mount source {src} missing"
            else:
                assert src in compose["volumes"], f"named volume {src} not declared"


def test_quept_service_settings() -> None:
    quept = _compose()["services"]["quept"]
    env = quept["environment"]
    assert set(env) <= SERVE_ENV, f"unknown settings: {sorted(set(env) - SERVE_ENV)}"
    assert "/health" in " ".join(quept["healthcheck"]["test"])
    grace = int(re.fullmatch(r"(\d+)s", quept["stop_grace_period"]).group(1))
    assert grace > float(env["QUEPT_DRAIN_TIMEOUT_S"])
    assert any(p.endswith(":" + env["QUEPT_PORT"]) for p in quept["ports"])


def test_prometheus_scrapes_quept_metrics() -> None:
    compose = _compose()
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "quept"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"]
    assert port == compose["services"]["quept"]["environment"]["QUEPT_PORT"]


def test_grafana_provisioning_points_at_prometheus_and_dashboard() -> None:
    compose = _compose()
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    host = re.match(r"https?://([^:/]+):(\d+)", ds["url"])
    assert host and host.group(1) in compose["services"]
    (provider,) = yaml.safe_load((prov / "dashboards" / "quept.yaml").read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    host_dir = {c: h for h, c in mounts.items()}[provider["options"]["path"]]
    dashboards = list((DEPLOY / host_dir).glob("*.json"))
    assert dashboards
    for d in dashboards:
        uids = {p["datasource"]["uid"] for p in json.loads(d.read_text())["panels"]}
        assert uids == {ds["uid"]}
