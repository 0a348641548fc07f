"""`doit` with a remote tier (a real S3 endpoint on 127.0.0.1): a second checkout with an empty
store pulls every stage; an unreachable remote is a warning or, when required, an error."""
from __future__ import annotations

import hashlib
import re
import shutil

from conftest import new_project

from pipeline.engine.store import Store
from tests.s3_server import CREDENTIALS

STAGES = {"model", "bundle"}


def stages_with(word: str, out: str) -> set[str]:
    return set(re.findall(rf"kiln: tiny:(\S+): {word}", out))


def tarball_sha(project) -> str:
    return hashlib.sha256((project.artifacts / "tiny" / "bundle" / "tiny.tar.gz").read_bytes()).hexdigest()


def test_a_second_checkout_with_an_empty_store_pulls_every_stage(tiny_project, tmp_path, s3_server, bucket_url):
    env = s3_server.env(bucket_url)
    first = tiny_project.doit("recipe=tiny", **env, KILN_HOST_ID="builder-a").stdout
    assert stages_with("built", first) == STAGES
    assert stages_with("pushed to " + re.escape(bucket_url), first) == STAGES

    second = new_project(tmp_path / "second")
    for name in ("_tiny.yaml", "tiny.yaml"):
        shutil.copy(tiny_project.recipes / name, second.recipes)
    out = second.doit("recipe=tiny", **env, KILN_HOST_ID="builder-b").stdout
    assert stages_with("remote hit", out) == STAGES and stages_with("pulled", out) == STAGES
    assert "building key" not in out
    assert tarball_sha(second) == tarball_sha(tiny_project)
    assert ": built" not in second.doit("recipe=tiny", **env).stdout  # now a local hit
    # the records say where they came from and who built them; no credential is in any of it
    store = Store(second.store)
    records = [store.record(k) for k in store.actions()]
    assert {r["pulled_from"] for r in records} == {bucket_url} and {r["host"] for r in records} == {"builder-a"}
    for root in (tiny_project.store, second.store):
        for path in root.rglob("*"):
            if path.is_file():
                assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"].encode() not in path.read_bytes(), path
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in first + out

    # the remote's own checks, from either checkout
    verified = second.doit("verify", "--remote", "recipe=tiny", **env).stdout
    assert re.search(rf"verify --remote: 2 records, \d+ blobs \(.+ MB\) re-read from {re.escape(bucket_url)}; "
                     r"0 record\(s\) deleted", verified), verified
    kept = second.doit("gc", "--remote", "--max-age-days", "0", "--dry-run", "recipe=tiny", **env).stdout
    assert "gc --remote: would delete 0 record(s), 0 unreferenced manifest(s)/blob(s)" in kept  # tiny plans both
    refused = second.doit("gc", "--remote", "--budget-gb", "1", "recipe=tiny", check=False, **env)
    assert refused.returncode != 0 and "--budget-gb applies to the local store only" in refused.stdout + refused.stderr


def test_an_unreachable_optional_remote_warns_once_and_the_build_goes_on(tiny_project):
    proc = tiny_project.doit("recipe=tiny", KILN_REMOTE="s3://kiln-down/team", KILN_REMOTE_ENDPOINT="http://127.0.0.1:9",
                             **{k: v for k, v in CREDENTIALS.items()})
    assert stages_with("built", proc.stdout) == STAGES
    warnings = re.findall(r"kiln: warning: remote store s3://kiln-down/team: connection refused; building locally",
                          proc.stdout)
    assert len(warnings) == 1, proc.stdout


def test_an_unreachable_required_remote_fails_the_build_naming_it(tiny_project):
    proc = tiny_project.doit("recipe=tiny", check=False, KILN_REMOTE="s3://kiln-down/team",
                             KILN_REMOTE_ENDPOINT="http://127.0.0.1:9", KILN_REMOTE_REQUIRED="1", **CREDENTIALS)
    assert proc.returncode != 0
    assert "remote store s3://kiln-down/team: connection refused (KILN_REMOTE_REQUIRED=1)" in proc.stdout + proc.stderr
    assert not list(Store(tiny_project.store).actions())


def test_a_bad_remote_setting_is_refused_before_anything_runs(tiny_project):
    for env, message in (({"KILN_REMOTE": "s3://UPPER/x"}, "is not s3://bucket"),
                         ({"KILN_REMOTE": "s3://kiln-x/p", "KILN_REMOTE_REQUIRED": "maybe"}, "is not 0/1/true/false")):
        proc = tiny_project.doit("recipe=tiny", check=False, **env)
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr
        assert not (tiny_project.store / "actions").exists()
