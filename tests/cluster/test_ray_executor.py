"""KILN_EXECUTOR=ray on a real local Ray cluster (raylet processes via ray.cluster_utils, on 127.0.0.1): a
head with no CPUs, one plain node and two nodes offering the `calibration` resource. The tiny
Qualcomm recipe's calibration stage lands on a labelled node, the other stages on the plain one; killing that node mid-stage makes
Ray run it again on the other labelled node; the bundle is byte-identical to a local build, and
every record names the Ray node that built it."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import psutil
import pytest
from conftest import tiny_htp_recipe, wait_for

from pipeline.engine.store import Store
from tests.s3_server import CREDENTIALS

ray_cluster_utils = pytest.importorskip("ray.cluster_utils", reason="the ray extra (setup.sh installs it)")

# one worker: the cluster is the module's, the local reference build's entries are the session's
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("htp_store")]
# a dead node noticed within ~2 s (defaults: 20-70 s)
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                      "health_check_failure_threshold": 2, "health_check_timeout_ms": 1000}


# every Ray process on 127.0.0.1 (Ray otherwise binds the host's address, and rewrites a 127.0.0.1
# RAY_ADDRESS to it): kept set while the module runs, so the doit processes the tests start (the
# drivers) resolve the cluster the same way
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
ON_LOOPBACK = {"node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    saved_loopback = {k: os.environ.get(k) for k in LOOPBACK}
    os.environ.update(LOOPBACK)
    # the nodes' own stores (KILN_RAY_STORE=remote): one directory, as nodes on one disk would share
    # and the test S3 server's credentials, which a real node would have from its role or profile
    node_env = {"KILN_NODE_STORE": str(tmp_path_factory.mktemp("node_store")), **CREDENTIALS}
    saved = {k: os.environ.get(k) for k in node_env}
    os.environ.update(node_env)
    c = ray_cluster_utils.Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECKS, **ON_LOOPBACK})
    plain = c.add_node(num_cpus=2, **ON_LOOPBACK)
    labelled = [c.add_node(num_cpus=1, resources={"calibration": 1}, **ON_LOOPBACK) for _ in range(2)]
    c.wait_for_nodes()
    restore(saved)
    yield c, plain, labelled
    c.shutdown()
    restore(saved_loopback)


def restore(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v


def raylet_of(pid: int, nodes) -> object | None:
    """The cluster node whose raylet `pid` descends from."""
    raylets = {info.process.pid: n for n in nodes for info in n.all_processes.get("raylet", [])}
    for parent in psutil.Process(pid).parents():
        if parent.pid in raylets:
            return raylets[parent.pid]
    return None


def quantize_child(store: Path) -> int | None:
    """The pid of the running qnn.quantize stage process (its job file is in its scratch)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "pipeline.engine.run_stage" in cmd and str(store) in cmd[-1]:
            try:
                if json.loads(Path(cmd[-1]).read_text())["stage"] == "qnn.quantize":
                    return proc.info["pid"]
            except (OSError, ValueError, KeyError):
                pass
    return None


@pytest.mark.slow
def test_calibration_lands_on_a_labelled_node_survives_losing_it_and_builds_the_local_bytes(
        cluster, tiny_htp_project, tmp_path):
    c, plain, labelled = cluster
    p = tiny_htp_project
    p.write("rq.yaml", tiny_htp_recipe())
    local = p.doit("recipe=rq").stdout  # the reference, in the session's shared store
    assert "kiln: bundle ready" in local
    want = hashlib.sha256((p.artifacts / "rq" / "bundle" / "rq.tar.gz").read_bytes()).hexdigest()

    # the same recipe from nothing, every stage a Ray task
    p.shared_store = tmp_path / "ray_store"
    artifacts = tmp_path / "ray_artifacts"
    artifacts.mkdir()
    proc = p.popen_doit("recipe=rq", KILN_EXECUTOR="ray", RAY_ADDRESS=c.address, KILN_ARTIFACTS=str(artifacts))
    pid = None

    def quantize_started() -> bool:
        nonlocal pid
        assert proc.poll() is None, proc.stdout.read()
        pid = quantize_child(p.store)
        return pid is not None

    wait_for(quantize_started, 600)
    first = raylet_of(pid, labelled)
    assert first in labelled, "qnn.quantize started on a node without the calibration resource"
    time.sleep(2)  # mid-stage
    c.remove_node(first, allow_graceful=False)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out

    survivor = next(n for n in labelled if n is not first)
    store = Store(p.store)
    records = {r["stage"]: r for r in (store.record(k) for k in store.actions())}
    assert records["qnn.quantize"]["ray_node"] == survivor.node_id
    # the others ran on the node without the calibration resource (kept free for calibration)
    assert {r["ray_node"] for s, r in records.items() if s != "qnn.quantize"} == {plain.node_id}
    assert set(re.findall(r"kiln: rq:(\S+): built ", out)) == set(records)
    got = hashlib.sha256((artifacts / "rq" / "bundle" / "rq.tar.gz").read_bytes()).hexdigest()
    assert got == want, "the Ray build's bundle differs from the local one"
    # the killed attempt published nothing: one record per stage, and `verify` finds every output intact
    assert p.doit("verify", "recipe=rq", KILN_ARTIFACTS=str(artifacts)).returncode == 0

    # a second run is all hits: no Ray task at all
    again = p.doit("recipe=rq", KILN_EXECUTOR="ray", RAY_ADDRESS=c.address, KILN_ARTIFACTS=str(artifacts)).stdout
    assert ": built" not in again


