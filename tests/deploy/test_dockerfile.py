"""deploy/Dockerfile and the shell scripts: structure the issue asks for (parsed instructions,
not a build; deploy/smoke.sh does the real build), syntax of every script, and QUEPT_* names."""

from __future__ import annotations

import glob
import re
import shlex
import shutil
import subprocess

import pytest

from tests.deploy.conftest import DEPLOY, REPO, SERVE_ENV

SCRIPTS = {"entrypoint.sh": "sh", "build-pip.sh": "sh", "smoke.sh": "bash"}


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    st: list[list[tuple[str, str]]] = [[]]
    for op, rest in instructions():
        if op == "FROM":
            st.append([])
        st[-1].append((op, rest))
    return st


def test_base_image_is_an_argument_used_by_every_stage() -> None:
    pre, *body = stages()
    args = dict(a.split("=", 1) for op, a in pre if op == "ARG")
    assert re.fullmatch(r"(docker\.io/library/)?python:3\.\d+-slim(-\w+)?", args["BASE_IMAGE"])
    assert len(body) == 2, "a build stage and a runtime stage"
    for stage in body:
        assert stage[0][1].split()[0] == "${BASE_IMAGE}"


def test_runtime_stage_non_root_healthcheck_entrypoint() -> None:
    runtime = stages()[-1]
    ops = dict(runtime)
    user = ops["USER"].split(":")[0]
    uid = dict(a.split("=", 1) for op, a in runtime if op == "ARG" and "=" in a).get(user.strip("${}"), user)
    assert uid not in ("0", "root") and int(uid) >= 1000
    assert "/health" in ops["HEALTHCHECK"] and "--start-period" in ops["HEALTHCHECK"]
    assert "8000" in ops["EXPOSE"]
    entry = shlex.split(ops["ENTRYPOINT"].strip("[]").replace(",", " "))[0]
    copies = [c for op, c in runtime if op == "COPY" and c.split()[-1] == entry]
    assert copies, "the entrypoint is copied into the image"
    env = " ".join(v for op, v in runtime if op == "ENV")
    assert "QUEPT_HOST=0.0.0.0" in env and "PATH=/opt/venv/bin" in env


def test_build_arguments_for_proxies_wheelhouses_and_cuda() -> None:
    build = stages()[1]
    args = {a.split("=", 1)[0] for op, a in build if op == "ARG"}
    assert {"PIP_FIND_LINKS", "PIP_CERT", "PIP_INDEX_URL", "PIP_NO_INDEX", "TORCH_INDEX_URL",
            "TORCH_VERSION", "QUEPT_EXTRAS"} <= args
    assert "whl/cpu" in next(a for op, a in build if op == "ARG" and a.startswith("TORCH_INDEX_URL="))


def test_copy_sources_exist() -> None:
    for op, rest in instructions():
        if op != "COPY" or rest.startswith("--from"):
            continue
        *srcs, _dst = rest.split()
        for src in srcs:  # a pattern may match nothing (README.m[d]); a plain path must exist
            assert glob.has_magic(src) or (REPO / src).exists(), f"COPY source {src} missing"
        assert any(glob.glob(str(REPO / s)) for s in srcs), f"COPY {rest}: no source matches"


def test_quept_env_names_are_server_settings() -> None:
    text = "\n".join((DEPLOY / f).read_text() for f in ("Dockerfile", "entrypoint.sh", "smoke.sh"))
    names = set(re.findall(r"\b(QUEPT_[A-Z_]+)\b", text))
    names = {n for n in names if not n.startswith(("QUEPT_SMOKE_", "QUEPT_UID", "QUEPT_EXTRAS", "QUEPT_IMAGE"))}
    assert names <= SERVE_ENV, sorted(names - SERVE_ENV)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_scripts_parse(script: str) -> None:
    path = DEPLOY / script
    subprocess.run([SCRIPTS[script], "-n", str(path)], check=True, timeout=30)
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-S", "warning", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout


def test_entrypoint_serves_a_mounted_checkpoint(tmp_path) -> None:
    """/checkpoint is used when it holds a checkpoint and QUEPT_CHECKPOINT is unset."""
    script = ((DEPLOY / "entrypoint.sh").read_text().replace("/checkpoint", str(tmp_path / "ckpt"))
              .replace("/opt/quept/cache", str(tmp_path / "prebuilt")))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "quept").write_text('#!/bin/sh\necho "ckpt=${QUEPT_CHECKPOINT-unset} args=$*"\n')
    (fake / "quept").chmod(0o755)
    (tmp_path / "entry.sh").write_text(script)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "QUEPT_CACHE_DIR": str(tmp_path / "data")}
    run = lambda **e: subprocess.run(["sh", str(tmp_path / "entry.sh"), "serve"], env=env | e,  # noqa: E731
                                     capture_output=True, text=True, check=True).stdout.strip()
    assert run() == "ckpt=unset args=serve"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "elastic.json").write_text("{}")
    assert run() == f"ckpt={tmp_path / 'ckpt'} args=serve"
    assert run(QUEPT_CHECKPOINT="/other") == "ckpt=/other args=serve"
    (fake / "quept").write_text('#!/bin/sh\necho "key=${QUEPT_API_KEY-unset} len=${QUEPT_MAX_MODEL_LEN-unset}"\n')
    assert run(QUEPT_API_KEY="", QUEPT_MAX_MODEL_LEN="") == "key=unset len=unset"  # empty = not set
    assert run(QUEPT_API_KEY="k", QUEPT_MAX_MODEL_LEN="64") == "key=k len=64"
    # native kernels prebuilt in the image seed the cache once and are not overwritten
    so = tmp_path / "prebuilt" / "native" / "quept_native_abc" / "quept_native_abc.so"
    so.parent.mkdir(parents=True)
    so.write_text("prebuilt")
    run()
    seeded = tmp_path / "data" / "native" / "quept_native_abc" / "quept_native_abc.so"
    assert seeded.read_text() == "prebuilt"
    seeded.write_text("rebuilt")
    run()
    assert seeded.read_text() == "rebuilt"


def test_native_kernels_compiled_in_the_build_stage_and_only_the_library_shipped() -> None:
    """The compiler is installed and used in the build stage; the runtime stage copies the built
    kernels and installs nothing (no apt-get), so the image serves natively with no compiler."""
    _, build, runtime = stages()
    build_args = dict(a.split("=", 1) for op, a in build if op == "ARG" and "=" in a)
    assert build_args["NATIVE_KERNELS"] == "1", "native kernels by default"
    build_runs = " ".join(r for op, r in build if op == "RUN")
    assert "apt-get install" in build_runs and "g++" in build_runs
    assert "python -m quept.kernels.native" in build_runs
    assert "! -name '*.so' -delete" in build_runs, "object files and build scripts stay behind"
    runtime_runs = " ".join(r for op, r in runtime if op == "RUN")
    assert "apt-get" not in runtime_runs and "g++" not in runtime_runs
    assert "find_compiler() is None" in runtime_runs, "the runtime stage checks that it has no compiler"
    copies = [c.split() for op, c in runtime if op == "COPY" and c.startswith("--from=build")]
    assert ["--from=build", "/opt/quept/cache", "/opt/quept/cache"] in copies
    entry = (DEPLOY / "entrypoint.sh").read_text()
    assert "/opt/quept/cache/native" in entry, "the entrypoint seeds the cache from the shipped kernels"
