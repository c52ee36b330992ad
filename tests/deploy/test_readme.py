"""docs/deployment.md: its commands match the files: paths exist, build arguments are ARGs of the
Dockerfile, variables are ones the server, compose file or smoke test read, locust flags exist."""

from __future__ import annotations

import re

from tests.deploy.conftest import DEPLOY, REPO, SERVE_ENV

README = (REPO / "docs" / "deployment.md").read_text()


def test_paths_exist() -> None:
    paths = set(re.findall(r"\b((?:deploy|benchmarks|shared/tools)/[\w./-]*\w)", README))
    assert paths
    for p in paths:
        base = REPO.parent if p.startswith("shared/") else REPO
        if p.startswith("benchmarks/results/locust"):
            continue  # outputs of the documented commands
        assert (base / p).exists(), f"README names {p}, which does not exist"


def test_build_args_are_dockerfile_args() -> None:
    args = set(re.findall(r"^ARG (\w+)", (DEPLOY / "Dockerfile").read_text(), re.M))
    used = set(re.findall(r"--build-arg (\w+)=", README)) | set(re.findall(r"`(\w+)` \(default", README))
    assert used and used <= args, sorted(used - args)


def test_variables_are_read_somewhere() -> None:
    compose = (DEPLOY / "compose.yaml").read_text() + (DEPLOY / "compose.gpu.yaml").read_text()
    smoke = (DEPLOY / "smoke.sh").read_text()
    for var in set(re.findall(r"\b(QUEPT_\w+)", README)):
        assert var in SERVE_ENV or var in compose or var in smoke, f"README names {var}, which nothing reads"
    for var in set(re.findall(r"\b(GRAFANA_\w+|PROMETHEUS_\w+|BASE_IMAGE|TORCH_INDEX_URL)\b", README)):
        assert var in compose or var in (DEPLOY / "Dockerfile").read_text(), var


def test_locust_flags_exist() -> None:
    locustfile = (REPO / "benchmarks" / "locustfile.py").read_text()
    own = set(re.findall(r'add_argument\("(--[\w-]+)"', locustfile))
    builtin = {"-f", "--headless", "-u", "-r", "-t", "--host", "--csv", "--csv-full-history", "--only-summary",
               "--stop-timeout"}
    block = re.search(r"```bash\n(quept serve &.*?)```", README, re.S).group(1)
    flags = set(re.findall(r"(?<=\s)(--?[a-z][\w-]*)", block.split("locust ", 1)[1].split("python ")[0]))
    assert flags <= own | builtin, sorted(flags - own - builtin)
    assert {"--precision-mix", "--max-tokens"} <= flags


def test_k8s_and_compose_files_named() -> None:
    for name in ("compose.yaml", "compose.gpu.yaml"):
        assert f"deploy/{name}" in README
    for f in (DEPLOY / "k8s").glob("*.yaml"):
        if f.name != "kustomization.yaml":
            assert f.name in README, f"README does not describe k8s/{f.name}"