def test_a_stage_no_node_can_take_fails_at_once_naming_the_resource(cluster, tiny_project):
    c, _, _ = cluster
    proc = tiny_project.doit("recipe=tiny", check=False, KILN_EXECUTOR="ray", RAY_ADDRESS=c.address,
                             KILN_RAY_RESOURCES='{"model": {"qairt-sdk": 1}}')
    assert proc.returncode != 0
    assert "no live node of the Ray cluster offers CPU=1, qairt-sdk=1" in proc.stdout + proc.stderr


def test_the_tiny_recipe_on_ray_gives_the_local_bytes_and_hits_stay_on_the_driver(cluster, tiny_project, tmp_path):
    c, plain, labelled = cluster
    local = tiny_project.doit("recipe=tiny").stdout
    assert set(re.findall(r"kiln: tiny:(\S+): built ", local)) == {"model", "bundle"}
    tarball = tiny_project.artifacts / "tiny" / "bundle" / "tiny.tar.gz"
    want = tarball.read_bytes()
    artifacts = tmp_path / "ray_artifacts"
    artifacts.mkdir()
    env = {"KILN_EXECUTOR": "ray", "RAY_ADDRESS": c.address, "KILN_ARTIFACTS": str(artifacts),
           "KILN_STORE": str(tmp_path / "ray_store")}
    out = tiny_project.doit("recipe=tiny", **env).stdout
    assert set(re.findall(r"kiln: tiny:(\S+): built ", out)) == {"model", "bundle"}
    assert (artifacts / "tiny" / "bundle" / "tiny.tar.gz").read_bytes() == want
    store = Store(tmp_path / "ray_store")
    assert {store.record(k)["ray_node"] for k in store.actions()} == {plain.node_id}  # calibration nodes kept free
    # the stage's own output came back through Ray's log streaming
    assert "adding model as" in out or "bundle:" in out
    again = tiny_project.doit("recipe=tiny", **env).stdout
    assert ": built" not in again and "-- tiny:bundle" in again


def test_nodes_without_the_drivers_store_go_through_the_bucket(cluster, tiny_project, tmp_path, s3_server, bucket_url):
    """KILN_RAY_STORE=remote: a node pulls the inputs it lacks from the bucket, builds into its own
    store and pushes; the driver pulls the entry. Same bundle bytes as a local build."""
    c, _, _ = cluster
    tiny_project.doit("recipe=tiny")
    want = (tiny_project.artifacts / "tiny" / "bundle" / "tiny.tar.gz").read_bytes()
    artifacts = tmp_path / "ray_artifacts"
    artifacts.mkdir()
    env = {"KILN_EXECUTOR": "ray", "RAY_ADDRESS": c.address, "KILN_RAY_STORE": "remote",
           "KILN_ARTIFACTS": str(artifacts), "KILN_STORE": str(tmp_path / "driver_store"), **s3_server.env(bucket_url)}
    out = tiny_project.doit("recipe=tiny", **env).stdout
    assert set(re.findall(r"kiln: tiny:(\S+): built ", out)) == {"model", "bundle"}
    assert "pushed to" not in out  # the nodes pushed; the driver only pulled
    assert (artifacts / "tiny" / "bundle" / "tiny.tar.gz").read_bytes() == want
    store = Store(tmp_path / "driver_store")
    assert {store.record(k)["pulled_from"] for k in store.actions()} == {bucket_url}
    assert all("ray_node" in store.record(k) for k in store.actions())
    # without a bucket the mode is refused before anything runs
    refused = tiny_project.doit("recipe=tiny", check=False, KILN_EXECUTOR="ray", RAY_ADDRESS=c.address,
                                KILN_RAY_STORE="remote")
    assert refused.returncode != 0 and "none is configured" in refused.stdout + refused.stderr


def test_the_cluster_listens_on_loopback_only(cluster):
    c, plain, labelled = cluster
    pids = {info.process.pid for n in [c.head_node, plain, *labelled] for infos in n.all_processes.values()
            for info in infos if info.process is not None}
    listening = {(p, conn.laddr.ip) for p in pids if psutil.pid_exists(p)
                 for conn in psutil.Process(p).net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN}
    assert listening, "no Ray process found listening"
    assert {ip for _, ip in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
