"""Stages that miss, run as Ray tasks (KILN_EXECUTOR=ray, RAY_ADDRESS).

doit stays the planner and the only writer of its database: the driver settles each stage
against the store and the remote tier as always (a hit never leaves it), holds the key's lock,
and only a miss becomes a Ray task. The task runs the stage exactly as the local executor does
(`run_and_publish`: a child process, its output teed to the log and to stdout, which Ray streams
to the driver's console) on a node that offers the stage's resources: CPUs, its declared peak
memory, and custom resources (`Stage.node_resources`, e.g. {"calibration": 1}). Inputs are read
from and the output published to the store, which is shared storage every node mounts at the
same path; only the output digest and the node id come back through Ray, nothing large.

A node lost mid-stage: Ray runs the task again elsewhere (its scratch dies with it; the lock is
the driver's). A stage that fails is tried again `Stage.retries` times. The child process gets the
driver's thread settings, not Ray's per-task OMP_NUM_THREADS: thread counts change float
reductions, and a build must give the same bytes wherever it runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import StageFailed

if TYPE_CHECKING:
    from pipeline.engine.plan import StageSpec
    from pipeline.engine.settings import Settings
    from pipeline.engine.store import Store

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCH_NUM_THREADS")
NODE_FAILURE_RETRIES = 3  # a task whose node died is run again on another, this many times


def run_on_ray(spec: StageSpec, store: Store, settings: Settings) -> str:
    """Run the stage as a Ray task; return its output digest (published in the shared store)."""
    import ray

    _connect(settings)
    resources = settings.node_resources(spec.stage, spec.node_resources)
    _check_cluster_offers(spec, resources)
    threads = {k: os.environ.get(k) for k in THREAD_VARS}
    task = ray.remote(_run_stage).options(
        name=spec.task_name, num_cpus=1, memory=spec.memory or None, resources=resources or None,
        max_retries=NODE_FAILURE_RETRIES, retry_exceptions=False)
    for attempt in range(spec.retries + 1):
        try:
            result = ray.get(task.remote(spec, str(store.root), settings, threads))
            return result["digest"]
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), StageFailed) else None
            if cause is None:
                raise StageFailed(f"{spec.task_name}: the Ray task failed: {str(e).splitlines()[0][:300]}") from None
            if attempt == spec.retries:
                raise cause from None
            print(f"kiln: {spec.task_name}: failed on attempt {attempt + 1} of {spec.retries + 1}; trying again",
                  flush=True)
        except ray.exceptions.RayError as e:  # the node died more often than Ray retries, the cluster went
            raise StageFailed(f"{spec.task_name}: Ray could not run it: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]}") from None
    raise AssertionError("unreachable")


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
    digest = run_and_publish(spec, Store(Path(store_root)), settings, extra_record={"ray_node": node})
    return {"digest": digest, "node": node}


def _connect(settings: Settings) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=settings.ray_address, namespace="kiln", log_to_driver=True, logging_level="WARNING",
                 configure_logging=True, runtime_env={"env_vars": {"PYTHONPATH": str(settings.root)}})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise StageFailed(f"Ray cluster {settings.ray_address}: cannot connect ({str(e).splitlines()[0][:200]})") from None


def _check_cluster_offers(spec: StageSpec, resources: dict[str, float]) -> None:
    """Fail now, naming what is missing, rather than wait forever for a node that does not exist."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [r for r in nodes if r.get("CPU", 0) >= 1 and all(r.get(k, 0) >= v for k, v in resources.items())]
    if not fits:
        want = ", ".join(f"{k}={v:g}" for k, v in {"CPU": 1, **resources}.items())
        raise StageFailed(f"{spec.task_name}: no live node of the Ray cluster offers {want} (start one with "
                          f"`ray start --address=... --resources='{{...}}'`, or change [tool.kiln.ray].resources)")
