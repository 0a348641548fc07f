"""Stages that miss, run as Ray tasks (KILN_EXECUTOR=ray, RAY_ADDRESS).

doit stays the planner and the only writer of its database: the driver settles each stage
against the store and the remote tier as always (a hit never leaves it), holds the key's lock,
and only a miss becomes a Ray task. The task runs the stage exactly as the local executor does
(`run_and_publish`: a child process, its output teed to the log and to stdout, which Ray streams
to the driver's console) on a node that offers the stage's resources: CPUs, its declared peak
memory, and the custom resources configured for it (`[tool.kiln.ray].resources`, e.g.
{"calibration": 1} for qnn.quantize: which kinds of node a cluster has is deployment, not code); a stage
that needs none of them prefers the nodes that offer none, keeping those for their stages. Where inputs
come from and the output goes (KILN_RAY_STORE): `shared`, the store is shared storage every node
mounts at the same path; `remote`, each node keeps a store of its own (KILN_NODE_STORE, default
~/.cache/kiln/store), pulls the inputs it lacks from the remote tier (each checked against its
manifest), publishes there and pushes, and the driver pulls the entry. Either way only the
output digest and the node id come back through Ray, nothing large.

A node lost mid-stage: Ray runs the task again elsewhere (its scratch dies with it; the lock is
the driver's). A stage failed by a known-flaky tool (`ToolFlaked`) comes back as StageFlaked and
the runner's retry loop runs it again, as it does locally. The child process gets the driver's
thread settings, not Ray's per-task OMP_NUM_THREADS: thread counts change float
reductions, and a build must give the same bytes wherever it runs.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError, StageFailed

if TYPE_CHECKING:
    from pipeline.engine.plan import StageSpec
    from pipeline.engine.settings import Settings
    from pipeline.engine.store import Store

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCH_NUM_THREADS")
NODE_FAILURE_RETRIES = 3  # a task whose node died is run again on another, this many times


def run_on_ray(spec: StageSpec, store: Store, settings: Settings) -> str:
    """Run the stage as a Ray task; return its output digest, published in `store` (and, with
    KILN_RAY_STORE=remote, in the remote tier already)."""
    import ray

    _connect(settings)
    resources = settings.node_resources(spec.stage)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    _check_cluster_offers(spec, resources, nodes)
    threads = {k: os.environ.get(k) for k in THREAD_VARS}
    task = ray.remote(_run_stage).options(
        name=spec.task_name, num_cpus=1, memory=spec.memory or None, resources=resources or None,
        max_retries=NODE_FAILURE_RETRIES, retry_exceptions=False, **_placement(resources, settings, nodes))
    try:
        result = ray.get(task.remote(spec, str(store.root), settings, threads))
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, StageFailed):  # StageFlaked too: the runner's retry loop decides
            raise cause from None
        if isinstance(cause, KilnError):
            raise StageFailed(f"{spec.task_name} (on Ray): {cause}") from None
        last = [line for line in str(e).splitlines() if line.strip()][-1:]
        raise StageFailed(f"{spec.task_name}: the Ray task failed: {''.join(last)[:300]}") from None
    except ray.exceptions.RayError as e:  # the node died more often than Ray retries, the cluster went
        raise StageFailed(f"{spec.task_name}: Ray could not run it: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from None
    if settings.ray_store == "remote":
        return _fetch(spec, store, settings, result["digest"])
    return result["digest"]


def _run_stage(spec: StageSpec, store_root: str, settings: Settings, threads: dict[str, str | None]) -> dict[str, Any]:
    """The Ray task: the local executor's run, on this node, recording which node it was."""
    import ray

    from pipeline.engine.runner import run_and_publish
    from pipeline.engine.store import Store

    for name, value in threads.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    node = ray.get_runtime_context().get_node_id()
    if settings.ray_store == "shared":
        digest = run_and_publish(spec, Store(Path(store_root)), settings, extra_record={"ray_node": node})
        return {"digest": digest, "node": node}
    tier = settings.remote_tier()
    assert tier is not None and spec.inputs is not None  # settings refuse ray_store=remote without one
    local = Store(Path(os.environ.get("KILN_NODE_STORE") or Path.home() / ".cache" / "kiln" / "store"))
    for digest in spec.inputs.values():
        tier.pull_output(local, digest)
    lock = local.lock(spec.key)  # another driver's task on this node may build the same key
    lock.acquire()
    try:
        digest = local.output_of(spec.key) or run_and_publish(spec, local, settings, extra_record={"ray_node": node})
        tier.push(local, spec.key)
    finally:
        lock.release()
    return {"digest": digest, "node": node}


def _fetch(spec: StageSpec, store: Store, settings: Settings, digest: str) -> str:
    """The entry a node pushed, pulled into the driver's store."""
    tier = settings.remote_tier()
    assert tier is not None
    pulled = tier.pull(store, spec.key)
    if pulled is None or pulled[0] != digest:
        raise StageFailed(f"{spec.task_name}: the Ray node built output {digest[:16]}…, but {tier.url} does not hold "
                          "that entry for its key")
    return digest


def _connect(settings: Settings) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=settings.ray_address, namespace="kiln", log_to_driver=True, logging_level="WARNING",
                 configure_logging=True, runtime_env={"env_vars": {"PYTHONPATH": str(settings.root)}})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise StageFailed(f"Ray cluster {settings.ray_address}: cannot connect ({str(e).splitlines()[0][:200]})") from None


_TURN = itertools.count()  # plain nodes are taken in turn


def _placement(resources: dict[str, float], settings: Settings, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """A stage that asks for no custom resource prefers the live nodes that offer none of the ones
    Kiln routes stages by (`calibration` nodes are kept for calibration): soft affinity to one of
    them, so it still runs elsewhere when none is left. Ray alone would pack it anywhere."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    routed = {name for _, wanted in settings.ray_resources for name, _ in wanted}
    if resources or not routed:
        return {}
    plain = sorted(n["NodeID"] for n in nodes if n["Resources"].get("CPU", 0) >= 1 and not routed & set(n["Resources"]))
    if not plain:
        return {}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=plain[next(_TURN) % len(plain)], soft=True)}


def _check_cluster_offers(spec: StageSpec, resources: dict[str, float], nodes: list[dict[str, Any]]) -> None:
    """Fail now, naming what is missing, rather than wait forever for a node that does not exist."""
    offers = [n["Resources"] for n in nodes]
    fits = [r for r in offers if r.get("CPU", 0) >= 1 and all(r.get(k, 0) >= v for k, v in resources.items())]
    if not fits:
        want = ", ".join(f"{k}={v:g}" for k, v in {"CPU": 1, **resources}.items())
        raise StageFailed(f"{spec.task_name}: no live node of the Ray cluster offers {want} (start one with "
                          f"`ray start --address=... --resources='{{...}}'`, or change [tool.kiln.ray].resources)")
