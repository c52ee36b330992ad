"""deploy/k8s: every manifest validates against the Kubernetes OpenAPI schemas (strict: unknown
fields fail), offline, via the schemas bundled in the PyPI package kubernetes-validate; and the
pieces agree with each other and with the server contract."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, SERVE_ENV, load_yaml_docs

kv = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

K8S = DEPLOY / "k8s"
# The oldest Kubernetes we claim (autoscaling/v2 GA, sidecar-free probes) and the newest schema.
VERSIONS = ["1.29.0", kv.latest_version()]
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _all() -> dict[tuple[str, str], dict]:
    out = {}
    for p in MANIFESTS:
        for d in load_yaml_docs(p):
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_schema(path: Path, version: str) -> None:
    docs = load_yaml_docs(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_schema_validation_catches_errors() -> None:
    """The validator really checks (guards against a validator that accepts anything)."""
    dep = _all()[("Deployment", "quept")]
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, VERSIONS[-1], strict=True)
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = load_yaml_docs(K8S / "kustomization.yaml")[0]
    assert kust["kind"] == "Kustomization"
    assert sorted(kust["resources"]) == sorted(p.name for p in MANIFESTS)
    assert {i["name"] for i in kust["images"]} == {"quept"}


def _container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def test_probes_and_graceful_termination() -> None:
    objs = _all()
    dep, cm = objs[("Deployment", "quept")], objs[("ConfigMap", "quept-config")]
    c = _container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(cm["data"]["QUEPT_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", ports["http"]), probe
    drain = float(cm["data"]["QUEPT_DRAIN_TIMEOUT_S"])
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + 5, "SIGKILL would cut the server's drain short"
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain, (
        "a draining server answers 503 on /health; liveness must not restart it meanwhile")
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    sc = dep["spec"]["template"]["spec"]["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == ports["http"]


def test_env_names_are_server_settings() -> None:
    objs = _all()
    names = set(objs[("ConfigMap", "quept-config")]["data"])
    names |= {e["name"] for e in _container(objs[("Deployment", "quept")]).get("env", [])}
    assert names <= SERVE_ENV, f"unknown settings: {sorted(names - SERVE_ENV)}"


def test_service_selects_the_pods() -> None:
    objs = _all()
    dep, svc = objs[("Deployment", "quept")], objs[("Service", "quept")]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    names = {p["name"] for p in _container(dep)["ports"]}
    assert all(p["targetPort"] in names for p in svc["spec"]["ports"])
    pdb = objs[("PodDisruptionBudget", "quept")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_hpa_scales_on_queue_depth_through_the_adapter() -> None:
    objs = _all()
    hpa = objs[("HorizontalPodAutoscaler", "quept")]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "quept")
    (metric,) = hpa["spec"]["metrics"]
    hpa_name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load(objs[("ConfigMap", "prometheus-adapter-quept")]["data"]["config.yaml"])
    (rule,) = rules["rules"]
    series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
    assert series == "quept:num_requests_waiting"  # docs/architecture.md §5: the queue depth
    exported = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert exported == hpa_name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_scrape_config_keeps_quept_pods_with_pod_labels() -> None:
    cfg = yaml.safe_load(_all()[("ConfigMap", "prometheus-quept-scrape")]["data"]["prometheus.yml"])
    (job,) = cfg["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "__metrics_path__", "__address__"} <= targets
    # the __address__ rewrite joins the pod IP with the annotated port
    (addr,) = [r for r in job["relabel_configs"] if r.get("target_label") == "__address__"]
    m = re.fullmatch(addr["regex"], "10.0.0.7:1234;8000")
    assert m and m.expand(addr["replacement"].replace("$", "\\")) == "10.0.0.7:8000"
