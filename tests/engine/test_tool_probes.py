"""Tool fingerprints are remembered on disk under what they depend on, so a no-op `doit` neither
spawns `--version` probes nor scans every installed distribution; a change there asks again."""
from __future__ import annotations

import json
import os
import sys
from importlib import metadata

import pytest

from pipeline.engine import tools
from pipeline.engine.errors import ToolMissing


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site-packages directory of its own on sys.path, and a probes file of its own."""
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    monkeypatch.setattr(tools, "_probes", lambda: tmp_path / ".probes.json")
    tools._import_path_signature.cache_clear()
    yield site
    tools._import_path_signature.cache_clear()


def install(site, version: str) -> None:
    for old in site.glob("kiln_fake_pkg-*.dist-info"):
        (old / "METADATA").unlink()
        old.rmdir()
    info = site / f"kiln_fake_pkg-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kiln-fake-pkg\nVersion: {version}\n")
    st = os.stat(site)  # two changes within one mtime tick must still count as a change
    os.utime(site, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_a_package_version_is_remembered_until_site_packages_changes(site, monkeypatch):
    install(site, "1.0")
    assert tools.fingerprint.__wrapped__("kiln-fake-pkg") == "1.0"
    calls = []
    with monkeypatch.context() as m:
        m.setattr(metadata, "version", lambda name: calls.append(name) or "scanned")
        assert tools.fingerprint.__wrapped__("kiln-fake-pkg") == "1.0" and calls == []  # no scan
    install(site, "2.0")  # an upgrade
    tools._import_path_signature.cache_clear()  # a new process
    assert tools.fingerprint.__wrapped__("kiln-fake-pkg") == "2.0"


def test_a_missing_package_is_an_error_and_not_remembered(site):
    with pytest.raises(ToolMissing, match="'kiln-fake-pkg' is not installed"):
        tools.fingerprint.__wrapped__("kiln-fake-pkg")
    install(site, "1.0")
    tools._import_path_signature.cache_clear()
    assert tools.fingerprint.__wrapped__("kiln-fake-pkg") == "1.0"


def test_the_probes_file_stays_bounded(site, tmp_path):
    for i in range(tools.PROBES_KEPT + 40):
        tools._remembered(f"sig-{i}", lambda i=i: str(i))
    known = json.loads((tmp_path / ".probes.json").read_text())
    assert len(known) == tools.PROBES_KEPT
    assert f"sig-{tools.PROBES_KEPT + 39}" in known and "sig-0" not in known
