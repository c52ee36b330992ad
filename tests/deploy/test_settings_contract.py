"""The QUEPT_* variables the deployment files set are settings the server really reads."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

from tests.deploy.conftest import SERVE_ENV


def _server_env_names() -> set[str]:
    pydantic_settings = pytest.importorskip("pydantic_settings")
    server = importlib.import_module("quept.server")
    names: set[str] = set()
    for info in pkgutil.iter_modules(server.__path__, "quept.server."):
        try:
            mod = importlib.import_module(info.name)
        except ImportError:
            continue
        for obj in vars(mod).values():
            if (isinstance(obj, type) and issubclass(obj, pydantic_settings.BaseSettings)
                    and obj is not pydantic_settings.BaseSettings):
                prefix = (obj.model_config.get("env_prefix") or "").upper()
                if prefix == "QUEPT_":
                    names |= {prefix + f.upper() for f in obj.model_fields}
    if not names:
        pytest.skip("the server has no QUEPT_ settings class yet")
    return names


def test_deploy_env_names_are_server_settings() -> None:
    names = _server_env_names()
    assert SERVE_ENV <= names, f"deploy files use settings the server lacks: {sorted(SERVE_ENV - names)}"
