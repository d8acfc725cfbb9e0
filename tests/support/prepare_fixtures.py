"""Fixtures shared by the prepare tests (a plugin of tests/conftest.py): ``offline`` (no connection but to
127.0.0.1; a test module asks for it with ``pytestmark = pytest.mark.usefixtures("offline")``), the synthetic
archives ``syn`` (built once per module) served over HTTP by ``server``, and ``manifest_file``."""

from __future__ import annotations

from pathlib import Path

import pytest
from http_server import FileServer, guard_network
from synthetic_archives import make_archives, write_manifest


@pytest.fixture
def offline(monkeypatch):
    guard_network(monkeypatch)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_archives(tmp_path_factory.mktemp("archives"))


@pytest.fixture
def server(syn):
    with FileServer({f"/{n}": p for n, p in syn.archives.items()}) as srv:
        yield srv


def manifest_file(tmp_path: Path, syn, server, **override) -> Path:
    return write_manifest(tmp_path / "manifest.json", syn, server.url if server else None, **override)
